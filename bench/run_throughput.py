"""P1-P3: interleaved throughput repeats of the pipeline and its baselines."""

from __future__ import annotations

import json
from typing import Any

from bench import baselines
from bench.common import (
    BenchNamespace,
    ratio,
    undisturbed,
)
from bench.loadgen import (
    LoadSpec,
    measure_alone,
)
from bench.run_pipeline import pipeline_run
from bench.run_sizes import Sizes, log, tuned

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
