"""The sizes of a full and a quick bench run, the levers measured, and the log."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass
class Sizes:
    repeats: int = 3
    # P1: the hot-SKU flash sale, pipeline and baselines alike
    flash_attempts: int = 100_000
    flash_units: int = 25_000
    # P2/P3: every reserve granted, on one SKU and on many
    single_attempts: int = 40_000
    many_skus: int = 1000
    pass_messages: int = 100_000
    # the load generator measured alone (send and read), as many commands as P1
    loadgen_commands: int = 100_000
    p6_seconds: float = 30.0
    p6_skus: int = 2000
    p6_calibration: int = 30_000
    rss_points: list[int] = field(default_factory=lambda: [100_000, 1_000_000])
    warm_restarts: int = 2  # restarts of each kind at the largest table
    idle_seconds: float = 5.0  # window for the idle-CPU figure
    profile_seconds: float = 15.0
    profile_attempts: int = 200_000
    ingest_records: int = 200_000
    # P7: closed-loop reserves over HTTP and over Kafka (per client, 8 clients at once)
    reserve_http_n: int = 500
    levers: list[str] = field(default_factory=lambda: ["uvloop"])
    lever_pairs: int = 2
    mix_attempts: int = 20_000


FULL = Sizes()
QUICK = Sizes(
    repeats=1,
    flash_attempts=4000,
    flash_units=1000,
    single_attempts=3000,
    many_skus=100,
    pass_messages=10_000,
    loadgen_commands=4000,
    p6_seconds=5.0,
    p6_skus=100,
    p6_calibration=3000,
    rss_points=[5_000, 10_000],
    warm_restarts=1,
    idle_seconds=2.0,
    profile_seconds=4.0,
    profile_attempts=20_000,
    ingest_records=10_000,
    reserve_http_n=50,
    levers=["uvloop"],
    lever_pairs=1,
    mix_attempts=1000,
)

LEVER_ENV = {
    # the sinks leave the worker process (they also run alone: python -m pipeline.sinks)
    "sink_off": {"INVENTORY_SINK_ENABLED": "0"},
    # the expiry sweeper checks its index of open reservations less often
    "expiry_30s": {"INVENTORY_EXPIRY_SCAN_INTERVAL_S": "30"},
    # uvloop instead of asyncio's default event loop (Faust reads FAUST_LOOP)
    "uvloop": {"FAUST_LOOP": "uvloop"},
    # the changelog relay as its own process (python -m pipeline.relay)
    "relay_out": {"INVENTORY_RELAY_ENABLED": "0"},
    # relay and sinks each in their own process: the worker only decides
    "split": {"INVENTORY_RELAY_ENABLED": "0", "INVENTORY_SINK_ENABLED": "0"},
}
# processes a lever runs beside the worker (the work it took out of the worker)
LEVER_SIDECARS: dict[str, tuple[str, ...]] = {
    "relay_out": ("pipeline.relay",),
    "split": ("pipeline.relay", "pipeline.sinks"),
}
# The topology the headline pipeline figures use: a worker that only decides, the relay
# and the sinks each in their own process. "One process" runs (the default deployment,
# everything inside the worker) are measured beside it.
TUNED = "split"


def tuned() -> dict[str, Any]:
    """pipeline_run keyword arguments for the tuned topology."""
    return {"env": LEVER_ENV[TUNED], "sidecars": LEVER_SIDECARS[TUNED]}


def log(msg: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[bench {stamp}] {msg}", file=sys.stderr, flush=True)
