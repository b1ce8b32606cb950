"""Finished checkout sagas are pruned after their retention (issue 14 item 13).

Before, the saga table kept every order ever placed, in RocksDB and in its changelog,
for ever. Now a finished one (committed, cancelled, rejected, expired) is deleted, with
a tombstone in the table's changelog, ``INVENTORY_ORDER_RETENTION_MS`` after the latest
of its expiry, placement and last goal; an open one never is. A late command for a
pruned order is an unknown order (``ORDER_UNKNOWN`` answer and an ``unknown_order``
dead letter), and a cold restore from the changelog does not bring it back.
"""

from __future__ import annotations

import pytest

from harness import OUT, Namespace, Worker, metric_total, read_topic, wait_for, wait_stock
from pipeline.produce import CommandProducer
from tests.integration.test_orders import Checkout, ResultReader, restock

pytestmark = pytest.mark.integration

SKU = "SAGA-PRUNE-1"


def status(worker: Worker, order: str) -> int | None:
    return worker.get_json(f"/orders/{order}")[0]


def test_finished_sagas_are_pruned_and_open_ones_kept(kafka):
    ns = Namespace.fresh(
        "sagaprune",
        partitions=1,
        INVENTORY_ORDER_RETENTION_MS="2000",
        INVENTORY_EXPIRY_SCAN_INTERVAL_S="0.2",
    )
    with CommandProducer(ns.settings):
        pass  # creates the namespace's topics
    worker = Worker(ns).start()
    reader = ResultReader(ns)
    try:
        restock(ns, {SKU: 10})
        wait_stock(worker, SKU, on_hand=10)
        with CommandProducer(ns.settings) as p:
            checkout = Checkout(p)
            checkout.place("sold", [(SKU, 1)], ttl_ms=1000)
            checkout.place("back", [(SKU, 1)], ttl_ms=1000)
            checkout.place("nope", [(SKU, 99)], ttl_ms=1000)
            checkout.place("late", [(SKU, 1)], ttl_ms=1000)  # left to expire
            checkout.place("held", [(SKU, 2)], ttl_ms=600_000)  # open for 10 minutes
            p.flush()
            reader.wait(
                lambda a: all(a.outcomes(o) for o in ("sold", "back", "nope", "late", "held")),
                30,
                "the holds' answers",
            )
            checkout.commit("sold")
            checkout.cancel("back")
            p.flush()
            finished = {"sold": "COMMITTED", "back": "CANCELLED", "nope": "REJECTED"}
            wait_for(
                lambda: all(
                    worker.get_json(f"/orders/{o}")[1].get("status") == want
                    for o, want in finished.items()
                ),
                30,
                "the orders to finish",
            )
            # about 1 s to expire "late", then 2 s of retention for every finished one
            wait_for(
                lambda: all(status(worker, o) == 404 for o in ("sold", "back", "nope", "late")),
                30,
                "the finished sagas to be pruned",
            )
            assert metric_total(worker.url, "inventory_sagas_pruned_total") == 4
            assert worker.get_json("/orders/held")[1]["status"] == "RESERVED"
            assert reader.answers.outcomes("late")[-1] == "ORDER_EXPIRED"

            # a late commit of a pruned order: answered unknown, dead-lettered
            checkout.commit("sold")
            p.flush()
            reader.wait(
                lambda a: (
                    a.outcomes("sold") == ["ORDER_RESERVED", "ORDER_COMMITTED", "ORDER_UNKNOWN"]
                ),
                30,
                "the late commit's answer",
            )
            s = ns.settings
            dls = read_topic(
                s,
                s.dead_letters_topic,
                timeout=30,
                until=lambda rs: any(r.key == b"sold" for r in rs),
            )
            assert [r.value["reason"] for r in dls if r.key == b"sold"] == ["unknown_order"]
            # the open one still settles normally
            checkout.commit("held")
            p.flush()
            wait_stock(worker, SKU, on_hand=7, reserved=0)
        worker.stop()

        # a cold restore reads the tombstones: the pruned ones stay gone
        worker = Worker(ns, "cold", data_dir=OUT / ns.name / "cold-data").start()
        wait_for(lambda: status(worker, "held") == 200, 30, "the cold worker's orders")
        assert [status(worker, o) for o in ("sold", "back", "nope", "late")] == [404] * 4
        assert worker.get_json("/orders/held")[1]["status"] == "COMMITTED"
    finally:
        reader.close()
        worker.stop()
