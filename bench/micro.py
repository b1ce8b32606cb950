"""Per-event costs of the worker's own code, measured in-process without Kafka.

Each item times one step the agent (or the relay, or the expiry sweeper) performs per
event, on realistic values, with :func:`time.perf_counter` over many iterations. These
are CPU costs on this machine; they tell how much of the per-event wall time measured
end to end the project's own code accounts for, and which step is worth changing.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from config.settings import Settings
from pipeline import core
from pipeline.validation import to_command
from schemas.codec import AvroCodec
from tables.stock import StoredReservation, StoredStock, effects_of


def _time(fn: Callable[[], Any], min_seconds: float = 0.2) -> float:
    """Microseconds per call (best of 3 runs of at least ``min_seconds``)."""
    best = float("inf")
    for _ in range(3):
        n = 0
        t0 = time.perf_counter()
        while True:
            for _ in range(100):
                fn()
            n += 100
            el = time.perf_counter() - t0
            if el >= min_seconds:
                break
        best = min(best, el / n * 1e6)
    return best


def measure(cfg: Settings, quick: bool = False) -> dict[str, float]:
    """Microseconds per call of each per-event step (see the module docstring)."""
    secs = 0.05 if quick else 0.2
    codec = AvroCodec()
    now = int(time.time() * 1000)
    sku = "SKU-HOT-000001"
    reserve = {
        "event_id": str(uuid.uuid4()),
        "order_id": "o-" + uuid.uuid4().hex,
        "sku": sku,
        "qty": 1,
        "channel": "web",
        "ttl_ms": 0,
        "occurred_at": now,
    }
    raw = codec.encode("ReserveStock", reserve)
    name, rec = codec.decode(raw)
    topic = cfg.orders_topic
    cmd = to_command(topic, sku.encode(), name, rec, cfg)
    record = core.StockRecord(sku=sku, on_hand=100000, reserved=500, version=501)
    decision = core.decide(record, cmd, now, None, dedupe_window=cfg.dedupe_window)
    stored_after = StoredStock(
        decision.record, {topic: 123457, cfg.restocks_topic: 3}, effects_of(decision.events), now
    )
    value = stored_after.to_bytes()
    assert decision.reservation is not None
    res = StoredReservation.new(decision.reservation, topic, 123457)
    res_value = res.to_bytes()
    change = decision.events[0].__dict__.copy()

    out = {
        "avro decode (ReserveStock)": _time(lambda: codec.decode(raw), secs),
        "validate -> command": _time(lambda: to_command(topic, sku.encode(), name, rec, cfg), secs),
        "StoredStock.from_bytes": _time(lambda: StoredStock.from_bytes(value), secs),
        "core.decide": _time(
            lambda: core.decide(record, cmd, now, None, dedupe_window=cfg.dedupe_window), secs
        ),
        "effects_of": _time(lambda: effects_of(decision.events), secs),
        "StoredStock.to_bytes (orjson)": _time(lambda: stored_after.to_bytes(), secs),
        "StoredReservation.new + to_bytes": _time(
            lambda: StoredReservation.new(decision.reservation, topic, 1).to_bytes(), secs
        ),
        "relay: StoredStock.from_bytes + avro encode": _time(
            lambda: (StoredStock.from_bytes(value), codec.encode("StockChanged", change)), secs
        ),
        "expiry sweep: orjson.loads per stored reservation": _time(
            lambda: orjson.loads(res_value), secs
        ),
    }
    out.update(_rocksdb(secs, value))
    out["_value_bytes"] = float(len(value))
    out["_reservation_bytes"] = float(len(res_value))
    return out


def _rocksdb(secs: float, value: bytes) -> dict[str, float]:
    try:
        from rocksdict import Options, Rdict
    except ImportError:
        return {}
    with tempfile.TemporaryDirectory() as d:
        db = Rdict(d + "/db", Options())
        key = b"SKU-HOT-000001"
        db[key] = value
        res = {
            "rocksdict put": _time(lambda: db.__setitem__(key, value), secs),
            "rocksdict get": _time(lambda: db[key], secs),
        }
        db.close()
    return res
