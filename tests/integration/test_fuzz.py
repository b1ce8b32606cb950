"""Fuzz: thousands of malformed and oversized records on every input topic, interleaved
with valid commands (issue 14, its Tests section).

The bad records are of many kinds: random bytes with and without a framing magic,
empty values, valid records cut short or with bytes after them, unknown schema
fingerprints, Confluent frames without a registry, commands on the wrong topic, keys
that are not the record's SKU, SKUs too long or with control bytes, quantities zero,
negative or too large, free text past its bound and values near the broker's limit.
Afterwards the worker is alive, every bad record has exactly one dead letter (matched by
its source topic, partition and offset), and every valid command was applied.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from harness import Namespace, Worker, read_topic, wait_stock
from pipeline.kafka.partitioning import partition_for
from pipeline.produce import CommandProducer, fill_defaults
from schemas.codec import AvroCodec

pytestmark = pytest.mark.integration

SKUS = [f"FUZZ-{i}" for i in range(12)]
BAD = 2000
ROUNDS = 10  # each SKU gets one valid restock of 1 unit per round


def _encode(codec: AvroCodec, name: str, fields: dict[str, Any]) -> bytes:
    return codec.encode(name, fill_defaults(fields))


def _bad_record(
    rng: random.Random, codec: AvroCodec, topics: dict[str, str]
) -> tuple[str, bytes, bytes]:
    """(topic, key, value) of one record the ledger must dead-letter."""
    sku = rng.choice(SKUS)
    key = sku.encode()
    kind = rng.randrange(14)
    topic = rng.choice(list(topics.values()))
    good = _encode(codec, "RestockReceived", {"sku": sku, "qty": 1})
    if kind == 0:  # garbage
        return topic, key, rng.randbytes(rng.randrange(1, 3000))
    if kind == 1:  # garbage behind the single-object magic
        return topic, key, b"\xc3\x01" + rng.randbytes(rng.randrange(0, 300))
    if kind == 2:
        return topic, key, b""
    if kind == 3:  # cut short
        return topics["restocks"], key, good[: rng.randrange(2, len(good) - 1)]
    if kind == 4:  # bytes after the record
        return topics["restocks"], key, good + rng.randbytes(rng.randrange(1, 50))
    if kind == 5:  # a fingerprint no schema has
        return topic, key, b"\xc3\x01" + rng.randbytes(8) + good[10:]
    if kind == 6:  # a Confluent frame, and no registry
        return topic, key, b"\x00" + rng.randbytes(4) + good[10:]
    if kind == 7:  # a restock on the orders topic
        return topics["orders"], key, good
    if kind == 8:  # key is not the record's SKU
        other = SKUS[(SKUS.index(sku) + 1) % len(SKUS)]
        return topics["restocks"], key, _encode(codec, "RestockReceived", {"sku": other, "qty": 1})
    if kind == 9:  # a SKU too long for the ledger (its key is that SKU)
        long_sku = "L" * rng.randrange(65, 5000)
        value = _encode(codec, "RestockReceived", {"sku": long_sku, "qty": 1})
        return topics["restocks"], long_sku.encode(), value
    if kind == 10:  # zero, negative or too large quantities
        qty = rng.choice([0, -1, -(2**31), 2**31 - 1])
        return topics["restocks"], key, _encode(codec, "RestockReceived", {"sku": sku, "qty": qty})
    if kind == 11:  # free text past its bound
        fields = {
            "sku": sku,
            "order_id": "o-long",
            "qty": 1,
            "channel": "c" * rng.randrange(65, 20_000),
        }
        return topics["orders"], key, _encode(codec, "ReserveStock", fields)
    if kind == 12:  # control bytes in the SKU
        bad_sku = sku + "\x00\x01"
        value = _encode(codec, "RestockReceived", {"sku": bad_sku, "qty": 1})
        return topics["restocks"], bad_sku.encode(), value
    # a large value (up to 600 kB) behind a valid magic
    return topic, key, b"\xc3\x01" + rng.randbytes(rng.randrange(100_000, 600_000))


def test_fuzzed_input_is_dead_lettered_once_and_valid_commands_are_applied(kafka):
    ns = Namespace.fresh("fuzz")
    s = ns.settings
    topics = {"orders": s.orders_topic, "restocks": s.restocks_topic, "returns": s.returns_topic}
    codec = AvroCodec()
    rng = random.Random(20261202)
    worker = Worker(ns).start()
    sent_bad: list[tuple[str, int, bytes]] = []  # (topic, partition, key) per bad record
    try:
        with CommandProducer(s) as producer:
            per_round = BAD // ROUNDS
            for _ in range(ROUNDS):
                for sku in SKUS:
                    producer.send("RestockReceived", {"sku": sku, "qty": 1})
                for _ in range(per_round):
                    topic, key, value = _bad_record(rng, codec, topics)
                    part = partition_for(key, ns.partitions)
                    producer.send_raw(topic, key, value, part)
                    sent_bad.append((topic, part, key))
                producer.flush(60)
        for sku in SKUS:
            wait_stock(worker, sku, on_hand=ROUNDS, timeout=120)

        dead = read_topic(
            s, s.dead_letters_topic, until=lambda rs: len(rs) >= BAD, idle=3.0, timeout=180
        )
        where = Counter(
            (d.value["source_topic"], d.value["source_partition"], d.value["source_offset"])
            for d in dead
        )
        assert len(dead) == BAD, Counter(d.value["reason"] for d in dead)
        assert max(where.values()) == 1  # each bad record once
        assert Counter((t, p) for t, p, _ in sent_bad) == Counter((t, p) for t, p, _ in where)
        reasons = Counter(d.value["reason"] for d in dead)
        assert len(reasons) >= 8, reasons  # many kinds, each with its own reason
        assert worker.proc is not None and worker.proc.poll() is None  # still running
        for sku in SKUS:  # nothing more was applied meanwhile
            status, body = worker.get_json(f"/stock/{sku}")
            assert status == 200 and body["on_hand"] == ROUNDS, body
    finally:
        worker.stop()


SAGA_BAD = 300
SAGA_ORDERS = 20


def _bad_checkout(rng: random.Random, codec: AvroCodec, sku: str) -> tuple[bytes, bytes]:
    """(key, value) of one checkouts record the saga must dead-letter."""
    order_id = f"bad-{rng.randrange(10**9)}"
    key = order_id.encode()
    good = _encode(codec, "PlaceOrder", {"order_id": order_id, "lines": [{"sku": sku, "qty": 1}]})
    kind = rng.randrange(8)
    if kind == 0:
        return key, rng.randbytes(rng.randrange(1, 3000))
    if kind == 1:
        return key, good[: rng.randrange(2, len(good) - 1)]
    if kind == 2:
        return key, b"\xc3\x01" + rng.randbytes(8) + good[10:]
    if kind == 3:  # a stock command on the checkouts topic
        return key, _encode(codec, "RestockReceived", {"sku": sku, "qty": 1})
    if kind == 4:  # key is not the order id
        return b"other-" + key, good
    if kind == 5:  # one line too many (decoded, then too_many_lines)
        lines = [{"sku": f"{sku}-{i}", "qty": 1} for i in range(101)]
        return key, _encode(codec, "PlaceOrder", {"order_id": order_id, "lines": lines})
    if kind == 6:  # tens of thousands of lines: refused before its lines are decoded
        lines = [{"sku": "S", "qty": 1}] * rng.randrange(20_000, 60_000)
        return key, _encode(codec, "PlaceOrder", {"order_id": order_id, "lines": lines})
    return key, b""


def test_fuzzed_checkouts_and_ledger_answers_are_dead_lettered_once(kafka):
    """The saga's two inputs: the public checkouts topic and the ledger's answers."""
    ns = Namespace.fresh("fuzzsaga")
    s = ns.settings
    codec = AvroCodec()
    rng = random.Random(20261203)
    sku = "FUZZ-SAGA"
    worker = Worker(ns).start()
    sent_bad: list[tuple[str, int]] = []
    try:
        with CommandProducer(s) as producer:
            producer.send("RestockReceived", {"sku": sku, "qty": 1000})
            for i in range(SAGA_ORDERS):
                producer.send(
                    "PlaceOrder",
                    {"order_id": f"good-{i}", "lines": [{"sku": sku, "qty": 1}], "ttl_ms": 600_000},
                )
                for _ in range(SAGA_BAD // SAGA_ORDERS):
                    key, value = _bad_checkout(rng, codec, sku)
                    part = partition_for(key, ns.partitions)
                    producer.send_raw(s.checkouts_topic, key, value, part)
                    sent_bad.append((s.checkouts_topic, part))
            producer.flush(60)
        results = read_topic(
            s,
            s.order_results_topic,
            until=lambda rs: {r.key for r in rs} >= {f"good-{i}".encode() for i in range(20)},
            timeout=120,
        )
        assert {r.value["outcome"] for r in results} == {"ORDER_RESERVED"}
        with CommandProducer(s) as producer:
            # garbage where the ledger's answers to the sagas go, keyed by open sagas
            for i in range(SAGA_ORDERS):
                key = f"good-{i}".encode()
                part = partition_for(key, ns.partitions)
                producer.send_raw(s.line_results_topic, key, rng.randbytes(40), part)
                sent_bad.append((s.line_results_topic, part))
            producer.flush(30)
        dead = read_topic(
            s,
            s.dead_letters_topic,
            until=lambda rs: len(rs) >= len(sent_bad),
            idle=3.0,
            timeout=120,
        )
        where = Counter(
            (d.value["source_topic"], d.value["source_partition"], d.value["source_offset"])
            for d in dead
        )
        assert len(dead) == len(sent_bad), Counter(d.value["reason"] for d in dead)
        assert max(where.values()) == 1
        assert Counter(sent_bad) == Counter((t, p) for t, p, _ in where)
        reasons = Counter(d.value["reason"] for d in dead)
        assert reasons["record_too_large"] > 0, reasons
        assert worker.proc is not None and worker.proc.poll() is None
        status, body = worker.get_json(f"/stock/{sku}")
        assert status == 200 and body["reserved"] == SAGA_ORDERS, body
    finally:
        worker.stop()
