"""Producers that write the input topics in Kafka transactions (issue 14 item 7).

The ledger reads its inputs read_committed: records of an aborted transaction are
never applied or answered, a transaction still open holds the partition back until it
ends (Kafka's last stable offset) and then goes on, and the offsets that transaction
markers and aborted records take are not mistaken for lost records (no gap, no rewind).
"""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import Producer

from harness import Namespace, Worker, metric_total, read_topic, restock_and_wait, wait_stock
from pipeline.clients import confluent_config
from pipeline.clock import now_ms
from pipeline.produce import CommandProducer
from schemas.codec import AvroCodec

pytestmark = pytest.mark.integration

SKU = "TX-1"


def _reserve(codec: AvroCodec, order: str) -> bytes:
    return codec.encode(
        "ReserveStock",
        {
            "event_id": f"e-{order}",
            "order_id": order,
            "sku": SKU,
            "qty": 1,
            "occurred_at": now_ms(),
            "channel": "web",
            "ttl_ms": 0,
            "allow_partial": False,
        },
    )


def test_aborted_commands_are_never_applied_and_markers_do_not_stall(kafka):
    ns = Namespace.fresh("txin")
    s = ns.settings
    codec = AvroCodec()
    worker = Worker(ns).start()
    # murmur2, as Java producers partition: the open transaction's record must sit on the
    # SKU's own partition (librdkafka's default would put it elsewhere, to be re-routed)
    tx = Producer(
        {
            **confluent_config(s),
            "transactional.id": f"{s.app_id}-shop-tx",
            "partitioner": "murmur2_random",
        }
    )
    try:
        with CommandProducer(s) as producer:
            restock_and_wait(worker, producer, SKU, 100)
        tx.init_transactions(30)
        committed, aborted = [], []
        for round_ in range(5):
            tx.begin_transaction()
            for i in range(3):
                order = f"abort-{round_}-{i}"
                aborted.append(order)
                tx.produce(s.orders_topic, _reserve(codec, order), SKU.encode())
            tx.abort_transaction(30)
            tx.begin_transaction()
            for i in range(2):
                order = f"commit-{round_}-{i}"
                committed.append(order)
                tx.produce(s.orders_topic, _reserve(codec, order), SKU.encode())
            tx.commit_transaction(30)
        wait_stock(worker, SKU, reserved=len(committed))

        # a transaction left open holds the partition back; it goes on once it commits
        tx.begin_transaction()
        tx.produce(s.orders_topic, _reserve(codec, "slow-commit"), SKU.encode())
        tx.flush(10)
        with CommandProducer(s) as producer:
            producer.send("ReserveStock", {"sku": SKU, "order_id": "behind-open-tx", "qty": 1})
        time.sleep(3)
        _, held = worker.get_json(f"/stock/{SKU}")
        assert held["reserved"] == len(committed)  # behind the open transaction
        threading.Timer(0.5, lambda: tx.commit_transaction(30)).start()
        body = wait_stock(worker, SKU, reserved=len(committed) + 2)
        committed += ["slow-commit", "behind-open-tx"]

        answers = read_topic(
            s,
            s.results_topic,
            until=lambda rs: set(committed) <= {r.value["order_id"] for r in rs},
            idle=2.0,
            timeout=60,
        )
        answered = {r.value["order_id"]: r.value["outcome"] for r in answers}
        assert all(answered[o] == "RESERVED" for o in committed)
        assert not set(aborted) & set(answered), "an aborted command was answered"
        assert body["reserved"] == len(committed) and body["on_hand"] == 100
        # markers and aborted records are not lost records: no gap counted, no re-read
        # (the scrape works: the batches it counted are there)
        assert metric_total(worker.url, "inventory_batch_commands_count") > 0
        assert metric_total(worker.url, "inventory_input_gaps_total") == 0
        assert metric_total(worker.url, "inventory_input_rewinds_total") == 0
    finally:
        worker.stop()
