"""Chaos rounds inside the test suite: flash sales under faults, invariants I1..I6.

``test_chaos_short`` runs 4 rounds (part of ``make test``): Redis down, search
refusing and black-holed, duplicate bursts and a ``kill -9`` of one of the two
workers (a rebalance both ways); broker restarts are left to ``make chaos``
(one takes about 90 s here);
``test_chaos_rounds`` (slow) runs ``CHAOS_ROUNDS`` random rounds, like
``make chaos``. See ``chaos_workload.py`` for the workload and ``chaos_checks.py``
for the exact checks.
"""

from __future__ import annotations

import copy
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chaos  # noqa: E402

# Single-worker kill -9 rounds also run in tests/integration/test_crash.py; the
# broker-restart path runs in `make chaos`.
SHORT_PLAN = [
    ["redis", "dupes"],
    ["search_refuse", "dupes"],
    ["search_blackhole", "redis"],
    ["kill9", "dupes"],
]


def run_and_assert(cfg: chaos.ChaosConfig) -> list[chaos.RoundResult]:
    results = chaos.run_chaos(cfg)
    assert len(results) == cfg.rounds
    bad = [r for r in results if not r.ok]
    assert not bad, "invariant violations:\n" + chaos.violation_report(results)
    return results


@pytest.mark.integration
def test_chaos_short(kafka, redis_service, opensearch):
    seed = int(os.environ.get("CHAOS_SEED", "11"))
    cfg = chaos.ChaosConfig(rounds=len(SHORT_PLAN), seed=seed, plan=SHORT_PLAN, traffic_s=12.0)
    results = run_and_assert(cfg)
    injected = [f for r in results for f in r.faults]
    assert all(f.error is None for f in injected), [f.error for f in injected if f.error]
    assert sum(r.commands for r in results) > 1000, "too little traffic to prove anything"


@pytest.mark.integration
@pytest.mark.slow
def test_chaos_rounds(kafka, redis_service, opensearch):
    """Not in `make test`; `make chaos` runs the same through run_chaos.py."""
    rounds = int(os.environ.get("CHAOS_ROUNDS", "10"))
    seed = int(os.environ.get("CHAOS_SEED", "1"))
    run_and_assert(chaos.ChaosConfig(rounds=rounds, seed=seed))


# --------------------------------------------------------------------------
# the checker itself: a consistent history passes, each planted fault is caught

T0 = 1_700_000_000_000


def _answer(eid, oid, outcome, qty, available, reason="", duplicate=False):
    return {
        "event_id": eid,
        "order_id": oid,
        "sku": "S",
        "outcome": outcome,
        "qty": qty,
        "available": available,
        "reason": reason,
        "duplicate": duplicate,
    }


def _change(version, on_hand, reserved, cause, eid, oid="", at=T0, processed=None):
    return {
        "sku": "S",
        "version": version,
        "on_hand": on_hand,
        "reserved": reserved,
        "safety_stock": 0,
        "available": max(0, on_hand - reserved),
        "cause_type": cause,
        "cause_event_id": eid,
        "order_id": oid,
        "channel": "web",
        "occurred_at": at,
        "processed_at": processed if processed is not None else at + 5,
    }


def _history():
    """restock 5; o1 reserves 2 and commits; o2 (4) is rejected; o3 (short) expires."""
    orders = {
        "o1": chaos.OrderInfo("o1", "S", 2, T0, 0, "commit", 1),
        "o2": chaos.OrderInfo("o2", "S", 4, T0, 0, "release", 1),
        "o3": chaos.OrderInfo("o3", "S", 1, T0, 2000, "abandon", 1),
    }
    commands = {
        "rs1": ("RestockReceived", {}),
        "r-o1": ("ReserveStock", {}),
        "c-o1": ("CommitReservation", {}),
        "r-o2": ("ReserveStock", {}),
        "r-o3": ("ReserveStock", {}),
    }
    led = chaos.LedgerView(
        commands, Counter(dict.fromkeys(commands, 1)), orders, {"rs1": ("S", 5)}, ["S"]
    )
    by_event = {
        "r-o1": [_answer("r-o1", "o1", "RESERVED", 2, 3)],
        "c-o1": [_answer("c-o1", "o1", "COMMITTED", 2, 3)],
        "r-o2": [_answer("r-o2", "o2", "REJECTED", 4, 3, "insufficient_stock")],
        "r-o3": [_answer("r-o3", "o3", "RESERVED", 1, 2)],
        "expire-1": [_answer("expire-1", "o3", "EXPIRED", 1, 3, "expired")],
    }
    changes = {
        "S": [
            _change(1, 5, 0, "RestockReceived", "rs1"),
            _change(2, 5, 2, "ReserveStock", "r-o1", "o1"),
            _change(3, 3, 0, "CommitReservation", "c-o1", "o1"),
            _change(4, 3, 1, "ReserveStock", "r-o3", "o3"),
            _change(5, 3, 0, "ExpireReservation", "expire-1", "o3", at=T0 + 2500),
        ]
    }
    table = {"S": {"sku": "S", "on_hand": 3, "reserved": 0, "available": 3, "version": 5}}
    samples = {"redis": {"S": [(1.0, (2, 5, 2, 3)), (2.0, (5, 3, 0, 3))]}, "search": {}}
    return led, by_event, changes, [], table, samples


def _check(led, by_event, changes, dead, table, samples, disruptions=()):
    found, _ = chaos.check_invariants(
        led, by_event, changes, dead, table, samples, list(disruptions), 10.0, []
    )
    return {k: v for k, v in found.items() if v}


