"""Writes ``REPORT.md`` and its PNG plots from the results of :mod:`bench.run`.

Every number in the report comes from the results file; where the prose states a
number it is computed here from those results, and a verdict is the comparison of a
measured figure with the goal in :data:`GOALS`. The only figures not from the run are
the "before" column of the per-stage table, quoted from ``../shared/PERF-NOTES.md``
(measured on the previous, per-record Faust design) and labelled as such.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from bench import profile as prof  # noqa: E402
from bench.common import median, spread  # noqa: E402

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
    ("fold (`pipeline/batch.py` + `pipeline/core.py`)", r"pipeline/(batch|core)\.py"),
    ("transactions (`pipeline/kafka/transactions.py`, on its thread)", r"kafka/transactions\.py"),
    ("feed (`pipeline/kafka/feed.py`: fetch loop to per-partition buffers)", r"kafka/feed\.py"),
    ("local store (`pipeline/store.py`, RocksDB WriteBatch)", r"pipeline/store\.py"),
    ("Avro codec (`schemas/codec.py`)", r"schemas/codec\.py"),
    ("validation (`pipeline/validation.py`)", r"pipeline/validation\.py"),
    ("stored values, orjson (`tables/stock.py`)", r"tables/stock\.py"),
    ("relay (`pipeline/relay.py`)", r"pipeline/relay\.py"),
    ("sinks (`pipeline/sinks/`)", r"sinks/[a-z_]+\.py"),
    (
        "expiry sweeper (`pipeline/expiry.py`, `pipeline/indexing.py`)",
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


def write(results: dict[str, Any], md_path: Path, plot_dir: Path) -> None:
    plot_dir.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(plot_dir, md_path.parent)
    w = _Writer(results, plot_dir, rel)
    md_path.write_text(w.render())


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


class _Writer:
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

    # ------------------------------------------------------------ document
    def render(self) -> str:
        r = self.r
        quick = r.get("quick")
        sizes = r.get("sizes", {})
        self.add(
            "# Benchmark report"
            + (" (quick run: tiny sizes, a smoke check only)" if quick else ""),
            "",
            f"Generated by `python -m bench.run{' --quick' if quick else ''}` "
            f"(`make bench`) on {r.get('started', '?')}; the whole run took "
            f"{fmt(r.get('total_seconds', float('nan')) / 60, 1)} min. Raw numbers: "
            f"`bench/out/results-{'quick' if quick else 'full'}.json` (not committed).",
            "",
            "**How to read it.** This machine is shared with other sessions' workers, tests and "
            "the broker they use, so absolute rates swing from run to run. Every headline figure "
            "is therefore a *ratio* to a baseline measured in the same run, on the same broker, "
            f"over the same workload; throughput ratios are the median over {sizes.get('repeats')} "
            "interleaved repeat(s) (range in brackets), each repeat running every system back to "
            "back. Absolute numbers are given for context only. CPU time per decision is the "
            "figure least disturbed by other processes: it is what a decision costs, not how "
            "long it waited for a core.",
            "",
        )
        self.machine()
        self.summary()
        self.cpu_section()
        self.p1()
        self.loadgen()
        self.p2p3()
        self.p6()
        self.p7()
        self.recovery()
        self.stages()
        self.profile_section()
        self.levers()
        self.correctness()
        self.method(sizes)
        return "\n".join(self.lines) + "\n"

    def machine(self) -> None:
        m = self.r.get("machine_before", {})
        after = self.r.get("machine_after", {})
        pk = m.get("packages", {})
        la = m.get("loadavg", [float("nan")] * 3)
        la2 = after.get("loadavg", [float("nan")] * 3)
        pg = self.r.get("postgres_version") or "not run: " + self.r.get("postgres_error", "")
        self.add(
            "## Machine",
            "",
            "| | |",
            "|---|---|",
            f"| CPU | {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores (KVM guest) |",
            f"| RAM | {m.get('ram_gib', '?')} GiB |",
            f"| kernel | Linux {m.get('kernel', '?')} |",
            f"| load average (1/5/15 min) at start / end | "
            f"{' / '.join(fmt(x) for x in la)} — {' / '.join(fmt(x) for x in la2)} |",
            f"| Python | {m.get('python', '?')} |",
            f"| project commit | {self.git_text(m)} |",
            f"| Kafka | Apache Kafka {m.get('kafka', '?')} (KRaft, single node, same host) |",
            f"| Redis / OpenSearch | {m.get('redis', '?')} / {m.get('opensearch', '?')} |",
            f"| PostgreSQL | {pg} |",
            f"| faust-streaming / aiokafka | {pk.get('faust-streaming')} / {pk.get('aiokafka')} |",
            f"| confluent-kafka / librdkafka | {pk.get('confluent-kafka')} / {m.get('librdkafka')} |",
            f"| rocksdict / fastavro / orjson | {pk.get('rocksdict')} / {pk.get('fastavro')} / "
            f"{pk.get('orjson')} |",
            f"| psycopg / py-spy / matplotlib | {pk.get('psycopg')} / {pk.get('py-spy')} / "
            f"{pk.get('matplotlib')} |",
            "",
            f"Kafka, Redis, OpenSearch, PostgreSQL, the worker, the relay, the sinks and the load "
            f"generator all share these {m.get('cores', '?')} cores, as do other sessions' "
            "processes: every core is shared by the broker and every process of the pipeline, so "
            "a rate here is what the whole chain does on this box, not what one stage could do "
            "on a dedicated core.",
            "",
        )

    @staticmethod
    def git_text(m: dict[str, Any]) -> str:
        g = m.get("git") or {}
        dirty = g.get("dirty") or []
        if not dirty:
            return f"`{g.get('commit', '?')}` (clean outside bench/)"
        return (
            f"`{g.get('commit', '?')}` plus uncommitted changes in {len(dirty)} file(s) "
            "(measured as the tree stood)"
        )

    # ------------------------------------------------------------ summary
    def p6_ratio(self) -> tuple[float, float]:
        lat = self.r.get("latency", {})
        redis99 = _get(lat, "order_to_redis", "p99")
        bare99 = _get(lat, "bare_kafka", "p99")
        if isnan(redis99) or isnan(bare99) or not bare99:
            return float("nan"), bare99
        return redis99 / bare99, bare99

    def largest(self) -> dict[str, Any]:
        pts = _get(self.r, "memory", "points", default=[]) or []
        return pts[-1] if pts else {}

    def at_1m(self) -> dict[str, Any]:
        pts = _get(self.r, "memory", "points", default=[]) or []
        return next((p for p in pts if p["skus"] == 1_000_000), {})

    def kill_times(self, point: dict[str, Any]) -> list[float]:
        """kill -9 restart seconds at ``point``, plus the extra rounds if at the largest."""
        if not point:
            return []
        times = [point.get("kill_restart_s", float("nan"))]
        if point is self.largest():
            times += [
                w.get("kill_restart_s", float("nan")) for w in self.r["memory"].get("warm") or []
            ]
        return [t for t in times if not isnan(t)]

    def restore_ratio(self, p: dict[str, Any]) -> tuple[float, float, str]:
        """(restore ÷ the faster bare read, that bare rate, which client)."""
        if not p:
            return float("nan"), float("nan"), ""
        bares = [
            (p.get("bare_per_s", float("nan")), "aiokafka"),
            (p.get("bare_confluent_per_s", float("nan")), "confluent-kafka"),
        ]
        bares = [b for b in bares if not isnan(b[0])]
        if not bares:
            return float("nan"), float("nan"), ""
        rate, client = max(bares)
        return p.get("restore_per_s", float("nan")) / rate, rate, client

    def summary(self) -> None:
        p1 = self.ratios("p1_vs_postgres")
        p2 = self.ratios("p2_many_vs_single")
        p3 = self.ratios("p3_vs_aiokafka")
        p6, bare99 = self.p6_ratio()
        oversold = self.oversold_all()
        send_h = median(self.ratios("loadgen_send_vs_p1"))
        read_h = median(self.ratios("loadgen_read_vs_p1"))
        lg_ok = min(send_h, read_h)
        cpu_flash = self.cpu_us("pipeline_flash").get("total", float("nan"))
        cpu_others = {
            "flash, one process": self.cpu_us("pipeline_flash_1proc").get("total", float("nan")),
            "single SKU": self.cpu_us("pipeline_single").get("total", float("nan")),
            "single SKU, one process": self.cpu_us("pipeline_single_1proc").get(
                "total", float("nan")
            ),
        }
        p1m = self.at_1m()
        kills = self.kill_times(p1m)
        kill_s = max(kills) if kills else float("nan")
        restore, bare_rate, bare_client = self.restore_ratio(p1m)
        rss1m = p1m.get("rss_mb", float("nan")) if p1m else float("nan")
        no_1m = "" if p1m else " (no 1M-SKU point in this run)"
        session = _get(self.r, "memory", "session_timeout_s")
        self.add(
            "## Summary against the goals",
            "",
            "Goals are from issue 12 (the memory goal from issue 6); they are goals for this "
            "report, not assertions anywhere. A missed goal is stated with what limits it.",
            "",
            "| | goal | measured | baseline in the same run (context) | verdict |",
            "|---|---|---|---|---|",
            f"| P1 hot-SKU decisions/s, pipeline ÷ PostgreSQL conditional UPDATE of one row | "
            f"≥ {fmt(GOALS['p1'], 0)}x, 0 oversold | {fmt_spread(p1, 3)}x (one process: "
            f"{fmt(median(self.ratios('p1_vs_postgres_1proc')), 3)}x); oversold {oversold} | "
            f"PostgreSQL {fmt(median(self.tps('postgres')))}/s, pipeline "
            f"{fmt(median(self.tps('pipeline_flash')))}/s (one process "
            f"{fmt(median(self.tps('pipeline_flash_1proc')))}/s) | "
            f"**{verdict(median(p1), GOALS['p1'])}** (0 oversold: "
            f"{'yes' if oversold == '0' else 'see below'}) |",
            f"| Load generator alone ÷ pipeline (P1): send rate, read rate | ≥ "
            f"{fmt(LOADGEN_HEADROOM, 0)}x each (not the bottleneck) | send "
            f"{fmt_spread(self.ratios('loadgen_send_vs_p1'), 1)}x, read "
            f"{fmt_spread(self.ratios('loadgen_read_vs_p1'), 1)}x | alone: "
            f"{fmt(self.med('loadgen_alone', 'send_rate_per_s'))} commands/s sent, "
            f"{fmt(self.med('loadgen_alone', 'read_rate_per_s'))} answers/s read | "
            f"**{'not the bottleneck' if lg_ok >= LOADGEN_HEADROOM else verdict(lg_ok, LOADGEN_HEADROOM)}** |",
            f"| P2 many-SKU ÷ single-SKU decisions/s, one worker | ≥ {fmt(GOALS['p2'], 1)} | "
            f"{fmt_spread(p2)} | single {fmt(median(self.tps('pipeline_single')))}/s | "
            f"**{verdict(median(p2), GOALS['p2'])}** |",
            f"| P3 single SKU (every reserve granted) ÷ bare aiokafka passthrough | ≥ "
            f"{GOALS['p3']} | {fmt_spread(p3, 3)} (one process: "
            f"{fmt(median(self.ratios('p3_vs_aiokafka_1proc')), 3)}) | passthrough "
            f"{fmt(median(self.tps('pass_aiokafka')))}/s | "
            f"**{verdict(median(p3), GOALS['p3'])}** |",
            f"| P6 p99 order → Redis ÷ bare Kafka p99 (at half the max rate) | ≤ "
            f"{fmt(GOALS['p6'], 0)}x | {fmt(p6, 1)}x | bare Kafka p99 {fmt(bare99, 1)} ms | "
            f"**{verdict(p6, GOALS['p6'], higher_is_better=False)}** |",
            f"| CPU per decision, every process (worker, relay, sinks, Kafka, Redis, "
            f"OpenSearch), P1 flash | ≤ {fmt(GOALS['cpu_us'], 0)} µs | {fmt(cpu_flash, 0)} µs "
            f"(" + ", ".join(f"{k} {fmt(v, 0)}" for k, v in cpu_others.items()) + " µs) | "
            f"load generator {fmt(self.loadgen_us('pipeline_flash'), 0)} µs (not in the total) | "
            f"**{verdict(cpu_flash, GOALS['cpu_us'], higher_is_better=False)}** |",
            f"| `kill -9` of an idle worker with 1M SKUs → `/healthz` 200 | ≤ "
            f"{fmt(GOALS['kill_s'], 0)} s | "
            + (
                f"{', '.join(fmt(t, 1) for t in kills)} s (worst {fmt(kill_s, 1)} s)"
                if kills
                else "n/a"
            )
            + f"{no_1m} | consumer group session timeout {fmt(session, 0)} s (harness) | "
            f"**{verdict(kill_s, GOALS['kill_s'], higher_is_better=False)}** |",
            f"| Cold restore at 1M SKUs ÷ bare read of the same changelogs, records/s | ≥ "
            f"{GOALS['restore']} | {fmt(restore, 3)}{no_1m} | bare read ({bare_client}) "
            f"{fmt(bare_rate)}/s | **{verdict(restore, GOALS['restore'])}** |",
            f"| Worker RSS with 1M SKUs, right after a cold restore | ≤ {fmt(GOALS['rss'], 0)} MB "
            f"| {fmt(rss1m, 0)} MB{no_1m} | — | "
            f"**{verdict(rss1m, GOALS['rss'], higher_is_better=False)}** |",
            "",
        )
        checks = {
            "P1": verdict(median(p1), GOALS["p1"]) == "met" and oversold == "0",
            "load generator": lg_ok >= LOADGEN_HEADROOM,
            "P2": verdict(median(p2), GOALS["p2"]) == "met",
            "P3": verdict(median(p3), GOALS["p3"]) == "met",
            "P6": verdict(p6, GOALS["p6"], False) == "met",
            "CPU per decision": verdict(cpu_flash, GOALS["cpu_us"], False) == "met",
            "kill -9 recovery": verdict(kill_s, GOALS["kill_s"], False) == "met",
            "cold restore": verdict(restore, GOALS["restore"]) == "met",
            "RSS": verdict(rss1m, GOALS["rss"], False) == "met",
        }
        met = [k for k, ok in checks.items() if ok]
        missed = [k for k, ok in checks.items() if not ok]
        self.add(
            f"In short: no unit was oversold by any system (total {oversold}); met: "
            f"{', '.join(met) or 'none'}; missed or not measured: {', '.join(missed) or 'none'}. "
            '"Pipeline" is the headline topology: a worker that only decides, plus the relay '
            "(`python -m pipeline.relay`) and the sinks (`python -m pipeline.sinks`) in their own "
            'processes; "one process" is the default deployment with all three inside the '
            "worker, measured beside it in every repeat (headline ÷ one process: flash "
            f"{fmt_spread(self.ratios('tuned_vs_1proc_flash'))}, single SKU "
            f"{fmt_spread(self.ratios('tuned_vs_1proc_single'))}).",
            "",
        )
        self.limits_text()

    def cores_busy(self, key: str) -> tuple[float, float, float]:
        """(cores used by the pipeline and services, by the load generator, by the worker)
        on average during run ``key``: CPU seconds ÷ the window they were counted over
        (first send → caught up; for the load generator → its last answer)."""
        tot, lg, wk = [], [], []
        for rep in self.reps:
            busy = _get(rep, key, "cores_busy", default={})
            if isinstance(busy, dict) and busy:
                tot.append(sum(v for k, v in busy.items() if k in PROCESSES))
                wk.append(busy.get("worker", float("nan")))
                lg.append(float(_get(rep, key, "loadgen_cores")))
        return median(tot), median(lg), median(wk)

    def limits_text(self) -> None:
        """What limits the throughput goals, from the CPU figures of the P1 run."""
        cores = self.r.get("machine_before", {}).get("cores") or 2
        rate = median(self.tps("pipeline_flash"))
        pg = median(self.tps("postgres"))
        busy, lg, worker = self.cores_busy("pipeline_flash")
        total = self.cpu_us("pipeline_flash").get("total", float("nan"))
        if isnan(rate) or isnan(total):
            return
        target = GOALS["p1"] * pg
        budget = cores * 1e6 / target if target == target and target else float("nan")
        text = (
            f"**What limits the rate.** In the headline P1 run ({fmt(rate)} decisions/s) the "
            f"pipeline's processes and the services used {fmt(total, 0)} µs of CPU per "
            f"decision, on average {fmt(busy, 2)} of the machine's {cores} cores, and the load "
            f"generator another {fmt(lg, 2)}; the worker alone {fmt(worker, 2)} of a core. "
        )
        if isnan(busy) or isnan(worker):
            pass  # no utilisation figures (an older results file)
        elif busy + lg >= 0.8 * cores:
            text += (
                "The box is CPU-bound: the rate is what the CPU per decision allows on "
                f"{cores} shared cores. "
            )
        elif worker >= 0.85:
            text += "The deciding worker's event loop (one core at most) is the ceiling. "
        else:
            text += (
                "Neither the cores nor the worker's event loop were saturated on average, so "
                "waits (transaction commits, fetch intervals) bound the pace, not CPU. "
            )
        if not isnan(budget):
            text += (
                f"{fmt(GOALS['p1'], 0)}x PostgreSQL is {fmt(target)} decisions/s; on {cores} "
                f"cores that leaves {fmt(budget, 0)} µs of CPU per decision for the whole chain "
                f"(load generator included), against {fmt(total + self.loadgen_us('pipeline_flash'), 0)} "
                "µs measured."
            )
        self.add(text, "")

    def oversold_all(self) -> str:
        vals = []
        for rep in self.reps:
            for k in (
                "postgres",
                "redis",
                "redis_pipelined",
                "pipeline_flash",
                "pipeline_flash_1proc",
            ):
                if k in rep:
                    vals.append(int(_get(rep, k, "oversold_units", default=0)))
            for k in ("pipeline_flash", "pipeline_flash_1proc"):
                if k in rep:
                    vals.append(int(_get(rep, k, "table_oversold", default=0)))
        return str(sum(vals)) if vals else "n/a"

    # ------------------------------------------------------------ CPU
    def cpu_section(self) -> None:
        rows = []
        for key, label in (
            ("pipeline_flash", "P1 flash, headline (worker + relay + sinks processes)"),
            ("pipeline_flash_1proc", "P1 flash, one process"),
            ("pipeline_single", "single SKU, headline"),
            ("pipeline_single_1proc", "single SKU, one process"),
            ("pipeline_many", "many SKUs, headline"),
        ):
            cpu = self.cpu_us(key)
            if not cpu:
                continue
            one = "1proc" in key
            cells = []
            for name in PROCESSES:
                if name.startswith("pipeline.") and one:
                    cells.append("(in worker)")
                else:
                    cells.append(fmt(cpu.get(name, float("nan")), 1))
            busy, lg, _w = self.cores_busy(key)
            caught = all(bool(_get(rep, key, "caught_up", default=False)) for rep in self.reps)
            rows.append(
                f"| {label} | {' | '.join(cells)} | **{fmt(cpu['total'], 0)}** | "
                f"{fmt(self.loadgen_us(key), 1)} | {fmt(median(self.tps(key)))} | "
                f"{fmt(busy, 2)} + {fmt(lg, 2)} | {'yes' if caught else 'no'} |"
            )
        self.add("## CPU per decision, by process", "")
        if not rows:
            self.add(f"Not measured: throughput part {_not_run(self.r.get('throughput'))}.", "")
            return
        heads = " | ".join(PROCESS_LABEL[n] for n in PROCESSES)
        self.add(
            "From `/proc/<pid>/stat` of each process, from the first command sent (the restock "
            "applied, the answer reader connected) until the relay and both sinks reported no lag (so work still queued when the last "
            "answer arrived is counted), divided by the decisions; median over the repeats, µs. "
            "The total is the goal's (≤ "
            f"{fmt(GOALS['cpu_us'], 0)} µs). The load generator (this benchmark's process: "
            "4 sender threads and the answer reader) is measured up to its last answer and "
            "shown apart. The broker's figure includes whatever other sessions made it do "
            "in the same window. Cores busy = CPU seconds ÷ the window they were counted over "
            "(pipeline and services + load generator), an average over the run.",
            "",
            f"| run | {heads} | total µs | load generator µs | decisions/s | cores busy | "
            "caught up |",
            "|---|" + "---|" * (len(PROCESSES) + 6),
            *rows,
            "",
            "Per RESERVED decision the broker takes four record writes (the command, its "
            "reservation record, StockChanged for the audit topic, ReservationResult) and "
            "serves two reads (the worker's fetch, the load generator's); per REJECTED one "
            "three writes and two reads. Per batch: the SKU record (one per touched SKU) and "
            "the input-positions record, each read by the relay and both sink groups, the "
            "transaction's markers and its consumer-offset commit.",
            "",
        )
        self.engine_table()

    def engine_table(self) -> None:
        rows = []
        for key, label in (
            ("pipeline_flash", "P1 flash, headline"),
            ("pipeline_flash_1proc", "P1 flash, one process"),
            ("pipeline_single", "single SKU, headline"),
            ("pipeline_single_1proc", "single SKU, one process"),
            ("pipeline_many", "many SKUs, headline"),
        ):
            if not any(key in rep for rep in self.reps):
                continue
            e = "engine"
            rows.append(
                f"| {label} | {fmt(self.med(key, e, 'batch_commands', 'mean'), 0)} | "
                f"{fmt(self.med(key, e, 'batch_commands', 'count'), 0)} | "
                f"{fmt(self.med(key, e, 'batch_fold_seconds', 'mean') * 1000, 2)} | "
                f"{fmt(self.med(key, e, 'batch_commit_seconds', 'mean') * 1000, 1)} | "
                f"{fmt(self.med(key, e, 'decision_seconds', 'mean') * 1000, 1)} | "
                f"≤ {fmt(self.med(key, e, 'decision_seconds', 'p99_le') * 1000, 0)} |"
            )
        if rows:
            self.add(
                "The batch engine's own metrics from the worker's `/metrics` at the end of each "
                "run (median over the repeats; restock batches included): commands per batch "
                "(`inventory_batch_commands`), fold and transaction time per batch "
                "(`inventory_batch_fold_seconds`, `inventory_batch_commit_seconds`), and each "
                "command's arrival at the worker → commit (`inventory_decision_seconds`; p99 is "
                "the upper bound of its histogram bucket).",
                "",
                "| run | commands per batch (mean) | batches | fold ms per batch | commit ms per "
                "batch | arrival → commit ms (mean) | p99 ms |",
                "|---|---|---|---|---|---|---|",
                *rows,
                "",
            )

    # ------------------------------------------------------------ P1
    def p1(self) -> None:
        keys = [
            ("postgres", "PostgreSQL\n32 conns, 1 tx each"),
            ("redis", "Redis Lua\n32 clients"),
            ("redis_pipelined", "Redis Lua\npipelined x100"),
            ("pipeline_flash", "pipeline\n(3 processes)"),
            ("pipeline_flash_1proc", "pipeline\n(1 process)"),
        ]
        self.bar_plot("p1_throughput.png", keys, "hot-SKU reservations decided per second")
        s = self.r.get("sizes", {})
        self.add(
            "## P1: hot-SKU flash sale, pipeline vs PostgreSQL and Redis",
            "",
        )
        if not self.reps:
            self.add(f"Not measured: throughput part {_not_run(self.r.get('throughput'))}.", "")
            return
        self.add(
            f"One SKU with {s.get('flash_units'):,} units, {s.get('flash_attempts'):,} reserve "
            "attempts of 1 unit, the same for every system. PostgreSQL: its own cluster (Debian "
            "package, `initdb` in a temp dir, `synchronous_commit=on`, `fsync=on`), 32 "
            "connections from 32 threads, one transaction per attempt: `UPDATE stock SET "
            "reserved = reserved + $1 WHERE sku = $2 AND on_hand - reserved - safety >= $1`. "
            "Redis: the stack's Redis (no persistence), a Lua `HMGET` + check + `HINCRBY` per "
            "attempt from 32 threads (and pipelined 100 per round trip). Pipeline: a fresh worker "
            "with the relay and the sinks in their own processes (one process: the same with "
            "both inside the worker), the hot SKU restocked and seen on `GET /stock/{sku}` "
            "first, then the attempts sent from 4 producer threads as fast as they go; rate = "
            "answers on `reservation-results` ÷ (last answer − first send). Oversold = units "
            "held by the answers beyond the units, and per the table (`GET /stock`, reserved > "
            "on_hand).",
            "",
            "| repeat | PostgreSQL /s | Redis /s | Redis pipelined /s | pipeline /s | "
            "one process /s | pipeline ÷ PG | pipeline ÷ Redis | "
            "oversold PG / Redis / pipeline (answers, table) |",
            "|---|---|---|---|---|---|---|---|---|",
        )
        for i, rep in enumerate(self.reps, 1):
            self.add(
                f"| {i} | {fmt(_tp(rep, 'postgres'))} | {fmt(_tp(rep, 'redis'))} | "
                f"{fmt(_tp(rep, 'redis_pipelined'))} | {fmt(_tp(rep, 'pipeline_flash'))} | "
                f"{fmt(_tp(rep, 'pipeline_flash_1proc'))} | "
                f"{fmt(_get(rep, 'ratios', 'p1_vs_postgres'), 3)} | "
                f"{fmt(_get(rep, 'ratios', 'p1_vs_redis'), 3)} | "
                f"{_get(rep, 'postgres', 'oversold_units', default='n/a')} / "
                f"{_get(rep, 'redis', 'oversold_units', default='n/a')} / "
                f"{_get(rep, 'pipeline_flash', 'oversold_units', default='n/a')}, "
                f"{_get(rep, 'pipeline_flash', 'table_oversold', default='n/a')} |"
            )
        self.add("")
        self.img("p1_throughput.png", "P1 throughput")
        p1 = median(self.ratios("p1_vs_postgres"))
        outcomes = _get(self.reps[0], "pipeline_flash", "outcomes", default={})
        self.add(
            f"**Goal ≥ {fmt(GOALS['p1'], 0)}x PostgreSQL: {verdict(p1, GOALS['p1'])}** at "
            f"{fmt(p1, 3)}x (outcomes of repeat 1: {outcomes}). A hot SKU lives on one "
            "partition, so one partition task in one process decides it, serially; the batch "
            "engine makes that cheap per decision (the fold of a whole batch, one SKU record and "
            "one transaction per batch), which leaves the CPU per decision of the whole chain "
            "(the CPU section above) as the limit on this machine. PostgreSQL's row update is "
            "serial too, but each step is a few microseconds of C plus a group-committed fsync.",
            "",
        )
        tl = [
            (rep.get("pipeline_flash", {}).get("timeline"), "hot SKU flash")
            for rep in self.reps[:1]
        ]
        tl += [(rep.get("pipeline_many", {}).get("timeline"), "many SKUs") for rep in self.reps[:1]]
        if any(t for t, _ in tl):
            fig, ax = plt.subplots(figsize=(7, 3.2))
            for t, label in tl:
                if t and t == t:
                    xs = [p[0] for p in t]
                    width = xs[1] - xs[0] if len(xs) > 1 else 1.0
                    ax.plot(xs, [p[1] / width for p in t], label=label)
            ax.set_xlabel("seconds since first send")
            ax.set_ylabel("answers / s")
            ax.set_title("Answers over time (repeat 1)")
            ax.legend()
            fig.tight_layout()
            fig.savefig(self.dir / "timeline.png", dpi=110)
            plt.close(fig)
            send = _get(self.reps[0], "pipeline_flash", "send_rate_per_s")
            self.add(
                "Answers per second over one run of each. The load generator sent the flash "
                f"sale's commands at {fmt(send)}/s (produce calls), so it had sent them all "
                "early in the run and the curve is the pipeline's pace. Once the units are sold "
                "out a decision changes no stock: no StockChanged to publish, and the SKU records "
                "the sinks read carry no newer version (their writes are no-ops by version).",
                "",
            )
            self.img("timeline.png", "answers over time")

    def bar_plot(self, name: str, keys: list[tuple[str, str]], ylabel: str) -> None:
        meds, los, his, labels = [], [], [], []
        for k, label in keys:
            m, lo, hi = spread(self.tps(k))
            if m != m:
                continue
            meds.append(m)
            los.append(m - lo)
            his.append(hi - m)
            labels.append(label)
        if not meds:
            return
        fig, ax = plt.subplots(figsize=(7, 3.6))
        bars = ax.bar(labels, meds, yerr=[los, his], capsize=4, color="#4a7ab5")
        ax.set_yscale("log")
        ax.set_ylim(top=max(meds) * 4)
        ax.set_ylabel(ylabel + " (log)")
        for b, v in zip(bars, meds, strict=True):
            ax.annotate(f"{v:,.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom")
        ax.set_title("median over repeats; whiskers = min..max")
        fig.tight_layout()
        fig.savefig(self.dir / name, dpi=110)
        plt.close(fig)

    # ------------------------------------------------------------ load generator
    def loadgen(self) -> None:
        self.add("## The load generator, measured alone", "")
        if not any("loadgen_alone" in rep for rep in self.reps):
            self.add(f"Not measured: throughput part {_not_run(self.r.get('throughput'))}.", "")
            return
        s = self.r.get("sizes", {})
        self.add(
            "In every repeat, right before the pipeline runs, the same code is measured without a "
            f"pipeline: the same `Sender` (4 threads, the same producer settings) sends "
            f"{s.get('loadgen_commands'):,} ReserveStock of one SKU to an orders topic nobody "
            "consumes, and the same `ResultCollector` reads as many ReservationResult records "
            "produced beforehand. Send rate = produce calls per second (as in the pipeline "
            "runs); CPU = this process's CPU time (all threads, librdkafka's included) ÷ "
            "commands or answers. The load generator builds its commands itself, so it encodes "
            "them without a validation pass (`AvroCodec.encode_trusted`) and asks librdkafka "
            "for delivery reports of failures only.",
            "",
            "| repeat | sent alone /s | CPU µs per command | read alone /s | CPU µs per answer | "
            "pipeline P1 /s | send ÷ P1 | read ÷ P1 | load generator µs per decision in P1 |",
            "|---|---|---|---|---|---|---|---|---|",
        )
        for i, rep in enumerate(self.reps, 1):
            a = rep.get("loadgen_alone", {})
            self.add(
                f"| {i} | {fmt(a.get('send_rate_per_s'))} | "
                f"{fmt(a.get('send_cpu_us_per_command'), 1)} | {fmt(a.get('read_rate_per_s'))} | "
                f"{fmt(a.get('read_cpu_us_per_answer'), 1)} | {fmt(_tp(rep, 'pipeline_flash'))} | "
                f"{fmt(_get(rep, 'ratios', 'loadgen_send_vs_p1'), 1)} | "
                f"{fmt(_get(rep, 'ratios', 'loadgen_read_vs_p1'), 1)} | "
                f"{fmt(_get(rep, 'pipeline_flash', 'loadgen_cpu_ms_per_decision') * 1000, 1)} |"
            )
        send_h = median(self.ratios("loadgen_send_vs_p1"))
        read_h = median(self.ratios("loadgen_read_vs_p1"))
        _busy, lg, _w = self.cores_busy("pipeline_flash")
        ok = min(send_h, read_h) >= LOADGEN_HEADROOM
        self.add(
            "",
            f"Alone it sends {fmt(send_h, 1)}x and reads {fmt(read_h, 1)}x as fast as the "
            "pipeline answers (median), "
            + (
                f"so it does not set the pace (criterion: ≥ {fmt(LOADGEN_HEADROOM, 0)}x both). "
                if ok
                else f"below the ≥ {fmt(LOADGEN_HEADROOM, 0)}x criterion: it may limit the "
                "measured rate. "
            )
            + f"It does take CPU the pipeline could use: {fmt(lg, 2)} of a core on average "
            "during the P1 run, on the same cores as everything else.",
            "",
        )

    # ------------------------------------------------------------ P2/P3
    def p2p3(self) -> None:
        keys = [
            ("pipeline_single", "pipeline\n1 SKU"),
            ("pipeline_many", "pipeline\nmany SKUs"),
            ("pipeline_single_1proc", "1 process\n1 SKU"),
            ("pass_aiokafka", "bare aiokafka\npassthrough"),
            ("pass_confluent", "bare confluent\npassthrough"),
        ]
        self.bar_plot("p2_p3_throughput.png", keys, "messages decided/forwarded per second")
        s = self.r.get("sizes", {})
        self.add("## P2 and P3: one SKU vs many, and the pipeline vs a bare Kafka loop", "")
        if not self.reps:
            self.add(f"Not measured: throughput part {_not_run(self.r.get('throughput'))}.", "")
            return
        self.add(
            f"P2: one worker (relay and sinks in their own processes), "
            f"{s.get('single_attempts'):,} reserves, every one granted (enough units), on one SKU "
            f"vs on {s.get('many_skus'):,} SKUs with Zipf(1.1) popularity (each run on a fresh "
            "worker and namespace, 8 partitions). P3: the single-SKU rate vs a bare "
            f"consume-and-produce loop forwarding {s.get('pass_messages'):,} of the same encoded "
            "ReserveStock messages unchanged between two 8-partition topics of the same broker, "
            "in its own process like the worker (aiokafka, the client of the worker's fetch loop, "
            "with acks=all, idempotence and linger 1 ms; and confluent-kafka for reference).",
            "",
            "| repeat | single /s | many /s | many ÷ single | one process single /s | "
            "aiokafka pass /s | confluent pass /s | pipeline ÷ aiokafka | pipeline ÷ confluent |",
            "|---|---|---|---|---|---|---|---|---|",
        )
        for i, rep in enumerate(self.reps, 1):
            self.add(
                f"| {i} | {fmt(_tp(rep, 'pipeline_single'))} | {fmt(_tp(rep, 'pipeline_many'))} "
                f"| {fmt(_get(rep, 'ratios', 'p2_many_vs_single'))} | "
                f"{fmt(_tp(rep, 'pipeline_single_1proc'))} | "
                f"{fmt(_tp(rep, 'pass_aiokafka'))} | {fmt(_tp(rep, 'pass_confluent'))} | "
                f"{fmt(_get(rep, 'ratios', 'p3_vs_aiokafka'), 3)} | "
                f"{fmt(_get(rep, 'ratios', 'p3_vs_confluent'), 3)} |"
            )
        self.add("")
        self.img("p2_p3_throughput.png", "P2 and P3 throughput")
        p2 = median(self.ratios("p2_many_vs_single"))
        p3 = median(self.ratios("p3_vs_aiokafka"))
        e = "engine"
        single_b = self.med("pipeline_single", e, "batch_commands", "mean")
        many_b = self.med("pipeline_many", e, "batch_commands", "mean")
        cpu_s = self.cpu_us("pipeline_single").get("total", float("nan"))
        cpu_m = self.cpu_us("pipeline_many").get("total", float("nan"))
        self.add(
            f"**P2 ≥ {fmt(GOALS['p2'], 1)}: {verdict(p2, GOALS['p2'])}** at {fmt(p2)}"
            + (
                " (the range over repeats reaches the goal: parity within this machine's noise)"
                if spread(self.ratios("p2_many_vs_single"))[2] >= GOALS["p2"] > p2
                else ""
            )
            + ". One worker decides every partition in one process, so spreading the SKUs "
            "buys no parallelism; what differs is per-SKU work: one SKU record per touched SKU "
            "per batch instead of one, a sink write per SKU instead of one per fetched batch "
            "for the hot SKU, and transactions on eight partitions instead of one. Measured: "
            f"{fmt(single_b, 0)} vs {fmt(many_b, 0)} commands per batch, {fmt(cpu_s, 0)} vs "
            f"{fmt(cpu_m, 0)} µs of CPU per decision (single vs many). Many SKUs pay off with "
            "more workers (partitions spread over processes and cores).",
            "",
            f"**P3 ≥ {GOALS['p3']}: {verdict(p3, GOALS['p3'])}** at {fmt(p3, 3)}. A bare loop "
            "does one fetch and one send per message; the pipeline, per decision, the worker's "
            "fetch, decode, validation and fold, a reservation record and (per batch) a SKU "
            "record and a positions record in a transaction, the relay's StockChanged and "
            "ReservationResult, and (per batch) the sinks' reads and writes: the broker record "
            "counts in the CPU section, against 1 write and 1 read for the passthrough.",
            "",
        )

    # ------------------------------------------------------------ P7
    def p7(self) -> None:
        got = self.r.get("reserve_http", {})
        self.add("## P7: synchronous reserve API (`POST /reservations`) beside the Kafka path", "")
        why = _not_run(got)
        if why:
            self.add(f"Not measured: {why}.", "")
            return
        n, c = got.get("n", 0), got.get("concurrency", 0)
        self.add(
            f"One worker, every reserve granted. Closed loop: each client has one request in "
            f"flight ({n} per client). Kafka path: send ReserveStock and read "
            "reservation-results until its answer (what `docs/asyncapi.yaml` tells a checkout "
            "to do); HTTP: `POST /reservations` on a kept-alive connection, which does the same "
            f"inside the worker (`pipeline/reserve_api.py`). Then {c} clients of each at once.",
            "",
            "| path | clients | p50 ms | p99 ms | answers/s |",
            "|---|---|---|---|---|",
        )
        rows = (
            ("Kafka", 1, "kafka_ms", None),
            ("HTTP", 1, "http_ms", None),
            ("Kafka", c, "kafka_concurrent_ms", "kafka_concurrent_per_s"),
            ("HTTP", c, "http_concurrent_ms", "http_concurrent_per_s"),
        )
        for label, clients, key, rate in rows:
            per_s = fmt(got.get(rate, float("nan"))) if rate else "—"
            self.add(
                f"| {label} | {clients} | {fmt(_get(got, key, 'p50'), 1)} | "
                f"{fmt(_get(got, key, 'p99'), 1)} | {per_s} |"
            )
        self.add("")

    # ------------------------------------------------------------ P6
    def p6(self) -> None:
        lat = self.r.get("latency", {})
        why = _not_run(lat)
        if why:
            self.add("## P6: latency", "", f"Not measured: {why}", "")
            return
        samples = lat.get("samples", {})
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for key, label in (
            ("bare_kafka", "bare Kafka produce→consume"),
            ("order_to_decision", "order → decision (reservation-results)"),
            ("order_to_redis", "order → Redis hash"),
            ("order_to_search", "order → OpenSearch doc"),
        ):
            v = sorted(x for x in samples.get(key, []) if x == x and x > 0)
            if v:
                ys = [(i + 1) / len(v) for i in range(len(v))]
                ax.plot(v, ys, label=f"{label} (n={len(v)})")
        ax.set_xscale("log")
        ax.set_xlabel("milliseconds (log)")
        ax.set_ylabel("fraction of commands")
        ax.set_title(f"Latency CDF at {fmt(lat.get('rate_per_s'))} commands/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(self.dir / "p6_latency.png", dpi=110)
        plt.close(fig)
        bare99 = _get(lat, "bare_kafka", "p99")
        rows = [
            ("bare Kafka produce → consume (baseline)", "bare_kafka"),
            ("order → decision on reservation-results", "order_to_decision"),
            (
                "  of which: order → batch folded (`processed_at`, before its commit)",
                "order_to_agent",
            ),
            (
                "  of which: folded → answer read (transaction commit + relay hop)",
                "agent_to_answer",
            ),
            ("order → Redis hash written (Redis `TIME`)", "order_to_redis"),
            ("order → OpenSearch doc built (sink clock)", "order_to_search"),
        ]
        s = self.r.get("sizes", {})
        self.add(
            "## P6: order-to-decision / Redis / OpenSearch latency at half the maximum rate",
            "",
            "Measured on the headline topology (a worker that decides, the relay and the sinks "
            f"in their own processes). The same worker first took {s.get('p6_calibration'):,} "
            "reserves over the same SKUs as fast as the load generator sends (its maximum "
            f"right then: {fmt(lat.get('max_rate_per_s'))} answers/s); then a steady load at "
            "half of that. If a backlog grew in that window (the last third of the orders "
            "waiting over 3x longer than the first third, or fewer than 95% of the send rate "
            "answered), the rate was not sustainable after all and the window was repeated at "
            "0.3x, then 0.2x the maximum; the figures below are from the last window: "
            f"{fmt(lat.get('rate_per_s'))} reserves/s ({fmt(lat.get('share_of_max'), 1)}x the "
            f"maximum) for {fmt(lat.get('seconds'))} s over {s.get('p6_skus'):,} SKUs (Zipf 1.1), "
            "4 paced producer threads, sinks on. Send time = wall clock just before `produce()`. "
            "Decision = arrival of the answer at a consumer in the load generator. Redis = the "
            "`updated_at` (Redis server clock) on the sink's pub/sub message of the first "
            "applied version ≥ the order's version (the sinks read the SKU records of the "
            "changelog and write only the newest version of a fetched batch). OpenSearch = `updated_at` of the document (the sink's clock when "
            "it built the bulk request; one sample per SKU: its last order; searchable after "
            "the next 1 s refresh on top). The baseline is a plain confluent-kafka producer → "
            "consumer at the same rate with the same client settings. Same host, same clock.",
            "",
            "| path | n | p50 ms | p99 ms | p99 ÷ bare p99 |",
            "|---|---|---|---|---|",
        )
        for label, key in rows:
            p99 = _get(lat, key, "p99")
            self.add(
                f"| {label} | {_get(lat, key, 'n', default=0)} | {fmt(_get(lat, key, 'p50'), 1)} "
                f"| {fmt(p99, 1)} | {fmt(p99 / bare99 if bare99 else float('nan'), 1)} |"
            )
        self.add(
            "",
            "| window | rate /s (x max) | sent /s | answered /s | p50 first third ms | "
            "p50 last third ms | backlog | p99 order→Redis ms |",
            "|---|---|---|---|---|---|---|---|",
        )
        for i, a in enumerate(lat.get("attempts") or [lat], 1):
            self.add(
                f"| {i} | {fmt(a.get('rate_per_s'))} ({fmt(a.get('share_of_max'), 1)}) | "
                f"{fmt(a.get('achieved_send_rate'))} | {fmt(a.get('achieved_answer_rate'))} | "
                f"{fmt(a.get('first_third_p50_ms'), 1)} | {fmt(a.get('last_third_p50_ms'), 1)} | "
                f"{'yes' if a.get('backlog') is True else 'no'} | "
                f"{fmt(_get(a, 'order_to_redis', 'p99'), 1)} |"
            )
        self.add("")
        if all((a.get("backlog") is True) for a in (lat.get("attempts") or [])):
            self.add(
                "Even the last window built a backlog: this worker had no sustainable rate "
                "under that load, so its p99 is queueing, not pipeline latency.",
                "",
            )
        self.img("p6_latency.png", "P6 latency CDF")
        r6, _ = self.p6_ratio()
        commit = _get(lat, "engine", "batch_commit_seconds", "mean") * 1000
        batch = _get(lat, "engine", "batch_commands", "mean")
        self.add(
            f"**p99 order-to-Redis ≤ {fmt(GOALS['p6'], 0)}x bare Kafka p99: "
            f"{verdict(r6, GOALS['p6'], False)}** at {fmt(r6, 1)}x. An order reaches Redis "
            "through two Kafka hops (orders → worker, the SKU record on the changelog → sink) "
            "and its answer through two plus the load generator's read (changelog → relay → "
            "reservation-results), after the batch's transaction, which must commit before a "
            f"read_committed reader sees the changelog record (in this window {fmt(commit, 1)} ms per "
            f"transaction on average, {fmt(batch, 1)} commands per batch), and each process's "
            "event-loop queueing on shared cores; a bare Kafka hop is one produce and one fetch. "
            "The split above shows where the time goes.",
            "",
        )

    # ------------------------------------------------------------ recovery + memory
    def recovery(self) -> None:
        mem = self.r.get("memory", {})
        pts = mem.get("points") or []
        self.add("## Crash recovery, restarts and memory with N SKUs", "")
        if not pts:
            self.add(f"Not measured: memory part {_not_run(mem)}.", "")
            return
        session = mem.get("session_timeout_s")
        self.add(
            "Processing a million restocks through the pipeline would take longer than this "
            "run's budget, so the stock changelog is filled directly (`bench/tablefill.py`, "
            "not in transactions): one record per SKU, on the SKU's partition, whose value is "
            "what the ledger stores after one `RestockReceived` (built with "
            "`pipeline.core.decide` and `tables.stock.StoredStock`); the relay's group is set "
            "to the end so nothing is re-published; sinks are off in this worker. For each "
            "size, one worker in turn:",
            "",
            "1. **cold start**: data dir wiped, so every partition re-reads both changelogs "
            "into its local RocksDB;",
            "2. **`kill -9`** (SIGKILL of its process group) once it is idle, and a restart: "
            "local RocksDB is kept (written only after each commit, with the changelog "
            "offsets), so only what the changelogs hold beyond it is re-read;",
            "3. **clean stop** (SIGTERM) and a **warm restart**.",
            "",
            "Time = start of the process → `/healthz` 200 (every ledger partition ready, no "
            "rebalance under way). Records re-read and restore seconds come from each "
            "partition's log line `ledger partition N ready: changelog @A -> @B (K records) in "
            "X s`: records = ΣK, restore s = from the earliest start of ownership (line time − "
            "X) to the last line, over the partitions that re-read records (they do it "
            "concurrently). Bare reads of the same two changelogs, `read_committed`, from the "
            "start to the end: aiokafka in this process, and confluent-kafka "
            "(`pipeline.kafka.reading.read_to_end`, the client the ledger restores with). "
            f"Consumer group session timeout: {fmt(session, 0)} s (the test harness's "
            "`INVENTORY_SESSION_TIMEOUT_S`; the default is 10 s).",
            "",
            "| SKUs | changelog records | cold → healthz s | records re-read | restore s | "
            "restore rec/s | bare aiokafka rec/s | bare confluent rec/s | restore ÷ faster bare | "
            "kill -9 → healthz s | re-read after kill | group joined after s | warm → healthz s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        )
        for p in pts:
            rr = self.restore_ratio(p)[0]
            kill = p.get("kill", {})
            self.add(
                f"| {p['skus']:,} | {p['changelog_records']:,} | {fmt(p['cold_start_s'], 1)} | "
                f"{p.get('restore_records', 0):,} | {fmt(p['restore_s'], 1)} | "
                f"{fmt(p['restore_per_s'])} | {fmt(p.get('bare_per_s'))} | "
                f"{fmt(p.get('bare_confluent_per_s'))} | {fmt(rr, 3)} | "
                f"{fmt(p.get('kill_restart_s'), 1)} | {kill.get('records', 'n/a')} | "
                f"{fmt(kill.get('joined_after_start_s'), 1)} | {fmt(p.get('warm_start_s'), 1)} |"
            )
        self.add("")
        runs: dict[str, list[int]] = {}
        for p in pts:
            if isinstance(p.get("separate_run"), str):
                runs.setdefault(p["separate_run"], []).append(p["skus"])
        for started, skus in runs.items():
            rows = ", ".join(f"{n:,}" for n in skus)
            self.add(
                f"The {rows}-SKU row{'s come' if len(skus) > 1 else ' comes'} from a separate "
                f"invocation started {started}, after the main run (`python -m bench.run "
                f"--only memory --rss-skus {','.join(str(n) for n in skus)} --merge-into "
                "bench/out/results-full.json`).",
                "",
            )
        extra = mem.get("warm") or []
        if extra:
            self.add(
                f"More restarts with {pts[-1]['skus']:,} SKUs (warm after a clean stop, then "
                "`kill -9` once idle and a restart): "
                + "; ".join(
                    f"warm {fmt(w['warm_start_s'], 1)} s, kill -9 → healthz "
                    f"{fmt(w.get('kill_restart_s'), 1)} s"
                    for w in extra
                )
                + ".",
                "",
            )
        big = pts[-1]
        kill = big.get("kill", {})
        kills = self.kill_times(big)
        rr, bare_rate, client = self.restore_ratio(big)
        cold = big.get("cold", {})
        at_goal = big["skus"] == 1_000_000
        kill_worst = max(kills) if kills else float("nan")
        kill_verdict = (
            verdict(kill_worst, GOALS["kill_s"], False) if at_goal else "not measured at 1M SKUs"
        )
        restore_verdict = verdict(rr, GOALS["restore"]) if at_goal else "not measured at 1M SKUs"
        self.add(
            f"**`kill -9` → healthz with {big['skus']:,} SKUs: "
            f"{', '.join(fmt(t, 1) for t in kills) or 'n/a'} s; goal ≤ {fmt(GOALS['kill_s'], 0)} s "
            f"at 1M SKUs: {kill_verdict}.** The restart re-read {kill.get('records', 'n/a')} "
            "changelog records; the consumer group let the new process in "
            f"{fmt(kill.get('joined_after_start_s'), 1)} s after it started, once the broker had "
            "given up on the killed member's session; then the partitions were fenced and caught "
            f"up (last partition ready {fmt(kill.get('last_ready_after_start_s'), 1)} s after the "
            "start). A clean stop leaves the group at once, hence the warm restart's "
            f"{fmt(big.get('warm_start_s'), 1)} s.",
            "",
            f"**Cold restore ÷ bare read with {big['skus']:,} SKUs: {fmt(rr, 3)}; goal ≥ "
            f"{GOALS['restore']} at 1M SKUs: {restore_verdict}** ({fmt(big['restore_per_s'])} vs "
            f"{fmt(bare_rate)} records/s, the faster bare read: {client or 'n/a'}). Each "
            "partition reads its changelogs with a confluent-kafka consumer on a thread and "
            "writes each chunk of records to RocksDB in one WriteBatch; the longest partition "
            f"took {fmt(cold.get('max_partition_s'), 1)} s, and the cold start reached healthz "
            f"in {fmt(big['cold_start_s'], 1)} s (group join "
            f"{fmt(cold.get('joined_after_start_s'), 1)} s after the start included). The "
            "restore seconds include each partition's fencing (`init_transactions`) and "
            "consumer start, which dominate a small table.",
            "",
            "| SKUs | RSS after cold start MB | after kill -9 restart MB | after warm start MB | "
            "idle CPU cold / kill / warm (cores) | expiry index rebuild after the start s |",
            "|---|---|---|---|---|---|",
        )
        for p in pts:
            self.add(
                f"| {p['skus']:,} | {fmt(p['rss_mb'], 0)} | {fmt(p.get('kill_rss_mb'), 0)} | "
                f"{fmt(p.get('warm_rss_mb'), 0)} | {fmt(p['idle_cpu_cores'], 2)} / "
                f"{fmt(p.get('kill_idle_cpu_cores'), 2)} / {fmt(p.get('warm_idle_cpu_cores'), 2)} "
                f"| {fmt(p.get('index_rebuild_cold_s'), 1)} |"
            )
        self.add("")
        live = [
            (k, _get(rep, k, "rss_mb"))
            for rep in self.reps[:1]
            for k in ("pipeline_flash", "pipeline_single", "pipeline_many")
        ]
        if live:
            self.add(
                "For comparison, the workers of the throughput runs (repeat 1) ended at "
                + ", ".join(f"{k.replace('pipeline_', '')} {fmt(v, 0)} MB" for k, v in live)
                + ".",
                "",
            )
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
        xs = [p["skus"] for p in pts]
        for key, label, color in (
            ("rss_mb", "after cold start", "#c0504d"),
            ("kill_rss_mb", "after kill -9 restart", "#9bbb59"),
            ("warm_rss_mb", "after warm start", "#4a7ab5"),
        ):
            ax1.plot(xs, [p.get(key, float("nan")) for p in pts], "o-", color=color, label=label)
        ax1.xaxis.set_major_formatter(
            matplotlib.ticker.FuncFormatter(lambda v, _p: f"{v / 1000:.0f}k")
        )
        ax1.axhline(GOALS["rss"], color="gray", lw=1, ls=":", label="goal 300 MB")
        ax1.set_xlabel("SKUs in the table")
        ax1.set_ylabel("worker RSS (MB)")
        ax1.legend(fontsize=8)
        ax1.set_title("Worker resident memory")
        labels = [f"{p['skus'] // 1000}k" for p in pts]
        x = range(len(pts))
        ax2.bar(
            [i - 0.27 for i in x], [p["restore_per_s"] for p in pts], 0.27, label="cold restore"
        )
        ax2.bar(
            [i for i in x],
            [p.get("bare_per_s", float("nan")) for p in pts],
            0.27,
            label="bare aiokafka",
        )
        ax2.bar(
            [i + 0.27 for i in x],
            [p.get("bare_confluent_per_s", float("nan")) for p in pts],
            0.27,
            label="bare confluent",
        )
        ax2.set_xticks(list(x), labels)
        ax2.set_yscale("log")
        ax2.set_ylabel("changelog records/s (log)")
        ax2.legend(fontsize=8)
        ax2.set_title("Restore vs bare read")
        fig.tight_layout()
        fig.savefig(self.dir / "p5_memory.png", dpi=110)
        plt.close(fig)
        self.img("p5_memory.png", "restore and memory")
        rss1m = self.at_1m().get("rss_mb", float("nan"))
        self.add(
            f"**RSS at 1M SKUs ≤ {fmt(GOALS['rss'], 0)} MB: {verdict(rss1m, GOALS['rss'], False)}**"
            + (f" at {fmt(rss1m, 0)} MB right after a cold start" if not isnan(rss1m) else "")
            + ". The table lives in RocksDB files; RSS is what the process keeps around them: "
            "memtables and block cache per partition DB (`INVENTORY_ROCKSDB_*`), the decoded "
            "SKU records cached per partition, and Python's heap. Once after every start (and "
            "every `INVENTORY_EXPIRY_FULL_SCAN_S`) the expiry sweeper rebuilds its index of open "
            "reservations by reading the whole table (the rebuild column); the idle-CPU columns "
            f"are the worker's CPU over {fmt(self.r.get('sizes', {}).get('idle_seconds'), 0)} s "
            "after that rebuild.",
            "",
        )

    # ------------------------------------------------------------ stages before/after
    def stages(self) -> None:
        micro = self.r.get("micro", {})
        ing = self.r.get("ingest", {})
        self.add("## Per-stage CPU: before (previous design) and after", "")
        why = _not_run(micro)
        if why:
            self.add(f"Not measured: micro part {why}.", "")
        else:
            self.stage_table(micro, ing)
        self.ingest_table(ing)

    def stage_table(self, m: dict[str, Any], ing: dict[str, Any]) -> None:
        def g(key: str) -> float:
            v = m.get(key, float("nan"))
            return float(v) if isinstance(v, (int, float)) else float("nan")

        feed = self.ingest_row(ing, "feed")
        feed_us = feed.get("worker_us_per_record", float("nan")) if feed else float("nan")
        feed_text = fmt(feed_us, 1)
        if feed and feed_us == 0:  # less than the start-up CPU's noise that ingest subtracts
            feed_text = f"≈0 (below the resolution: {fmt(ing.get('records', 0), 0)} records)"
        write_r = (
            g("SKU record encode per batch, per command (RESERVED)")
            + g("reservation record encode (RESERVED)")
            + g("transaction produce() per batch, per command")
            + g("local RocksDB write per batch, per command (RESERVED)")
        )
        relay = g("relay: decode + encode_trusted per output (RESERVED)") + g(
            "relay: produce() per output"
        )
        n = int(g("_batch_commands")) if g("_batch_commands") == g("_batch_commands") else 0
        rows = [
            (
                "ingestion of one input record into the worker",
                BEFORE["ingest"],
                f"{feed_text} (feed, `bench/ingest.py` worker CPU per record)",
                "consumer hands each fetch to a per-partition feed",
            ),
            (
                "Avro decode (ReserveStock)",
                BEFORE["decode"],
                fmt(g("avro decode (ReserveStock)"), 1),
                "",
            ),
            (
                "validation → command",
                BEFORE["validation"],
                fmt(g("validation -> command"), 1),
                "topic map cached, control bytes by regex",
            ),
            (
                "stored SKU record decode",
                BEFORE["stored_decode"],
                f"0 on a hot SKU (decoded records cached); cold SKU "
                f"{fmt(g('cold SKU: RocksDB get + StoredStock.from_bytes'), 1)} (RocksDB get + "
                "decode, once per batch)",
                "",
            ),
            (
                "decide, RESERVED",
                BEFORE["decide_reserved"],
                f"{fmt(g('fold per command (RESERVED)'), 1)} (`batch.fold` per command: the "
                "reservation lookup, effects and watermarks included; `core.decide` alone "
                f"{fmt(g('core.decide alone (RESERVED)'), 1)})",
                "",
            ),
            (
                "decide, REJECTED",
                BEFORE["decide_rejected"],
                f"{fmt(g('fold per command (REJECTED)'), 1)} (`batch.fold` per command; "
                f"`core.decide` alone {fmt(g('core.decide alone (REJECTED)'), 1)})",
                "",
            ),
            (
                "state writes of one decision (changelog + local RocksDB)",
                BEFORE["table_write"],
                f"{fmt(write_r, 1)}: SKU record encode "
                f"{fmt(g('SKU record encode per batch, per command (RESERVED)'), 2)} (per batch ÷ "
                f"{n}) + reservation record encode "
                f"{fmt(g('reservation record encode (RESERVED)'), 2)} + transaction `produce()` "
                f"{fmt(g('transaction produce() per batch, per command'), 2)} (SKU, positions and "
                "reservation records) + RocksDB WriteBatch "
                f"{fmt(g('local RocksDB write per batch, per command (RESERVED)'), 2)} (per batch "
                f"÷ {n})",
                "one SKU record per SKU per batch, one transaction per batch",
            ),
            (
                "relay, per output",
                BEFORE["relay"],
                f"{fmt(relay, 1)}: SKU record decode + `encode_trusted` "
                f"{fmt(g('relay: decode + encode_trusted per output (RESERVED)'), 1)} + "
                f"confluent `produce()` {fmt(g('relay: produce() per output'), 2)}",
                "one SKU record carries a batch's outputs",
            ),
            (
                "codec.encode of a StockChanged",
                BEFORE["encode"],
                f"{fmt(g('codec.encode (validated) StockChanged'), 1)} validated vs "
                f"{fmt(g('codec.encode_trusted StockChanged'), 1)} `encode_trusted`",
                "relay and load generator skip the validation pass",
            ),
            (
                "metrics",
                BEFORE["labels"],
                f"{fmt(g('prometheus labels(...).inc()'), 2)} per `labels(...).inc()`, "
                f"{fmt(g('prometheus cached child .inc()'), 2)} per cached child; "
                f"{fmt(g('metrics per command (Counters.decided)'), 1)} per decided command",
                "children cached",
            ),
            (
                "sinks: read a change",
                "— (decoded every StockChanged)",
                f"{fmt(g('sink: SKU record decode per batch, per command (RESERVED)'), 2)} "
                f"RESERVED / {fmt(g('sink: SKU record decode per batch, per command (REJECTED)'), 2)} "
                f"REJECTED (SKU record decode + latest change, per batch ÷ {n}), per sink",
                "sinks read the SKU records of the changelog",
            ),
            (
                "event-id store, per stock command",
                "— (window of 256 ids only)",
                f"fold {fmt(g('restock fold per command (with ids)'), 1)} with the id look-up vs "
                f"{fmt(g('restock fold per command (without ids)'), 1)} without; RocksDB write "
                f"{fmt(g('event ids: RocksDB write per batch, per command'), 2)}; one more "
                f"changelog record of {fmt(g('_event_id_bytes'), 0)} bytes (key + value) kept "
                "for `INVENTORY_EVENT_ID_RETENTION_MS`",
                "re-sends recognised for the retention (reserves unaffected)",
            ),
            (
                "load generator: encode a ReserveStock",
                "—",
                f"{fmt(g('loadgen: encode ReserveStock (validated)'), 1)} validated vs "
                f"{fmt(g('loadgen: encode_trusted ReserveStock'), 1)} `encode_trusted` (used)",
                "",
            ),
            (
                "load generator: decode a ReservationResult",
                "—",
                fmt(g("loadgen: decode ReservationResult"), 1),
                "",
            ),
        ]
        ingest_note = (
            "the worker's CPU per record in the feed mode of `bench/ingest.py` (same run)"
            if feed
            else "n/a: the ingest part was not run"
        )
        self.add(
            "In-process micro-benchmarks (`bench/micro.py`, `time.perf_counter`, best of 3, no "
            "broker): each stage of the new path per command, on realistic values; steps done "
            f"once per batch are timed on a full batch ({n} reserves of one hot SKU) and divided "
            'by its commands. **The "before" column is quoted from `../shared/PERF-NOTES.md`, '
            "measured on the previous code (one Faust event and two table writes per "
            'decision), not in this run.** Ingestion "now" is ' + ingest_note + ".",
            "",
            "| stage | before, µs (PERF-NOTES.md) | now, µs (this run) | what changed |",
            "|---|---|---|---|",
            *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
            "",
            f"Sizes: a SKU record carrying a full batch's effects is "
            f"{fmt(g('_sku_record_bytes (RESERVED)'), 0)} bytes (RESERVED) / "
            f"{fmt(g('_sku_record_bytes (REJECTED)'), 0)} bytes (REJECTED); a reservation "
            f"record {fmt(g('_reservation_bytes (RESERVED)'), 0)} bytes. `produce()` is timed "
            "into the local queue of a producer without a broker; the delivery report each "
            "record gets later is not in it.",
            "",
        )

    @staticmethod
    def ingest_row(ing: dict[str, Any], mode: str) -> dict[str, Any]:
        for row in ing.get("rows", []) if isinstance(ing, dict) else []:
            if row.get("mode") == mode:
                return row
        return {}

    def ingest_table(self, ing: dict[str, Any]) -> None:
        self.add("### Ingestion prototype (`bench/ingest.py`)", "")
        why = _not_run(ing)
        if why:
            self.add(f"Not measured: ingest part {why}.", "")
            return

        def total(row: dict[str, Any]) -> float:
            return (
                row.get("worker_us_per_record", float("nan"))
                + row.get("packer_us_per_record", 0.0)
                + row.get("broker_us_per_record", float("nan"))
            )

        self.add(
            f"One hot partition pre-filled with {ing.get('records', 0):,} small records; a real "
            "Faust worker hands every record to application code by (stream) a Faust agent "
            "iterating `stream.events()`, the previous path; (b, feed) the consumer handing each "
            "fetch to `pipeline.kafka.feed.BatchFeed`, the path the ledger uses; (a, envelope) a "
            "confluent-kafka stage packing up to 500 records per envelope on an internal topic "
            "that a Faust agent unpacks. Worker CPU has a worker's start-up subtracted; broker "
            "CPU is the Kafka JVM's over the same window (it includes other sessions' load).",
            "",
            "| mode | records/s | worker µs/record | stage µs/record | broker µs/record | "
            "total µs/record |",
            "|---|---|---|---|---|---|",
        )
        for row in ing.get("rows", []):
            self.add(
                f"| {row['mode']} | {fmt(row.get('records_per_s'))} | "
                f"{fmt(row.get('worker_us_per_record'), 1)} | "
                f"{fmt(row.get('packer_us_per_record'), 1) if row['mode'] == 'envelope' else '—'} "
                f"| {fmt(row.get('broker_us_per_record'), 1)} | {fmt(total(row), 1)} |"
            )
        feed, env = self.ingest_row(ing, "feed"), self.ingest_row(ing, "envelope")
        if feed and env:
            tf, te = total(feed), total(env)
            if tf < te:
                text = (
                    "Candidate (b), the feed, is kept over (a), the envelope stage, because it "
                    "needs no extra hop or process and costs less in total per record (worker + "
                    f"stage + broker: {fmt(tf, 1)} vs {fmt(te, 1)} µs)."
                )
            else:
                text = (
                    "In this run the envelope stage cost no more in total per record (worker + "
                    f"stage + broker: {fmt(te, 1)} vs {fmt(tf, 1)} µs for the feed); the feed is "
                    "kept because it needs no extra hop or process (one fewer Kafka write and read "
                    "per record, and one fewer process to run)."
                )
            self.add("", text, "")
        else:
            self.add("")

    # ------------------------------------------------------------ profile
    def profile_section(self) -> None:
        p = self.r.get("profile", {})
        raw = p.get("raw") if isinstance(p, dict) else None
        self.add("## Profile of what still limits: the hot-SKU load", "")
        if not raw or not Path(raw).exists():
            self.add(f"Not measured: {_not_run(p) or 'py-spy output missing'}", "")
            return
        pr = prof.summarise(Path(raw), {name: rx for name, rx in SUBSYSTEMS})
        run = p.get("run", {})
        self.add(
            f"`py-spy record --format raw --rate 100 --nonblocking` for "
            f"{fmt(self.r.get('sizes', {}).get('profile_seconds'), 0)} s on the worker, the "
            f"relay and the sinks at once, during a flash sale like P1's "
            f"({run.get('attempts', 0):,} attempts for a quarter as many units, headline "
            f"topology, {fmt(run.get('throughput_per_s'))} answers/s; the profiled run is not "
            f"used for any ratio). Worker: {pr.samples} samples over all its threads (the "
            "transactions run on a thread pool; idle threads are sampled too, waiting in "
            "`EpollSelector.select` or the pool's `_worker`).",
            "",
            "Where the worker's time goes: inclusive = share of samples whose stack contains "
            "the subsystem (they overlap: the engine calls the fold, and everything runs under "
            "the event loop), self = share whose running function belongs to it.",
            "",
            "| subsystem | inclusive | self |",
            "|---|---|---|",
        )
        for name, rx in SUBSYSTEMS:
            self.add(f"| {name} | {pr.share(name) * 100:.1f}% | {pr.self_share(rx) * 100:.1f}% |")
        self.add(
            "",
            "Top frames of the worker by self time (the leaf function being run):",
            "",
            "| self | frame |",
            "|---|---|",
        )
        for name, frac in pr.top("self", 15):
            self.add(f"| {frac * 100:.1f}% | `{name}` |")
        self.add(
            "", "Top project frames by inclusive time:", "", "| inclusive | frame |", "|---|---|"
        )
        proj = [
            (k, v / pr.samples)
            for k, v in pr.inclusive.most_common()
            if any(s in k for s in ("agents/", "pipeline/", "kafka/", "tables/", "schemas/"))
        ][:12]
        for name, frac in proj:
            self.add(f"| {frac * 100:.1f}% | `{name}` |")
        self.add("")
        top = pr.top("self", 15)
        if top:
            fig, ax = plt.subplots(figsize=(8, 4.5))
            names = [n if len(n) < 60 else n[:57] + "..." for n, _ in top][::-1]
            ax.barh(names, [f * 100 for _, f in top][::-1], color="#b5634a")
            ax.set_xlabel("% of samples (self)")
            ax.set_title("Worker hot frames (py-spy)")
            ax.tick_params(axis="y", labelsize=7)
            fig.tight_layout()
            fig.savefig(self.dir / "profile_top.png", dpi=110)
            plt.close(fig)
            self.img("profile_top.png", "profile top frames")
        for mod, path in (p.get("sidecars") or {}).items():
            if not path or not Path(path).exists():
                continue
            sp = prof.summarise(Path(path))
            if not sp.samples:
                continue
            self.add(
                f"`{mod}` ({sp.samples} samples), top self frames: "
                + ", ".join(f"`{k}` {v * 100:.0f}%" for k, v in sp.top("self", 6)),
                "",
            )
        idle = Path(raw).with_name("idle-profile.txt")
        if idle.exists():
            ip = prof.summarise(idle, {"expiry": r"pipeline/(expiry|indexing)\.py"})
            pts = _get(self.r, "memory", "points", default=[]) or []
            n = pts[-1]["skus"] if pts else 0
            if ip.samples:
                self.add(
                    f"Idle worker with {n:,} SKUs in the table (no traffic), 5 s of py-spy: "
                    f"{ip.share('expiry') * 100:.0f}% of {ip.samples} samples are in the expiry "
                    "sweeper (it checks an in-memory index of open reservations each second). "
                    "Top self frames: "
                    + ", ".join(f"`{k}` {v * 100:.0f}%" for k, v in ip.top("self", 4)),
                    "",
                )

    # ------------------------------------------------------------ levers
    def levers(self) -> None:
        lev = self.r.get("levers", {})
        if _not_run(lev) or not lev:
            return
        first = next(iter(lev.values()))
        self.add(
            "## Levers measured side by side",
            "",
            "Each lever is a single-SKU run (every reserve granted, "
            f"{first.get('attempts'):,} attempts) on a fresh worker started with the variables "
            "shown (and the processes listed), right after a baseline run on a fresh worker: the "
            "headline topology, or the one-process deployment for the topology levers. The "
            "ratio is lever ÷ its own baseline, median over the pairs; CPU is the total over "
            "the pipeline's processes and the services, µs per decision. With this much noise, "
            "read a throughput ratio within about ±20% of 1 as no effect.",
            "",
            "| lever | environment (+ processes) | baseline | baseline /s | with lever /s | "
            "ratio (per pair) | CPU µs/decision baseline → lever |",
            "|---|---|---|---|---|---|---|",
        )
        for name, v in lev.items():
            env = ", ".join(f"`{k}={val}`" for k, val in v["env"].items())
            if v.get("sidecars"):
                env += " + " + ", ".join(f"`python -m {m}`" for m in v["sidecars"])
            pairs = v.get("pairs", [])
            rs = [p["ratio"] for p in pairs]

            def total(cpu: dict[str, float]) -> float:
                return sum(x for k, x in cpu.items() if k in PROCESSES) * 1000

            cpu_b = [total(p.get("base_cpu_ms", {})) for p in pairs]
            cpu_l = [total(p.get("lever_cpu_ms", {})) for p in pairs]
            self.add(
                f"| {name} | {env} | {v.get('base', '?')} | "
                f"{fmt(median(p['base_per_s'] for p in pairs))} | "
                f"{fmt(median(p['lever_per_s'] for p in pairs))} | **{fmt(median(rs))}** "
                f"({', '.join(fmt(x) for x in rs)}) | "
                f"{fmt(median(cpu_b) if cpu_b else float('nan'), 0)} → "
                f"{fmt(median(cpu_l) if cpu_l else float('nan'), 0)} |"
            )
        self.add("")

    # ------------------------------------------------------------ correctness
    def correctness(self) -> None:
        mix = self.r.get("mix", {})
        self.add("## Load generator modes: mix of commits/releases/expiries and duplicates", "")
        why = _not_run(mix)
        if why:
            self.add(f"Not run: {why}", "")
            return
        self.add(
            f"A flash sale of {mix.get('attempts'):,} reserves for {mix.get('attempts', 0) // 3:,} "
            "units where each RESERVED answer is followed by a CommitReservation (40%) or a "
            "ReleaseReservation (30%), 10% of the reserves carry a 1.5 s ttl and are left to "
            "expire, and 10% of the reserves are sent twice (same event and order id). Released "
            "and expired units go back on sale and are reserved again by later attempts.",
            "",
            f"- answers by outcome: {mix.get('outcomes')}",
            f"- oversold units (answers: held = RESERVED/COMMITTED by each order's last "
            f"answer, minus units): **{mix.get('oversold_units')}**; per the table "
            f"(`reserved > on_hand`): **{mix.get('table_oversold')}**",
            f"- reserves sent twice {mix.get('injected_duplicates')}, second answers with "
            f"`duplicate=true` {mix.get('duplicate_answers')}",
            f"- reservations left to expire {mix.get('expected_expiries')}, orders answered "
            f"EXPIRED {mix.get('expired_orders')}",
            "- duplicate answers to commands the load generator did not send: "
            f"{mix.get('other_duplicate_answers') or 'none'} (the expiry sweeper sends an "
            "ExpireReservation again when the first has not been applied within 5 s; the second "
            "is answered as a duplicate and changes nothing)",
            f"- {fmt(mix.get('throughput_per_s'))} answers/s, complete: {mix.get('complete')}",
            "",
        )

    def method(self, sizes: dict[str, Any]) -> None:
        steps = self.r.get("step_seconds", {})
        pts = ", ".join(f"{n:,}" for n in sizes.get("rss_points", []))
        self.add(
            "## Sizes, method and how to reproduce",
            "",
            f"Sizes: {sizes.get('flash_attempts', 0):,} attempts for "
            f"{sizes.get('flash_units', 0):,} units in P1 (pipeline, PostgreSQL and Redis alike), "
            f"{sizes.get('single_attempts', 0):,} reserves in the single- and many-SKU runs "
            f"({sizes.get('many_skus', 0):,} SKUs), {sizes.get('pass_messages', 0):,} messages "
            f"per passthrough, {sizes.get('loadgen_commands', 0):,} commands for the load "
            f"generator alone, {sizes.get('repeats')} repeat(s), {sizes.get('p6_seconds')} s of "
            f"paced load for P6, table sizes {pts} for recovery and memory, "
            f"{sizes.get('ingest_records', 0):,} records for the ingestion prototype.",
            "",
            "Time per part (s): " + ", ".join(f"{k} {v:.0f}" for k, v in steps.items()),
            "",
        )
        for part, when in (self.r.get("separate_runs") or {}).items():
            if part == "memory":
                continue  # noted with its points in the recovery section
            self.add(
                f"- The `{part}` part was measured again in a separate invocation started "
                f"{when} and merged into this report (`python -m bench.run --only {part} "
                "--merge-into bench/out/results-full.json`); its ratios compare figures "
                "measured back to back within that invocation.",
            )
        self.add(
            "",
            "```bash",
            "make stack-up                         # Kafka, Redis, OpenSearch (local, no Docker)",
            "apt-get install -y postgresql         # the PostgreSQL baseline (Debian's package)",
            "make bench                            # = .venv/bin/python -m bench.run (idle machine)",
            ".venv/bin/python -m bench.run --quick # tiny sizes, a smoke check",
            ".venv/bin/python -m bench.run --quick --only memory,micro  # some parts only",
            ".venv/bin/python -m bench.ingest --records 200000 --report ingest.json",
            "# one load by hand against a running worker (make run):",
            ".venv/bin/python -m bench.loadgen flash --units 1000 --attempts 5000",
            ".venv/bin/python -m bench.loadgen steady --skus 1000 --attempts 20000 --rate 2000",
            ".venv/bin/python -m bench.loadgen dup --skus 100 --attempts 2000 --dup-fraction 0.2",
            "```",
            "",
            "Every worker is a real `faust -A pipeline.app worker` subprocess (the test "
            "harness's `Worker`) in a fresh namespace: topic prefix, app id, Redis key prefix "
            "and search index of its own, 8 partitions (the project default); the namespace's "
            "topics, keys and index are deleted afterwards. A run that fails (e.g. the shared "
            "broker restarted by another session) is retried once in a fresh namespace.",
            "",
        )
