"""Recovery and memory: restart times, changelog restore vs a bare read, RSS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import profile
from bench.common import (
    BenchNamespace,
    cpu_seconds,
    log_count,
    rss_mb,
    time_to_healthy,
)
from bench.run_sizes import Sizes, log
from bench.tablefill import fill_changelog
from pipeline.kafka.topics import ledger_changelogs

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
