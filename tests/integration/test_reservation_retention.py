"""Closed reservations are pruned after their retention (issue 14 item 13).

Before, every reservation ever made stayed in the ledger's RocksDB and its
reservations changelog forever (so a retry of its order got the same answer):
restore time and the sweepers' scans grew without bound. Now a closed one
(committed, released, expired, rejected) is deleted with a tombstone once its
expiry and last decision are older than ``INVENTORY_RESERVATION_RETENTION_MS``;
an open one never is. A cold restore from the changelogs does not bring the pruned
ones back.
"""

from __future__ import annotations

import time

import pytest

from harness import OUT, Namespace, Worker, metric_total, wait_for, wait_stock
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration

SKU = "PRUNE-1"


def test_closed_reservations_are_pruned_and_open_ones_kept(kafka):
    ns = Namespace.fresh("resprune", partitions=1, INVENTORY_RESERVATION_RETENTION_MS="2000")
    worker = Worker(ns).start()
    try:
        with CommandProducer(ns.settings) as producer:
            producer.send("RestockReceived", {"sku": SKU, "qty": 10})
            producer.flush()
            wait_stock(worker, SKU, on_hand=10)
            for order in ("sold", "gone", "open"):
                producer.send(
                    "ReserveStock", {"order_id": order, "sku": SKU, "qty": 1, "ttl_ms": 1000}
                )
            producer.send("ReserveStock", {"order_id": "too-big", "sku": SKU, "qty": 99})
            producer.send("CommitReservation", {"order_id": "sold", "sku": SKU})
            producer.send("ReleaseReservation", {"order_id": "gone", "sku": SKU})
            # "open" has a 1 s ttl: hold it open with a long one instead
            producer.send(
                "ReserveStock", {"order_id": "held", "sku": SKU, "qty": 2, "ttl_ms": 600_000}
            )
            producer.flush()
            wait_stock(worker, SKU, on_hand=9)
            time.sleep(3.0)  # past the retention: sold, gone, too-big, and open once expired

            n = 0

            def pruned() -> bool:
                nonlocal n  # batches carry the pruning: keep commands flowing
                n += 1
                producer.send("SafetyStockSet", {"sku": SKU, "qty": n % 2})
                producer.flush()
                return metric_total(worker.url, "inventory_reservations_pruned_total") >= 4

            wait_for(pruned, 40, "the closed reservations to be pruned")
            assert metric_total(worker.url, "inventory_reservations_pruned_total") == 4
            # the open reservation was kept: its commit sells
            producer.send("CommitReservation", {"order_id": "held", "sku": SKU})
            producer.flush()
            wait_stock(worker, SKU, on_hand=7, reserved=0)
            # a late commit of a pruned order finds no reservation: a dead letter
            producer.send("CommitReservation", {"order_id": "sold", "sku": SKU})
            producer.flush()
            wait_for(
                lambda: metric_total(worker.url, "inventory_dead_letters_total") >= 1,
                30,
                "the late commit's dead letter",
            )
            worker.stop()

            # a cold restore reads the tombstones: the pruned ones stay gone
            worker = Worker(ns, "cold", data_dir=OUT / ns.name / "cold-data").start()
            producer.send("CommitReservation", {"order_id": "gone", "sku": SKU})
            producer.flush()
            wait_for(
                lambda: metric_total(worker.url, "inventory_dead_letters_total") >= 1,
                30,
                "the cold worker's dead letter for a pruned order",
            )
            body = wait_stock(worker, SKU, on_hand=7, reserved=0)
            # (the loop above left safety_stock at 0 or 1)
            assert body["available"] == 7 - body["safety_stock"]
    finally:
        worker.stop()
