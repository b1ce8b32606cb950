"""Locations and transfers on the real stack: units held, sold and moved exactly once.

One worker (ledger, relay and both sinks) on a fresh namespace, with its own Redis key
prefix and search index and a location priority (store-7 before dc-1). A SKU is
restocked at two locations; a reserve names a location, one picks by the priority, one
the SKU could cover only by a split is refused without ``split`` and held with it, and
the split one is committed (its units leave both locations). A transfer is shipped, the
worker is killed (SIGKILL) and started again, then the transfer is received short (one
unit lost) and the receipt is re-sent by the producer (same event id) and sent again
under another id; a second transfer is shipped and cancelled. ``GET /stock``, the Redis
hash, the search document (the README's "in stock at store X" query) and StockChanged
show the per-location figures, each command applied once and every unit accounted for.
"""

from __future__ import annotations

import urllib.request
import uuid
from typing import Any

import pytest
import redis
from opensearchpy import OpenSearch

from harness import (
    Namespace,
    Worker,
    drop_projections,
    metric_total,
    read_topic,
    wait_for,
    wait_stock,
)
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration

TOKEN = uuid.uuid4().hex[:8]
PREFIX = f"test-locations-{TOKEN}:"  # the worker's Redis keys and search index
INDEX = f"test-locations-{TOKEN}"
DC, STORE = "dc-1", "store-7"


@pytest.fixture(scope="module")
def ns() -> Namespace:
    return Namespace.fresh(
        "locations",
        partitions=2,
        INVENTORY_REDIS_KEY_PREFIX=PREFIX,
        INVENTORY_SEARCH_INDEX=INDEX,
        INVENTORY_LOCATION_PRIORITY=f"{STORE},{DC}",
    )


@pytest.fixture(scope="module")
def worker(ns: Namespace, kafka: None, redis_service: None, opensearch: None):
    w = Worker(ns).start()
    yield w
    w.stop()
    drop_projections(ns.settings)


def _commands(worker: Worker, kind: str, outcome: str) -> float:
    """inventory_commands_total of ``kind`` with ``outcome``, any channel."""
    with urllib.request.urlopen(worker.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("inventory_commands_total{")
        and f'type="{kind}"' in line
        and f'outcome="{outcome}"' in line
    )


def figures(on_hand: int, reserved: int = 0, inbound: int = 0) -> dict[str, int]:
    """One location in ``GET /stock`` (no safety stock in this test)."""
    return {
        "on_hand": on_hand,
        "reserved": reserved,
        "damaged": 0,
        "available": max(0, on_hand - reserved),
        "inbound": inbound,
    }


