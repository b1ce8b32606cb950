"""Two workers on one host: routed table queries, and a rebalance mid-stream."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from harness import Namespace, Worker, read_topic, wait_for
from pipeline.kafka.partitioning import partition_for
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration


def skus_on_every_partition(partitions: int, per_partition: int = 2) -> list[str]:
    found: dict[int, list[str]] = {p: [] for p in range(partitions)}
    i = 0
    while any(len(v) < per_partition for v in found.values()):
        sku = f"TW-{i}"
        p = partition_for(sku.encode(), partitions)
        if len(found[p]) < per_partition:
            found[p].append(sku)
        i += 1
    return [s for v in found.values() for s in v]


def test_second_worker_mid_stream_loses_and_duplicates_nothing_and_both_answer(kafka):
    ns = Namespace.fresh("two", partitions=4)
    skus = skus_on_every_partition(ns.partitions)
    w1 = Worker(ns, "w1").start()
    w2 = Worker(ns, "w2")
    per_sku = 60
    orders = {f"o-{sku}-{i}": sku for sku in skus for i in range(per_sku)}

    def stream() -> None:
        with CommandProducer(ns.settings) as p:
            for sku in skus:
                p.send("RestockReceived", {"sku": sku, "qty": 40, "event_id": f"init-{sku}"})
            for i in range(per_sku):
                for sku in skus:
                    p.send("ReserveStock", {"order_id": f"o-{sku}-{i}", "sku": sku, "qty": 1})
                p.flush()
                time.sleep(0.05)

    producer = threading.Thread(target=stream)
    try:
        producer.start()
        time.sleep(1.0)
        w2.start()  # joins the group: partitions move from w1 to w2 while traffic flows
        producer.join()
        results = read_topic(
            ns.settings,
            ns.settings.results_topic,
            timeout=180,
            idle=1.0,
            until=lambda rs: set(orders) <= {r.value["order_id"] for r in rs},
        )
        firsts: dict[str, str] = {}
        for r in results:
            v = r.value
            if v["order_id"] in orders and not v["duplicate"]:
                prev = firsts.setdefault(v["order_id"], v["outcome"])
                assert prev == v["outcome"]
        assert set(firsts) == set(orders)
        for sku in skus:
            outcomes = Counter(firsts[o] for o, s in orders.items() if s == sku)
            assert outcomes == {"RESERVED": 40, "REJECTED": per_sku - 40}, (sku, outcomes)

        # each worker answers for every SKU, owned by it or by the other one
        wait_for(
            lambda: w2.status("/healthz") == 200 and w1.status("/healthz") == 200,
            60,
            "both workers healthy",
        )
        for w in (w1, w2):
            for sku in skus:
                status, body = w.get_json(f"/stock/{sku}")
                assert status == 200, (w.name, sku, body)
                assert (body["on_hand"], body["reserved"], body["available"], body["version"]) == (
                    40,
                    40,
                    0,
                    41,
                ), (w.name, sku, body)
            assert w.get_json("/stock/TW-UNKNOWN")[0] == 404
    finally:
        w2.stop()
        w1.stop()
