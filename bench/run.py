"""``make bench``: every benchmark in one go, then ``bench/REPORT.md`` with plots.

    python -m bench.run            # full run (~15-20 min on a 2-core machine)
    python -m bench.run --quick    # tiny sizes (< 3 min): checks that everything works

The machine is shared and noisy, so every headline figure is a ratio to a baseline
measured in the same run (PostgreSQL, Redis, a bare Kafka loop, a bare consumer, ...),
taken as the median over repeats where affordable; the absolute numbers are kept for
context only. Raw results go to ``bench/out/results*.json``; the full run's plots go to
``bench/report/`` (committed with the report), the quick run's to ``bench/out/quick/``.

Needs the local stack (``make stack-up``) and, for the PostgreSQL baseline, Debian's
``postgresql`` package; a missing baseline is reported as "not run", never faked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
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
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import baselines, machine, micro, profile
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
from bench.loadgen import LoadGenerator, LoadResult, LoadSpec, TopicReader, end_offsets
from bench.tablefill import changelog_size, fill_changelog
from pipeline.topics import changelog_topic
from schemas.codec import AvroCodec


@dataclass
class Sizes:
    repeats: int = 3
    flash_attempts: int = 6000
    flash_units: int = 1500
    many_skus: int = 1000
    pass_messages: int = 50000
    p6_seconds: float = 30.0
    p6_skus: int = 2000
    p6_calibration: int = 4000
    rss_points: list[int] = field(default_factory=lambda: [100_000, 300_000])
    warm_restarts: int = 2
    idle_seconds: float = 5.0  # window for the idle-CPU figure
    profile_seconds: float = 15.0
    levers: list[str] = field(
        default_factory=lambda: [
            "split",
            "relay_out",
            "sink_off",
            "uvloop",
            "linger_10ms",
            "threaded_producer",
        ]
    )
    lever_pairs: int = 2
    mix_attempts: int = 3000


FULL = Sizes()
QUICK = Sizes(
    repeats=1,
    flash_attempts=800,
    flash_units=200,
    many_skus=100,
    pass_messages=5000,
    p6_seconds=5.0,
    p6_skus=100,
    p6_calibration=400,
    rss_points=[5_000, 10_000],
    warm_restarts=1,
    idle_seconds=2.0,
    profile_seconds=4.0,
    levers=["split"],
    lever_pairs=1,
    mix_attempts=300,
)

LEVER_ENV = {
    # the sinks leave the worker process (they also run alone: python -m pipeline.sinks)
    "sink_off": {"INVENTORY_SINK_ENABLED": "0"},
    # Faust sends table (changelog) writes from a producer in its own thread and loop
    "threaded_producer": {"PRODUCER_THREADED": "true"},
    # Faust reads PRODUCER_LINGER (seconds) from the environment over the app's 1 ms
    "linger_10ms": {"PRODUCER_LINGER": "0.01"},
    # the expiry sweeper scans every stored reservation each interval
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
# The topology the headline pipeline figures use (the tuning outcome): a worker that
# only decides, the relay and the sinks each in their own process. "One process" runs
# (the default deployment, everything inside the worker) are measured beside it.
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
    processes) in a fresh namespace; summary dict."""
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

        def after_restock(skus: list[str], units: int) -> None:
            wait(skus, units)
            cpu0.update({name: cpu_seconds(pid) for name, pid in procs.items()})
            if profile_to is not None and worker.proc is not None:
                spy.append(profile.record(worker.proc.pid, profile_to, profile_seconds))

        result = gen.run(spec, wait_restocked=after_restock)
        out = result.summary()
        # CPU per decision of each pipeline process: far less sensitive than rates to
        # other processes on a shared machine (it is what a decision costs, not how long
        # it waited for a core)
        decided = max(1, out["decisions"])
        out["cpu_ms_per_decision"] = {
            name: (cpu_seconds(pid) - cpu0.get(name, 0.0)) * 1000 / decided
            for name, pid in procs.items()
        }
        out["rss_mb"] = rss_mb(worker.proc.pid)[0]
        out["table_oversold"] = _table_oversold(worker, result)
        out["latencies_ms"] = result.latencies_ms(result.reserve_ids)
        out["timeline"] = _timeline(result)
        for p in spy:
            if p is not None:
                with contextlib.suppress(Exception):
                    p.wait(profile_seconds + 30)
        worker.stop()
        out["producer_buffer_full_warnings"] = log_count(worker, "producer buffer full")
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
    """Repeats of: PostgreSQL, Redis, pipeline hot flash, single-SKU, many-SKU, passthroughs."""
    reps: list[dict[str, Any]] = []
    m, n = sizes.flash_attempts, sizes.flash_units
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
            lambda: baselines.redis_flash(base.redis_url, n, m * 10, pipeline_depth=100).summary(),
            log=log,
        )
        flash = LoadSpec(mode="flash", attempts=m, units=n, producers=4)
        single = LoadSpec(mode="flash", attempts=m, units=m * 2, producers=4)
        log(f"repeat {r + 1}: pipeline flash sale (hot SKU, {m} reserves for {n} units)")
        rep["pipeline_flash"] = pipeline_run("flash", flash, **tuned())
        log(f"repeat {r + 1}: the same flash sale, everything in one worker process")
        rep["pipeline_flash_1proc"] = pipeline_run("flash-1proc", flash)
        log(f"repeat {r + 1}: pipeline single SKU, every reserve granted")
        rep["pipeline_single"] = pipeline_run("single", single, **tuned())
        log(f"repeat {r + 1}: the same single-SKU load, everything in one worker process")
        rep["pipeline_single_1proc"] = pipeline_run("single-1proc", single)
        log(f"repeat {r + 1}: pipeline {sizes.many_skus} SKUs (Zipf 1.1), every reserve granted")
        rep["pipeline_many"] = pipeline_run(
            "many",
            LoadSpec(mode="steady", attempts=m, units=m * 2, skus=sizes.many_skus, producers=4),
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


def _tp(rep: dict[str, Any], key: str) -> float:
    return float(rep.get(key, {}).get("throughput_per_s", float("nan")))


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


def wait_quiet(procs: list[Any], timeout: float = 60.0) -> None:
    """Until the relay and both sinks report no lag on any of ``procs``' /metrics (or
    ``timeout``): the worker and the standalone relay and sinks processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            lag = sum(
                _metric_sum(p, "inventory_relay_lag_records")
                + _metric_sum(p, "inventory_sink_lag_records")
                for p in procs
            )
            if lag == 0:
                return
        time.sleep(0.5)


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


# ---------------------------------------------------------------- P5 + memory


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def _line_time(line: str) -> datetime | None:
    """The timestamp of a worker log line: JSON (``"ts"``) or Faust's ``[date time,ms]``."""
    if line.startswith("{"):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            ts = json.loads(line)["ts"]
            return datetime.fromisoformat(ts.replace("Z", "+00:00")).replace(tzinfo=None)
        return None
    m = _STAMP.match(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f") if m else None


def restore_seconds(log_path: Path) -> float:
    """Seconds from Faust's "Restoring state" to "Done reading" in the last start's log."""
    text = log_path.read_text(errors="replace").rsplit("===== start #", 1)[-1]
    begin = end = None
    for line in text.splitlines():
        if "Restoring state from changelog topics" in line and begin is None:
            begin = _line_time(line)
        elif "Done reading from changelog topics" in line:
            end = _line_time(line)
    if begin is None or end is None:
        return float("nan")
    return (end - begin).total_seconds()


async def _bare_read(bootstrap: str, topic: str, partitions: int) -> tuple[int, float]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        end = await c.end_offsets(tps)
        done = {tp: False for tp in tps}
        n = 0
        t0 = time.perf_counter()
        while not all(done.values()):
            batches = await c.getmany(timeout_ms=500, max_records=10000)
            for tp, recs in batches.items():
                n += len(recs)
                if recs and recs[-1].offset + 1 >= end[tp]:
                    done[tp] = True
            for tp in tps:
                if not done[tp] and await c.position(tp) >= end[tp]:
                    done[tp] = True
        return n, time.perf_counter() - t0
    finally:
        await c.stop()


def bare_changelog_read(cfg: Any) -> tuple[int, float]:
    """(records, seconds) for a bare aiokafka consumer reading the whole changelog."""
    return asyncio.run(_bare_read(cfg.kafka_bootstrap, changelog_topic(cfg), cfg.partitions))


def memory_and_restore(sizes: Sizes, profile_to: Path | None) -> dict[str, Any]:
    """Table of N SKUs: cold restore, RSS, idle CPU, warm restart, bare changelog read."""
    ns = BenchNamespace.fresh("mem", sink=False)
    cfg = ns.settings
    worker = ns.worker()
    points: list[dict[str, Any]] = []
    warm: list[dict[str, Any]] = []
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
        c0 = _cpu_seconds(pid)
        time.sleep(sizes.idle_seconds)
        return rss, hwm, (_cpu_seconds(pid) - c0) / sizes.idle_seconds

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
            records = changelog_size(cfg)
            shutil.rmtree(worker.data_dir, ignore_errors=True)
            log(f"memory: cold start restoring {records:,} changelog records")
            cold = time_to_healthy(worker, timeout=1800)
            restore = restore_seconds(worker.log_path)
            rss, hwm, idle_cpu = settle("cold")
            last = "FILL" + str(n - 1).zfill(12)
            status, body = worker.get_json(f"/stock/{last}")
            if profile_to is not None and n == sizes.rss_points[-1] and worker.proc is not None:
                spy = profile.record(worker.proc.pid, profile_to, 5)
                if spy is not None:
                    spy.wait(60)
            worker.stop()
            log(f"memory: warm restart with {n:,} SKUs")
            warm_s = time_to_healthy(worker, timeout=1800)
            warm_rss, _, warm_cpu = settle("warm")
            worker.stop()
            bare_n, bare_s = bare_changelog_read(cfg)
            points.append(
                {
                    "skus": n,
                    "changelog_records": records,
                    "cold_start_s": cold,
                    "restore_s": restore,
                    "restore_per_s": records / restore if restore == restore else float("nan"),
                    "bare_read_records": bare_n,
                    "bare_read_s": bare_s,
                    "bare_per_s": bare_n / bare_s if bare_s > 0 else float("nan"),
                    "rss_mb": rss,
                    "hwm_mb": hwm,
                    "idle_cpu_cores": idle_cpu,
                    "warm_start_s": warm_s,
                    "warm_rss_mb": warm_rss,
                    "warm_idle_cpu_cores": warm_cpu,
                    "index_rebuild_cold_s": rebuild_s.get("cold"),
                    "index_rebuild_warm_s": rebuild_s.get("warm"),
                    "last_sku_found": status == 200 and body.get("on_hand") == 100,
                }
            )
            log(f"memory: {points[-1]}")
        for i in range(sizes.warm_restarts - 1):
            log(f"memory: extra warm restart {i + 1} with {filled:,} SKUs")
            t = time_to_healthy(worker, timeout=1800)
            rss, _, _ = settle("extra")
            warm.append({"warm_start_s": t, "rss_mb": rss})
            worker.stop()
    finally:
        worker.kill()
        ns.cleanup()
    return {"points": points, "warm": warm}


# ---------------------------------------------------------------- main


PARTS = ("throughput", "latency", "memory", "profile", "levers", "mix", "micro")


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
        "memory",
        lambda: undisturbed(
            "memory", lambda: memory_and_restore(sizes, prof_dir / "idle-profile.txt"), log=log
        ),
    )

    def prof() -> dict[str, Any]:
        out = prof_dir / "hot-profile.txt"
        m = sizes.flash_attempts
        res = pipeline_run(
            "profile",
            LoadSpec(mode="flash", attempts=m, units=m * 2, producers=4),
            profile_to=out,
            profile_seconds=sizes.profile_seconds,
            **tuned(),
        )
        res.pop("latencies_ms", None)
        return {"run": res, "raw": str(out)}

    step("profile", prof)

    def levers() -> dict[str, Any]:
        m = max(200, sizes.flash_attempts // 3)
        spec = LoadSpec(mode="flash", attempts=m, units=m * 2, producers=4)
        out = {}
        for name in sizes.levers:
            pairs = []
            for i in range(sizes.lever_pairs):
                log(f"lever {name} ({i + 1}/{sizes.lever_pairs}): {LEVER_ENV[name]}")
                base = pipeline_run("lever-base", spec)
                res = pipeline_run(
                    f"lever-{name}",
                    spec,
                    env=LEVER_ENV[name],
                    sidecars=LEVER_SIDECARS.get(name, ()),
                )
                pairs.append(
                    {
                        "base_per_s": base["throughput_per_s"],
                        "lever_per_s": res["throughput_per_s"],
                        "ratio": ratio(res["throughput_per_s"], base["throughput_per_s"]),
                        "base_cpu_ms": base["cpu_ms_per_decision"],
                        "lever_cpu_ms": res["cpu_ms_per_decision"],
                        "base_buffer_full": base["producer_buffer_full_warnings"],
                        "lever_buffer_full": res["producer_buffer_full_warnings"],
                    }
                )
            out[name] = {
                "env": LEVER_ENV[name],
                "sidecars": list(LEVER_SIDECARS.get(name, ())),
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
    p.add_argument("--quick", action="store_true", help="tiny sizes, < 3 min")
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
    if args.only:
        skip |= set(PARTS) - {s for s in args.only.split(",") if s}
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
