"""The stock ledger on a real broker: one worker, one namespace, a SKU per behaviour."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest
import redis

from harness import (
    Namespace,
    Record,
    Worker,
    read_topic,
    restock_and_wait,
    wait_for,
    wait_stock,
)
from pipeline.clock import now_ms
from pipeline.kafka.partitioning import partition_for
from pipeline.produce import CommandProducer
from schemas.codec import AvroCodec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ns() -> Namespace:
    return Namespace.fresh(
        "ledger", partitions=4, INVENTORY_EXPIRY_SCAN_INTERVAL_S="0.2", INVENTORY_MAX_QTY="1000"
    )


@pytest.fixture(scope="module")
def worker(ns, kafka):
    w = Worker(ns).start()
    yield w
    w.stop()


@pytest.fixture()
def producer(ns):
    with CommandProducer(ns.settings) as p:
        yield p


def results_for(ns, orders: set[str], timeout: float = 60.0) -> list[Record]:
    """Every ReservationResult for ``orders`` once each order has at least one."""

    def have_all(rs: list[Record]) -> bool:
        return orders <= {r.value["order_id"] for r in rs}

    recs = read_topic(
        ns.settings,
        ns.settings.results_topic,
        timeout=timeout,
        until=lambda rs: have_all([r for r in rs if r.value["order_id"] in orders]),
        idle=0.5,
    )
    return [r for r in recs if r.value["order_id"] in orders]


def changes_for(ns, sku: str, min_version: int, timeout: float = 60.0) -> list[Record]:
    def enough(rs: list[Record]) -> bool:
        return any(
            r.value.get("sku") == sku and r.value.get("version", 0) >= min_version
            for r in rs
            if r.name == "StockChanged"
        )

    recs = read_topic(
        ns.settings, ns.settings.stock_changes_topic, timeout=timeout, until=enough, idle=0.5
    )
    return [r for r in recs if r.value.get("sku") == sku]


def stock(worker: Worker, sku: str) -> dict:
    status, body = worker.get_json(f"/stock/{sku}")
    assert status == 200, body
    return body


def assert_gapless(changes: list[Record]) -> None:
    by_version: dict[int, dict] = {}
    for r in changes:
        if r.name != "StockChanged":
            continue
        v = r.value["version"]
        if v in by_version:  # a relay re-send after a crash: must be the same change
            assert by_version[v] == r.value
        by_version[v] = r.value
    assert sorted(by_version) == list(range(1, len(by_version) + 1))


def test_flash_sale_grants_exactly_the_units_on_hand(worker, ns, producer):
    sku = "FLASH-1"
    restock_and_wait(worker, producer, sku, 100)
    orders = [f"flash-{i}" for i in range(2000)]

    def shopper(chunk: list[str]) -> None:
        with CommandProducer(ns.settings) as p:
            for order in chunk:
                p.send("ReserveStock", {"order_id": order, "sku": sku, "qty": 1, "channel": "web"})

    started = time.monotonic()
    threads = [threading.Thread(target=shopper, args=(orders[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = results_for(ns, set(orders), timeout=120)
    elapsed = time.monotonic() - started
    first = {}
    for r in results:
        first.setdefault(r.value["order_id"], r.value)
    outcomes = Counter(v["outcome"] for v in first.values())
    print(
        f"\nflash sale: 2000 reserves decided in {elapsed:.1f}s "
        f"({2000 / elapsed:.0f}/s end to end incl. produce)"
    )
    assert outcomes == {"RESERVED": 100, "REJECTED": 1900}
    assert all(v["available"] == 0 for v in first.values() if v["outcome"] == "REJECTED")
    body = wait_stock(worker, sku, reserved=100)
    assert (body["on_hand"], body["reserved"], body["available"], body["version"]) == (
        100,
        100,
        0,
        101,
    )
    changes = changes_for(ns, sku, 101)
    assert_gapless(changes)
    crossings = {
        (c["direction"], c["available"], c["threshold"], c["version"])
        for c in (r.value for r in changes if r.name == "LowStockCrossed")
    }
    # the restock lifts it above the threshold; the 95th reservation takes it down to 5
    assert crossings == {("up", 100, 5, 1), ("down", 5, 5, 96)}


def test_commit_and_release_move_units_as_designed(worker, ns, producer):
    sku = "CR-1"
    restock_and_wait(worker, producer, sku, 10)
    producer.send("ReserveStock", {"order_id": "cr-a", "sku": sku, "qty": 3})
    producer.send("ReserveStock", {"order_id": "cr-b", "sku": sku, "qty": 2})
    producer.send("CommitReservation", {"order_id": "cr-a", "sku": sku})
    producer.send(
        "ReleaseReservation", {"order_id": "cr-b", "sku": sku, "reason": "payment_failed"}
    )
    producer.flush()
    body = wait_stock(worker, sku, version=5)
    assert (body["on_hand"], body["reserved"], body["available"]) == (7, 0, 7)
    outcomes = sorted(
        (r.value["order_id"], r.value["outcome"]) for r in results_for(ns, {"cr-a", "cr-b"})
    )
    assert outcomes == [
        ("cr-a", "COMMITTED"),
        ("cr-a", "RESERVED"),
        ("cr-b", "RELEASED"),
        ("cr-b", "RESERVED"),
    ]


def test_duplicates_are_answered_once_and_applied_once(worker, ns, producer):
    sku = "DUP-1"
    producer.send("RestockReceived", {"sku": sku, "qty": 5, "event_id": "dup-restock"})
    producer.send("RestockReceived", {"sku": sku, "qty": 5, "event_id": "dup-restock"})
    producer.flush()
    wait_stock(worker, sku, on_hand=5)
    producer.send(
        "ReserveStock", {"order_id": "dup-o", "sku": sku, "qty": 2, "event_id": "dup-res"}
    )
    producer.send(
        "ReserveStock", {"order_id": "dup-o", "sku": sku, "qty": 2, "event_id": "dup-res"}
    )
    # a marker on the same partition after them (another topic would not be ordered)
    producer.send("ReserveStock", {"order_id": "dup-marker", "sku": sku, "qty": 1})
    producer.flush()
    results_for(ns, {"dup-marker"})
    body = wait_stock(worker, sku, reserved=3)
    assert (body["on_hand"], body["version"]) == (5, 3)
    answers = [r.value for r in results_for(ns, {"dup-o"})]
    assert [(a["outcome"], a["duplicate"]) for a in answers] == [
        ("RESERVED", False),
        ("RESERVED", True),
    ]


def test_expired_reservation_returns_its_units(worker, ns, producer):
    sku = "EXP-1"
    restock_and_wait(worker, producer, sku, 4)
    producer.send("ReserveStock", {"order_id": "exp-o", "sku": sku, "qty": 3, "ttl_ms": 1500})
    producer.flush()
    wait_stock(worker, sku, reserved=3)
    body = wait_stock(worker, sku, reserved=0)
    assert body["available"] == 4
    answers = [r.value["outcome"] for r in results_for(ns, {"exp-o"}) if not r.value["duplicate"]]
    assert answers[:2] == ["RESERVED", "EXPIRED"]
    # a commit after expiry finds nothing to commit
    producer.send("CommitReservation", {"order_id": "exp-o", "sku": sku})
    producer.flush()
    wait_for(
        lambda: any(r.value["outcome"] == "INVALID_STATE" for r in results_for(ns, {"exp-o"})),
        30,
        "late commit answer",
    )
    assert stock(worker, sku)["on_hand"] == 4


def test_returns_resellable_go_on_hand_damaged_do_not(worker, ns, producer):
    sku = "RET-1"
    producer.send("RestockReceived", {"sku": sku, "qty": 2})
    producer.send("ReturnReceived", {"order_id": "r-1", "sku": sku, "qty": 3, "resellable": True})
    producer.send("ReturnReceived", {"order_id": "r-2", "sku": sku, "qty": 4, "resellable": False})
    producer.send("SafetyStockSet", {"sku": sku, "qty": 1})
    producer.flush()
    body = wait_stock(worker, sku, version=4)  # a damaged return is a published change too
    assert (body["on_hand"], body["safety_stock"], body["available"]) == (5, 1, 4)
    assert body["damaged"] == 4


def test_count_below_reserved_emits_a_shortfall(worker, ns, producer):
    sku = "SHORT-1"
    restock_and_wait(worker, producer, sku, 10)
    producer.send("ReserveStock", {"order_id": "short-o", "sku": sku, "qty": 6})
    producer.flush()
    wait_stock(worker, sku, reserved=6)
    producer.send("StockCounted", {"sku": sku, "on_hand": 4})
    producer.flush()
    body = wait_stock(worker, sku, version=3)
    assert (body["on_hand"], body["reserved"], body["available"]) == (4, 6, 0)
    shortfalls = [r.value for r in changes_for(ns, sku, 3) if r.name == "StockShortfall"]
    assert [(s["counted"], s["reserved"], s["shortfall"]) for s in shortfalls[:1]] == [(4, 6, 2)]


def test_mispartitioned_record_is_rerouted_and_applied_once(worker, ns, producer):
    sku = "MIS-1"
    right = partition_for(sku.encode(), ns.partitions)
    wrong = (right + 1) % ns.partitions
    producer.send("RestockReceived", {"sku": sku, "qty": 3}, partition=wrong)
    producer.flush()
    body = wait_stock(worker, sku, on_hand=3)
    assert body["version"] == 1
    changes = changes_for(ns, sku, 1)
    assert [(r.value["version"], r.partition) for r in changes] == [(1, right)]


def _dead_letters(ns, count: int) -> list[Record]:
    return read_topic(
        ns.settings,
        ns.settings.dead_letters_topic,
        until=lambda rs: len(rs) >= count,
        idle=0.5,
        timeout=60,
    )


def test_bad_input_goes_to_dead_letters_with_reason_and_source(worker, ns, producer):
    codec = AvroCodec()
    s = ns.settings
    good = {"event_id": "x", "sku": "DL-1", "qty": 1, "occurred_at": now_ms()}
    body_only = codec.encode("RestockReceived", good)[10:]
    cases = [
        ("undecodable", s.restocks_topic, b"DL-1", b"not avro at all"),
        ("unknown_schema", s.restocks_topic, b"DL-1", b"\xc3\x01" + b"\x00" * 8 + body_only),
        (
            "qty_not_positive",
            s.restocks_topic,
            b"DL-1",
            codec.encode("RestockReceived", {**good, "qty": 0}),
        ),
        (
            "qty_too_large",
            s.restocks_topic,
            b"DL-1",
            codec.encode("RestockReceived", {**good, "qty": 1001}),
        ),
        ("empty_sku", s.restocks_topic, b"", codec.encode("RestockReceived", {**good, "sku": ""})),
        (
            "sku_too_long",
            s.restocks_topic,
            b"L" * 65,
            codec.encode("RestockReceived", {**good, "sku": "L" * 65}),
        ),
        ("key_mismatch", s.restocks_topic, b"OTHER", codec.encode("RestockReceived", good)),
        ("wrong_topic", s.orders_topic, b"DL-1", codec.encode("RestockReceived", good)),
        (
            "unknown_reservation",
            s.orders_topic,
            b"DL-1",
            codec.encode(
                "CommitReservation",
                {"event_id": "y", "order_id": "ghost", "sku": "DL-1", "occurred_at": now_ms()},
            ),
        ),
    ]
    sent = []
    for reason, topic, key, value in cases:
        sent.append((reason, topic, producer.send_raw(topic, key, value)))
    producer.send("RestockReceived", {"sku": "DL-1", "qty": 2})  # valid, after all of them
    producer.flush()
    wait_stock(worker, "DL-1", on_hand=2)
    letters = _dead_letters(ns, len(cases))
    got = {(d.value["reason"], d.value["source_topic"]) for d in letters}
    assert got == {(reason, topic) for reason, topic, _ in sent}
    for d in letters:
        original = next(value for reason, _, _, value in cases if reason == d.value["reason"])
        assert d.value["value"] == original
        assert d.value["source_offset"] >= 0 and d.value["source_partition"] >= 0


def test_retry_with_same_event_id_after_restart_gets_original_outcome(worker, ns, producer):
    sku = "RETRY-1"
    restock_and_wait(worker, producer, sku, 1)
    producer.send(
        "ReserveStock", {"order_id": "retry-o", "sku": sku, "qty": 1, "event_id": "retry-e"}
    )
    producer.flush()
    wait_stock(worker, sku, reserved=1)
    worker.stop()
    worker.start()
    producer.send(
        "ReserveStock", {"order_id": "retry-o", "sku": sku, "qty": 1, "event_id": "retry-e"}
    )
    producer.flush()
    wait_for(lambda: len(results_for(ns, {"retry-o"})) >= 2, 60, "second answer")
    answers = [(r.value["outcome"], r.value["duplicate"]) for r in results_for(ns, {"retry-o"})]
    assert answers[:2] == [("RESERVED", False), ("RESERVED", True)]
    assert stock(worker, sku)["reserved"] == 1


def _allocated_sku(worker, producer, label: str) -> str:
    """A fresh SKU with 100 units, 20 of them allocated to the marketplace (no shared pool)."""
    sku = f"{label}-{uuid.uuid4().hex[:6]}"
    producer.send("RestockReceived", {"sku": sku, "qty": 100})
    producer.send("ChannelAllocationSet", {"sku": sku, "channel": "marketplace", "qty": 20})
    producer.flush()
    body = wait_stock(worker, sku, version=2)
    assert body["channels"] == {
        "marketplace": {"allocated": 20, "reserved": 0, "available": 20, "use_shared": False}
    }
    assert (body["available"], body["shared_available"]) == (100, 80)
    return sku


def _reserve_in_order(ns, producer, sku: str, orders: list[tuple[str, int, str]]) -> dict:
    for order_id, qty, channel in orders:
        producer.send(
            "ReserveStock", {"order_id": order_id, "sku": sku, "qty": qty, "channel": channel}
        )
    producer.flush()
    answers = results_for(ns, {o for o, _, _ in orders})
    return {
        a.value["order_id"]: (a.value["outcome"], a.value["reason"])
        for a in answers
        if not a.value["duplicate"]
    }


def test_a_channel_exhausts_its_quota_while_the_shared_pool_remains(worker, ns, producer):
    sku = _allocated_sku(worker, producer, "CHQ")
    got = _reserve_in_order(
        ns,
        producer,
        sku,
        [
            (f"{sku}-m1", 20, "marketplace"),
            (f"{sku}-m2", 1, "marketplace"),
            (f"{sku}-w1", 5, "web"),
        ],
    )
    assert got == {
        f"{sku}-m1": ("RESERVED", ""),
        f"{sku}-m2": ("REJECTED", "channel_allocation_exhausted"),
        f"{sku}-w1": ("RESERVED", ""),
    }
    body = wait_stock(worker, sku, reserved=25)
    assert body["channels"]["marketplace"] == {
        "allocated": 20,
        "reserved": 20,
        "available": 0,
        "use_shared": False,
    }
    assert (body["available"], body["shared_available"]) == (75, 75)
    # the Redis projection shows the same per-channel numbers
    r = redis.Redis.from_url(worker.ns.settings.redis_url, decode_responses=True)
    key = worker.ns.settings.redis_stock_key(sku)
    wait_for(lambda: r.hget(key, "version") == str(body["version"]), 30, "the Redis hash")
    h = r.hgetall(key)
    assert (h["channel:marketplace:available"], h["channel:marketplace:reserved"]) == ("0", "20")
    assert h["shared_available"] == "75"


def test_the_shared_pool_runs_out_while_a_channel_quota_remains(worker, ns, producer):
    sku = _allocated_sku(worker, producer, "CHS")
    got = _reserve_in_order(
        ns,
        producer,
        sku,
        [(f"{sku}-w1", 80, "web"), (f"{sku}-w2", 1, "web"), (f"{sku}-m1", 20, "marketplace")],
    )
    assert got == {
        f"{sku}-w1": ("RESERVED", ""),
        f"{sku}-w2": ("REJECTED", "reserved_for_other_channels"),
        f"{sku}-m1": ("RESERVED", ""),
    }
    body = wait_stock(worker, sku, reserved=100)
    assert body["available"] == 0
