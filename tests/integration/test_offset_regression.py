"""Input offsets that go backwards (issue 14 item 11).

An input topic deleted and created again (or truncated by an unclean leader
election) starts its offsets again below where the ledger stands. Before, every
new command on it looked like a redelivery and was skipped, silently: the new
restocks here were never applied. Now the partition halts with a clear error
(``/readyz``, ``/healthz``, a metric) and decides nothing until an operator acts
(README, "Offsets that go backwards"). The other partitions go on meanwhile. It is
detected when a worker takes the partition, and while it runs: when records arrive
below the next offset unasked, and when the log end is seen below it while idle.
"""

from __future__ import annotations

import time

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from harness import Namespace, Worker, metric_total, wait_for, wait_stock
from pipeline.kafka.partitioning import partition_for
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration


def _recreate(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.delete_topics([topic], operation_timeout=30)[topic].result(timeout=60)
    deadline = time.monotonic() + 60
    while True:  # the deletion finishes in the background
        try:
            admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(timeout=30)
            return
        except Exception:  # noqa: BLE001 - TOPIC_ALREADY_EXISTS while it is being deleted
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _two_skus(partitions: int) -> tuple[str, str]:
    """Two SKUs on different partitions."""
    first = "REGRESS-0"
    home = partition_for(first.encode(), partitions)
    other = next(
        f"REGRESS-{i}"
        for i in range(1, 100)
        if partition_for(f"REGRESS-{i}".encode(), partitions) != home
    )
    return first, other


def test_a_recreated_input_topic_halts_its_partition_until_resumed(kafka):
    ns = Namespace.fresh("regress", partitions=2)
    cfg = ns.settings
    sku, other = _two_skus(ns.partitions)
    part = partition_for(sku.encode(), ns.partitions)
    worker = Worker(ns).start()
    try:
        with CommandProducer(cfg) as producer:
            for i in range(5):
                producer.send("RestockReceived", {"sku": sku, "qty": 10, "event_id": f"old-{i}"})
            producer.flush()
            wait_stock(worker, sku, on_hand=50)
            worker.stop()

            _recreate(cfg.kafka_bootstrap, cfg.restocks_topic, ns.partitions)
            # the new log of the partition ends at 3, below the next offset to apply (5);
            # one of its records repeats a command applied before the topic was re-created
            for event_id in ("new-0", "new-1", "old-4"):
                producer.send("RestockReceived", {"sku": sku, "qty": 1, "event_id": event_id})
            producer.send("RestockReceived", {"sku": other, "qty": 7, "event_id": "other-0"})
            producer.flush()

            worker.start(wait=False)

            def halted() -> bool:
                if worker.status("/readyz") is None:
                    return False  # not listening yet
                status, body = worker.get_json("/readyz")
                return status == 503 and body["partitions"].get(str(part)) == "halted"

            wait_for(halted, 90, "the partition to halt")
            status, body = worker.get_json("/readyz")
            reason = next(r for r in body["reasons"] if "halted" in r)
            assert f"{cfg.restocks_topic}/{part} ends at @3" in reason
            assert "below the next offset to apply @5" in reason
            assert worker.get_json("/healthz") == (
                503,
                {"status": "halted", "reasons": body["reasons"]},
            )
            assert metric_total(worker.url, "inventory_ledger_partition_halted") == 1
            assert metric_total(worker.url, "inventory_input_offset_regressions_total") >= 1
            # the other partition decides on meanwhile
            wait_stock(worker, other, on_hand=7)
            status, body = worker.get_json(f"/stock/{sku}")
            assert status == 503 and body["error"] == "halted", body
            time.sleep(2)  # nothing of the halted partition is decided meanwhile
            assert metric_total(worker.url, "inventory_ledger_partition_halted") == 1
            worker.stop()

            # halted again after a restart: nothing of the new log was taken for applied
            worker.start(wait=False)
            wait_for(halted, 90, "the partition to halt again")
            # (the other partition may still be taking ownership when this one halts)
            wait_stock(worker, other, on_hand=7)
    finally:
        worker.stop()


def test_a_topic_recreated_under_a_running_worker_halts_its_partition(kafka):
    """The runtime checks: the worker keeps running while the topic goes and comes back."""
    ns = Namespace.fresh("regrun", partitions=2)
    cfg = ns.settings
    sku, other = _two_skus(ns.partitions)
    part = partition_for(sku.encode(), ns.partitions)
    worker = Worker(ns).start()
    try:
        with CommandProducer(cfg) as producer:
            for i in range(5):
                producer.send("RestockReceived", {"sku": sku, "qty": 10, "event_id": f"old-{i}"})
            producer.send("RestockReceived", {"sku": other, "qty": 1, "event_id": "other-old"})
            producer.flush()
            wait_stock(worker, sku, on_hand=50)
            wait_stock(worker, other, on_hand=1)

            _recreate(cfg.kafka_bootstrap, cfg.restocks_topic, ns.partitions)
            for event_id in ("new-0", "new-1"):
                producer.send("RestockReceived", {"sku": sku, "qty": 1, "event_id": event_id})
            producer.flush()

            def halted() -> bool:
                status, body = worker.get_json("/readyz")
                return status == 503 and body["partitions"].get(str(part)) == "halted"

            wait_for(halted, 90, "the running partition to halt")
            status, body = worker.get_json("/readyz")
            reason = next(r for r in body["reasons"] if f"{cfg.restocks_topic}/{part} " in r)
            # (how far back depends on whether the new records were there when it looked)
            assert "below the next offset to apply @" in reason, reason
            wait_for(
                lambda: worker.get_json(f"/stock/{sku}")[1].get("error") == "halted",
                30,
                "/stock to answer halted",
            )
            # the other partition's log went back too (to @0 from @1), idle: the stall
            # watcher's check finds it
            wait_for(
                lambda: worker.get_json("/readyz")[1]["partitions"].get(str(1 - part)) == "halted",
                30,
                "the idle partition to halt",
            )
            assert worker.proc is not None and worker.proc.poll() is None
    finally:
        worker.stop()
