"""``make bench``: every benchmark in one go, then ``bench/REPORT.md`` with plots.

    python -m bench.run            # full run (~30 min on a 2-core machine; run it idle)
    python -m bench.run --quick    # tiny sizes (a few minutes): checks that everything works
    python -m bench.run --only memory,micro   # some parts only

The machine is shared and noisy, so every headline figure is a ratio to a baseline
measured in the same run (PostgreSQL, Redis, a bare Kafka loop, a bare consumer, the
load generator alone, ...), taken as the median over repeats where affordable; the
absolute numbers are kept for context only. Raw results go to
``bench/out/results*.json``; the full run's plots go to ``bench/report/`` (committed
with the report), the quick run's to ``bench/out/quick/``.

Needs the local stack (``make stack-up``) and, for the PostgreSQL baseline, Debian's
``postgresql`` package; a missing baseline is reported as "not run", never faked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import sys
import threading
import time
import traceback
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import baselines, ingest, machine, micro, profile, reserve_http
from bench.common import (
    OUT,
    REPO,
    REPORT_DIR,
    BenchNamespace,
    StackRestarted,
    cpu_seconds,
    log_count,
    percentile,
    ratio,
    rss_mb,
    stack_pids,
    time_to_healthy,
    to_jsonable,
    undisturbed,
    wait_decided,
    wait_stock,
)
from bench.loadgen import (
    LoadGenerator,
    LoadResult,
    LoadSpec,
    TopicReader,
    end_offsets,
    measure_alone,
)
from bench.tablefill import fill_changelog
from pipeline.topics import ledger_changelogs
from schemas.codec import AvroCodec


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


# ---------------------------------------------------------------- pipeline runs


def _restock_waiter(worker: Any) -> Callable[[list[str], int], None]:
    def wait(skus: list[str], units: int) -> None:
        restocks = len(skus) * max(1, -(-units // 100_000))
        wait_decided(worker, restocks, 300, "RestockReceived")
        for sku in skus[:1] + skus[-1:]:
            wait_stock(worker, sku, units)

    return wait


def pipeline_run(
    label: str,
    spec: LoadSpec,
    *,
    sink: bool = True,
    env: dict[str, str] | None = None,
    profile_to: Path | None = None,
    profile_seconds: float = 0.0,
    sidecars: tuple[str, ...] = (),
    attempts_left: int = 2,
) -> dict[str, Any]:
    """One load against a fresh worker (plus ``sidecars``, modules run as their own
    processes) in a fresh namespace; summary dict.

    CPU per decision of every process (the pipeline's, the broker, Redis, OpenSearch)
    is counted from the first send until the relay and the sinks have caught up (their
    lag metrics at 0), so work still queued when the last answer arrived is in it; the
    load generator's own CPU (this process) up to its last answer, apart.
    With ``profile_to``, py-spy records the worker there and each sidecar beside it
    (``<stem>-<module>.txt``) from the restock's end.
    """
    ns = BenchNamespace.fresh(label, sink=sink, **(env or {}))
    worker = ns.worker()
    sides = [ns.sidecar(m) for m in sidecars]
    pids = stack_pids()
    try:
        worker.start(timeout=180)
        for side in sides:
            side.start()
        gen = LoadGenerator(ns.settings)
        wait = _restock_waiter(worker)
        spy: list[Any] = []
        assert worker.proc is not None
        procs = {"worker": worker.proc.pid}
        procs.update({s.module: s.proc.pid for s in sides if s.proc is not None})
        # the services do per-decision work too (every Kafka record is a broker request)
        for service, pid in zip(("kafka", "redis", "opensearch"), pids, strict=True):
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                procs[service] = int(pid)
        cpu0: dict[str, float] = {}

        def at_first_send() -> None:
            cpu0.update({name: cpu_seconds(pid) for name, pid in procs.items()})
            cpu0["loadgen"] = time.process_time()
            cpu0["at"] = time.monotonic()

        def after_restock(skus: list[str], units: int) -> None:
            wait(skus, units)
            if profile_to is not None:
                for name, pid in procs.items():
                    if name == "worker" or name.startswith("pipeline."):
                        path = (
                            profile_to
                            if name == "worker"
                            else profile_to.with_name(f"{profile_to.stem}-{name}.txt")
                        )
                        spy.append(profile.record(pid, path, profile_seconds))

        result = gen.run(spec, wait_restocked=after_restock, on_start=at_first_send)
        loadgen_cpu = time.process_time() - cpu0.get("loadgen", time.process_time())
        loadgen_window = time.monotonic() - cpu0.get("at", time.monotonic())
        out = result.summary()
        t_quiet = time.monotonic()
        out["caught_up"] = wait_quiet([worker, *sides], timeout=60)
        out["catch_up_s"] = time.monotonic() - t_quiet
        # CPU per decision of each pipeline process: far less sensitive than rates to
        # other processes on a shared machine (it is what a decision costs, not how long
        # it waited for a core)
        cpu = {name: cpu_seconds(pid) - cpu0.get(name, 0.0) for name, pid in procs.items()}
        window = time.monotonic() - cpu0.get("at", time.monotonic())
        decided = max(1, out["decisions"])
        out["cpu_ms_per_decision"] = {name: s * 1000 / decided for name, s in cpu.items()}
        out["loadgen_cpu_ms_per_decision"] = loadgen_cpu * 1000 / decided
        # average cores busy over each window (first send -> caught up; -> last answer)
        out["cpu_window_s"] = window
        out["cores_busy"] = {name: s / window for name, s in cpu.items()} if window > 0 else {}
        out["loadgen_cores"] = loadgen_cpu / loadgen_window if loadgen_window > 0 else 0.0
        out["engine"] = engine_stats(worker)
        out["rss_mb"] = rss_mb(worker.proc.pid)[0]
        out["table_oversold"] = _table_oversold(worker, result)
        out["latencies_ms"] = result.latencies_ms(result.reserve_ids)
        out["timeline"] = _timeline(result)
        for p in spy:
            if p is not None:
                with contextlib.suppress(Exception):
                    p.wait(profile_seconds + 30)
        worker.stop()
        if not result.complete:
            raise RuntimeError(f"{label}: incomplete ({out['decisions']}/{out['sent']})")
        if stack_pids() != pids:
            raise StackRestarted(f"a stack service restarted during {label}")
        return out
    except Exception as exc:  # noqa: BLE001 - the shared broker may be restarted by others
        worker.kill()
        if attempts_left > 1:
            log(f"{label}: {exc}; measuring again in a fresh namespace")
            return pipeline_run(
                label,
                spec,
                sink=sink,
                env=env,
                profile_to=profile_to,
                profile_seconds=profile_seconds,
                sidecars=sidecars,
                attempts_left=attempts_left - 1,
            )
        raise
    finally:
        worker.kill()
        for side in sides:
            side.kill()
        ns.cleanup()


_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def _metrics_text(worker: Any) -> str:
    with urllib.request.urlopen(worker.url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def histogram(text: str, name: str) -> dict[str, float]:
    """count, sum, mean and bucket-bound p50/p99 of a Prometheus histogram (summed over
    its labels) from ``/metrics`` text; a quantile is the upper bound of its bucket."""
    buckets: dict[float, float] = {}
    count = total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        metric, labels, value = m.group("name"), m.group("labels") or "", float(m.group("value"))
        if metric == f"{name}_count":
            count += value
        elif metric == f"{name}_sum":
            total += value
        elif metric == f"{name}_bucket":
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                bound = float("inf") if le.group(1) == "+Inf" else float(le.group(1))
                buckets[bound] = buckets.get(bound, 0.0) + value

    def quantile(q: float) -> float:
        for bound in sorted(buckets):
            if count and buckets[bound] >= q * count:
                return bound
        return float("nan")

    return {
        "count": count,
        "sum": total,
        "mean": total / count if count else float("nan"),
        "p50_le": quantile(0.5),
        "p99_le": quantile(0.99),
    }


def engine_stats(worker: Any) -> dict[str, Any]:
    """The batch engine's own histograms on ``worker``: commands per batch, fold and
    commit seconds per batch, arrival-to-commit seconds per command."""
    with contextlib.suppress(Exception):
        text = _metrics_text(worker)
        return {
            "batch_commands": histogram(text, "inventory_batch_commands"),
            "batch_fold_seconds": histogram(text, "inventory_batch_fold_seconds"),
            "batch_commit_seconds": histogram(text, "inventory_batch_commit_seconds"),
            "decision_seconds": histogram(text, "inventory_decision_seconds"),
        }
    return {}


def _table_oversold(worker: Any, result: LoadResult) -> int:
    """Units reserved beyond on_hand per the table itself (GET /stock), over up to 50 SKUs."""
    over = 0
    for sku in result.skus[:50]:
        status, body = worker.get_json(f"/stock/{sku}")
        if status == 200:
            over += max(0, body["reserved"] + body["safety_stock"] - body["on_hand"])
    return over


def _timeline(result: LoadResult, bins: int = 60) -> list[tuple[float, int]]:
    """(seconds since first send, answers in that bin) for the throughput-over-time plot."""
    times = sorted(a.at for got in result.answers.values() for a in got)
    if not times:
        return []
    span = max(times[-1] - result.first_send, 1e-3)
    width = span / bins
    counts = [0] * bins
    for t in times:
        counts[min(bins - 1, int((t - result.first_send) / width))] += 1
    return [(round((i + 0.5) * width, 3), c) for i, c in enumerate(counts)]


# ---------------------------------------------------------------- P1-P3


def throughput_repeats(sizes: Sizes, pg: baselines.PostgresCluster | None) -> dict[str, Any]:
    """Repeats of: PostgreSQL, Redis, the load generator alone, pipeline hot flash (both
    topologies), single-SKU (both), many-SKU, bare passthroughs; all back to back."""
    reps: list[dict[str, Any]] = []
    m, n = sizes.flash_attempts, sizes.flash_units
    s = sizes.single_attempts
    from config.settings import settings as base

    for r in range(sizes.repeats):
        rep: dict[str, Any] = {}
        log(f"repeat {r + 1}/{sizes.repeats}: PostgreSQL and Redis flash sale ({m} for {n})")
        if pg is not None:
            rep["postgres"] = baselines.postgres_flash(pg.dsn, n, m).summary()
        rep["redis"] = undisturbed(
            "Redis flash", lambda: baselines.redis_flash(base.redis_url, n, m).summary(), log=log
        )
        rep["redis_pipelined"] = undisturbed(
            "Redis pipelined flash",
            lambda: baselines.redis_flash(base.redis_url, n, m, pipeline_depth=100).summary(),
            log=log,
        )
        log(f"repeat {r + 1}: the load generator alone, {sizes.loadgen_commands} commands")
        rep["loadgen_alone"] = undisturbed(
            "load generator alone", lambda: _loadgen_alone(sizes.loadgen_commands), log=log
        )
        flash = LoadSpec(mode="flash", attempts=m, units=n, producers=4)
        single = LoadSpec(mode="flash", attempts=s, units=s * 2, producers=4)
        log(f"repeat {r + 1}: pipeline flash sale (hot SKU, {m} reserves for {n} units)")
        rep["pipeline_flash"] = pipeline_run("flash", flash, **tuned())
        log(f"repeat {r + 1}: the same flash sale, everything in one worker process")
        rep["pipeline_flash_1proc"] = pipeline_run("flash-1proc", flash)
        log(f"repeat {r + 1}: pipeline single SKU, {s} reserves, every one granted")
        rep["pipeline_single"] = pipeline_run("single", single, **tuned())
        log(f"repeat {r + 1}: the same single-SKU load, everything in one worker process")
        rep["pipeline_single_1proc"] = pipeline_run("single-1proc", single)
        log(f"repeat {r + 1}: pipeline {sizes.many_skus} SKUs (Zipf 1.1), every reserve granted")
        rep["pipeline_many"] = pipeline_run(
            "many",
            LoadSpec(mode="steady", attempts=s, units=s * 2, skus=sizes.many_skus, producers=4),
            **tuned(),
        )
        log(f"repeat {r + 1}: bare passthroughs, {sizes.pass_messages} ReserveStock messages")
        msgs = baselines.reserve_messages(base, sizes.pass_messages)
        ns = BenchNamespace.fresh("pass")
        try:
            for client in ("aiokafka", "confluent"):
                pr = undisturbed(
                    f"{client} passthrough",
                    lambda c=client, s=ns.settings, m=msgs: baselines.passthrough(s, c, m),
                    log=log,
                )
                rep[f"pass_{client}"] = {
                    "messages": pr.messages,
                    "seconds": pr.seconds,
                    "throughput_per_s": pr.throughput,
                }
        finally:
            ns.cleanup()
        _repeat_ratios(rep)
        reps.append(rep)
        log(f"repeat {r + 1} ratios: {json.dumps(rep['ratios'], default=str)}")
    return {"repeats": reps}


def _loadgen_alone(commands: int) -> dict[str, Any]:
    ns = BenchNamespace.fresh("loadgen", sink=False)
    try:
        got = measure_alone(ns.settings, commands, producers=4)
        if not got["complete"]:
            raise RuntimeError(f"load generator alone incomplete: {got}")
        return got
    finally:
        ns.cleanup()


def _tp(rep: dict[str, Any], key: str) -> float:
    return float(rep.get(key, {}).get("throughput_per_s", float("nan")))


def _alone(rep: dict[str, Any], key: str) -> float:
    return float(rep.get("loadgen_alone", {}).get(key, float("nan")))


def _repeat_ratios(rep: dict[str, Any]) -> None:
    rep["ratios"] = {
        "p1_vs_postgres": ratio(_tp(rep, "pipeline_flash"), _tp(rep, "postgres")),
        "p1_vs_redis": ratio(_tp(rep, "pipeline_flash"), _tp(rep, "redis")),
        "p2_many_vs_single": ratio(_tp(rep, "pipeline_many"), _tp(rep, "pipeline_single")),
        "p3_vs_aiokafka": ratio(_tp(rep, "pipeline_single"), _tp(rep, "pass_aiokafka")),
        "p3_vs_confluent": ratio(_tp(rep, "pipeline_single"), _tp(rep, "pass_confluent")),
        # the same measures for the default deployment (relay and sinks inside the worker)
        "p1_vs_postgres_1proc": ratio(_tp(rep, "pipeline_flash_1proc"), _tp(rep, "postgres")),
        "p3_vs_aiokafka_1proc": ratio(_tp(rep, "pipeline_single_1proc"), _tp(rep, "pass_aiokafka")),
        "tuned_vs_1proc_flash": ratio(_tp(rep, "pipeline_flash"), _tp(rep, "pipeline_flash_1proc")),
        "tuned_vs_1proc_single": ratio(
            _tp(rep, "pipeline_single"), _tp(rep, "pipeline_single_1proc")
        ),
        # headroom of the load generator: its rates alone over the pipeline's (P1 flash)
        "loadgen_send_vs_p1": ratio(_alone(rep, "send_rate_per_s"), _tp(rep, "pipeline_flash")),
        "loadgen_read_vs_p1": ratio(_alone(rep, "read_rate_per_s"), _tp(rep, "pipeline_flash")),
    }


# ---------------------------------------------------------------- P6


def _metric_sum(worker: Any, name: str) -> float:
    with urllib.request.urlopen(worker.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def wait_quiet(procs: list[Any], timeout: float = 60.0) -> bool:
    """Until the relay and both sinks report no lag on any of ``procs``' /metrics (or
    ``timeout``: False): the worker and the standalone relay and sinks processes."""
    deadline = time.monotonic() + timeout
    zeros = 0
    while time.monotonic() < deadline:
        lag = -1.0
        with contextlib.suppress(Exception):
            lag = sum(
                _metric_sum(p, "inventory_relay_lag_records")
                + _metric_sum(p, "inventory_sink_lag_records")
                for p in procs
            )
        zeros = zeros + 1 if lag == 0 else 0
        if zeros >= 2:  # twice in a row: a gauge set before the last records came is stale
            return True
        time.sleep(0.25)
    return False


def latency_run(sizes: Sizes) -> dict[str, Any]:
    """P6 on one worker: find its max rate, then order-to-decision/Redis/search at half of it.

    The maximum is measured on the same worker right before (a steady Zipf burst sent as
    fast as possible), because the machine's load drifts within a run. If a backlog grows
    during the paced window (the last third's median latency over 3x the first third's, or
    fewer than 95% of the send rate answered),
    that rate was not sustainable after all and the window is repeated at a lower share
    of the maximum (0.5, then 0.3, then 0.2); every attempt is reported.
    """
    ns = BenchNamespace.fresh("p6", **LEVER_ENV[TUNED])
    cfg = ns.settings
    worker = ns.worker()
    sides = [ns.sidecar(m) for m in LEVER_SIDECARS[TUNED]]
    prefix = f"P6{uuid.uuid4().hex[:6]}"
    attempts_out: list[dict[str, Any]] = []
    try:
        worker.start(timeout=180)
        for side in sides:
            side.start()
        gen = LoadGenerator(cfg)
        calib = LoadSpec(
            mode="steady",
            attempts=sizes.p6_calibration,
            units=100_000,
            skus=sizes.p6_skus,
            producers=4,
            sku_prefix=prefix,
        )
        log(f"P6: maximum rate, {calib.attempts} reserves as fast as possible")
        max_rate = gen.run(calib, wait_restocked=_restock_waiter(worker)).throughput
        for share in (0.5, 0.3, 0.2):
            wait_quiet([worker, *sides])
            rate = max(5.0, max_rate * share)
            log(
                f"P6: {rate:.0f}/s paced for {sizes.p6_seconds:.0f} s ({share} x max {max_rate:.0f}/s)"
            )
            got = _paced_latency(cfg, gen, worker, sizes, rate, prefix, seed=11 + len(attempts_out))
            got["share_of_max"] = share
            attempts_out.append(got)
            if not got["backlog"]:
                break
        assert worker.proc is not None
        rss = rss_mb(worker.proc.pid)[0]
        engine = engine_stats(worker)
    finally:
        worker.stop()
        for side in sides:
            side.kill()
        ns.cleanup()
    final = attempts_out[-1]
    log("P6: bare Kafka produce-to-consume at the same rate")
    bare = undisturbed(
        "bare Kafka latency",
        lambda: baselines.bare_latency(cfg, final["rate_per_s"], sizes.p6_seconds),
        log=log,
    )
    final["bare_kafka"] = _pct(bare)
    final["samples"]["bare_kafka"] = bare
    final["max_rate_per_s"] = max_rate
    final["seconds"] = sizes.p6_seconds
    final["rss_mb"] = rss
    final["engine"] = engine  # over the whole worker: calibration and every window
    final["attempts"] = [{k: v for k, v in a.items() if k != "samples"} for a in attempts_out]
    return final


def _pct(v: list[float]) -> dict[str, float]:
    return {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)}


def _paced_latency(
    cfg: Any, gen: LoadGenerator, worker: Any, sizes: Sizes, rate: float, prefix: str, seed: int
) -> dict[str, Any]:
    """One paced window at ``rate``; latencies to the answer, Redis and the search index."""
    import redis

    codec = AvroCodec()
    changes: dict[str, tuple[str, int, int]] = {}  # cause_event_id -> (sku, version, processed)
    redis_seen: dict[str, list[tuple[int, int]]] = {}  # sku -> [(version, updated_at ms)]
    stop = threading.Event()
    spec = LoadSpec(
        mode="steady",
        attempts=max(1, int(rate * sizes.p6_seconds)),
        units=100_000,
        skus=sizes.p6_skus,
        rate=rate,
        producers=4,
        sku_prefix=prefix,
        restock=False,
        seed=seed,
    )

    def on_change(msg: Any, now: float) -> None:
        name, v = codec.decode(msg.value())
        if name == "StockChanged" and v["cause_type"] == "ReserveStock":
            changes[v["cause_event_id"]] = (v["sku"], v["version"], v["processed_at"])

    r = redis.Redis.from_url(cfg.redis_url)
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(cfg.redis_channel)

    def listen() -> None:
        while not stop.is_set():
            msg = pubsub.get_message(timeout=0.1)
            if msg and msg.get("type") == "message":
                d = json.loads(msg["data"])
                redis_seen.setdefault(d["sku"], []).append((d["version"], d["updated_at"]))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    reader = TopicReader(cfg, end_offsets(cfg, cfg.stock_changes_topic), on_change)
    reader.start()
    try:
        result = gen.run(spec)
        deadline = time.monotonic() + 60  # let the projections catch up with the last changes
        while time.monotonic() < deadline and len(changes) < len(result.reserve_ids):
            time.sleep(0.2)
        latest: dict[str, int] = {}
        for sku, ver, _p in changes.values():
            latest[sku] = max(latest.get(sku, 0), ver)
        while time.monotonic() < deadline:
            if all(
                max((v for v, _ in redis_seen.get(s, [])), default=0) >= v
                for s, v in latest.items()
            ):
                break
            time.sleep(0.2)
        docs = _search_docs(cfg, list(latest), latest, deadline)
    finally:
        stop.set()
        reader.stop()
        listener.join(5)
        pubsub.close()
    sent = result.sent
    decision = result.latencies_ms(result.reserve_ids)
    to_agent, relay_hop, to_redis, to_search = [], [], [], []
    for eid in result.reserve_ids:
        ch = changes.get(eid)
        if ch is None or eid not in sent:
            continue
        sku, ver, processed = ch
        to_agent.append(processed - sent[eid] * 1000)
        got = result.answers.get(eid)
        if got:
            relay_hop.append(got[0].at * 1000 - processed)
        applied = [u for v, u in redis_seen.get(sku, []) if v >= ver]
        if applied:
            to_redis.append(min(applied) - sent[eid] * 1000)
        doc = docs.get(sku)
        if doc is not None and doc[0] == ver:
            to_search.append(doc[1] - sent[eid] * 1000)
    third = max(1, len(result.reserve_ids) // 3)
    early = percentile(result.latencies_ms(result.reserve_ids[:third]), 50)
    late = percentile(result.latencies_ms(result.reserve_ids[-third:]), 50)
    return {
        "rate_per_s": rate,
        "achieved_send_rate": result.send_rate,
        "achieved_answer_rate": result.throughput,
        "first_third_p50_ms": early,
        "last_third_p50_ms": late,
        # a backlog: waits grew over the window, or the answers fell behind the sends (a
        # burst-calibrated maximum can overstate what is sustainable)
        "backlog": bool(late > 3 * max(1.0, early) or result.throughput < 0.95 * result.send_rate),
        "complete": result.complete,
        "order_to_decision": _pct(decision),
        "order_to_agent": _pct(to_agent),
        "agent_to_answer": _pct(relay_hop),
        "order_to_redis": _pct(to_redis),
        "order_to_search": _pct(to_search),
        "samples": {
            "order_to_decision": decision,
            "order_to_redis": to_redis,
            "order_to_search": to_search,
        },
    }


def _search_docs(
    cfg: Any, skus: list[str], latest: dict[str, int], deadline: float
) -> dict[str, tuple[int, int]]:
    """sku -> (version, updated_at) from the search index, waiting for the latest versions."""
    docs: dict[str, tuple[int, int]] = {}
    while True:
        for i in range(0, len(skus), 500):
            body = json.dumps({"ids": skus[i : i + 500]}).encode()
            req = urllib.request.Request(
                f"{cfg.opensearch_url}/{cfg.search_index}/_mget",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with contextlib.suppress(Exception), urllib.request.urlopen(req, timeout=10) as resp:
                for d in json.loads(resp.read())["docs"]:
                    if d.get("found"):
                        src = d["_source"]
                        docs[d["_id"]] = (int(src["version"]), int(src["updated_at"]))
        done = all(docs.get(s, (0, 0))[0] >= v for s, v in latest.items())
        if done or time.monotonic() > deadline:
            return docs
        time.sleep(0.5)


# ---------------------------------------------------------------- recovery + memory


def _line_time(line: str) -> datetime | None:
    """The timestamp of a JSON worker log line (``"ts"``, UTC), naive UTC."""
    if line.startswith("{"):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            ts = json.loads(line)["ts"]
            return datetime.fromisoformat(ts.replace("Z", "+00:00")).replace(tzinfo=None)
    return None


def _epoch(t: datetime) -> float:

    return t.replace(tzinfo=UTC).timestamp()


_READY = re.compile(
    r"ledger partition (?P<p>\d+) ready: changelog @(?P<a>\d+) -> @(?P<b>\d+) "
    r"\((?P<k>\d+) records\) in (?P<x>[0-9.]+) s"
)


def _last_start(log_path: Path) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return text.rsplit("===== start #", 1)[-1]


def ledger_start(log_path: Path, started_at: float, group: str = "") -> dict[str, Any]:
    """What the last start of a worker did, from its log: each ledger partition's
    ``ready`` line (records re-read from the two changelogs, seconds of fencing and
    catch-up) and when the consumer group let the worker in.

    ``restore_s`` is the wall time over which the partitions that re-read records were
    taking ownership (they do it concurrently): the latest ``ready`` line minus the
    earliest start (its time minus its seconds). ``*_after_start_s`` are seconds since
    ``started_at`` (epoch, taken just before the process was started); ``group`` is the
    app's consumer group (the relay's and sinks' groups join too).
    """
    ready: list[dict[str, Any]] = []
    joined: datetime | None = None
    needle = f"Joined group '{group}'" if group else "Joined group"
    for line in _last_start(log_path).splitlines():
        if joined is None and needle in line:
            joined = _line_time(line)
            continue
        m = _READY.search(line)
        t = _line_time(line) if m else None
        if m and t is not None:
            ready.append(
                {
                    "partition": int(m["p"]),
                    "from": int(m["a"]),
                    "to": int(m["b"]),
                    "records": int(m["k"]),
                    "seconds": float(m["x"]),
                    "at": _epoch(t),
                }
            )
    out: dict[str, Any] = {
        "partitions_ready": len({r["partition"] for r in ready}),
        "ready_lines": len(ready),
        "records": sum(r["records"] for r in ready),
        "joined_after_start_s": _epoch(joined) - started_at if joined else float("nan"),
    }
    if not ready:
        return out | {"restore_s": float("nan"), "max_partition_s": float("nan")}
    busy = [r for r in ready if r["records"]] or ready
    begin = min(r["at"] - r["seconds"] for r in busy)
    out.update(
        restore_s=max(r["at"] for r in busy) - begin,
        max_partition_s=max(r["seconds"] for r in ready),
        sum_partition_s=sum(r["seconds"] for r in ready),
        first_ready_after_start_s=min(r["at"] for r in ready) - started_at,
        last_ready_after_start_s=max(r["at"] for r in ready) - started_at,
    )
    return out


def timed_start(worker: Any, timeout: float = 1800.0) -> dict[str, Any]:
    """Start ``worker``: seconds to ``/healthz`` 200, plus :func:`ledger_start`."""
    started_at = time.time()
    healthy_s = time_to_healthy(worker, timeout=timeout)
    group = worker.ns.settings.app_id
    return {"healthy_s": healthy_s, **ledger_start(worker.log_path, started_at, group)}


async def _bare_read(bootstrap: str, topics: list[str], partitions: int) -> tuple[int, float]:
    """aiokafka, ``read_committed``: every partition from its start to the end it had
    when reading began (the last offset of a transactional partition is a commit
    marker that is never delivered: done once the position reaches the end)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await c.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        end = await c.end_offsets(tps)
        left = {tp for tp in tps if end[tp] > 0}
        n = 0
        t0 = time.perf_counter()
        deadline = time.monotonic() + 600
        while left:
            if time.monotonic() > deadline:
                raise TimeoutError(f"bare read: {len(left)} partitions short of their end")
            batches = await c.getmany(*left, timeout_ms=500, max_records=10000)
            for recs in batches.values():
                n += len(recs)
            for tp in list(left):
                if await c.position(tp) >= end[tp]:
                    left.discard(tp)
        return n, time.perf_counter() - t0
    finally:
        await c.stop()


