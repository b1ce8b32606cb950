"""What a load is (:class:`LoadSpec`) and what it measured (:class:`Answer`,
:class:`LoadResult`: throughput, latencies, held and oversold units, duplicates)."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

# results the pipeline publishes for the loadgen's commands
ANSWER_OUTCOMES_HELD = ("RESERVED", "COMMITTED")


@dataclass
class LoadSpec:
    """What to send; see the module docstring."""

    mode: str = "flash"  # flash | steady | dup
    attempts: int = 2000
    units: int = 500  # flash: units of the hot SKU; steady: units per SKU
    skus: int = 1  # steady: number of SKUs
    zipf: float = 1.1
    qty: int = 1
    producers: int = 4
    rate: float | None = None  # total commands/s; None = as fast as possible
    commit_fraction: float = 0.0
    release_fraction: float = 0.0
    expire_fraction: float = 0.0
    expire_ttl_ms: int = 1500
    dup_fraction: float = 0.0
    seed: int = 7
    sku_prefix: str = ""
    restock: bool = True
    timeout: float = 300.0
    progress: bool = True

    def sku_names(self) -> list[str]:
        prefix = self.sku_prefix or f"B{uuid.uuid4().hex[:6]}"
        if self.mode == "flash" or self.skus <= 1:
            return [f"{prefix}-HOT"]
        return [f"{prefix}-{i:07d}" for i in range(self.skus)]


@dataclass(slots=True)
class Answer:
    at: float  # wall clock, seconds
    outcome: str
    qty: int
    duplicate: bool
    order_id: str
    sku: str


@dataclass
class LoadResult:
    spec: LoadSpec
    skus: list[str]
    sent: dict[str, float]  # event_id -> send time (wall, s)
    reserve_ids: list[str]
    answers: dict[str, list[Answer]]  # event_id -> answers in arrival order
    outcomes: Counter[str]
    first_send: float
    last_send: float
    last_answer: float
    restocked_units: dict[str, int]
    injected_dups: int
    expected_expiries: int
    complete: bool
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def decisions(self) -> int:
        return sum(len(v) for v in self.answers.values()) + self.outcomes.get("EXPIRED", 0)

    @property
    def throughput(self) -> float:
        """Answers per second, first send to last answer."""
        span = self.last_answer - self.first_send
        return self.decisions / span if span > 0 else float("nan")

    @property
    def send_rate(self) -> float:
        span = self.last_send - self.first_send
        return len(self.sent) / span if span > 0 else float("nan")

    def latencies_ms(self, event_ids: list[str] | None = None) -> list[float]:
        """First answer minus send time, per answered event (ms)."""
        out = []
        for eid in event_ids if event_ids is not None else list(self.sent):
            got = self.answers.get(eid)
            if got:
                out.append((got[0].at - self.sent[eid]) * 1000)
        return out

    def held_units(self) -> dict[str, int]:
        """Per SKU: units held (RESERVED or COMMITTED) by the last answer of each order."""
        last: dict[str, Answer] = {}
        for got in self.answers.values():
            for a in got:
                if not a.duplicate:
                    prev = last.get(a.order_id)
                    if prev is None or a.at >= prev.at:
                        last[a.order_id] = a
        for order_id, a in self.expired_orders.items():
            last[order_id] = a
        held: dict[str, int] = defaultdict(int)
        for a in last.values():
            if a.outcome in ANSWER_OUTCOMES_HELD:
                held[a.sku] += a.qty
        return dict(held)

    @property
    def expired_orders(self) -> dict[str, Answer]:
        return self.extra.get("expired_orders", {})

    def oversold_units(self) -> int:
        """Units granted beyond what was restocked, summed over SKUs (must be 0)."""
        held = self.held_units()
        return sum(max(0, held.get(s, 0) - self.restocked_units.get(s, 0)) for s in held)

    def duplicate_answers(self) -> int:
        """Answers with ``duplicate=true`` to the reserves the load generator sent twice."""
        return sum(1 for e in self.reserve_ids for a in self.answers.get(e, ()) if a.duplicate)

    def other_duplicate_answers(self) -> Counter[str]:
        """Duplicate answers to commands the load generator did not send (e.g. the expiry
        sweeper re-sending an ExpireReservation the agent had not applied yet), by outcome."""
        mine = set(self.sent)
        return Counter(
            a.outcome
            for e, got in self.answers.items()
            if e not in mine
            for a in got
            if a.duplicate
        )

    def summary(self) -> dict[str, Any]:
        from bench.common import percentile

        lat = self.latencies_ms(self.reserve_ids)
        return {
            "mode": self.spec.mode,
            "attempts": self.spec.attempts,
            "skus": len(self.skus),
            "sent": len(self.sent),
            "decisions": self.decisions,
            "throughput_per_s": self.throughput,
            "send_rate_per_s": self.send_rate,
            "outcomes": dict(self.outcomes),
            "oversold_units": self.oversold_units(),
            "injected_duplicates": self.injected_dups,
            "duplicate_answers": self.duplicate_answers(),
            "other_duplicate_answers": dict(self.other_duplicate_answers()),
            "expired_orders": len(self.expired_orders),
            "expected_expiries": self.expected_expiries,
            "complete": self.complete,
            "latency_ms": {
                "p50": percentile(lat, 50),
                "p90": percentile(lat, 90),
                "p99": percentile(lat, 99),
                "max": max(lat) if lat else float("nan"),
            },
        }
