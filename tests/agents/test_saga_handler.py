"""The checkout saga's handler (agents/orders.py) event by event: the ledger commands a
PlaceOrder sends, the answers that move it on, what it re-routes, skips and dead-letters."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from memory_kafka import SagaRig, key_on, now_ms, settings

from agents.ledger import REPLY_HEADER
from agents.orders import GRACE_MS
from pipeline import metrics
from pipeline.domain.saga import OrderOutcome, OrderStatus
from pipeline.kafka.partitioning import partition_for
from schemas.codec import AvroCodec

CFG = settings()
CODEC = AvroCodec()
ORDER = key_on(1, CFG, "order")
TTL = 60_000


def run(scenario: Any) -> Any:
    return asyncio.run(scenario)


def place(order: str = ORDER, lines: tuple[tuple[str, int], ...] = (("A", 1), ("B", 2))) -> Any:
    return {
        "order_id": order,
        "lines": [{"sku": s, "qty": q} for s, q in lines],
        "ttl_ms": TTL,
    }


def test_a_placed_order_sends_one_reserve_per_line_to_the_lines_partitions() -> None:
    async def scenario() -> None:
        rig = SagaRig(CFG)
        topic, part, offset = await rig.checkout("PlaceOrder", place())
        commands = rig.take_commands()
        assert [(c.name, c.fields["sku"], c.fields["qty"]) for c in commands] == [
            ("ReserveStock", "A", 1),
            ("ReserveStock", "B", 2),
        ]
        for c in commands:
            assert c.key == c.fields["sku"].encode()
            assert c.partition == partition_for(c.key, CFG.partitions)
            assert c.headers == [(REPLY_HEADER, b"saga")]  # the answer comes back to the saga
            assert c.fields["event_id"] == f"{ORDER}:{c.fields['sku']}:reserve"
            assert c.fields["order_id"] == ORDER and c.fields["ttl_ms"] == TTL + GRACE_MS
        stored = rig.saga(ORDER)
        assert stored.saga.status is OrderStatus.RESERVING
        assert stored.watermarks == {topic: offset}
        assert [k for k, _ in rig.open_sagas.items()] == [ORDER.encode()]
        assert rig.dead_letters() == [] and rig.outputs.order_results.sent == []

    run(scenario())


def test_ledger_answers_move_the_saga_through_reserved_to_committed() -> None:
    async def scenario() -> None:
        rig = SagaRig(CFG)
        await rig.checkout("PlaceOrder", place())
        a, b = rig.take_commands()
        await rig.answer(a, "RESERVED")
        assert rig.saga(ORDER).saga.status is OrderStatus.RESERVING
        await rig.answer(b, "RESERVED")
        stored = rig.saga(ORDER)
        assert stored.saga.status is OrderStatus.RESERVED
        # the answer to the order is stored with the state (the relay publishes it)
        assert [e["outcome"] for e in stored.effects] == [OrderOutcome.ORDER_RESERVED.value]
        assert rig.take_commands() == []

        await rig.checkout("CommitOrder", {"order_id": ORDER})
        commits = rig.take_commands()
        assert [(c.name, c.fields["sku"]) for c in commits] == [
            ("CommitReservation", "A"),
            ("CommitReservation", "B"),
        ]
        assert rig.saga(ORDER).saga.status is OrderStatus.COMMITTING
        for c in commits:
            await rig.answer(c, "COMMITTED")
        stored = rig.saga(ORDER)
        assert stored.saga.status is OrderStatus.COMMITTED
        assert [e["outcome"] for e in stored.effects] == [OrderOutcome.ORDER_COMMITTED.value]
        assert rig.open_sagas.items() == {}.items() and len(rig.finished) == 1

    run(scenario())


def test_a_rejected_line_releases_the_lines_already_held() -> None:
    async def scenario() -> None:
        rig = SagaRig(CFG)
        await rig.checkout("PlaceOrder", place())
        a, b = rig.take_commands()
        await rig.answer(a, "RESERVED")
        await rig.answer(b, "REJECTED", reason="insufficient_stock")
        [release] = rig.take_commands()
        assert (release.name, release.fields["sku"]) == ("ReleaseReservation", "A")
        assert rig.saga(ORDER).saga.status is OrderStatus.RELEASING
        await rig.answer(release, "RELEASED")
        stored = rig.saga(ORDER)
        assert stored.saga.status is OrderStatus.REJECTED
        assert [e["outcome"] for e in stored.effects] == [OrderOutcome.ORDER_REJECTED.value]

    run(scenario())


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"garbage", "undecodable"),
        (b"\x00\x00\x00\x00\x07garbage", "unknown_schema"),  # a registry frame, no registry
        (b"\xc3\x01\x00", "truncated"),
    ],
)
def test_a_garbage_answer_for_an_open_saga_is_a_dead_letter_and_changes_nothing(
    garbage: bytes, reason: str
) -> None:
    async def scenario() -> None:
        rig = SagaRig(CFG)
        await rig.checkout("PlaceOrder", place())
        a, b = rig.take_commands()
        before = rig.table[ORDER.encode()]
        topic, part, offset = await rig.deliver(CFG.line_results_topic, ORDER.encode(), garbage)
        [d] = rig.dead_letters()
        assert (d["reason"], d["source_topic"], d["source_partition"], d["source_offset"]) == (
            reason,
            topic,
            part,
            offset,
        )
        assert d["key"] == ORDER.encode() and d["value"] == garbage
        assert rig.table[ORDER.encode()] == before and rig.take_commands() == []
        # the saga goes on with the next answers
        await rig.answer(a, "RESERVED")
        await rig.answer(b, "RESERVED")
        assert rig.saga(ORDER).saga.status is OrderStatus.RESERVED

    run(scenario())


def test_answers_that_are_not_for_a_saga_are_skipped_without_a_dead_letter() -> None:
    async def scenario() -> None:
        rig = SagaRig(CFG)
        await rig.checkout("PlaceOrder", place())
        a, _ = rig.take_commands()
        before = dict(rig.table)
        # plain ReserveStock traffic (no saga with that key), even garbage, is not looked at
        await rig.deliver(CFG.line_results_topic, b"not-a-saga", b"garbage")
        # an answer whose order is not its key, and one on another partition than its key's
        forged = CODEC.encode(
            "ReservationResult",
            {
                "event_id": a.fields["event_id"],
                "order_id": "someone-else",
                "sku": "A",
                "outcome": "RESERVED",
                "qty": 1,
                "available": 0,
            },
        )
        await rig.deliver(CFG.line_results_topic, ORDER.encode(), forged)
        wrong = (rig.partition_of(ORDER.encode()) + 1) % CFG.partitions
        await rig.deliver(CFG.line_results_topic, ORDER.encode(), forged, partition=wrong)
        assert rig.table == before and rig.dead_letters() == [] and rig.take_commands() == []

    run(scenario())


BODY = CODEC.encode(
    "PlaceOrder",
    {"event_id": "p", "order_id": ORDER, "lines": [{"sku": "A", "qty": 1}], "occurred_at": 1},
)[10:]


def encoded(name: str, **fields: Any) -> bytes:
    return CODEC.encode(name, {"event_id": "bad", "occurred_at": now_ms(), **fields})


# reason -> (key, value) of a checkouts record the saga refuses
BAD: dict[str, tuple[bytes, bytes]] = {
    "undecodable": (ORDER.encode(), b"not avro at all"),
    "unknown_schema": (ORDER.encode(), b"\xc3\x01" + b"\xff" * 8 + BODY),
    "record_too_large": (ORDER.encode(), b"\xc3\x01" + b"x" * 200_000),
    "qty_not_positive": (
        ORDER.encode(),
        encoded("PlaceOrder", order_id=ORDER, lines=[{"sku": "A", "qty": 0}]),
    ),
    "no_lines": (ORDER.encode(), encoded("PlaceOrder", order_id=ORDER, lines=[])),
    "key_mismatch": (
        ORDER.encode(),
        encoded("PlaceOrder", order_id="another", lines=[{"sku": "A", "qty": 1}]),
    ),
    "wrong_topic": (ORDER.encode(), encoded("RestockReceived", sku="A", qty=1)),
    "unknown_order": (ORDER.encode(), encoded("CommitOrder", order_id=ORDER)),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_checkouts_record_is_one_dead_letter_and_the_partition_goes_on(
    reason: str,
) -> None:
    key, value = BAD[reason]

    async def scenario() -> None:
        rig = SagaRig(CFG)
        assert len(value) <= rig.handler.max_bytes or reason == "record_too_large"
        before = metrics.DEAD_LETTERS.labels(reason)._value.get()
        topic, part, offset = await rig.deliver(CFG.checkouts_topic, key, value)
        [d] = rig.dead_letters()
        assert (d["reason"], d["source_topic"], d["source_partition"], d["source_offset"]) == (
            reason,
            topic,
            part,
            offset,
        )
        assert d["key"] == key and d["value"] == value[: len(d["value"])]
        assert metrics.DEAD_LETTERS.labels(reason)._value.get() == before + 1
        assert rig.table == {} and rig.take_commands() == []
        if reason == "unknown_order":  # answered as well: the client is not left waiting
            [answer] = rig.outputs.order_results.sent
            assert CODEC.decode(answer.value)[1]["outcome"] == OrderOutcome.ORDER_UNKNOWN.value
        # the next record of the partition is applied
        await rig.checkout("PlaceOrder", place())
        assert rig.saga(ORDER).watermarks == {topic: offset + 1}
        assert len(rig.take_commands()) == 2

    run(scenario())


def test_a_checkouts_record_on_another_partition_than_its_key_is_resent_there() -> None:
    async def scenario() -> None:
        rig = SagaRig(CFG)
        right = rig.partition_of(ORDER.encode())
        wrong = (right + 1) % CFG.partitions
        before = metrics.REROUTED.labels(CFG.checkouts_topic)._value.get()
        await rig.checkout("PlaceOrder", place(), partition=wrong)
        [moved] = rig.outputs.checkouts.sent
        assert (moved.key, moved.partition) == (ORDER.encode(), right)
        assert metrics.REROUTED.labels(CFG.checkouts_topic)._value.get() == before + 1
        assert rig.table == {} and rig.take_commands() == []  # decided only where it belongs
        await rig.deliver(CFG.checkouts_topic, moved.key, moved.value, partition=moved.partition)
        assert rig.saga(ORDER).saga.status is OrderStatus.RESERVING
        assert len(rig.take_commands()) == 2

    run(scenario())


def test_a_redelivered_checkouts_record_is_skipped() -> None:
    async def scenario() -> None:
        rig = SagaRig(CFG)
        topic, part, offset = await rig.checkout("PlaceOrder", place())
        rig.take_commands()
        stored = dict(rig.table)
        before = metrics.REDELIVERED.labels(topic)._value.get()
        value = CODEC.encode(
            "PlaceOrder", {"event_id": "again", "occurred_at": now_ms(), **place()}
        )
        await rig.redeliver(topic, ORDER.encode(), value, part, offset)
        assert rig.table == stored and rig.take_commands() == []
        assert metrics.REDELIVERED.labels(topic)._value.get() == before + 1

    run(scenario())


def test_the_worker_s_handler_sends_to_the_faust_topics() -> None:
    # the outputs seam defaults to what the agent sent to before it existed
    from agents import orders
    from pipeline import runtime

    out = orders.handler.outputs
    assert out.checkouts is orders.checkouts_topic and out.ledger is runtime.orders_topic
    assert out.order_results is orders.order_results_topic
    assert out.dead_letters is runtime.dead_letters_topic
