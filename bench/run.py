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
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import baselines, ingest, machine, micro, reserve_http
from bench.common import (
    OUT,
    REPO,
    REPORT_DIR,
    BenchNamespace,
    ratio,
    to_jsonable,
    undisturbed,
)
from bench.loadgen import (
    LoadSpec,
)
from bench.run_latency import latency_run
from bench.run_pipeline import pipeline_run
from bench.run_recovery import memory_and_restore
from bench.run_sizes import FULL, LEVER_ENV, LEVER_SIDECARS, QUICK, TUNED, Sizes, log, tuned
from bench.run_throughput import throughput_repeats

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
