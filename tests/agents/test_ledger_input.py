"""Bad and misplaced input at a ledger partition: each bad record is one dead letter with
its reason and source, a record on another partition than its key's is re-sent there
(in the batch's transaction), and the partition goes on with the next record."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from memory_kafka import MemoryBroker, Worker, key_on, now_ms, settings

from agents.ledger import POSITIONS_KEY, REPLY_HEADER
from pipeline import metrics
from schemas.codec import AvroCodec
from tables.stock import StoredStock, stock_key

CFG = settings()
P, Q = 0, 3
SKU = key_on(P, CFG)
OTHER = key_on(P, CFG, "OTHER")
CODEC = AvroCodec()


def run(scenario: Any) -> Any:
    return asyncio.run(scenario)


def restock(**fields: Any) -> bytes:
    return CODEC.encode(
        "RestockReceived",
        {"event_id": "bad-1", "sku": SKU, "qty": 1, "occurred_at": now_ms(), **fields},
    )


BODY = restock()[10:]  # a RestockReceived without its single-object header

# reason -> (topic, key, value): one of each kind of input the ledger refuses
BAD: dict[str, tuple[str, bytes | None, Callable[[], bytes]]] = {
    "undecodable": (CFG.restocks_topic, SKU.encode(), lambda: b"not avro at all"),
    "truncated": (CFG.restocks_topic, SKU.encode(), lambda: b"\xc3\x01\x00\x01"),
    "unknown_schema": (CFG.restocks_topic, SKU.encode(), lambda: b"\xc3\x01" + b"\0" * 8 + BODY),
    "qty_not_positive": (CFG.restocks_topic, SKU.encode(), lambda: restock(qty=0)),
    "qty_too_large": (CFG.restocks_topic, SKU.encode(), lambda: restock(qty=1001)),
    "invalid_occurred_at": (CFG.restocks_topic, SKU.encode(), lambda: restock(occurred_at=-5)),
    "empty_sku": (CFG.restocks_topic, b"", lambda: restock(sku="")),
    "sku_too_long": (CFG.restocks_topic, b"L" * 65, lambda: restock(sku="L" * 65)),
    "wrong_topic": (CFG.orders_topic, SKU.encode(), lambda: restock()),
    "key_mismatch": (CFG.restocks_topic, OTHER.encode(), lambda: restock()),
    "unknown_reservation": (
        CFG.orders_topic,
        SKU.encode(),
        lambda: CODEC.encode(
            "CommitReservation",
            {"event_id": "c-1", "order_id": "ghost", "sku": SKU, "occurred_at": now_ms()},
        ),
    ),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_input_is_one_dead_letter_and_the_partition_goes_on(
    tmp_path: Path, reason: str
) -> None:
    topic, key, value = BAD[reason][0], BAD[reason][1], BAD[reason][2]()

    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        before = metrics.DEAD_LETTERS.labels(reason)._value.get()
        _, part, offset = w.send_raw(topic, key, value, partition=P)
        good = w.send("RestockReceived", {"sku": SKU, "qty": 2})
        await w.settle()

        letters = w.dead_letters()
        assert [d["reason"] for d in letters] == [reason]
        d = letters[0]
        assert (d["source_topic"], d["source_partition"], d["source_offset"]) == (
            topic,
            part,
            offset,
        )
        assert (d["key"], d["value"]) == (key, value)
        assert metrics.DEAD_LETTERS.labels(reason)._value.get() == before + 1
        # the partition went on: the next record is applied, the bad one's offset passed
        stock = w.stock(SKU)
        assert stock.record.on_hand == 2 and stock.watermarks[CFG.restocks_topic] == good[2]
        assert w.ledger(P).expected[topic] == offset + 1 + (topic == good[0])
        await w.stop()

    run(scenario())


def test_a_batch_of_bad_input_only_commits_its_dead_letters_with_the_positions(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        w.send_raw(CFG.restocks_topic, SKU.encode(), b"junk", partition=P)
        w.send_raw(CFG.returns_topic, SKU.encode(), b"", partition=P)  # an empty value
        await w.settle()
        assert len(broker.transactions) == 1
        outs = broker.transactions[0]
        assert sorted(o.topic for o in outs) == sorted(
            [CFG.dead_letters_topic] * 2 + [w.ledger(P).changelog]
        )
        assert [o.key for o in outs if o.topic == w.ledger(P).changelog] == [POSITIONS_KEY]
        assert sorted(d["reason"] for d in w.dead_letters()) == ["undecodable", "undecodable"]
        assert w.stock(SKU) is None
        await w.stop()

    run(scenario())


def test_a_dead_letter_of_a_record_at_the_size_limit_stays_within_it(tmp_path: Path) -> None:
    cfg = settings(max_record_bytes=20_000)

    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, cfg, tmp_path)
        await w.assign([P])
        w.send_raw(cfg.restocks_topic, SKU.encode(), b"x" * 19_990, partition=P)
        await w.settle()
        [out] = [o for o in broker.transactions[0] if o.topic == cfg.dead_letters_topic]
        assert out.value is not None and len(out.value) <= cfg.max_record_bytes
        d = w.codec.decode(out.value)[1]
        assert d["reason"] == "undecodable" and "value truncated from 19990" in d["detail"]
        await w.stop()

    run(scenario())


def test_a_batch_too_large_for_one_changelog_record_is_cut_and_the_rest_follows(
    tmp_path: Path,
) -> None:
    # a SKU's changelog record carries all its effects of the batch: the ledger cuts the
    # batch before it would pass the broker's record size, never dead-letters good input
    cfg = settings(max_record_bytes=20_000)
    sku = key_on(P, cfg, "HOT")

    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, cfg, tmp_path)
        await w.assign([P])
        for _ in range(30):
            w.send("RestockReceived", {"sku": sku, "qty": 1, "reference": "r" * 200})
        await w.settle()
        assert len(broker.transactions) > 1
        assert w.dead_letters() == []
        sizes = [len(o.value) for outs in broker.transactions for o in outs if o.value]
        assert max(sizes) <= cfg.max_record_bytes
        stock = w.stock(sku)
        assert (stock.record.on_hand, stock.record.version) == (30, 30)
        await w.stop()

    run(scenario())


def test_a_record_on_another_partition_than_its_key_is_resent_there_and_applied_once(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P, Q])
        before = metrics.REROUTED.labels(CFG.orders_topic)._value.get()
        w.send("RestockReceived", {"sku": SKU, "qty": 5})
        reply = [(REPLY_HEADER, b"saga")]
        _, _, offset = w.send(
            "ReserveStock", {"sku": SKU, "order_id": "o1", "qty": 2}, partition=Q, headers=reply
        )
        await w.settle()

        # Q's transaction re-sent it to P (value and headers as they came) and moved on
        [moved] = [o for outs in broker.transactions for o in outs if o.topic == CFG.orders_topic]
        assert (moved.partition, moved.key, moved.headers) == (P, SKU.encode(), reply)
        assert moved.value == broker.records(CFG.orders_topic, Q)[0].value
        assert w.ledger(Q).expected[CFG.orders_topic] == offset + 1
        assert w.ledger(Q).store.get(stock_key(SKU)) is None
        assert metrics.REROUTED.labels(CFG.orders_topic)._value.get() == before + 1
        # ... where it was decided once, with the other records of its key
        stock = w.stock(SKU)
        assert (stock.record.on_hand, stock.record.reserved, stock.record.version) == (5, 2, 2)
        answers = [
            a
            for outs in broker.transactions
            for o in outs
            if o.topic == w.ledger(P).changelog and o.key == stock_key(SKU) and o.value
            for a in StoredStock.from_bytes(o.value).effects.get("ReservationResult", [])
        ]
        assert [(a["order_id"], a["outcome"]) for a in answers] == [("o1", "RESERVED")]
        assert w.dead_letters() == []
        await w.stop()

    run(scenario())


def test_a_misplaced_record_for_a_partition_owned_elsewhere_waits_there(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([Q])  # P belongs to another worker
        w.send("RestockReceived", {"sku": SKU, "qty": 5}, partition=Q)
        await w.settle()
        [waiting] = broker.records(CFG.restocks_topic, P)
        assert waiting.key == SKU.encode()
        assert w.ledger(Q).store.get(stock_key(SKU)) is None
        other = Worker(broker, CFG, tmp_path / "other")
        await other.assign([P])
        await other.settle()
        assert other.stock(SKU).record.on_hand == 5
        await other.stop()
        await w.stop()

    run(scenario())
