"""The ledger's local RocksDB store (pipeline/store.py) and the fetch feed (pipeline/kafka/feed.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import orjson
import rocksdict

from pipeline.kafka.feed import BatchFeed
from pipeline.store import META_KEY, PartitionStore

CL, RES = "app-stock-changelog", "app-reservations-changelog"


def test_a_batch_and_the_changelog_positions_are_written_together_and_survive_a_reopen(tmp_path):
    store = PartitionStore(tmp_path / "p0.db")
    assert store.position(CL) == 0 and store.position(RES) == 0
    store.write([(b"A", b"1"), (b"A\x00r\x00o1", b"r")], {CL: 5, RES: 9})
    store.write([(b"B", b"2")], {CL: 7})
    store.close()
    again = PartitionStore(tmp_path / "p0.db")
    assert (again.position(CL), again.position(RES)) == (7, 9)
    assert again.get(b"A") == b"1" and again.get(b"B") == b"2"
    assert sorted(k for k, _ in again.items()) == [b"A", b"A\x00r\x00o1", b"B"]  # no meta key
    again.close()


def test_records_read_from_a_changelog_are_stored_raw_and_tombstones_delete(tmp_path):
    store = PartitionStore(tmp_path / "p0.db")
    store.write([(b"gone", b"x")], {})
    store.write_raw(CL, [(b"A", b"v1", 10), (b"gone", None, 11), (b"A", b"v2", 12)])
    assert store.get(b"A") == b"v2" and store.get(b"gone") is None
    assert store.position(CL) == 13
    store.close()


def test_a_store_written_before_the_reservations_changelog_reads_its_offset_as_the_stocks(
    tmp_path,
):
    path = tmp_path / "old.db"
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    db = rocksdict.Rdict(str(path), options=opts)
    db[META_KEY] = orjson.dumps({"next": 42})
    db.close()
    store = PartitionStore(path, default_topic=CL)
    assert (store.position(CL), store.position(RES)) == (42, 0)
    store.close()


def _records(*offsets: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(offset=o) for o in offsets]


TP0 = SimpleNamespace(topic="t.orders", partition=0)
TP0R = SimpleNamespace(topic="t.restocks", partition=0)
TP1 = SimpleNamespace(topic="t.orders", partition=1)


def test_the_feed_keeps_each_partition_in_fetch_order_and_splits_to_the_batch_size():
    feed = BatchFeed(["t.orders", "t.restocks"])
    feed.offer(TP0, _records(0, 1, 2), generation=1)
    feed.offer(TP1, _records(0), generation=1)
    feed.offer(TP0R, _records(5, 6), generation=1)
    assert feed.buffered == 6 and feed.pending(0) == 5
    first = feed.take(0, 4)
    assert [(c.tp.topic, [r.offset for r in c.records]) for c in first] == [
        ("t.orders", [0, 1, 2]),
        ("t.restocks", [5]),
    ]
    rest = feed.take(0, 10)
    assert [[r.offset for r in c.records] for c in rest] == [[6]]
    assert feed.pending(0) == 0 and feed.pending(1) == 1


def test_a_reset_drops_what_was_buffered_before_a_rebalance():
    feed = BatchFeed(["t.orders"])
    feed.offer(TP0, _records(0, 1), generation=1)
    feed.offer(TP1, _records(0), generation=1)
    feed.reset([0])
    assert feed.pending(0) == 0 and feed.pending(1) == 1
    feed.reset()
    assert feed.buffered == 0


def test_the_fetch_loop_waits_while_the_feed_is_full():
    async def scenario() -> list[str]:
        feed = BatchFeed(["t.orders"], max_buffered=3)
        feed.offer(TP0, _records(0, 1, 2), generation=1)
        events: list[str] = []

        async def fetch_loop() -> None:
            await feed.wait_for_space()
            events.append("fetched")

        task = asyncio.ensure_future(fetch_loop())
        await asyncio.sleep(0.01)
        events.append("drained")
        feed.take(0, 2)
        await asyncio.wait_for(task, 1)
        return events

    assert asyncio.run(scenario()) == ["drained", "fetched"]


def test_the_drop_failpoint_loses_a_record_once():
    feed = BatchFeed(["t.orders"])
    feed.drop_once({("orders", 0, 1)}, "t.")
    feed.offer(TP0, _records(0, 1, 2), generation=1)
    feed.offer(TP0, _records(1), generation=1)  # fetched again: delivered this time
    assert [[r.offset for r in c.records] for c in feed.take(0, 10)] == [[0, 2], [1]]


def test_store_paths_are_per_partition_under_the_data_dir():
    from pipeline.store import store_path

    assert store_path(Path("/d"), 3) == Path("/d/ledger/stock-3.db")


def test_event_ids_are_kept_apart_scanned_for_expiry_in_steps_and_deleted(tmp_path):
    from tables.stock import event_key

    store = PartitionStore(tmp_path / "p0.db")
    old = [(event_key("r", f"e{i}"), orjson.dumps({"at": 1_000 + i})) for i in range(5)]
    new = [(event_key("s", f"e{i}"), orjson.dumps({"at": 9_000})) for i in range(3)]
    store.write([*old, *new, (b"r", b"stock"), (b"r\x00r\x00o", b"res")], {CL: 1})
    # the scans of SKU and reservation keys never see them (the expiry index, rebuilds)
    assert sorted(k for k, _ in store.items()) == [b"r", b"r\x00r\x00o"]
    assert store.event_count() == 8
    found: list[bytes] = []
    cursor: bytes | None = b"\x00e\x00"
    steps = 0
    while cursor is not None:
        keys, cursor = store.expired_events(cursor, before=5_000, limit=3)
        found += keys
        steps += 1
    assert found == [k for k, _ in old] and steps == 3
    store.write([], {}, deletes=found)
    assert store.event_count() == 3 and store.get(old[0][0]) is None
    assert store.get(b"r") == b"stock"
    store.close()