def bare_changelog_read(cfg: Any) -> tuple[int, float]:
    """(records, seconds) for a bare aiokafka consumer reading both ledger changelogs."""
    topics = [t for t in ledger_changelogs(cfg) if _topic_size(cfg, t) >= 0]
    return asyncio.run(_bare_read(cfg.kafka_bootstrap, topics, cfg.partitions))


def bare_changelog_read_confluent(cfg: Any) -> tuple[int, float]:
    """(records, seconds) for ``pipeline.kafka.reading.read_to_end`` (confluent-kafka,
    the client the ledger restores with, ``read_committed``) over both changelogs."""
    from pipeline.kafka.reading import read_to_end

    n = 0
    t0 = time.perf_counter()
    for topic in ledger_changelogs(cfg):
        with contextlib.suppress(LookupError):
            for _msg in read_to_end(cfg, topic, timeout=600, chunk=10_000):
                n += 1
    return n, time.perf_counter() - t0


def _topic_size(cfg: Any, topic: str) -> int:
    """Offsets in ``topic`` (high minus low watermarks, markers included); -1: no topic."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": "bench-size"})
    try:
        meta = c.list_topics(topic, timeout=10)
        if topic not in meta.topics or meta.topics[topic].error is not None:
            return -1
        total = 0
        for p in meta.topics[topic].partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
        return total
    finally:
        c.close()


def memory_and_restore(sizes: Sizes, profile_to: Path | None) -> dict[str, Any]:
    """Table of N SKUs: cold start (data dir wiped), ``kill -9`` mid-idle and restart,
    clean stop and warm restart; RSS and idle CPU after each; bare changelog reads."""
    from bench.tablefill import sku_name

    ns = BenchNamespace.fresh("mem", sink=False)
    cfg = ns.settings
    worker = ns.worker()
    points: list[dict[str, Any]] = []
    extra: list[dict[str, Any]] = []
    filled = 0

    rebuilt_line = "reservation index rebuilt"
    rebuilds_seen = [0]
    rebuild_s: dict[str, float] = {}

    def settle(label: str) -> tuple[float, float, float]:
        """RSS right after the start; idle CPU once the expiry sweeper's first index
        rebuild (a read of the whole table, after every start) has finished."""
        assert worker.proc is not None
        pid = worker.proc.pid
        time.sleep(min(3.0, sizes.idle_seconds))
        rss, hwm = rss_mb(pid)
        deadline = time.monotonic() + 600
        while log_count(worker, rebuilt_line) <= rebuilds_seen[0]:
            if time.monotonic() > deadline:
                raise RuntimeError("the expiry sweeper never rebuilt its index")
            time.sleep(0.5)
        rebuilds_seen[0] = log_count(worker, rebuilt_line)
        found = re.findall(r"reservation index rebuilt: \d+ open in ([0-9.]+) s", _log_text())
        if found:
            rebuild_s[label] = float(found[-1])
        time.sleep(1.0)
        c0 = cpu_seconds(pid)
        time.sleep(sizes.idle_seconds)
        return rss, hwm, (cpu_seconds(pid) - c0) / sizes.idle_seconds

    def _log_text() -> str:
        try:
            return worker.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    try:
        for n in sizes.rss_points:
            log(f"memory: writing the changelog up to {n:,} SKUs")
            fill_changelog(cfg, filled, n - filled)
            filled = n
            records = sum(max(0, _topic_size(cfg, t)) for t in ledger_changelogs(cfg))
            shutil.rmtree(worker.data_dir, ignore_errors=True)
            log(f"memory: cold start (data dir wiped) restoring {records:,} changelog records")
            cold = timed_start(worker)
            rss, hwm, idle_cpu = settle("cold")
            status, body = worker.get_json(f"/stock/{sku_name('FILL', n - 1)}")
            if profile_to is not None and n == sizes.rss_points[-1] and worker.proc is not None:
                spy = profile.record(worker.proc.pid, profile_to, 5)
                if spy is not None:
                    spy.wait(60)
            log(f"memory: kill -9 of the idle worker with {n:,} SKUs, then a restart")
            worker.kill()
            killed = timed_start(worker)
            kill_rss, _, kill_cpu = settle("kill")
            worker.stop()
            log(f"memory: clean stop and warm restart with {n:,} SKUs")
            warm = timed_start(worker)
            warm_rss, _, warm_cpu = settle("warm")
            worker.stop()
            bare_n, bare_s = bare_changelog_read(cfg)
            bare_c_n, bare_c_s = bare_changelog_read_confluent(cfg)
            restore_s = cold.get("restore_s", float("nan"))
            points.append(
                {
                    "skus": n,
                    "changelog_records": records,
                    "cold": cold,
                    "cold_start_s": cold["healthy_s"],
                    "restore_records": cold["records"],
                    "restore_s": restore_s,
                    "restore_per_s": (
                        cold["records"] / restore_s
                        if restore_s == restore_s and restore_s > 0
                        else float("nan")
                    ),
                    "bare_read_records": bare_n,
                    "bare_read_s": bare_s,
                    "bare_per_s": bare_n / bare_s if bare_s > 0 else float("nan"),
                    "bare_confluent_records": bare_c_n,
                    "bare_confluent_s": bare_c_s,
                    "bare_confluent_per_s": bare_c_n / bare_c_s if bare_c_s > 0 else float("nan"),
                    "rss_mb": rss,
                    "hwm_mb": hwm,
                    "idle_cpu_cores": idle_cpu,
                    "kill": killed,
                    "kill_restart_s": killed["healthy_s"],
                    "kill_rss_mb": kill_rss,
                    "kill_idle_cpu_cores": kill_cpu,
                    "warm": warm,
                    "warm_start_s": warm["healthy_s"],
                    "warm_rss_mb": warm_rss,
                    "warm_idle_cpu_cores": warm_cpu,
                    "index_rebuild_cold_s": rebuild_s.get("cold"),
                    "index_rebuild_warm_s": rebuild_s.get("warm"),
                    "last_sku_found": status == 200 and body.get("on_hand") == 100,
                }
            )
            log(
                f"memory: {n:,} SKUs: cold {cold['healthy_s']:.1f} s (restore "
                f"{cold['records']:,} in {restore_s:.1f} s), kill -9 restart "
                f"{killed['healthy_s']:.1f} s, warm {warm['healthy_s']:.1f} s, RSS {rss:.0f} MB"
            )
        for i in range(sizes.warm_restarts - 1):
            log(f"memory: extra restarts {i + 1} with {filled:,} SKUs (warm, then kill -9)")
            warm = timed_start(worker)
            rss, _, _ = settle("extra")
            worker.kill()
            killed = timed_start(worker)
            settle("extra-kill")
            worker.stop()
            extra.append(
                {
                    "warm_start_s": warm["healthy_s"],
                    "rss_mb": rss,
                    "kill_restart_s": killed["healthy_s"],
                    "kill": killed,
                }
            )
    finally:
        worker.kill()
        ns.cleanup()
    return {
        "points": points,
        "warm": extra,
        "session_timeout_s": float(ns.ns.env(0, Path("."))["INVENTORY_SESSION_TIMEOUT_S"]),
    }


# ---------------------------------------------------------------- main


PARTS = (
    "throughput",
    "latency",
    "reserve_http",
    "memory",
    "profile",
    "levers",
    "mix",
    "micro",
    "ingest",
)
TOPOLOGY_LEVERS = {"split", "relay_out", "sink_off"}  # measured against one process


def run(sizes: Sizes, quick: bool, skip: set[str]) -> dict[str, Any]:
    started = time.time()
    results: dict[str, Any] = {
        "quick": quick,
        "sizes": asdict(sizes),
        "started": datetime.now().isoformat(timespec="seconds"),
    }
    results["machine_before"] = machine.describe()
    prof_dir = OUT / ("quick" if quick else "full")
    prof_dir.mkdir(parents=True, exist_ok=True)

    def step(name: str, fn: Callable[[], Any]) -> None:
        if name in skip:
            results[name] = {"skipped": True}
            return
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the rest
            log(f"{name} FAILED: {exc}")
            results[name] = {
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(),
            }
        results.setdefault("step_seconds", {})[name] = time.perf_counter() - t0

    pg: baselines.PostgresCluster | None = None
    pg_error = ""
    try:
        if "throughput" in skip:
            raise RuntimeError("throughput part skipped")
        pg = baselines.PostgresCluster().__enter__()
        results["postgres_version"] = pg.version
    except Exception as exc:  # noqa: BLE001
        pg_error = str(exc)
        log(f"PostgreSQL baseline not available: {exc}")
    results["postgres_error"] = pg_error
    try:
        step("throughput", lambda: throughput_repeats(sizes, pg))
    finally:
        if pg is not None:
            pg.__exit__(None, None, None)

    step("latency", lambda: undisturbed("P6", lambda: latency_run(sizes), log=log))
    step(
        "reserve_http",
        lambda: undisturbed("P7", lambda: reserve_http.measure(sizes.reserve_http_n), log=log),
    )
    step(
        "memory",
        lambda: undisturbed(
            "memory", lambda: memory_and_restore(sizes, prof_dir / "idle-profile.txt"), log=log
        ),
    )

    def prof() -> dict[str, Any]:
        out = prof_dir / "hot-profile.txt"
        m = sizes.profile_attempts
        # the P1 load (one hot SKU, a quarter of the attempts granted), long enough for
        # py-spy's window; worker, relay and sinks are each profiled
        res = pipeline_run(
            "profile",
            LoadSpec(mode="flash", attempts=m, units=max(1, m // 4), producers=4),
            profile_to=out,
            profile_seconds=sizes.profile_seconds,
            **tuned(),
        )
        res.pop("latencies_ms", None)
        res.pop("timeline", None)
        sides = {mod: str(out.with_name(f"{out.stem}-{mod}.txt")) for mod in LEVER_SIDECARS[TUNED]}
        return {"run": res, "raw": str(out), "sidecars": sides}

    step("profile", prof)

    def levers() -> dict[str, Any]:
        m = sizes.single_attempts
        spec = LoadSpec(mode="flash", attempts=m, units=m * 2, producers=4)
        out = {}
        for name in sizes.levers:
            if name in TOPOLOGY_LEVERS:
                base_env: dict[str, str] = {}
                base_sides: tuple[str, ...] = ()
                env = dict(LEVER_ENV[name])
                sides = LEVER_SIDECARS.get(name, ())
            else:  # on top of the headline topology
                base_env = dict(LEVER_ENV[TUNED])
                base_sides = LEVER_SIDECARS[TUNED]
                env = {**LEVER_ENV[TUNED], **LEVER_ENV[name]}
                sides = tuple(dict.fromkeys(base_sides + LEVER_SIDECARS.get(name, ())))
            pairs = []
            for i in range(sizes.lever_pairs):
                log(f"lever {name} ({i + 1}/{sizes.lever_pairs}): {LEVER_ENV[name]}")
                base = pipeline_run("lever-base", spec, env=base_env, sidecars=base_sides)
                res = pipeline_run(f"lever-{name}", spec, env=env, sidecars=sides)
                pairs.append(
                    {
                        "base_per_s": base["throughput_per_s"],
                        "lever_per_s": res["throughput_per_s"],
                        "ratio": ratio(res["throughput_per_s"], base["throughput_per_s"]),
                        "base_cpu_ms": base["cpu_ms_per_decision"],
                        "lever_cpu_ms": res["cpu_ms_per_decision"],
                    }
                )
            out[name] = {
                "env": LEVER_ENV[name],
                "sidecars": list(LEVER_SIDECARS.get(name, ())),
                "base": "one process" if name in TOPOLOGY_LEVERS else TUNED,
                "attempts": m,
                "pairs": pairs,
            }
        return out

    step("levers", levers)

    def mix() -> dict[str, Any]:
        m = sizes.mix_attempts
        res = pipeline_run(
            "mix",
            LoadSpec(
                mode="flash",
                attempts=m,
                units=m // 3,
                producers=4,
                commit_fraction=0.4,
                release_fraction=0.3,
                expire_fraction=0.1,
                dup_fraction=0.1,
                timeout=240,
            ),
            **tuned(),
        )
        res.pop("latencies_ms", None)
        return res

    step("mix", mix)
    step("micro", lambda: micro.measure(BenchNamespace.fresh("micro").settings, quick))

    def ingestion() -> dict[str, Any]:
        log(f"ingest: Faust stream vs feed vs envelope, {sizes.ingest_records:,} records")
        got = ingest.run_all(sizes.ingest_records, echo=False)
        got["records"] = sizes.ingest_records
        return got

    step("ingest", lambda: undisturbed("ingest", ingestion, log=log))
    results["machine_after"] = machine.describe()
    results["total_seconds"] = time.time() - started
    return results


def merge(saved: dict[str, Any], extra: dict[str, Any], skip: set[str]) -> dict[str, Any]:
    """Put the parts run in ``extra`` into ``saved``: memory points are added (same size:
    replaced), other parts replaced; each is marked with the time of its separate run."""
    for part in PARTS:
        if part in skip or part not in extra:
            continue
        if isinstance(extra[part], dict) and "error" in extra[part]:
            log(f"not merging {part}: {extra[part]['error'][:200]}")
            continue
        saved.setdefault("separate_runs", {})[part] = extra.get("started")
        if part == "memory" and isinstance(saved.get("memory"), dict):
            pts = saved["memory"].setdefault("points", [])
            for p_ in (extra.get("memory") or {}).get("points", []):
                p_["separate_run"] = extra.get("started")
                pts[:] = [q for q in pts if q["skus"] != p_["skus"]] + [p_]
            pts.sort(key=lambda q: q["skus"])
        else:
            saved[part] = extra[part]
    return saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few minutes")
    p.add_argument("--report", type=Path, default=None, help="where to write the Markdown report")
    p.add_argument(
        "--skip", default="", help=f"comma list of parts to leave out: {','.join(PARTS)}"
    )
    p.add_argument("--only", default="", help="comma list of the only parts to run")
    p.add_argument(
        "--merge-into",
        type=Path,
        default=None,
        help="add this run's memory points to a saved results file and re-render its report",
    )
    p.add_argument(
        "--rss-skus",
        default="",
        help="comma list of table sizes for the memory run (e.g. 100000,300000,1000000)",
    )
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--levers", default="", help=f"comma list of levers: {','.join(LEVER_ENV)}")
    p.add_argument("--lever-pairs", type=int, default=None)
    p.add_argument("--from-json", type=Path, default=None, help="only re-render a saved run")
    args = p.parse_args(argv)
    from bench import report

    sizes = QUICK if args.quick else FULL
    if args.rss_skus:
        sizes.rss_points = [int(x) for x in args.rss_skus.split(",") if x]
    if args.repeats:
        sizes.repeats = args.repeats
    if args.levers:
        sizes.levers = [x for x in args.levers.split(",") if x]
        unknown = set(sizes.levers) - set(LEVER_ENV)
        if unknown:
            p.error(f"unknown levers: {sorted(unknown)}")
    if args.lever_pairs:
        sizes.lever_pairs = args.lever_pairs
    name = "quick" if args.quick else "full"
    raw = OUT / f"results-{name}.json"
    skip = {s for s in args.skip.split(",") if s}
    only = {s for s in args.only.split(",") if s}
    if (skip | only) - set(PARTS):
        p.error(f"unknown parts: {sorted((skip | only) - set(PARTS))}; parts: {', '.join(PARTS)}")
    if only:
        skip |= set(PARTS) - only
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        OUT.mkdir(parents=True, exist_ok=True)
        results = run(sizes, args.quick, skip)
        if args.merge_into:
            raw = args.merge_into
            results = merge(json.loads(raw.read_text()), results, skip)
        raw.write_text(json.dumps(to_jsonable(results), indent=1, default=str))
        log(f"raw results: {raw}")
    if args.quick:
        md = args.report or OUT / "REPORT-quick.md"
        plots = OUT / "quick"
    else:
        md = args.report or REPO / "bench" / "REPORT.md"
        plots = REPORT_DIR
    report.write(results, md, plots)
    log(f"report: {md}  ({results.get('total_seconds', 0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
