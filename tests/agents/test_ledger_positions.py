"""Where a ledger partition resumes and what it trusts: the changelog's end (fresh answers),
its positions record (a new owner), and input offsets that jump or go backwards."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from faust.types import TP
from memory_kafka import MemoryBroker, Worker, key_on, settings

from agents.ledger import POSITIONS_KEY, State
from pipeline import metrics
from tables.stock import StoredStock, stock_key

CFG = settings()
P = 2
SKU = key_on(P, CFG)
RESTOCKS = CFG.restocks_topic


def run(scenario: Any) -> Any:
    return asyncio.run(scenario)


def counter(family: Any, *labels: str) -> float:
    value: float = family.labels(*labels)._value.get()
    return value


def restock(w: Worker, qty: int = 1, **kw: Any) -> tuple[str, int, int]:
    return w.send("RestockReceived", {"sku": SKU, "qty": qty}, **kw)


def test_an_answer_is_fresh_while_the_changelog_ends_where_this_owner_wrote_it(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        ledger = w.ledger(P)
        assert await ledger.fresh() is True  # nothing written by anyone yet
        restock(w, 2)
        await w.settle()
        assert await ledger.fresh() is True
        # another writer (a newer owner) appended: this worker's state may be behind
        other = StoredStock.from_bytes(ledger.store.get(stock_key(SKU)) or b"")
        broker.produce(ledger.changelog, P, stock_key(SKU), other.to_bytes())
        assert await ledger.fresh() is False
        # taking the partition again reads that record: fresh again
        await w.assign([P])
        assert await w.ledger(P).fresh() is True
        await w.stop()

    run(scenario())


def test_no_answer_is_fresh_during_a_rebalance_or_for_an_older_generation(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        w = Worker(MemoryBroker(), CFG, tmp_path)
        await w.assign([P])
        ledger = w.ledger(P)
        w.app.rebalancing = True
        assert await ledger.fresh() is False
        w.app.rebalancing = False
        assert await ledger.fresh() is True
        w.app.consumer_generation_id += 1  # the group moved on; this task is stale
        assert await ledger.fresh() is False
        await w.stop()

    run(scenario())


def test_a_new_owner_restores_the_changelog_and_resumes_at_its_positions_record(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        a = Worker(broker, CFG, tmp_path / "a")
        await a.assign([P], generation=1)
        for qty in (1, 2, 3):
            restock(a, qty)
        await a.settle()
        assert broker.group == {}  # no group offsets were ever committed
        await a.revoke()
        await a.stop()

        b = Worker(broker, CFG, tmp_path / "b")  # an empty data dir
        await b.assign([P], generation=2)
        await b.settle()
        assert b.ledger(P).expected == {CFG.orders_topic: 0, CFG.returns_topic: 0, RESTOCKS: 3}
        assert len(broker.transactions) == 1  # nothing decided again
        assert (b.stock(SKU).record.on_hand, b.stock(SKU).record.version) == (6, 3)
        restock(b, 4)
        await b.settle()
        assert (b.stock(SKU).record.on_hand, b.stock(SKU).record.version) == (10, 4)
        await b.stop()

    run(scenario())


def test_the_group_offset_wins_when_it_is_ahead_of_the_positions_record(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        for qty in (1, 2, 4):
            restock(w, qty)
        broker.group[(RESTOCKS, P)] = 2  # committed by an earlier design's consumer
        await w.assign([P])
        await w.settle()
        assert w.stock(SKU).record.on_hand == 4
        await w.stop()

    run(scenario())


def test_an_input_that_ends_below_the_next_offset_halts_the_partition_at_takeover(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        for _ in range(3):
            restock(w)
        await w.settle()
        written = len(broker.transactions)
        before = counter(metrics.OFFSET_REGRESSIONS, RESTOCKS)
        broker.recreate(RESTOCKS, P)  # deleted and created again: offsets start over
        restock(w, 50)
        await w.assign([P])
        ledger = w.ledger(P)
        assert ledger.state is State.HALTED and "ends at @1" in ledger.halted
        assert counter(metrics.OFFSET_REGRESSIONS, RESTOCKS) == before + 1
        await w.settle()
        assert len(broker.transactions) == written and w.stock(SKU).record.on_hand == 3
        assert await ledger.fresh() is False
        await w.stop()

    run(scenario())


def test_redelivered_offsets_on_a_log_that_went_backwards_halt_a_running_partition(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        for _ in range(3):
            restock(w)
        await w.settle()
        written = len(broker.transactions)
        broker.recreate(RESTOCKS, P)
        restock(w, 50)
        restock(w, 50)
        w.consumer.positions[TP(RESTOCKS, P)] = 0  # offset out of range: reset to earliest
        w.consumer.fetch()
        await w.until(lambda: w.ledger(P).state is State.HALTED, "the partition halts")
        assert len(broker.transactions) == written and w.stock(SKU).record.on_hand == 3
        await w.stop()

    run(scenario())


def test_records_deleted_before_they_were_applied_are_a_counted_gap_and_skipped(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        restock(w, 1)
        await w.settle()
        await w.revoke()
        for qty in (2, 4, 8):  # while nobody owned the partition
            restock(w, qty)
        broker.delete_records(RESTOCKS, P, 3)  # retention ran before anyone read @1, @2
        before = counter(metrics.INPUT_GAPS, RESTOCKS)
        await w.assign([P])
        assert w.ledger(P).expected[RESTOCKS] == 3
        await w.settle()
        assert counter(metrics.INPUT_GAPS, RESTOCKS) == before + 2
        assert w.stock(SKU).record.on_hand == 9
        await w.stop()

    run(scenario())


def test_a_record_lost_on_its_way_is_read_again_before_anything_after_it(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        sent = [restock(w, qty) for qty in (1, 2, 4)]
        w.consumer.fetch(skip={sent[1]})  # the fetch loop moved on past offset 1
        await w.until(lambda: {TP(RESTOCKS, P): 1} in w.consumer.seeks, "a re-read from @1")
        await w.settle()
        stock = w.stock(SKU)
        assert (stock.record.on_hand, stock.record.version) == (7, 3)
        assert stock.watermarks[RESTOCKS] == 2
        # applied in offset order: each version's cause is the record at that offset
        changes = [
            c
            for r in broker.records(w.ledger(P).changelog, P)
            if r.key == stock_key(SKU)
            for c in StoredStock.from_bytes(r.value or b"").effects["StockChanged"]
        ]
        assert [(c["version"], c["on_hand"]) for c in changes] == [(1, 1), (2, 3), (3, 7)]
        await w.stop()

    run(scenario())


def test_offsets_taken_by_transaction_markers_are_no_gap(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        seeks = len(w.consumer.seeks)
        restock(w, 1)
        broker.marker(RESTOCKS, P)  # a transactional producer's commit marker at @1
        restock(w, 2)
        await w.settle()
        assert w.stock(SKU).record.on_hand == 3
        assert len(w.consumer.seeks) == seeks  # no re-read was needed
        assert w.ledger(P).expected[RESTOCKS] == 3
        await w.stop()

    run(scenario())


def test_a_redelivered_batch_is_skipped_and_writes_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        restock(w, 1)
        restock(w, 2)
        await w.settle()
        written = len(broker.transactions)
        before = counter(metrics.REDELIVERED, RESTOCKS)
        w.consumer.positions[TP(RESTOCKS, P)] = 0  # Kafka delivers them again
        await w.settle()
        assert len(broker.transactions) == written
        assert counter(metrics.REDELIVERED, RESTOCKS) == before + 2
        assert (w.stock(SKU).record.on_hand, w.stock(SKU).record.version) == (3, 2)
        positions = w.ledger(P).store.get(POSITIONS_KEY)
        assert positions is not None and b'"%s":2' % RESTOCKS.encode() in positions
        await w.stop()

    run(scenario())


def test_a_lost_last_record_is_read_again_once_the_partition_stalls(tmp_path: Path) -> None:
    # nothing after it reveals the gap: the idle partition asks the broker for its log end
    cfg = settings(ledger_stall_after_s=0.05)

    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, cfg, tmp_path)
        await w.assign([P])
        restock(w, 1)
        lost = restock(w, 2)
        before = counter(metrics.INPUT_STALLS, RESTOCKS)
        w.consumer.fetch(skip={lost})
        await w.until(lambda: {TP(RESTOCKS, P): lost[2]} in w.consumer.seeks, "a re-read")
        assert counter(metrics.INPUT_STALLS, RESTOCKS) == before + 1
        await w.settle()
        assert (w.stock(SKU).record.on_hand, w.stock(SKU).record.version) == (3, 2)
        await w.stop()

    run(scenario())
