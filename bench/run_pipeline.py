"""One pipeline run under load (worker, relay, sinks) and what is read from it:
/metrics histograms, engine stats, oversold check, send timeline."""

from __future__ import annotations

import contextlib
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import profile
from bench.common import (
    BenchNamespace,
    StackRestarted,
    cpu_seconds,
    rss_mb,
    stack_pids,
    wait_decided,
    wait_stock,
)
from bench.loadgen import (
    LoadGenerator,
    LoadResult,
    LoadSpec,
)
from bench.run_sizes import log

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
