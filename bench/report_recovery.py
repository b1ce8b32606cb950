"""Report: recovery after a kill and memory."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from bench.report_base import GOALS, WriterBase, _get, _not_run, fmt, isnan, verdict


class RecoverySection(WriterBase):
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
            "`pipeline.domain.core.decide` and `tables.stock.StoredStock`); the relay's group is set "
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