def test_units_are_held_sold_and_moved_per_location_exactly_once(
    ns: Namespace, worker: Worker
) -> None:
    s = ns.settings
    sku, other = "LOC-1", "LOC-2"
    r = redis.Redis.from_url(s.redis_url, decode_responses=True)
    search = OpenSearch(hosts=[s.opensearch_url], timeout=30)
    key = f"{PREFIX}stock:{sku}"

    def reserve(order: str, qty: int, **more: Any) -> None:
        producer.send("ReserveStock", {"order_id": order, "sku": sku, "qty": qty, **more})

    with CommandProducer(s) as producer:
        producer.send("RestockReceived", {"sku": sku, "qty": 10, "location": DC})
        producer.send("RestockReceived", {"sku": sku, "qty": 3, "location": STORE})
        producer.send("RestockReceived", {"sku": other, "qty": 5, "location": DC})
        producer.flush()
        wait_stock(worker, sku, version=2)
        reserve("o1", 2, location=DC)  # named: from dc-1 although store-7 comes first
        reserve("o2", 2)  # by priority: store-7
        reserve("o3", 9)  # 1 + 8 available: no one location has 9
        reserve("o4", 9, split=True)  # store-7's 1, then dc-1's 8
        producer.flush()
        body = wait_stock(worker, sku, version=5)
        assert body["locations"] == {DC: figures(10, 10), STORE: figures(3, 3)}
        assert (body["on_hand"], body["reserved"], body["available"]) == (13, 13, 0)
        producer.send("CommitReservation", {"order_id": "o4", "sku": sku})
        producer.flush()
        body = wait_stock(worker, sku, version=6)
        assert body["locations"] == {DC: figures(2, 2), STORE: figures(2, 2)}
        producer.send("RestockReceived", {"sku": sku, "qty": 6, "location": DC})
        ship = {"transfer_id": f"t1-{TOKEN}", "sku": sku, "qty": 4, "source": DC}
        producer.send("TransferShipped", {**ship, "destination": STORE, "event_id": "ship-1"})
        producer.flush()
        body = wait_stock(worker, sku, version=8)
        assert body["locations"] == {DC: figures(4, 2), STORE: figures(2, 2, inbound=4)}
        assert body["on_hand"] == 6  # the 4 on the way are at neither end

        worker.kill()  # kill -9 between the ship and the receipt; the restart is warm
        worker.start()
        received = {"transfer_id": f"t1-{TOKEN}", "sku": sku, "qty": 3}
        producer.send("TransferShipped", {**ship, "destination": STORE, "event_id": "ship-1"})
        producer.send("TransferReceived", {**received, "event_id": "recv-1"})
        producer.send("TransferReceived", {**received, "event_id": "recv-1"})  # a re-send
        producer.send("TransferReceived", {**received, "event_id": "recv-2"})  # no longer open
        t2 = {"transfer_id": f"t2-{TOKEN}", "sku": sku}
        producer.send("TransferShipped", {**t2, "qty": 2, "source": DC, "destination": STORE})
        producer.send("TransferCancelled", t2)
        producer.flush()

    body = wait_stock(worker, sku, version=11)
    # dc-1: 10 - 8 sold + 6 - 4 shipped (t2 went out and came back); store-7: 3 - 1 sold
    # + 3 of t1's 4 received (one lost on the way)
    assert body["locations"] == {DC: figures(4, 2), STORE: figures(5, 2)}
    assert (body["on_hand"], body["reserved"], body["available"]) == (9, 4, 5)

    wait_for(lambda: r.hget(key, "version") == "11", 30, "the Redis hash at version 11")
    fields = {k: v for k, v in r.hgetall(key).items() if k.startswith("location:")}
    assert fields == {
        f"location:{name}:{f}": str(v)
        for name, figs in ((DC, figures(4, 2)), (STORE, figures(5, 2)))
        for f, v in figs.items()
    }

    def doc(name: str) -> dict[str, Any]:
        got = search.get(index=INDEX, id=name, ignore=404)
        return got.get("_source") or {}

    wait_for(lambda: doc(sku).get("version") == 11, 30, "the search document at 11")
    wait_for(lambda: doc(other).get("version") == 1, 30, "the other SKU's search document")
    assert [(x["location"], x["available"], x["in_stock"]) for x in doc(sku)["locations"]] == [
        (DC, 2, True),
        (STORE, 3, True),
    ]
    search.indices.refresh(index=INDEX)
    at_store = {
        "query": {
            "nested": {
                "path": "locations",
                "query": {
                    "bool": {
                        "filter": [
                            {"term": {"locations.location": STORE}},
                            {"term": {"locations.in_stock": True}},
                        ]
                    }
                },
            }
        }
    }
    hits = search.search(index=INDEX, body=at_store)["hits"]["hits"]
    assert [h["_source"]["sku"] for h in hits] == [sku]  # LOC-2 is only at dc-1

    changes = read_topic(
        s,
        s.stock_changes_topic,
        until=lambda rs: any(
            x.name == "StockChanged" and x.value["sku"] == sku and x.value["version"] >= 11
            for x in rs
        ),
        idle=0.5,
        timeout=60,
    )
    seen = sorted(
        {
            x.value["version"]: x.value
            for x in changes
            if x.name == "StockChanged" and x.value["sku"] == sku
        }.items()
    )
    assert [(v, c["cause_type"], c["on_hand"], c["reserved"]) for v, c in seen] == [
        (1, "RestockReceived", 10, 0),
        (2, "RestockReceived", 13, 0),
        (3, "ReserveStock", 13, 2),
        (4, "ReserveStock", 13, 4),
        (5, "ReserveStock", 13, 13),
        (6, "CommitReservation", 4, 4),
        (7, "RestockReceived", 10, 4),
        (8, "TransferShipped", 6, 4),
        (9, "TransferReceived", 9, 4),
        (10, "TransferShipped", 7, 4),
        (11, "TransferCancelled", 9, 4),
    ]
    # every StockChanged carries its locations, whose sums are the SKU's figures
    for _, c in seen:
        assert sum(x["on_hand"] for x in c["locations"]) == c["on_hand"]
        assert sum(x["reserved"] for x in c["locations"]) == c["reserved"]
        assert sum(x["available"] for x in c["locations"]) == c["available"]
    assert [x["inbound"] for x in seen[7][1]["locations"]] == [0, 4]

    results = read_topic(
        s,
        s.results_topic,
        until=lambda rs: sum(1 for x in rs if x.value.get("sku") == sku) >= 5,
        idle=0.5,
        timeout=60,
    )
    answers = {x.value["order_id"]: x.value for x in results if x.value.get("sku") == sku}
    assert (answers["o3"]["outcome"], answers["o3"]["reason"]) == (
        "REJECTED",
        "insufficient_at_location",
    )
    assert [answers[o]["outcome"] for o in ("o1", "o2")] == ["RESERVED", "RESERVED"]
    # counted by the restarted worker: the re-sent ship and receipt are duplicates, the
    # receipt under a new id finds no open transfer; one receipt, one cancel
    wait_for(
        lambda: _commands(worker, "TransferReceived", "TRANSFER_RECEIVED") == 1,
        10,
        "the receipt counted",
    )
    assert _commands(worker, "TransferReceived", "DUPLICATE") == 1
    assert _commands(worker, "TransferShipped", "DUPLICATE") == 1
    assert _commands(worker, "TransferReceived", "TRANSFER_REFUSED") == 1
    assert _commands(worker, "TransferCancelled", "TRANSFER_CANCELLED") == 1
    assert "1 of 4 units lost in transit" in worker.tail(400)
    assert metric_total(worker.url, "inventory_transfer_units_lost_total") == 1
