"""Damaged units on the real stack: returned, seen everywhere, then resolved exactly once.

One worker (ledger, relay and both sinks) on a fresh namespace, with its own Redis key
prefix and search index. A SKU gets sellable and damaged returns; its damaged count
must show in ``GET /stock``, the Redis hash, the search document and StockChanged.
Then some damaged units go back on hand, the worker is killed (SIGKILL) and started
again, the rest are written off, the first resolve is sent again by the producer (same
event id, after the restart), one asks for more than is left (refused,
INSUFFICIENT_DAMAGED) and one has qty 0 (dead letter): each resolve is applied once.
"""

from __future__ import annotations

import urllib.request
import uuid

import pytest
import redis
from opensearchpy import OpenSearch

from harness import Namespace, Record, Worker, drop_projections, read_topic, wait_for, wait_stock
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration

TOKEN = uuid.uuid4().hex[:8]
PREFIX = f"test-damaged-{TOKEN}:"  # the worker's Redis keys and search index (its env only:
INDEX = f"test-damaged-{TOKEN}"  # ns.settings keeps the defaults)


@pytest.fixture(scope="module")
def ns() -> Namespace:
    return Namespace.fresh(
        "damaged",
        partitions=2,
        INVENTORY_REDIS_KEY_PREFIX=PREFIX,
        INVENTORY_SEARCH_INDEX=INDEX,
    )


@pytest.fixture(scope="module")
def worker(ns: Namespace, kafka: None, redis_service: None, opensearch: None):
    w = Worker(ns).start()
    yield w
    w.stop()
    drop_projections(ns.settings)


def _commands(worker: Worker, outcome: str) -> float:
    """inventory_commands_total of DamagedStockResolved with ``outcome``, any channel."""
    with urllib.request.urlopen(worker.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("inventory_commands_total{")
        and 'type="DamagedStockResolved"' in line
        and f'outcome="{outcome}"' in line
    )


def _changes(ns: Namespace, sku: str, version: int) -> list[Record]:
    recs = read_topic(
        ns.settings,
        ns.settings.stock_changes_topic,
        until=lambda rs: any(
            r.name == "StockChanged" and r.value["sku"] == sku and r.value["version"] >= version
            for r in rs
        ),
        idle=0.5,
        timeout=60,
    )
    return [r for r in recs if r.name == "StockChanged" and r.value["sku"] == sku]


def test_damaged_units_are_visible_and_resolved_once(ns: Namespace, worker: Worker) -> None:
    s = ns.settings
    sku = "DMG-1"
    r = redis.Redis.from_url(s.redis_url, decode_responses=True)
    search = OpenSearch(hosts=[s.opensearch_url], timeout=30)
    key = f"{PREFIX}stock:{sku}"

    with CommandProducer(s) as producer:
        producer.send("RestockReceived", {"sku": sku, "qty": 10})
        producer.flush()
        wait_stock(worker, sku, on_hand=10)
        # returns: 1 resellable, 5 damaged (one return line of 2 and one of 3)
        producer.send(
            "ReturnReceived", {"order_id": "r1", "sku": sku, "qty": 1, "resellable": True}
        )
        producer.send(
            "ReturnReceived", {"order_id": "r2", "sku": sku, "qty": 2, "resellable": False}
        )
        producer.send(
            "ReturnReceived", {"order_id": "r3", "sku": sku, "qty": 3, "resellable": False}
        )
        producer.flush()
        body = wait_stock(worker, sku, version=4)
        assert (body["on_hand"], body["damaged"], body["available"]) == (11, 5, 11)
        wait_for(lambda: r.hget(key, "version") == "4", 30, "the Redis hash at version 4")
        assert (r.hget(key, "damaged"), r.hget(key, "available")) == ("5", "11")

        def search_doc() -> dict:
            doc = search.get(index=INDEX, id=sku, ignore=404)
            return doc.get("_source") or {}

        wait_for(lambda: search_doc().get("version") == 4, 30, "the search document")
        assert (search_doc()["damaged"], search_doc()["on_hand"]) == (5, 11)

        # resolve: 2 pass inspection, 3 are scrapped; the first is re-sent by the producer
        restock = {"event_id": f"qc-{TOKEN}-1", "sku": sku, "qty": 2, "action": "RESTOCK"}
        producer.send("DamagedStockResolved", {**restock, "reason": "passed inspection"})
        producer.flush()
        wait_stock(worker, sku, version=5, on_hand=13, damaged=3)
        worker.kill()  # kill -9 between the two resolves; the restart is warm (RocksDB)
        worker.start()
        producer.send(
            "DamagedStockResolved",
            {"sku": sku, "qty": 3, "action": "WRITE_OFF", "reason": "crushed"},
        )
        producer.send("DamagedStockResolved", {**restock, "reason": "passed inspection"})
        producer.send("DamagedStockResolved", {"sku": sku, "qty": 1, "action": "WRITE_OFF"})
        producer.send("DamagedStockResolved", {"sku": sku, "qty": 0, "action": "RESTOCK"})
        # a marker on the same topic (and partition): once applied, so is all of the above
        producer.send(
            "ReturnReceived", {"order_id": "r4", "sku": sku, "qty": 1, "resellable": True}
        )
        producer.flush()

    body = wait_stock(worker, sku, version=7)
    assert (body["on_hand"], body["damaged"], body["available"]) == (14, 0, 14)
    wait_for(lambda: r.hget(key, "version") == "7", 30, "the Redis hash at version 7")
    assert (r.hget(key, "on_hand"), r.hget(key, "damaged")) == ("14", "0")
    wait_for(lambda: search_doc().get("version") == 7, 30, "the search document at 7")
    assert search_doc()["damaged"] == 0

    changes = _changes(ns, sku, 7)
    seen = sorted({r.value["version"]: r.value for r in changes}.items())
    assert [(v, c["cause_type"], c["on_hand"], c["damaged"]) for v, c in seen] == [
        (1, "RestockReceived", 10, 0),
        (2, "ReturnReceived", 11, 0),
        (3, "ReturnReceived", 11, 2),
        (4, "ReturnReceived", 11, 5),
        (5, "DamagedStockResolved", 13, 3),
        (6, "DamagedStockResolved", 13, 0),
        (7, "ReturnReceived", 14, 0),
    ]
    # counted by the restarted worker: the re-send a duplicate (its id is in the SKU's
    # record, which survived the kill), the resolve beyond what is held refused
    wait_for(lambda: _commands(worker, "DUPLICATE") == 1, 10, "the duplicate counted")
    assert _commands(worker, "DAMAGED_RESTOCKED") == 0
    assert _commands(worker, "DAMAGED_WRITTEN_OFF") == 1
    assert _commands(worker, "INSUFFICIENT_DAMAGED") == 1
    letters = read_topic(
        s, s.dead_letters_topic, until=lambda rs: len(rs) >= 1, idle=0.5, timeout=30
    )
    assert [(d.value["reason"], d.value["source_topic"]) for d in letters] == [
        ("qty_not_positive", s.returns_topic)
    ]
