"""Report: CPU per decision, the engine table, P1 and the load generator."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.common import median, spread  # noqa: E402
from bench.report_base import (
    GOALS,
    LOADGEN_HEADROOM,
    PROCESS_LABEL,
    PROCESSES,
    WriterBase,
    _get,
    _not_run,
    _tp,
    fmt,
    verdict,
)


class CpuSection(WriterBase):
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
