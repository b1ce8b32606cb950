"""A worker frozen past its session timeout mid-sale, then thawed, sells nothing twice.

Two workers share a flash sale on SKUs of both workers' partitions. The owner of
half of them is frozen with SIGSTOP for longer than its session timeout; the
other worker takes its partitions over and sells them out. Then the frozen one
is thawed (SIGCONT): it still believes it owns its old partitions, holds their
old state in memory and may have a batch half done. More orders follow.

The ledger must not grant any of them (the stock is gone), the table must equal
the orders answered RESERVED, and no version of any SKU may exist twice with
different content on the audit topic, or go back: the thawed worker's writes are
fenced by the new owner's transactions, and it re-reads the changelog before it
decides for a partition again.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter, defaultdict

import pytest

from harness import Namespace, Worker, read_topic, wait_for
from pipeline.kafka.partitioning import partition_for
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration

PARTITIONS = 4
UNITS = 30


def skus_per_partition(per_partition: int = 2) -> list[str]:
    found: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
    i = 0
    while any(len(v) < per_partition for v in found.values()):
        sku = f"PZ-{i}"
        p = partition_for(sku.encode(), PARTITIONS)
        if len(found[p]) < per_partition:
            found[p].append(sku)
        i += 1
    return [s for v in found.values() for s in v]


def owned_partitions(worker: Worker) -> set[int]:
    """Ledger partitions a worker decides for, from its log lines since its last start."""
    text = worker.log_path.read_text(errors="replace")
    last = text.rsplit("ledger partitions [", 1)
    if len(last) < 2:
        return set()
    inside = last[1].split("]", 1)[0]
    return {int(x) for x in inside.split(",") if x.strip()}


def test_a_worker_thawed_after_its_partitions_moved_grants_nothing_more(kafka):
    ns = Namespace.fresh("pause", partitions=PARTITIONS)
    skus = skus_per_partition()
    w1 = Worker(ns, "w1").start()
    w2 = Worker(ns, "w2").start()
    frozen = False
    try:
        wait_for(
            lambda: (
                owned_partitions(w1)
                and owned_partitions(w2)
                and w1.status("/healthz") == 200
                and w2.status("/healthz") == 200
            ),
            90,
            "both workers owning partitions",
        )
        with CommandProducer(ns.settings) as p:
            for sku in skus:
                p.send("RestockReceived", {"sku": sku, "qty": UNITS, "event_id": f"init-{sku}"})
            p.flush()
        wait_for(
            lambda: all(w1.get_json(f"/stock/{s}")[0] == 200 for s in skus), 60, "restocks applied"
        )

        orders: dict[str, str] = {}
        stop = threading.Event()

        def sale() -> None:
            # one order per SKU per round, twice the units: every SKU sells out
            n = 0
            with CommandProducer(ns.settings) as prod:
                while not stop.is_set() and n < 2 * UNITS:
                    for sku in skus:
                        oid = f"o-{sku}-{n}"
                        orders[oid] = sku
                        prod.send("ReserveStock", {"order_id": oid, "sku": sku, "qty": 1})
                    prod.flush()
                    n += 1
                    time.sleep(0.1)

        seller = threading.Thread(target=sale)
        seller.start()
        time.sleep(1.5)  # mid-sale
        os.killpg(w1.proc.pid, signal.SIGSTOP)
        frozen = True
        # past the session timeout (6 s in tests): w2 takes w1's partitions and sells them out
        time.sleep(14)
        seller.join()
        os.killpg(w1.proc.pid, signal.SIGCONT)
        frozen = False

        # the thawed worker holds stale state: more orders, none may be granted
        late = {f"late-{sku}-{i}": sku for sku in skus for i in range(10)}
        with CommandProducer(ns.settings) as prod:
            for oid, sku in late.items():
                prod.send("ReserveStock", {"order_id": oid, "sku": sku, "qty": 1})
            prod.flush()
        orders.update(late)

        results = read_topic(
            ns.settings,
            ns.settings.results_topic,
            timeout=180,
            idle=2.0,
            until=lambda rs: set(orders) <= {r.value["order_id"] for r in rs},
        )
        first: dict[str, str] = {}
        for r in results:
            v = r.value
            if v["order_id"] in orders:
                prev = first.setdefault(v["order_id"], v["outcome"])
                assert prev == v["outcome"], f"{v['order_id']} answered {prev} and {v['outcome']}"
        assert set(first) == set(orders), f"unanswered: {sorted(set(orders) - set(first))[:5]}"
        granted = Counter(orders[o] for o, out in first.items() if out == "RESERVED")
        for sku in skus:
            assert granted[sku] == UNITS, (sku, granted[sku])
        for oid in late:
            assert first[oid] == "REJECTED", (oid, first[oid])

        # the table equals the answers, on both workers (each routes to the owner)
        wait_for(
            lambda: w1.status("/healthz") == 200 and w2.status("/healthz") == 200,
            90,
            "both workers healthy after the thaw",
        )
        for w in (w1, w2):
            for sku in skus:
                status, body = w.get_json(f"/stock/{sku}")
                assert status == 200, (w.name, sku, body)
                assert (body["on_hand"], body["reserved"]) == (UNITS, UNITS), (w.name, sku, body)

        # no version exists twice with different content, none goes back
        changes = read_topic(
            ns.settings,
            ns.settings.stock_changes_topic,
            timeout=60,
            idle=2.0,
            until=lambda rs: sum(r.name == "StockChanged" for r in rs) >= len(skus) * (UNITS + 1),
        )
        seen: dict[tuple[str, int], tuple] = {}
        order_seen: dict[str, list[int]] = defaultdict(list)
        for r in changes:
            if r.name != "StockChanged":
                continue
            v = r.value
            content = (v["on_hand"], v["reserved"], v["cause_event_id"])
            key = (v["sku"], v["version"])
            assert seen.setdefault(key, content) == content, f"{key}: {seen[key]} vs {content}"
            order_seen[v["sku"]].append(v["version"])
        for sku in skus:
            versions = sorted(set(order_seen[sku]))
            assert versions == list(range(1, UNITS + 2)), (sku, versions)
    finally:
        if frozen:
            os.killpg(w1.proc.pid, signal.SIGCONT)
        w2.stop()
        w1.stop()