def _planted(mutate):
    h = copy.deepcopy(_history())
    mutate(*h)
    return _check(*h)


def test_checker_passes_a_consistent_history():
    assert _check(*_history()) == {}


@pytest.mark.parametrize(
    ("name", "mutate", "invariant"),
    [
        # I1: v4 held more than on hand (and the table says so too)
        (
            "oversell",
            lambda led, be, ch, d, t, s: ch["S"].__setitem__(
                3, _change(4, 3, 4, "ReserveStock", "r-o3", "o3")
            ),
            "I1",
        ),
        ("on_hand drift", lambda led, be, ch, d, t, s: t["S"].__setitem__("on_hand", 4), "I2"),
        # I3: the restock applied a second time
        (
            "double restock",
            lambda led, be, ch, d, t, s: (
                ch["S"].append(_change(6, 8, 0, "RestockReceived", "rs1")),
                t["S"].update(version=6, on_hand=8),
            ),
            "I3",
        ),
        # I3: a reserve's answer never published although its change landed
        ("lost answer", lambda led, be, ch, d, t, s: be.pop("r-o1"), "I3"),
        ("version gap", lambda led, be, ch, d, t, s: ch["S"].pop(2), "I4"),
        (
            "projection regress",
            lambda led, be, ch, d, t, s: s["redis"]["S"].append((3.0, (4, 3, 1, 2))),
            "I4",
        ),
        (
            "projection ahead",
            lambda led, be, ch, d, t, s: s["redis"]["S"].append((3.0, (9, 3, 0, 3))),
            "I4",
        ),
        (
            "late expiry",
            lambda led, be, ch, d, t, s: ch["S"].__setitem__(
                4,
                _change(5, 3, 0, "ExpireReservation", "expire-1", "o3", T0 + 2500, T0 + 60_000),
            ),
            "I6",
        ),
        (
            "early expiry",
            lambda led, be, ch, d, t, s: ch["S"].__setitem__(
                4, _change(5, 3, 0, "ExpireReservation", "expire-1", "o3", T0 + 100)
            ),
            "I6",
        ),
        (
            "retry answered differently",
            lambda led, be, ch, d, t, s: be["c-o1"].append(
                _answer("c-o1", "o1", "INVALID_STATE", 2, 3, "reservation is COMMITTED")
            ),
            "I6",
        ),
        (
            "never closed",
            lambda led, be, ch, d, t, s: (
                be.pop("c-o1"),
                ch["S"].pop(2),
                ch["S"].__setitem__(2, _change(3, 5, 3, "ReserveStock", "r-o3", "o3")),
                ch["S"].__setitem__(
                    3, _change(4, 5, 2, "ExpireReservation", "expire-1", "o3", T0 + 2500)
                ),
                t["S"].update(on_hand=5, reserved=2, available=3, version=4),
                s.__setitem__("redis", {}),
            ),
            "I6",
        ),
    ],
)
def test_checker_catches_planted_violation(name, mutate, invariant):
    found = _planted(mutate)
    assert invariant in found, (name, found)


def test_round_plan_faults_fit_the_kafka_mode():
    """``broker`` restarts the single broker, ``leader_kill`` kills a cluster node: a
    random plan picks each only in its own mode, and no more than ``broker_restarts``."""
    for cluster_mode, own, other in (
        (False, "broker", "leader_kill"),
        (True, "leader_kill", "broker"),
    ):
        seen = Counter()
        for seed in range(40):
            cfg = chaos.ChaosConfig(rounds=10, seed=seed, cluster=cluster_mode)
            plan = chaos.round_plan(cfg)
            kinds = [k for r in plan for k in r]
            assert other not in kinds, (cluster_mode, plan)
            assert kinds.count(own) <= cfg.broker_restarts, (cluster_mode, plan)
            seen.update(kinds)
        assert seen[own] > 0 and seen["kill9"] > 0, seen


def test_round_plan_of_the_single_broker_is_unchanged():
    """Adding the cluster's fault changed no seed's plan on the single broker."""
    assert chaos.round_plan(chaos.ChaosConfig(rounds=4, seed=3)) == [
        ["kill9", "dupes"],
        ["kill9", "broker", "redis"],
        ["broker", "search_blackhole"],
        ["search_refuse"],
    ]


@pytest.mark.integration
def test_tail_refill_finds_what_the_live_tail_missed(kafka):
    """The checks' fallback when the live tail lags (a long broker restart): a re-read
    from the beginning adds every record the tail has not seen, once."""
    from confluent_kafka import Producer

    from chaos_observe import TopicTail
    from harness import Namespace
    from pipeline.clients import confluent_config
    from pipeline.kafka.topics import ensure_topics
    from schemas.codec import AvroCodec

    ns = Namespace.fresh("tail-refill", partitions=2)
    s = ns.settings
    ensure_topics(s)
    codec = AvroCodec()
    producer = Producer(confluent_config(s))
    for i in range(30):
        answer = {
            "event_id": f"r-{i}",
            "order_id": f"o-{i}",
            "sku": "SKU-T",
            "outcome": "RESERVED",
            "qty": 1,
            "available": 30 - i,
        }
        producer.produce(s.results_topic, codec.encode("ReservationResult", answer), f"o-{i}")
    assert producer.flush(30) == 0
    tail = TopicTail(s)  # never started: it saw nothing, as a tail that lost its place
    assert tail.refill(timeout=60) == 30
    assert sorted(tail.by_event) == sorted(f"r-{i}" for i in range(30))
    assert tail.first_answer("r-7")["available"] == 23
    assert tail.refill(timeout=60) == 0  # a position seen already is not added twice
    assert tail.refilled == 30 and not tail.rewritten
