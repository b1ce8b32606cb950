"""Report: the profile, the levers, correctness and the method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench import profile as prof  # noqa: E402
from bench.common import median  # noqa: E402
from bench.report_base import PROCESSES, SUBSYSTEMS, WriterBase, _get, _not_run, fmt


class ProfileSection(WriterBase):
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
