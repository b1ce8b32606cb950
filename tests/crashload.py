"""A crash workload and its invariant check, shared by the kill -9 tests.

:class:`Workload` streams restocks, reserves, commits and releases over a few
SKUs (some sent twice, as a retrying producer would); :func:`check_invariants`
then checks, from the answers, the audit topic and the table, that every
command took effect exactly once:

* conservation: on_hand = restocked - committed units (from the answers);
* no oversell: reserved <= on_hand, and reserved = units of orders still open;
* exactly-once: every order's non-duplicate answers agree, nothing applied twice;
* versions: each SKU's StockChanged versions are 1..V without a gap and the
  table's version is V; a re-sent version carries identical numbers.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict

from config.settings import Settings
from harness import Namespace, Worker, read_topic, wait_stock
from pipeline.kafka.reading import read_to_end
from pipeline.kafka.topics import changelog_topic
from pipeline.produce import CommandProducer
from tables.stock import StoredStock, is_stock_key

SKUS = [f"KILL-{i}" for i in range(6)]


class Workload(threading.Thread):
    """Sends a deterministic-per-seed stream of commands, remembering what it sent."""

    def __init__(self, ns: Namespace, commands: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.ns = ns
        self.commands = commands
        self.rng = random.Random(seed)
        self.restocked: dict[str, int] = defaultdict(int)
        self.orders: dict[str, tuple[str, int]] = {}
        self.sent = 0
        self.error: BaseException | None = None
        self.pause = 0.25  # at most ~200 commands/s: the worker keeps up between kills
        self.stop = threading.Event()  # set after the last kill: the stream spans every kill

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc

    def _run(self) -> None:
        rng = self.rng
        open_orders: list[str] = []
        with CommandProducer(self.ns.settings) as p:
            for sku in SKUS:
                p.send("RestockReceived", {"sku": sku, "qty": 20, "event_id": f"init-{sku}"})
                self.restocked[sku] += 20
            for i in range(self.commands):
                if self.stop.is_set():
                    break
                roll = rng.random()
                if roll < 0.1:
                    sku = rng.choice(SKUS)
                    eid = f"rs-{i}"
                    p.send("RestockReceived", {"sku": sku, "qty": 3, "event_id": eid})
                    self.restocked[sku] += 3
                    if rng.random() < 0.3:  # producer retry of the same event
                        p.send("RestockReceived", {"sku": sku, "qty": 3, "event_id": eid})
                elif roll < 0.6 or not open_orders:
                    sku = rng.choice(SKUS)
                    order = f"ord-{i}"
                    qty = rng.randint(1, 3)
                    fields = {"order_id": order, "sku": sku, "qty": qty, "event_id": f"r-{i}"}
                    p.send("ReserveStock", fields)
                    if rng.random() < 0.2:
                        p.send("ReserveStock", fields)
                    self.orders[order] = (sku, qty)
                    open_orders.append(order)
                else:
                    order = open_orders.pop(rng.randrange(len(open_orders)))
                    sku, _ = self.orders[order]
                    kind = "CommitReservation" if rng.random() < 0.6 else "ReleaseReservation"
                    p.send(kind, {"order_id": order, "sku": sku, "event_id": f"s-{i}"})
                self.sent += 1
                if i % 50 == 0:
                    p.flush()
                    time.sleep(self.pause)
            p.flush()


def check_invariants(ns: Namespace, worker: Worker, load: Workload) -> dict[str, int]:
    s = ns.settings
    orders = set(load.orders)
    results = read_topic(
        s,
        s.results_topic,
        timeout=180,
        idle=1.0,
        until=lambda rs: orders <= {r.value["order_id"] for r in rs},
    )
    answers: dict[str, dict[str, dict]] = defaultdict(dict)  # order -> event_id -> answer
    for r in results:
        v = r.value
        if v["duplicate"]:
            continue
        prev = answers[v["order_id"]].get(v["event_id"])
        if prev is not None:  # the relay re-sent it after a crash: must be identical
            assert prev == v, (prev, v)
        answers[v["order_id"]][v["event_id"]] = v
    assert orders <= set(answers), f"unanswered orders: {sorted(orders - set(answers))[:10]}"

    committed: dict[str, int] = defaultdict(int)
    open_units: dict[str, int] = defaultdict(int)
    for order, (sku, qty) in load.orders.items():
        outcomes = [a["outcome"] for a in answers[order].values()]
        assert outcomes.count("RESERVED") <= 1, (order, outcomes)
        assert outcomes.count("COMMITTED") <= 1, (order, outcomes)
        if "COMMITTED" in outcomes:
            assert "RESERVED" in outcomes
            committed[sku] += qty
        elif "RESERVED" in outcomes and not {"RELEASED", "EXPIRED"} & set(outcomes):
            open_units[sku] += qty

    changes = read_topic(
        s, s.stock_changes_topic, timeout=60, idle=1.0, until=lambda rs: len(rs) > 0
    )
    by_sku: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in changes:
        if r.name != "StockChanged":
            continue
        v = r.value
        prev = by_sku[v["sku"]].get(v["version"])
        if prev is not None:
            assert prev == v, (prev, v)
        by_sku[v["sku"]][v["version"]] = v

    for sku in SKUS:
        body = wait_stock(worker, sku)
        expected_on_hand = load.restocked[sku] - committed[sku]
        assert body["on_hand"] == expected_on_hand, (sku, body, expected_on_hand)
        assert body["reserved"] == open_units[sku], (sku, body, open_units[sku])
        assert body["reserved"] <= body["on_hand"], (sku, body)
        versions = sorted(by_sku[sku])
        assert versions == list(range(1, body["version"] + 1)), (sku, versions[-5:], body)
        last = by_sku[sku][body["version"]]
        assert (last["on_hand"], last["reserved"]) == (body["on_hand"], body["reserved"])
    audit = audit_changelog(s)
    for sku in SKUS:
        body = wait_stock(worker, sku)
        assert audit.get(sku) == body["version"], (sku, audit.get(sku), body)
    return {"orders": len(orders), "results": len(results), "changes": len(changes)}


def audit_changelog(s: Settings) -> dict[str, int]:
    """Check the committed changelog itself; returns each SKU's last version.

    In offset order, each SKU record's StockChanged effects continue the previous
    record's versions by exactly one (no gap, no version written twice, none going
    back), and the record's own state is at its last effect's version.
    """
    last: dict[str, int] = {}
    for msg in read_to_end(s, changelog_topic(s)):
        key, value = msg.key(), msg.value()
        if key is None or value is None or not is_stock_key(key):
            continue
        stored = StoredStock.from_bytes(value)
        sku = stored.record.sku
        versions = [c["version"] for c in stored.effects.get("StockChanged", [])]
        before = last.get(sku, 0)
        assert versions == list(range(before + 1, before + 1 + len(versions))), (
            f"{sku} @{msg.offset()}: versions {versions} after {before}"
        )
        assert stored.record.version == before + len(versions), (
            f"{sku} @{msg.offset()}: state v{stored.record.version}, effects up to "
            f"{before + len(versions)}"
        )
        last[sku] = stored.record.version
    return last
