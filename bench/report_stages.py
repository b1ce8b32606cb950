"""Report: the per-stage table before/after and the ingest table."""

from __future__ import annotations

from typing import Any

from bench.report_base import BEFORE, WriterBase, _not_run, fmt


class StagesSection(WriterBase):
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
