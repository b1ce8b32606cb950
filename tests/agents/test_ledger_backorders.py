"""Backorders at a ledger partition (issue 16 item 2): one arrival decides many orders.

An arrival of a purchase order (a RestockReceived naming it), its close or a cut
converts or releases many backorders in one decision: the batch's one transaction
carries every changed reservation (on the reservations changelog), one answer per
order inside the SKU's changelog record (the relay publishes them), and the
customers' usages; the expiry index learns the converted holds. An aborted commit of
that batch decides it again once: each order is answered once, nothing held twice.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from memory_kafka import MemoryBroker, Worker, key_on, now_ms, settings

from agents.ledger import POSITIONS_KEY
from pipeline.kafka.transactions import BatchAborted
from tables.stock import StoredReservation, StoredStock, reservation_key, stock_key

CFG = settings()
P = 2
SKU = key_on(P, CFG, "PRE")
ORDERS = ("b1", "b2", "b3", "b4")


def run(scenario: Any) -> Any:
    return asyncio.run(scenario)


def answers(broker: MemoryBroker, changelog: str) -> list[tuple[str, str, str]]:
    """(order, outcome, reason) of every committed answer of the SKU, in order."""
    return [
        (a["order_id"], a["outcome"], a["reason"])
        for r in broker.records(changelog, P)
        if r.key == stock_key(SKU) and r.value is not None
        for a in StoredStock.from_bytes(r.value).effects.get("ReservationResult", [])
    ]


async def preorders(w: Worker) -> None:
    """A SKU with no stock, a cap of 10 and purchase order po-1 of 8 units; four
    backorders of 2, 3, 2 and 1 units placed in that order (one batch each)."""
    w.send("BackorderCapSet", {"sku": SKU, "max_units": 10})
    w.send(
        "IncomingStock",
        {"sku": SKU, "po_id": "po-1", "qty": 8, "expected_at": now_ms() + 86_400_000},
    )
    await w.settle()
    for order, qty in zip(ORDERS, (2, 3, 2, 1), strict=True):
        w.send(
            "ReserveStock",
            {"sku": SKU, "order_id": order, "qty": qty, "allow_backorder": True, "ttl_ms": 60_000},
        )
        await w.settle()


def test_an_arrival_converts_and_releases_many_orders_in_one_transaction(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        await preorders(w)
        changelog = w.ledger(P).changelog
        reservations = w.ledger(P).reservations
        assert [a[1] for a in answers(broker, changelog)] == ["BACKORDERED"] * 4
        before = len(broker.transactions)

        # 6 units arrive and the supplier sends no more: b1 (2) and b2 (3) are converted,
        # b3 (2) cannot be covered by the 1 left and is released; b4 (1) fits and converts
        w.send("RestockReceived", {"sku": SKU, "qty": 6, "po_id": "po-1", "final": True})
        await w.settle()
        assert len(broker.transactions) == before + 1
        outs = broker.transactions[-1]
        keys = {o.key for o in outs if o.topic == reservations}
        assert {reservation_key(SKU, o) for o in ORDERS} <= keys
        stored = {
            o: StoredReservation.from_bytes(
                next(x.value for x in outs if x.key == reservation_key(SKU, o))
            ).current
            for o in ORDERS
        }
        assert {o: (c["status"], c["reason"]) for o, c in stored.items()} == {
            "b1": ("RESERVED", "backorder_filled"),
            "b2": ("RESERVED", "backorder_filled"),
            "b3": ("RELEASED", "po_short"),
            "b4": ("RESERVED", "backorder_filled"),
        }
        sku_record = next(
            StoredStock.from_bytes(o.value)
            for o in outs
            if o.topic == changelog and o.key == stock_key(SKU)
        )
        assert [
            (a["order_id"], a["outcome"], a["po_id"])
            for a in sku_record.effects["ReservationResult"]
        ] == [
            ("b1", "RESERVED", "po-1"),
            ("b2", "RESERVED", "po-1"),
            ("b4", "RESERVED", "po-1"),
            ("b3", "RELEASED", "po-1"),
        ]
        assert any(o.key == POSITIONS_KEY for o in outs)
        stock = w.stock(SKU).record
        assert (stock.on_hand, stock.reserved, stock.available, stock.staged) == (6, 6, 0, 0)
        # the expiry sweeper knows the converted holds (they expire ttl after the arrival)
        due = w.engine.open_reservations.overdue(now_ms() + 120_000)
        assert sorted(order for _, order in due) == ["b1", "b2", "b4"]
        # a converted backorder is committed like any hold
        w.send("CommitReservation", {"sku": SKU, "order_id": "b2"})
        await w.settle()
        assert answers(broker, changelog)[-1] == ("b2", "COMMITTED", "")
        assert w.stock(SKU).record.on_hand == 3
        await w.stop()

    run(scenario())


def test_an_aborted_conversion_is_decided_again_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        await preorders(w)
        changelog = w.ledger(P).changelog
        broker.fail_next_commit(BatchAborted("the coordinator aborted it"))
        w.send("RestockReceived", {"sku": SKU, "qty": 8, "po_id": "po-1"})
        await w.settle()
        assert len(broker.aborted) == 1
        # readers see the committed attempt only: every order converted exactly once
        settled = [a for a in answers(broker, changelog) if a[1] != "BACKORDERED"]
        assert settled == [(o, "RESERVED", "backorder_filled") for o in ORDERS]
        stock = w.stock(SKU).record
        assert (stock.on_hand, stock.reserved, stock.incoming.promised) == (8, 8, 0)
        # the producer re-sends the arrival: a duplicate, nothing held twice, nobody
        # answered again
        record = broker.records(CFG.restocks_topic, P)[-1]
        w.send_raw(CFG.restocks_topic, record.key, record.value)
        await w.settle()
        assert [a for a in answers(broker, changelog) if a[1] != "BACKORDERED"] == settled
        assert w.stock(SKU).record.reserved == 8
        await w.stop()

    run(scenario())


def test_a_restarted_worker_reads_the_converted_holds_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path / "a")
        await w.assign([P])
        await preorders(w)
        w.send("RestockReceived", {"sku": SKU, "qty": 3, "po_id": "po-1"})  # b1; 1 staged
        await w.settle()
        await w.stop()
        # another worker (an empty data dir) takes the partition from the changelog
        w2 = Worker(broker, CFG, tmp_path / "b")
        await w2.assign([P])
        stock = w2.stock(SKU).record
        assert (stock.on_hand, stock.reserved, stock.staged, stock.available) == (3, 2, 1, 0)
        assert stock.incoming.waiting == 3
        w2.send("ReleaseReservation", {"sku": SKU, "order_id": "b2"})  # b3 (2) now first
        w2.send("RestockReceived", {"sku": SKU, "qty": 1, "po_id": "po-1"})  # covers b3
        await w2.settle()
        changelog = w2.ledger(P).changelog
        assert answers(broker, changelog)[-2:] == [
            ("b2", "RELEASED", "cancelled"),
            ("b3", "RESERVED", "backorder_filled"),
        ]
        assert w2.stock(SKU).record.reserved == 4
        await w2.stop()

    run(scenario())
