"""Per-command costs of each stage of the batch path, measured in-process without Kafka.

Each item times one step the worker (or the relay, the sinks, the load generator)
performs, on realistic values, with :func:`time.perf_counter` over many iterations
(best of 3). Steps done once per batch are timed on a full batch
(``INVENTORY_LEDGER_BATCH_MAX`` commands of one hot SKU) and divided by the commands in
it: that is what they cost per command when a hot partition is busy. These are CPU
costs on this machine, not waits; they say which stage is worth changing, and they are
compared in the report with the figures of the previous (per-record Faust) design from
``../shared/PERF-NOTES.md``.

Keys are stable (the report maps them to the "before" figures); values are
microseconds, keys starting with ``_`` are context (sizes, counts).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson

from config.settings import Settings
from pipeline import batch
from pipeline.domain import core
from schemas.codec import AvroCodec
from schemas.validation import to_command
from tables.stock import StoredReservation, StoredStock, effect_of, stock_key

SKU = "SKU-HOT-000001"


def _time(fn: Callable[[], Any], min_seconds: float = 0.2) -> float:
    """Microseconds per call (best of 3 runs of at least ``min_seconds``)."""
    best = float("inf")
    for _ in range(3):
        n = 0
        t0 = time.perf_counter()
        while True:
            for _ in range(10):
                fn()
            n += 10
            el = time.perf_counter() - t0
            if el >= min_seconds:
                break
        best = min(best, el / n * 1e6)
    return best


def _reserve_fields(i: int, now: int, run: str) -> dict[str, Any]:
    return {
        "event_id": f"r-{run}-{i}",
        "order_id": f"o-{run}-{i}",
        "sku": SKU,
        "qty": 1,
        "channel": "web",
        "ttl_ms": 0,
        "occurred_at": now,
    }


def measure(cfg: Settings, quick: bool = False) -> dict[str, float]:
    """Microseconds per command of each stage (see the module docstring)."""
    secs = 0.05 if quick else 0.25
    codec = AvroCodec()
    now = int(time.time() * 1000)
    run = uuid.uuid4().hex[:8]
    topic = cfg.orders_topic
    n = max(1, cfg.ledger_batch_max)
    out: dict[str, float] = {"_batch_commands": float(n)}

    # -- ingestion side: one input record to a command
    fields = _reserve_fields(0, now, run)
    raw = codec.encode("ReserveStock", fields)
    name, rec = codec.decode(raw)
    key = SKU.encode()
    out["avro decode (ReserveStock)"] = _time(lambda: codec.decode(raw), secs)
    out["validation -> command"] = _time(lambda: to_command(topic, key, name, rec, cfg), secs)
    out["decode + validation -> command"] = _time(
        lambda: to_command(topic, key, *codec.decode(raw), cfg), secs
    )

    # -- the fold: a full batch of reserves on one hot SKU, RESERVED and REJECTED
    commands = [
        to_command(topic, key, "ReserveStock", _reserve_fields(i, now, run), cfg) for i in range(n)
    ]
    inputs = [batch.Input(topic, 1_000_000 + i, c) for i, c in enumerate(commands)]
    plenty = StoredStock(
        core.StockRecord(sku=SKU, on_hand=10_000_000, reserved=5_000, version=5_001),
        {topic: 999_999, cfg.restocks_topic: 3},
        {},
        now,
    )
    sold_out = StoredStock(
        core.StockRecord(sku=SKU, on_hand=25_000, reserved=25_000, version=25_001),
        {topic: 999_999, cfg.restocks_topic: 3},
        {},
        now,
    )
    positions = {t: 1_000_000 + n for t in cfg.input_topics}
    with tempfile.TemporaryDirectory() as tmp:
        from pipeline.store import PartitionStore

        store = PartitionStore(Path(tmp) / "stock-0.db")

        def load_reservation(k: bytes) -> StoredReservation | None:
            # the engine: pending (a dict) first, then RocksDB (a miss for a new order)
            got = store.get(k)
            return StoredReservation.from_bytes(got) if got is not None else None

        results = {}
        for label, start in (("RESERVED", plenty), ("REJECTED", sold_out)):
            cache = {SKU: start}

            def fold(cache: dict[str, StoredStock] = cache) -> batch.BatchResult:
                return batch.fold(
                    inputs,
                    cache.get,
                    load_reservation,
                    now,
                    dedupe_window=cfg.dedupe_window,
                    low_stock_threshold=cfg.low_stock_threshold,
                    max_commands_per_sku=n,
                )

            result = fold()
            assert all(d is not None and d.outcome.value == label for d in result.decisions), label
            results[label] = result
            out[f"fold per command ({label})"] = _time(fold, secs) / n
            out[f"core.decide alone ({label})"] = _time(
                lambda r=start.record: core.decide(
                    r, commands[0], now, None, dedupe_window=cfg.dedupe_window
                ),
                secs,
            )
            stored = result.stocks[SKU]
            out[f"SKU record encode per batch, per command ({label})"] = (
                _time(stored.to_bytes, secs) / n
            )
            reservations = list(result.reservations.values())
            out[f"reservation record encode ({label})"] = _time(
                lambda r=reservations: r[0].to_bytes(), secs
            )
            held = [r.to_bytes() for r in reservations]

            def store_batch(result: batch.BatchResult = result, held: list[bytes] = held) -> None:
                # agents.ledger PartitionLedger._store: the reservations, the input
                # positions and slim SKU records in one WriteBatch with the offsets
                puts = list(zip(result.reservations, held, strict=True))
                puts.append((b"\x00positions", orjson.dumps(positions)))
                for k, s in batch.stock_writes(result):
                    slim = StoredStock(s.record, s.watermarks, {}, s.version_at)
                    puts.append((k, slim.to_bytes()))
                store.write(puts, {"stock": 1, "reservations": 1})

            out[f"local RocksDB write per batch, per command ({label})"] = (
                _time(store_batch, secs) / n
            )
            out[f"_sku_record_bytes ({label})"] = float(len(stored.to_bytes()))
            out[f"_reservation_bytes ({label})"] = float(len(held[0]))
        # -- the event-id store (issue 14 item 3): a batch of restocks with and without
        # looking each id up (RocksDB misses, as for new ids) and storing it
        restocks = [
            batch.Input(
                cfg.restocks_topic,
                i,
                core.RestockReceived(f"restock-{run}-{i:08d}", SKU, 1, now, "warehouse"),
            )
            for i in range(n)
        ]
        for label, use_ids in (("without ids", False), ("with ids", True)):
            cache = {SKU: plenty}

            def fold_restocks(c: dict[str, StoredStock] = cache, ids: bool = use_ids) -> Any:
                return batch.fold(
                    restocks,
                    c.get,
                    load_reservation,
                    now,
                    dedupe_window=cfg.dedupe_window,
                    max_commands_per_sku=n,
                    load_event=(lambda k: None if store.get(k) is None else 0) if ids else None,
                    event_retention_ms=cfg.event_id_retention_ms,
                )

            out[f"restock fold per command ({label})"] = _time(fold_restocks, secs) / n
        id_result = fold_restocks()
        id_puts = [(k, orjson.dumps({"at": at})) for k, at in id_result.events.items()]
        out["event ids: RocksDB write per batch, per command"] = (
            _time(lambda: store.write(id_puts, {}), secs) / n
        )
        out["_event_id_bytes"] = float(sum(len(k) + len(v) for k, v in id_puts) / len(id_puts))
        slim = StoredStock(plenty.record, plenty.watermarks, {}, now).to_bytes()
        store.write([(stock_key(SKU), slim)], {})
        out["cold SKU: RocksDB get + StoredStock.from_bytes"] = _time(
            lambda: StoredStock.from_bytes(store.get(key) or b""), secs
        )
        store.close()

    # -- metrics per decided command (cached Prometheus children)
    from agents.ledger import Counters
    from pipeline import metrics

    counters = Counters()
    decision = results["RESERVED"].decisions[0]
    assert decision is not None
    out["metrics per command (Counters.decided)"] = _time(
        lambda: counters.decided(decision, commands[0], now), secs
    )
    out["prometheus labels(...).inc()"] = _time(
        lambda: metrics.COMMANDS.labels("ReserveStock", "RESERVED", "web").inc(), secs
    )
    child = metrics.COMMANDS.labels("ReserveStock", "RESERVED", "web")
    out["prometheus cached child .inc()"] = _time(child.inc, secs)

    # -- the transaction's produce() calls, per command (a SKU record, the positions
    # record and n reservations per batch)
    produce = _produce_cost(quick)
    if produce == produce:
        per_batch_records = 2 + len(results["RESERVED"].reservations)
        out["transaction produce() per record"] = produce
        out["transaction produce() per batch, per command"] = produce * per_batch_records / n

    # -- the relay: one SKU record of a full batch -> its outputs
    from pipeline.relay import ChangelogRelay

    relay = ChangelogRelay(cfg, codec)
    for label, result in results.items():
        value = result.stocks[SKU].to_bytes()
        outputs = len(relay.outputs(key, value))
        out[f"_relay_outputs_per_batch ({label})"] = float(outputs)
        out[f"relay: decode + encode_trusted per output ({label})"] = (
            _time(lambda v=value: relay.outputs(key, v), secs) / outputs
        )
    if produce == produce:
        out["relay: produce() per output"] = produce

    # -- codec.encode with and without the validation pass (one StockChanged)
    change_event = next(
        e for e in results["RESERVED"].decisions[0].events if isinstance(e, core.StockChanged)
    )
    named = effect_of(change_event)
    assert named is not None
    change = named[1]
    out["codec.encode (validated) StockChanged"] = _time(
        lambda: codec.encode("StockChanged", change), secs
    )
    out["codec.encode_trusted StockChanged"] = _time(
        lambda: codec.encode_trusted("StockChanged", change), secs
    )

    # -- the sinks: they read the SKU records of the changelog (one per SKU per batch)
    # and take each one's latest change; per command = per record ÷ the batch's commands
    from pipeline.sinks.runner import SinkRunner

    sink = SinkRunner(cfg, SimpleNamespace(name="bench"), codec)  # type: ignore[arg-type]
    for label, result in results.items():
        record = SimpleNamespace(
            key=key, value=result.stocks[SKU].to_bytes(), topic=cfg.orders_topic, offset=1
        )
        assert len(sink.decode([record])[0]) == 1
        out[f"sink: SKU record decode per batch, per command ({label})"] = (
            _time(lambda rec=record: sink.decode([rec]), secs) / n
        )

    # -- the load generator's own work per command and per answer
    result_named = effect_of(
        next(
            e
            for e in results["RESERVED"].decisions[0].events
            if isinstance(e, core.ReservationResult)
        )
    )
    assert result_named is not None
    answer = codec.encode_trusted("ReservationResult", result_named[1])
    out["loadgen: encode ReserveStock (validated)"] = _time(
        lambda: codec.encode("ReserveStock", fields), secs
    )
    out["loadgen: encode_trusted ReserveStock"] = _time(
        lambda: codec.encode_trusted("ReserveStock", fields), secs
    )
    out["loadgen: decode ReservationResult"] = _time(lambda: codec.decode(answer), secs)
    return out


def _produce_cost(quick: bool) -> float:
    """Microseconds per confluent-kafka ``produce()`` call with a delivery callback, into
    the local queue of a producer that has no broker (nothing is ever sent; the queue is
    purged between runs). The delivery report each record gets later is not included."""
    try:
        from confluent_kafka import Producer
    except ImportError:
        return float("nan")
    producer = Producer(
        {
            "bootstrap.servers": "127.0.0.1:9",  # discard port: never a broker
            "queue.buffering.max.messages": 2_000_000,
            "queue.buffering.max.kbytes": 2_000_000,
            "linger.ms": 5_000,
            "message.timeout.ms": 600_000,
            "log_level": 0,
        }
    )
    value = b"v" * 400
    key = SKU.encode()

    def delivered(err: Any, msg: Any) -> None:
        pass

    count = 20_000 if quick else 100_000
    best = float("inf")
    try:
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(count):
                producer.produce("bench-micro", value, key, partition=0, on_delivery=delivered)
            best = min(best, (time.perf_counter() - t0) / count * 1e6)
            producer.purge(in_queue=True, in_flight=True)
            producer.poll(0)
    finally:
        producer.purge()
        producer.flush(0)
    return best
