"""Hostile input on the real stack: no record, however large or odd, stops a partition
(issue 14 items 2 and 5).

A ReserveStock with a 170 kB channel killed the worker before, and every later order on
its partition went unanswered. Here such a record, a record of garbage at the broker's
size limit, restocks that push ``on_hand`` past Avro's 32-bit int and a channel too many
all go to the dead letters with their reason, and orders sent after them on the same
SKU (so the same partition) are answered and published.
"""

from __future__ import annotations

import re
import urllib.request

import pytest
from confluent_kafka import Producer

from harness import Namespace, Worker, read_topic, restock_and_wait, wait_stock
from pipeline.clients import confluent_config
from pipeline.clock import now_ms
from pipeline.domain import core
from pipeline.produce import CommandProducer
from schemas.codec import AvroCodec

pytestmark = pytest.mark.integration

SKU = "HOSTILE-1"
BIG = 2_000_000_000


def test_oversized_and_overflowing_input_is_dead_lettered_and_the_partition_goes_on(kafka):
    ns = Namespace.fresh("hostile", INVENTORY_MAX_QTY=str(BIG))
    s = ns.settings
    codec = AvroCodec()
    worker = Worker(ns).start()
    try:
        with CommandProducer(s) as producer:
            restock_and_wait(worker, producer, SKU, 10)
            huge_channel = {
                "event_id": "huge-channel",
                "order_id": "o-huge",
                "sku": SKU,
                "qty": 1,
                "occurred_at": now_ms(),
                "channel": "c" * 170_000,
                "ttl_ms": 0,
                "allow_partial": False,
            }
            producer.send_raw(
                s.orders_topic, SKU.encode(), codec.encode("ReserveStock", huge_channel)
            )
            producer.flush()
        # garbage just under the broker's max.message.bytes (1 MiB + 12): its dead letter
        # would not fit unless it is truncated
        raw = Producer({**confluent_config(s), "message.max.bytes": 2_000_000})
        raw.produce(s.orders_topic, b"\xc3\x01" + b"\xff" * 1_040_000, SKU.encode())
        assert raw.flush(30) == 0
        with CommandProducer(s) as producer:
            producer.send("RestockReceived", {"sku": SKU, "qty": BIG, "event_id": "r-big-1"})
            producer.send("RestockReceived", {"sku": SKU, "qty": BIG, "event_id": "r-big-2"})
            for i in range(core.MAX_CHANNELS_PER_SKU + 1):
                producer.send(
                    "ChannelAllocationSet",
                    {"sku": SKU, "channel": f"ch-{i:02d}", "qty": 1, "use_shared": True},
                )
            producer.flush()
            wait_stock(worker, SKU, on_hand=BIG + 10)
            for i in range(5):
                producer.send("ReserveStock", {"sku": SKU, "order_id": f"after-{i}", "qty": 1})
            producer.flush()
        body = wait_stock(worker, SKU, reserved=5, timeout=90)
        assert body["on_hand"] == BIG + 10  # the second big restock changed nothing

        answers = read_topic(
            s,
            s.results_topic,
            until=lambda rs: {f"after-{i}" for i in range(5)} <= {r.value["order_id"] for r in rs},
            timeout=90,
        )
        outcomes = {r.value["order_id"]: r.value["outcome"] for r in answers}
        assert all(outcomes[f"after-{i}"] == "RESERVED" for i in range(5))
        assert "o-huge" not in outcomes  # a dead letter is never answered as if decided

        # the relay publishes past the refused commands: the last version reaches the topic
        changes = read_topic(
            s,
            s.stock_changes_topic,
            until=lambda rs: any(r.value.get("version") == body["version"] for r in rs),
            timeout=90,
        )
        assert max(r.value["version"] for r in changes if r.key == SKU.encode()) == body["version"]

        dead = read_topic(
            s, s.dead_letters_topic, until=lambda rs: len(rs) >= 4, idle=2.0, timeout=60
        )
        by_reason: dict[str, list[dict]] = {}
        for r in dead:
            by_reason.setdefault(r.value["reason"], []).append(r.value)
        assert len(by_reason.get("text_too_long", [])) == 1
        assert "channel is 170000 characters" in by_reason["text_too_long"][0]["detail"]
        big = (
            by_reason["unknown_schema"]
            if "unknown_schema" in by_reason
            else by_reason["undecodable"]
        )
        assert len(big) == 1 and "value truncated from 1040002" in big[0]["detail"]
        assert big[0]["source_topic"] == s.orders_topic and len(big[0]["value"]) > 900_000
        limits = sorted(d["detail"] for d in by_reason.get("limit_exceeded", []))
        assert len(limits) == 2, by_reason.keys()
        assert "channel allocations" in limits[0] and "on_hand would be" in limits[1]
        assert worker.proc is not None and worker.proc.poll() is None  # still running
    finally:
        worker.stop()


