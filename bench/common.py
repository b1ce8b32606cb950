"""Shared helpers: namespaces and worker subprocesses on the local stack, stats, /proc.

Workers are the test harness's real ``faust -A pipeline.app worker`` subprocesses
(``tests/harness.py``), each in a fresh :class:`BenchNamespace` (topic prefix, app id,
Redis key prefix and search index of its own), with data dirs and logs under
``bench/out``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka.admin import AdminClient, NewTopic

from config.settings import Settings

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
REPORT_DIR = REPO / "bench" / "report"

if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

import harness  # noqa: E402  (tests/harness.py: the project's worker runner)

PARTITIONS = 8  # the project's default INVENTORY_PARTITIONS
T = TypeVar("T")


@dataclass
class BenchNamespace:
    """A fresh topic prefix / app id, plus its own Redis prefix and search index."""

    ns: harness.Namespace
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fresh(cls, label: str, *, sink: bool = True, **env: str) -> BenchNamespace:
        ns = harness.Namespace.fresh(f"bench-{label}", PARTITIONS)
        extra = {
            "INVENTORY_REDIS_KEY_PREFIX": f"{ns.name}:",
            "INVENTORY_SEARCH_INDEX": ns.name.lower(),
            "INVENTORY_SINK_ENABLED": "1" if sink else "0",
        }
        extra.update(env)
        ns.extra_env.update(extra)
        return cls(ns, extra)

    @property
    def name(self) -> str:
        return self.ns.name

    @property
    def settings(self) -> Settings:
        return replace(
            self.ns.settings,
            redis_key_prefix=self.env["INVENTORY_REDIS_KEY_PREFIX"],
            search_index=self.env["INVENTORY_SEARCH_INDEX"],
        )

    def worker(self, name: str = "w1") -> harness.Worker:
        w = harness.Worker(self.ns, name, data_dir=OUT / "work" / self.name / name / "data")
        w.log_path = OUT / "work" / self.name / f"{name}.log"
        return w

    def sidecar(self, module: str) -> harness.Sidecar:
        return harness.Sidecar(self.ns, module, OUT / "work" / self.name / f"{module}.log")

    def cleanup(self) -> None:
        """Delete the namespace's topics, Redis keys and search index (best effort)."""
        cfg = self.settings
        with contextlib.suppress(Exception):
            admin = AdminClient({"bootstrap.servers": cfg.kafka_bootstrap})
            names = [
                t
                for t in admin.list_topics(timeout=10).topics
                if t.startswith(cfg.topic_prefix) or t.startswith(cfg.app_id + "-")
            ]
            if names:
                for fut in admin.delete_topics(names, operation_timeout=30).values():
                    with contextlib.suppress(Exception):
                        fut.result(30)
        with contextlib.suppress(Exception):
            import redis

            r = redis.Redis.from_url(cfg.redis_url)
            batch = []
            for key in r.scan_iter(match=f"{cfg.redis_key_prefix}*", count=5000):
                batch.append(key)
                if len(batch) >= 5000:
                    r.delete(*batch)
                    batch = []
            if batch:
                r.delete(*batch)
        with contextlib.suppress(Exception):
            req = urllib.request.Request(
                f"{cfg.opensearch_url}/{cfg.search_index}", method="DELETE"
            )
            urllib.request.urlopen(req, timeout=10).close()
        # keep the worker logs (bench/out/work/<ns>/*.log), drop the RocksDB data
        for data in (OUT / "work" / self.name).glob("*/data"):
            shutil.rmtree(data, ignore_errors=True)


def create_topics(cfg: Settings, names: Iterable[str], partitions: int = PARTITIONS) -> None:
    admin = AdminClient({"bootstrap.servers": cfg.kafka_bootstrap})
    futs = admin.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names]
    )
    for fut in futs.values():
        fut.result(30)


def delete_topics(cfg: Settings, names: Sequence[str]) -> None:
    admin = AdminClient({"bootstrap.servers": cfg.kafka_bootstrap})
    for fut in admin.delete_topics(list(names), operation_timeout=30).values():
        with contextlib.suppress(Exception):
            fut.result(30)


def short_id() -> str:
    return uuid.uuid4().hex[:8]


# ---------------------------------------------------------------- worker probes

_COMMANDS_RE = re.compile(r"^inventory_commands_total\{([^}]*)\}\s+([0-9.eE+-]+)$", re.M)


def decided_total(worker: harness.Worker, type_name: str | None = None) -> int:
    """Sum of ``inventory_commands_total`` on ``worker`` (optionally of one command type)."""
    with urllib.request.urlopen(worker.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for labels, value in _COMMANDS_RE.findall(text):
        if type_name is None or f'type="{type_name}"' in labels:
            total += float(value)
    return int(total)


def wait_decided(
    worker: harness.Worker, target: int, timeout: float, type_name: str | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if decided_total(worker, type_name) >= target:
            return
        time.sleep(0.2)
    raise TimeoutError(f"worker decided {decided_total(worker, type_name)} < {target}")


def wait_stock(worker: harness.Worker, sku: str, on_hand: int, timeout: float = 60.0) -> None:
    """Until ``GET /stock/{sku}`` shows ``on_hand`` (Kafka orders nothing across topics)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = worker.get_json(f"/stock/{sku}")
        if status == 200 and body["on_hand"] >= on_hand:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{sku} did not reach on_hand={on_hand}")


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB, from /proc."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":", 1)
            vals[k] = int(v.split()[0]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_to_healthy(worker: harness.Worker, timeout: float = 300.0) -> float:
    """Start ``worker`` and return seconds until ``/healthz`` answers 200."""
    t0 = time.perf_counter()
    worker.start(wait=False)
    worker.wait_healthy(timeout)
    return time.perf_counter() - t0


def log_count(worker: harness.Worker, needle: str) -> int:
    try:
        return worker.log_path.read_text(errors="replace").count(needle)
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------- a shared, restartable stack


def stack_pids() -> tuple[str, ...]:
    """The pids in the local stack's pid files; a change means a service was restarted."""
    files = [
        REPO / ".stack" / "kafka" / "kafka.pid",
        REPO / ".stack" / "redis" / "redis.pid",
        REPO / ".stack" / "opensearch" / "opensearch.pid",
    ]
    out = []
    for f in files:
        try:
            out.append(f.read_text().strip())
        except OSError:
            out.append("")
    return tuple(out)


class StackRestarted(RuntimeError):
    """Kafka, Redis or OpenSearch restarted during a measurement (another session's test)."""


def undisturbed(
    label: str, fn: Callable[[], T], tries: int = 2, log: Callable[[str], None] = print
) -> T:
    """Run ``fn``; if it fails or a stack service restarted meanwhile, run it again once."""
    for attempt in range(1, tries + 1):
        before = stack_pids()
        try:
            result = fn()
            if stack_pids() != before:
                raise StackRestarted(f"a stack service restarted during {label}")
            return result
        except Exception as exc:
            if attempt >= tries:
                raise
            log(f"{label}: {exc}; measuring again")
            time.sleep(5)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- stats


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else math.nan


def spread(values: Iterable[float]) -> tuple[float, float, float]:
    """(median, min, max) ignoring NaN."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return (math.nan, math.nan, math.nan)
    return (statistics.median(vals), min(vals), max(vals))


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and not math.isnan(a) else math.nan


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj
