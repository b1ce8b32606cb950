"""Chaos run configuration: the fault kinds, ChaosConfig, the seeded round plan,
and the records of what a round sent and did (orders, faults, results)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from harness import REPO

STACK = REPO / "scripts" / "stack.sh"
FAULT_KINDS = (
    "kill9",
    "broker",
    "leader_kill",
    "redis",
    "search_refuse",
    "search_blackhole",
    "dupes",
)
# ``broker`` restarts the shared single broker, ``leader_kill`` crashes one node of the
# 3-node cluster: each only in its own mode (ChaosConfig.cluster)
SINGLE_BROKER_ONLY = ("broker",)
CLUSTER_ONLY = ("leader_kill",)
INVARIANTS = ("I1", "I2", "I3", "I4", "I5", "I6")
TERMINAL = ("COMMITTED", "RELEASED", "EXPIRED")
ORDER_TYPES = ("ReserveStock", "CommitReservation", "ReleaseReservation")
DEFAULT_TTL_MS = 15 * 60 * 1000


@dataclass
class ChaosConfig:
    rounds: int = 10
    seed: int = 1
    traffic_s: float = 14.0  # how long each round's flash sale sends new orders
    shoppers: int = 3  # concurrent producer threads
    rate: float = 90.0  # new orders + restocks per second over all shoppers (closes extra)
    hot_skus: int = 2
    cold_skus: int = 3
    hot_units: int = 12
    cold_units: int = 30
    hot_share: float = 0.75  # of new orders, on a hot SKU
    restock_share: float = 0.06
    short_ttl_share: float = 0.15  # abandoned carts with a short ttl
    short_ttl_ms: tuple[int, int] = (1500, 4000)
    late_commit_share: float = 0.25  # of the abandoned carts: paid after the expiry
    fast_checkout_share: float = 0.1  # commit sent right after the reserve, unanswered yet
    commit_share: float = 0.6  # of the orders checked out: commit (else release)
    think_s: tuple[float, float] = (0.2, 1.5)
    resend_share: float = 0.08  # immediate producer re-send of the same command
    retry_after_s: float = 4.0  # client re-sends a command not answered by then
    max_retries: int = 3
    dupes_burst: int = 120  # commands re-sent by a ``dupes`` fault
    # faults
    plan: list[list[str]] | None = None  # explicit faults per round; else random
    faults_per_round: tuple[int, int] = (1, 3)
    broker_restarts: int = 3  # at most this many broker restarts in a random plan
    fault_window: tuple[float, float] = (0.1, 0.8)  # when faults start, share of traffic_s
    outage_s: tuple[float, float] = (3.0, 7.0)  # redis/search outage length
    kill_down_s: tuple[float, float] = (0.5, 3.0)  # dead time of a killed worker
    broker_down_s: tuple[float, float] = (0.5, 2.0)  # the broker stays stopped this long
    # run on the local 3-node cluster (tests/cluster.py: RF 3, min ISR 2, 1 standby)
    # instead of the shared single broker; its own fault: leader_kill
    cluster: bool = False
    # dead time of a killed leader broker (at least; and until its leadership of the hot
    # partition has moved): past the cluster's broker.session.timeout.ms (6 s)
    leader_down_s: tuple[float, float] = (7.0, 10.0)
    # after each round, also audit the committed changelog's version chain
    # (crashload.audit_changelog: no gap, no version written twice)
    audit_changelog: bool = False
    # checks
    expiry_slack_s: float = 10.0
    drain_timeout_s: float = 180.0
    answer_timeout_s: float = 60.0
    converge_timeout_s: float = 90.0
    partitions: int = 4
    delete_topics_on_success: bool = True


def round_plan(cfg: ChaosConfig) -> list[list[str]]:
    """The faults of every round: ``cfg.plan`` or a seeded random choice."""
    if cfg.plan is not None:
        plan = [list(p) for p in cfg.plan]
        while len(plan) < cfg.rounds:
            plan.append(list(cfg.plan[len(plan) % len(cfg.plan)]))
        return plan[: cfg.rounds]
    rng = random.Random(cfg.seed * 7919 + 1)
    plan = []
    restarts = 0
    excluded = SINGLE_BROKER_ONLY if cfg.cluster else CLUSTER_ONLY
    for _ in range(cfg.rounds):
        kinds = [
            k
            for k in FAULT_KINDS
            if k not in excluded
            and (k not in ("broker", "leader_kill") or restarts < cfg.broker_restarts)
        ]
        if "search_refuse" in kinds and "search_blackhole" in kinds:
            # one search fault per round: they act on the same proxy
            kinds.remove(rng.choice(["search_refuse", "search_blackhole"]))
        n = rng.randint(*cfg.faults_per_round)
        chosen = rng.sample(kinds, min(n, len(kinds)))
        restarts += "broker" in chosen or "leader_kill" in chosen
        plan.append(sorted(chosen, key=FAULT_KINDS.index))
    return plan


@dataclass
class OrderInfo:
    order_id: str
    sku: str
    qty: int
    occurred_at: int
    ttl_ms: int  # 0 = the workers' default (15 min)
    plan: str  # commit, release, abandon, late_commit
    round: int

    @property
    def short(self) -> bool:
        return self.plan in ("abandon", "late_commit")

    @property
    def expires_at(self) -> int:
        return self.occurred_at + (self.ttl_ms or DEFAULT_TTL_MS)


@dataclass
class FaultRecord:
    kind: str
    detail: str = ""
    start: float = 0.0  # time.time()
    end: float = 0.0
    disruptive: bool = False  # stops processing (kill -9, broker): widens the expiry bound
    error: str | None = None

    def label(self) -> str:
        return f"{self.kind}({self.detail})" if self.detail else self.kind


@dataclass
class RoundResult:
    number: int
    faults: list[FaultRecord]
    commands: int
    violations: dict[str, list[str]]
    seconds: float
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())
