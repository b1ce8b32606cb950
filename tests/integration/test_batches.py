"""The batch engine on the real stack: mixed batches decide as one-at-a-time would, and a
rebalance in the middle of batches loses, repeats and forks nothing."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest

from config.settings import Settings
from crashload import SKUS, Workload, audit_changelog, check_invariants
from harness import Namespace, Worker, read_topic, wait_for
from pipeline.domain import core
from pipeline.kafka.partitioning import partition_for
from pipeline.kafka.reading import read_to_end
from pipeline.kafka.topics import changelog_topic
from pipeline.produce import CommandProducer
from tables.stock import StoredStock, is_stock_key

pytestmark = pytest.mark.integration

PARTITIONS = 2
T0 = int(time.time() * 1000)  # recent: the expiry sweeper must not find the holds overdue


def skus_on(partition: int, n: int, prefix: str) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        sku = f"{prefix}-{i}"
        if partition_for(sku.encode(), PARTITIONS) == partition:
            out.append(sku)
        i += 1
    return out


def sku_records(s: Settings) -> dict[str, list[StoredStock]]:
    out: dict[str, list[StoredStock]] = defaultdict(list)
    for msg in read_to_end(s, changelog_topic(s)):
        if msg.key() is not None and msg.value() is not None and is_stock_key(msg.key()):
            stored = StoredStock.from_bytes(msg.value())
            out[stored.record.sku].append(stored)
    return out


def test_a_batch_mixing_every_command_on_one_partition_decides_as_one_at_a_time(kafka):
    ns = Namespace.fresh("mix", partitions=PARTITIONS)
    ordered = skus_on(0, 3, "MIXO")  # reserves, commits, releases (orders topic)
    stocked = skus_on(0, 2, "MIXS")  # restocks and counts (restocks topic)
    worker = Worker(ns).start()
    try:
        with CommandProducer(ns.settings) as p:
            for sku in ordered:
                p.send("RestockReceived", {"sku": sku, "qty": 5, "event_id": f"init-{sku}"})
            p.flush()
        wait_for(
            lambda: all(worker.get_json(f"/stock/{s}")[0] == 200 for s in ordered), 60, "restocks"
        )
        # one burst: every kind of command, several SKUs of partition 0, both topics
        plan: list[tuple[str, dict]] = []
        for k, sku in enumerate(ordered):
            for i in range(4):
                plan.append(("ReserveStock", {"order_id": f"{sku}-o{i}", "sku": sku, "qty": 2}))
            plan.append(("CommitReservation", {"order_id": f"{sku}-o0", "sku": sku}))
            plan.append(("ReleaseReservation", {"order_id": f"{sku}-o1", "sku": sku}))
            plan.append(("ReserveStock", {"order_id": f"{sku}-o4", "sku": sku, "qty": 1 + k}))
            plan.append(("CommitReservation", {"order_id": f"{sku}-o9", "sku": sku}))  # unknown
        for sku in stocked:
            plan.append(("RestockReceived", {"sku": sku, "qty": 10, "event_id": f"{sku}-r1"}))
            plan.append(("StockCounted", {"sku": sku, "on_hand": 4, "event_id": f"{sku}-c1"}))
            plan.append(("RestockReceived", {"sku": sku, "qty": 3, "event_id": f"{sku}-r2"}))
            plan.append(("RestockReceived", {"sku": sku, "qty": 3, "event_id": f"{sku}-r2"}))
        sent: list[tuple[str, dict]] = []
        with CommandProducer(ns.settings) as p:
            for name, fields in plan:
                fields = dict(fields, occurred_at=T0 + len(sent))
                fields.setdefault("event_id", f"ev-{len(sent)}")
                p.send(name, fields)
                sent.append((name, fields))
            p.flush()

        # the reference: the core, one command at a time, each SKU's commands in send order
        records: dict[str, core.StockRecord] = {}
        holds: dict[tuple[str, str], core.Reservation] = {}
        answers: dict[str, tuple[str, int, int]] = {}
        for sku in ordered:
            records[sku] = core.decide(
                None, core.RestockReceived(f"init-{sku}", sku, 5, T0), 0
            ).record
        builders = {
            "ReserveStock": lambda f: core.ReserveStock(
                f["event_id"], f["order_id"], f["sku"], f["qty"], f["occurred_at"], ttl_ms=900_000
            ),
            "CommitReservation": lambda f: core.CommitReservation(
                f["event_id"], f["order_id"], f["sku"], f["occurred_at"]
            ),
            "ReleaseReservation": lambda f: core.ReleaseReservation(
                f["event_id"], f["order_id"], f["sku"], f["occurred_at"]
            ),
            "RestockReceived": lambda f: core.RestockReceived(
                f["event_id"], f["sku"], f["qty"], f["occurred_at"]
            ),
            "StockCounted": lambda f: core.StockCounted(
                f["event_id"], f["sku"], f["on_hand"], f["occurred_at"]
            ),
        }
        for name, fields in sent:
            cmd = builders[name](fields)
            res = holds.get((cmd.sku, getattr(cmd, "order_id", "")))
            d = core.decide(records.get(cmd.sku), cmd, 0, res)
            records[cmd.sku] = d.record
            if d.reservation is not None:
                holds[(cmd.sku, d.reservation.order_id)] = d.reservation
            for e in d.events:
                if isinstance(e, core.ReservationResult):
                    answers[e.event_id] = (e.outcome.value, e.qty, e.available)

        got = read_topic(
            ns.settings,
            ns.settings.results_topic,
            timeout=60,
            until=lambda rs: set(answers) <= {r.value["event_id"] for r in rs},
        )
        by_event = {r.value["event_id"]: r.value for r in got}
        for eid, want in answers.items():
            v = by_event[eid]
            assert (v["outcome"], v["qty"], v["available"]) == want, (eid, v, want)
        for sku, rec in records.items():
            status, body = worker.get_json(f"/stock/{sku}")
            assert status == 200
            assert (body["on_hand"], body["reserved"], body["version"]) == (
                rec.on_hand,
                rec.reserved,
                rec.version,
            ), (sku, body, rec)
        # batched: fewer SKU records than commands, versions continuous across them
        audit = audit_changelog(ns.settings)
        written = sku_records(ns.settings)
        commands = defaultdict(int)
        for _, fields in sent:
            commands[fields["sku"]] += 1
        assert any(len(written[s]) < commands[s] for s in ordered + stocked), {
            s: (len(written[s]), commands[s]) for s in ordered + stocked
        }
        assert {s: audit[s] for s in records} == {s: r.version for s, r in records.items()}
    finally:
        worker.stop()


def test_rebalances_in_the_middle_of_batches_lose_repeat_and_fork_nothing(kafka):
    ns = Namespace.fresh("rebal", partitions=4)
    w1 = Worker(ns, "w1").start()
    w2 = Worker(ns, "w2")
    load = Workload(ns, 200_000, seed=21)
    load.pause = 0.02  # fast: every batch is full while partitions move
    load.start()
    try:
        time.sleep(2.0)
        w2.start()  # partitions move from w1 to w2 while batches are in flight
        time.sleep(3.0)
        w2.stop()  # and back
        time.sleep(2.0)
        w2.start()
        time.sleep(2.0)
        load.stop.set()
        load.join(300)
        assert load.error is None, load.error
        wait_for(lambda: all(w1.get_json(f"/stock/{s}")[0] == 200 for s in SKUS), 60, "SKUs known")
        stats = check_invariants(ns, w1, load)  # includes the changelog's version audit
        assert stats["orders"] > 500, stats
    finally:
        w2.stop()
        w1.stop()
