"""What every report section shares: the goals, the figures quoted from before,
number formatting and verdicts, and the writer's base (lines, plots, medians)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.common import median, spread

# the goals of issue 12 (and the memory goal kept from issue 6)
GOALS = {
    "p1": 10.0,  # hot-SKU decisions/s, pipeline ÷ PostgreSQL, at least
    "p2": 1.0,  # many-SKU ÷ single-SKU, at least
    "p3": 0.5,  # single SKU ÷ bare aiokafka passthrough, at least
    "p6": 3.0,  # p99 order -> Redis ÷ bare Kafka p99, at most
    "cpu_us": 100.0,  # CPU per decision over every process, µs, at most
    "kill_s": 10.0,  # kill -9 at 1M SKUs -> /healthz 200, seconds, at most
    "restore": 0.3,  # cold restore rate ÷ bare changelog read rate at 1M SKUs, at least
    "rss": 300.0,  # worker RSS with 1M SKUs, MB, at most
}
# the load generator is "not the bottleneck" when alone it sends and reads at least this
# many times the pipeline's rate (a margin well above this machine's run-to-run noise)
LOADGEN_HEADROOM = 2.0

# the processes whose CPU makes up "CPU per decision" (the load generator is apart)
PROCESSES = ("worker", "pipeline.relay", "pipeline.sinks", "kafka", "redis", "opensearch")
PROCESS_LABEL = {
    "worker": "worker",
    "pipeline.relay": "relay",
    "pipeline.sinks": "sinks",
    "kafka": "Kafka",
    "redis": "Redis",
    "opensearch": "OpenSearch",
}

# what a stack frame belongs to, for the profile's subsystem table: (label, regex). The
# regex is matched against full frames (inclusive share: the stack contains it) and
# against the short leaf names (self share: the function running is one of them).
SUBSYSTEMS: list[tuple[str, str]] = [
    (
        "batch engine (`agents/ledger.py`: take, sequence, classify, commit, store)",
        r"agents/ledger\.py",
    ),
    ("fold (`pipeline/batch.py` + `pipeline/domain/core.py`)", r"pipeline/(batch|core)\.py"),
    ("transactions (`pipeline/kafka/transactions.py`, on its thread)", r"kafka/transactions\.py"),
    ("feed (`pipeline/kafka/feed.py`: fetch loop to per-partition buffers)", r"kafka/feed\.py"),
    ("local store (`pipeline/store.py`, RocksDB WriteBatch)", r"pipeline/store\.py"),
    ("Avro codec (`schemas/codec.py`)", r"schemas/codec\.py"),
    ("validation (`schemas/validation.py`)", r"pipeline/validation\.py"),
    ("stored values, orjson (`tables/stock.py`)", r"tables/stock\.py"),
    ("relay (`pipeline/relay.py`)", r"pipeline/relay\.py"),
    ("sinks (`pipeline/sinks/`)", r"sinks/[a-z_]+\.py"),
    (
        "expiry sweeper (`pipeline/expiry.py`, `pipeline/kafka/indexing.py`)",
        r"pipeline/(expiry|indexing)\.py",
    ),
    ("prometheus_client", r"prometheus_client/"),
    ("aiokafka consumer/fetcher", r"aiokafka/consumer/"),
    ("Faust and mode (services, web, monitor)", r"\b(faust|mode)/"),
    ("asyncio event loop and selectors", r"asyncio/|selectors\.py"),
]

# "before" figures, µs, from ../shared/PERF-NOTES.md (the previous design's code)
BEFORE = {
    "ingest": "~85 (Faust stream path, per record)",
    "decode": "5.6",
    "validation": "6.9",
    "stored_decode": "7.5 (per command)",
    "decide_reserved": "22.7 (`core.decide`)",
    "decide_rejected": "7.2 (`core.decide`)",
    "table_write": "45–55 per table write, two per decision",
    "relay": "30.5 (decode + encode)",
    "encode": "7.8 validated vs 3.6 raw fastavro",
    "labels": "1.5 per `labels(...).inc()`",
}


def fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float):
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def fmt_spread(vals: list[float], digits: int = 2) -> str:
    m, lo, hi = spread(vals)
    if len([v for v in vals if v == v]) <= 1:
        return fmt(m, digits)
    return f"{fmt(m, digits)} ({fmt(lo, digits)}–{fmt(hi, digits)})"


def isnan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def verdict(value: float, goal: float, higher_is_better: bool = True) -> str:
    if isnan(value):
        return "not measured"
    ok = value >= goal if higher_is_better else value <= goal
    return "met" if ok else "missed"


def _get(d: dict[str, Any], *path: str, default: Any = float("nan")) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d or d[p] is None:
            return default
        d = d[p]
    return d


def _tp(rep: dict[str, Any], key: str) -> float:
    v = _get(rep, key, "throughput_per_s")
    return float(v) if v is not None else float("nan")


def _nan_for_none(obj: Any) -> Any:
    """JSON stores NaN as null; turn it back so arithmetic and fmt() see NaN."""
    if isinstance(obj, dict):
        return {k: _nan_for_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_for_none(v) for v in obj]
    return float("nan") if obj is None else obj


def _not_run(part: Any) -> str:
    """Why a part has no results ("" when it has some)."""
    if not isinstance(part, dict) or not part:
        return "not run"
    if part.get("skipped"):
        return "skipped in this invocation"
    if "error" in part:
        return f"failed: {part['error']}"
    return ""


class WriterBase:
    """State and helpers of the report writer; the sections are mixins over it."""

    def __init__(self, r: dict[str, Any], plot_dir: Path, rel: str) -> None:
        r = _nan_for_none(r)
        self.r = r
        self.dir = plot_dir
        self.rel = rel
        self.reps: list[dict[str, Any]] = _get(r, "throughput", "repeats", default=[]) or []
        self.lines: list[str] = []

    # ------------------------------------------------------------ helpers
    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def img(self, name: str, alt: str) -> None:
        self.add(f"![{alt}]({self.rel}/{name})", "")

    def ratios(self, key: str) -> list[float]:
        return [float(_get(rep, "ratios", key)) for rep in self.reps]

    def tps(self, key: str) -> list[float]:
        return [_tp(rep, key) for rep in self.reps]

    def med(self, key: str, *path: str) -> float:
        return median(float(_get(rep, key, *path)) for rep in self.reps)

    def cpu_us(self, key: str) -> dict[str, float]:
        """Median over repeats of each process's CPU µs per decision in run ``key``."""
        per = [_get(rep, key, "cpu_ms_per_decision", default={}) for rep in self.reps]
        per = [p for p in per if isinstance(p, dict) and p]
        if not per:
            return {}
        names = [n for n in PROCESSES if any(n in p for p in per)]
        out = {n: median(p.get(n, float("nan")) * 1000 for p in per) for n in names}
        out["total"] = median(sum(v for k, v in p.items() if k in PROCESSES) * 1000 for p in per)
        return out

    def loadgen_us(self, key: str) -> float:
        return self.med(key, "loadgen_cpu_ms_per_decision") * 1000
