"""Event-id idempotency for the retention, not for the SKU's last 256 ids (issue 14 item 3).

Reported: 20 restocks re-sent after 300 others of the same SKU were applied again
(on_hand 320 instead of 300). Here re-sends of early restocks are duplicates on a
running worker, after a ``kill -9`` (warm restart) and on a worker that restores from
the changelogs with an empty data dir; with a short retention, ids past it are pruned
from the store and a re-send counts again.
"""

from __future__ import annotations

import time

import pytest

from harness import OUT, Namespace, Worker, metric_total, wait_for, wait_stock
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration

SKU = "IDEM-1"


def _restocks(producer: CommandProducer, ids: range, marker: str) -> None:
    for i in ids:
        producer.send("RestockReceived", {"sku": SKU, "qty": 1, "event_id": f"r-{i}"})
    producer.send("RestockReceived", {"sku": SKU, "qty": 1000, "event_id": marker})
    producer.flush()


def test_resent_restocks_are_duplicates_for_the_retention_across_restarts(kafka):
    ns = Namespace.fresh("idem")
    worker = Worker(ns).start()
    try:
        with CommandProducer(ns.settings) as producer:
            for i in range(300):
                producer.send("RestockReceived", {"sku": SKU, "qty": 1, "event_id": f"r-{i}"})
            producer.flush()
            wait_stock(worker, SKU, on_hand=300)
            # every restock travels on one topic partition, so the marker comes last
            _restocks(producer, range(20), "marker-1")
            wait_stock(worker, SKU, on_hand=1300)

            worker.kill()
            worker.start()  # warm: the local store kept the ids
            _restocks(producer, range(20, 40), "marker-2")
            wait_stock(worker, SKU, on_hand=2300)

            worker.stop()
            cold = Worker(ns, "cold", data_dir=OUT / ns.name / "cold-data").start()
            worker = cold  # restored the ids from the changelog
            _restocks(producer, range(40, 60), "marker-3")
            body = wait_stock(cold, SKU, on_hand=3300)
        assert body["version"] == 303
    finally:
        worker.stop()


def test_ids_past_the_retention_are_pruned_and_count_again(kafka):
    # no window of recent ids in the SKU record: the store alone recognises re-sends
    ns = Namespace.fresh(
        "idemttl", INVENTORY_EVENT_ID_RETENTION_MS="3000", INVENTORY_DEDUPE_WINDOW="0"
    )
    worker = Worker(ns).start()
    try:
        with CommandProducer(ns.settings) as producer:
            _restocks(producer, range(5), "m-1")
            wait_stock(worker, SKU, on_hand=1005)
            _restocks(producer, range(5), "m-1")  # within the retention: all duplicates
            time.sleep(1.0)
            producer.send("RestockReceived", {"sku": SKU, "qty": 1, "event_id": "probe-1"})
            producer.flush()
            wait_stock(worker, SKU, on_hand=1006)
            time.sleep(3.5)

            # batches carry the pruning: keep commands flowing until the old ids are gone
            n = 0

            def pruned() -> bool:
                nonlocal n
                n += 1
                producer.send("SafetyStockSet", {"sku": SKU, "qty": n % 3})
                producer.flush()
                return metric_total(worker.url, "inventory_event_ids_pruned_total") >= 7

            wait_for(pruned, 30, "the expired event ids to be pruned")
            _restocks(producer, range(5), "m-1")  # past the retention: applied again
            wait_stock(worker, SKU, on_hand=2011)
    finally:
        worker.stop()