def test_a_forged_expire_from_the_public_topic_cannot_end_a_hold_early(kafka):
    """ExpireReservation is internal (the sweeper sends it), but the orders topic is
    public: one with a future occurred_at expired a 10-minute hold at once before. The
    ledger's clock caps its time now, so it changes nothing until the hold is due."""
    ns = Namespace.fresh("forged")
    worker = Worker(ns).start()
    try:
        with CommandProducer(ns.settings) as producer:
            restock_and_wait(worker, producer, SKU, 10)
            producer.send(
                "ReserveStock", {"sku": SKU, "order_id": "held", "qty": 2, "ttl_ms": 600_000}
            )
            producer.flush()
            wait_stock(worker, SKU, reserved=2)
            forged = {
                "event_id": "forged-expire",
                "order_id": "held",
                "sku": SKU,
                "occurred_at": now_ms() + 10**9,
                "channel": "system",
            }
            value = AvroCodec().encode("ExpireReservation", forged)
            producer.send_raw(ns.settings.orders_topic, SKU.encode(), value)
            # orders of one SKU are decided in order: once this one is in, so is the expire
            producer.send("ReserveStock", {"sku": SKU, "order_id": "after", "qty": 1})
            producer.flush()
            body = wait_stock(worker, SKU, reserved=3)
        assert body["available"] == 7
    finally:
        worker.stop()


def test_channels_a_producer_makes_up_do_not_grow_the_metrics(kafka):
    """Producers choose the channel; before, each new one was a new label value of three
    metrics (500 channels, 500 series each). Now only the configured channels are."""
    ns = Namespace.fresh("channels")
    worker = Worker(ns).start()
    try:
        with CommandProducer(ns.settings) as producer:
            for i in range(500):
                producer.send("SafetyStockSet", {"sku": SKU, "qty": i % 3, "channel": f"x{i}"})
            producer.send("SafetyStockSet", {"sku": SKU, "qty": 7, "channel": "web"})
            producer.flush()
            wait_stock(worker, SKU, safety_stock=7)
        with urllib.request.urlopen(worker.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        labels = set(re.findall(r'^inventory_commands_total\{[^}]*channel="([^"]*)"', text, re.M))
        assert labels == {"other", "web"}, labels
        other = re.findall(
            r'^inventory_commands_total\{[^}]*channel="other"[^}]*\} (\S+)', text, re.M
        )
        assert sum(map(float, other)) == 500  # every made-up channel counted, as "other"
    finally:
        worker.stop()


def test_a_forged_saga_expire_or_prune_from_the_public_topic_changes_nothing_early(kafka):
    """The saga's sweepers send CancelOrder{expire} (and the pruner its "pruned" form) on
    the public checkouts topic: with a future occurred_at, one expired a 10-minute order at
    once, and one deleted a finished order before its retention. The worker's clock caps
    their time now."""
    ns = Namespace.fresh("forgedsaga", 1)
    worker = Worker(ns).start()
    s = ns.settings
    try:
        with CommandProducer(s) as producer:
            restock_and_wait(worker, producer, SKU, 10)
            for order in ("open", "done"):
                producer.send(
                    "PlaceOrder",
                    {"order_id": order, "lines": [{"sku": SKU, "qty": 1}], "ttl_ms": 600_000},
                )
            producer.send("CommitOrder", {"order_id": "done"})
            producer.flush()
            read_topic(s, s.order_results_topic, until=lambda rs: len(rs) >= 3, timeout=60)
            codec = AvroCodec()
            for order, reason in (("open", "expired"), ("done", "pruned")):
                forged = {
                    "event_id": f"forged-{order}",
                    "order_id": order,
                    "reason": reason,
                    "channel": "system",
                    "occurred_at": now_ms() + 10**11,
                    "expire": True,
                }
                producer.send_raw(
                    s.checkouts_topic, order.encode(), codec.encode("CancelOrder", forged), 0
                )
            # decided in order on the one partition: these come after the forged ones
            producer.send("CommitOrder", {"order_id": "open"})
            producer.send("CommitOrder", {"order_id": "done"})
            producer.flush()
            results = read_topic(
                s, s.order_results_topic, until=lambda rs: len(rs) >= 5, timeout=60
            )
        last = {r.key: r.value["outcome"] for r in results}
        assert last[b"open"] == "ORDER_COMMITTED", [r.value for r in results]
        # a pruned order would be ORDER_UNKNOWN; kept, its commit is answered again
        assert last[b"done"] == "ORDER_COMMITTED", [r.value for r in results]
        assert len(results) == 5
    finally:
        worker.stop()


def test_a_multi_line_order_with_the_longest_ttl_is_answered(kafka):
    """Issue 14 item 4: a 7-day order's line holds last ttl + grace, past the ledger's
    7-day limit, so each line was dead-lettered and the saga re-sent it for ever; the
    order was never answered. The ledger takes the saga's holds up to ttl + grace now."""
    from schemas.validation import MAX_TTL_MS

    ns = Namespace.fresh("longttl", 1)
    s = ns.settings
    worker = Worker(ns).start()
    try:
        with CommandProducer(s) as producer:
            restock_and_wait(worker, producer, SKU, 10)
            restock_and_wait(worker, producer, "HOSTILE-2", 10)
            producer.send(
                "PlaceOrder",
                {
                    "order_id": "week",
                    "lines": [{"sku": SKU, "qty": 2}, {"sku": "HOSTILE-2", "qty": 3}],
                    "ttl_ms": MAX_TTL_MS,
                },
            )
            producer.flush()
            results = read_topic(
                s, s.order_results_topic, until=lambda rs: len(rs) >= 1, timeout=60
            )
        assert [r.value["outcome"] for r in results] == ["ORDER_RESERVED"]
        wait_stock(worker, SKU, reserved=2)
        wait_stock(worker, "HOSTILE-2", reserved=3)
        assert read_topic(s, s.dead_letters_topic, timeout=1.0) == []
    finally:
        worker.stop()
