"""What a worker's health endpoints mean (served by :mod:`pipeline.web.views`).

* ``GET /livez``: the process is alive. Answering at all shows the event loop
  serves; it is 503 only when the Faust app or its consumer has crashed (a crashed
  mode service stays crashed, so only a restart helps). A worker that rebalances,
  restores its tables or waits for Kafka is alive.
* ``GET /readyz``: the worker can answer for its partitions now. 200 only when
  Faust's table recovery has completed, no rebalance is under way and every ledger
  partition assigned to this worker has taken ownership and caught up with its
  changelog; else 503 with the reasons. Its body also lists the worker's ledger
  partitions and their state.
* ``GET /healthz`` (kept as it was, the public contract the tests, Docker and the
  bench use): 503 ``{"status": "recovering"}`` when not ready (the same checks as
  ``/readyz``; ``{"status": "halted", "reasons": [...]}`` when a ledger partition
  stopped because its input offsets went backwards, which needs an operator), else 200 ``{"status": "ok"|"degraded", "sinks": {...}}``, each sink
  ``ok``, ``degraded`` (its target fails) or ``replaying`` (its target lost data and
  is being re-applied from the changelog); degraded unless every sink is ok (the
  ledger still serves).

The functions below take the app and the ledger engine as arguments so they can be
checked without a running worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reasons: list[str] = field(default_factory=list)
    # this worker's ledger partitions: partition -> "starting" | "ready" | "halted" | "stopped"
    partitions: dict[int, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.ready else "not ready",
            "reasons": self.reasons,
            "partitions": {str(p): s for p, s in sorted(self.partitions.items())},
        }


def readiness(app: Any, engine: Any) -> Readiness:
    """The checks of ``/healthz`` and ``/readyz``, with a reason for each that fails."""
    partitions = {p: ledger.state.value for p, ledger in engine.partitions.items()}
    reasons = []
    if not app.tables.recovery.completed.is_set():
        reasons.append("tables recovering")
    if app.rebalancing:
        reasons.append("rebalancing")
    halted = [
        f"ledger partition {p} halted: {ledger.halted}"
        for p, ledger in sorted(engine.partitions.items())
        if getattr(ledger, "halted", "")
    ]
    reasons.extend(halted)
    if not engine.ready():
        waiting = sorted(p for p, s in partitions.items() if s not in ("ready", "halted"))
        if waiting:
            reasons.append("ledger partitions not caught up: " + ", ".join(map(str, waiting)))
        elif not halted:
            reasons.append("ledger partitions not caught up")
    return Readiness(not reasons, reasons, partitions)


def liveness(app: Any) -> list[str]:
    """Why the worker is dead (empty: alive)."""
    reasons = []
    for name, service in (("app", app), ("consumer", getattr(app, "_consumer", None))):
        if service is not None and service.crashed:
            reason = getattr(service, "crash_reason", None)
            reasons.append(f"{name} crashed: {reason!r}" if reason else f"{name} crashed")
    return reasons
