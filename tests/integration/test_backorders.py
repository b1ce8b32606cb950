"""Preorders and backorders on the real stack (issue 16 item 2): answered exactly once.

One worker (ledger, relay and both sinks) on a fresh namespace. A SKU takes backorders
(BackorderCapSet) against a purchase order (IncomingStock); customers' reserves that
allow a backorder are answered BACKORDERED with the purchase order and its date, and the
Redis hash and the search document show what is incoming, promised and backorderable. The
purchase order arrives short and final: the first-placed backorders that the units
cover become holds in the order they were placed (RESERVED, backorder_filled), the rest
are released (RELEASED, po_short), and each customer's answer on reservation-results
says so; a converted one is committed like any hold.

Then many backorders, and the worker is killed (SIGKILL) right after their purchase
order's arrival is produced; after the restart every backorder is answered exactly once
per outcome (BACKORDERED, then RESERVED or RELEASED; the producer's re-sends of the
arrival and of some reserves change nothing and are answered as duplicates), and no
unit is oversold or lost: on hand is what arrived, held is what was converted.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest
import redis
from opensearchpy import OpenSearch

from harness import Namespace, Worker, drop_projections, read_topic, wait_for, wait_stock
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration

TOKEN = uuid.uuid4().hex[:8]
DUE = 1_800_000_000_000  # when the purchase orders are expected (epoch ms)


@pytest.fixture(scope="module")
def ns() -> Namespace:
    return Namespace.fresh(
        "backorders",
        partitions=2,
        INVENTORY_REDIS_KEY_PREFIX=f"test-backorders-{TOKEN}:",
        INVENTORY_SEARCH_INDEX=f"test-backorders-{TOKEN}",
    )


@pytest.fixture(scope="module")
def worker(ns: Namespace, kafka: None, redis_service: None, opensearch: None):
    w = Worker(ns).start()
    yield w
    w.stop()
    drop_projections(ns.settings)


def answers_of(ns: Namespace, sku: str, until: Any, timeout: float = 90) -> list[dict[str, Any]]:
    """Every ReservationResult of ``sku`` on reservation-results, in topic order per order."""
    records = read_topic(
        ns.settings,
        ns.settings.results_topic,
        until=lambda rs: until([x.value for x in rs if x.value.get("sku") == sku]),
        idle=1.0,
        timeout=timeout,
    )
    return [x.value for x in records if x.value.get("sku") == sku]


def hash_of(ns: Namespace, sku: str) -> dict[str, str]:
    """The SKU's Redis hash as the worker's sink wrote it."""
    with redis.Redis.from_url(ns.settings.redis_url, decode_responses=True) as r:
        return r.hgetall(ns.settings.redis_stock_key(sku))


def doc_of(ns: Namespace, sku: str) -> dict[str, Any]:
    """The SKU's search document ({} until the sink wrote it)."""
    search = OpenSearch(hosts=[ns.settings.opensearch_url], timeout=30)
    try:
        got = search.get(index=ns.settings.search_index, id=sku, ignore=404)
        return got.get("_source") or {}
    finally:
        search.close()


def backorder(order: str, sku: str, qty: int, **more: Any) -> dict[str, Any]:
    return {
        "order_id": order,
        "sku": sku,
        "qty": qty,
        "allow_backorder": True,
        "customer_id": f"c-{order}",
        "ttl_ms": 600_000,
        **more,
    }


def test_a_short_purchase_order_converts_the_first_placed_and_tells_the_rest(
    ns: Namespace, worker: Worker
) -> None:
    sku = f"PRE-{TOKEN}"
    orders = {"o1": 2, "o2": 2, "o3": 3, "o4": 2}  # each more than the 1 on hand
    with CommandProducer(ns.settings) as producer:
        producer.send("RestockReceived", {"sku": sku, "qty": 1})
        producer.send("BackorderCapSet", {"sku": sku, "max_units": 10})
        producer.send("IncomingStock", {"sku": sku, "po_id": "po-1", "qty": 10, "expected_at": DUE})
        producer.flush()
        body = wait_stock(worker, sku, version=3)
        assert body["incoming"]["open"] == 10 and body["incoming"]["backorderable"] == 10
        for order, qty in orders.items():  # placed in this order (one partition: the SKU's)
            producer.send("ReserveStock", backorder(order, sku, qty))
        producer.flush()
        body = wait_stock(worker, sku, version=7)
        assert (body["on_hand"], body["reserved"], body["available"]) == (1, 0, 1)
        assert (body["incoming"]["promised"], body["incoming"]["waiting"]) == (9, 4)
        # the sinks store the purchase order figures of StockChanged v5
        projected = {"incoming": 10, "promised": 9, "backorderable": 1, "staged": 0}
        wait_for(lambda: hash_of(ns, sku).get("version") == "7", 30, "the Redis hash at 7")
        assert {f: int(hash_of(ns, sku)[f]) for f in projected} == projected
        wait_for(lambda: doc_of(ns, sku).get("version") == 7, 30, "the search document at 7")
        assert {f: doc_of(ns, sku)[f] for f in projected} == projected
        # 4 of the 10 arrive and the supplier sends no more
        producer.send("RestockReceived", {"sku": sku, "qty": 4, "po_id": "po-1", "final": True})
        producer.flush()
        body = wait_stock(worker, sku, version=8)
        # o1 and o2 (2 + 2) are held; o3 and o4 released; the plain unit stays available
        assert (body["on_hand"], body["reserved"], body["available"]) == (5, 4, 1)
        assert body["incoming"]["open"] == 0 and body["incoming"]["promised"] == 0
        assert body["incoming"]["purchase_orders"]["po-1"]["status"] == "RECEIVED"
        producer.send("CommitReservation", {"order_id": "o1", "sku": sku})
        producer.flush()
        body = wait_stock(worker, sku, version=9)
        assert (body["on_hand"], body["reserved"]) == (3, 2)

    got = answers_of(ns, sku, lambda rs: len(rs) >= 9)
    by_order: dict[str, list[tuple[str, str, str, int]]] = {}
    for a in got:
        by_order.setdefault(a["order_id"], []).append(
            (a["outcome"], a["reason"], a["po_id"], a["expected_at"])
        )
    placed = ("BACKORDERED", "", "po-1", DUE)
    assert by_order == {
        "o1": [placed, ("RESERVED", "backorder_filled", "po-1", DUE), ("COMMITTED", "", "", 0)],
        "o2": [placed, ("RESERVED", "backorder_filled", "po-1", DUE)],
        "o3": [placed, ("RELEASED", "po_short", "po-1", DUE)],
        "o4": [placed, ("RELEASED", "po_short", "po-1", DUE)],
    }
    # (answers are keyed by order, so they spread over the results topic's partitions:
    # the order they were placed in shows in which were converted, the first ones)


def test_a_kill_during_backorder_conversion_answers_each_order_once(
    ns: Namespace, worker: Worker
) -> None:
    sku = f"KILL-{TOKEN}"
    n, arriving = 60, 45  # 60 backorders of 1 unit; 45 units arrive, and no more
    orders = [f"k{i:03d}" for i in range(n)]
    arrival = {
        "event_id": f"arrival-{TOKEN}",
        "sku": sku,
        "qty": arriving,
        "po_id": "po-k",
        "final": True,
    }
    with CommandProducer(ns.settings) as producer:
        producer.send("BackorderCapSet", {"sku": sku, "max_units": 100})
        producer.send("IncomingStock", {"sku": sku, "po_id": "po-k", "qty": n, "expected_at": DUE})
        producer.flush()
        # the reserves go to another topic (orders): Kafka orders nothing across topics, so
        # sent at once they may be decided before the purchase order exists (and refused)
        wait_stock(worker, sku, version=2)
        for order in orders:
            producer.send("ReserveStock", backorder(order, sku, 1, event_id=f"r-{order}"))
        producer.flush()
        wait_stock(worker, sku, version=2 + n)
        producer.send("RestockReceived", arrival)
        producer.flush()
        worker.kill()  # kill -9 right after the arrival is produced: mid-conversion
        worker.start()
        # the producer, unsure, sends the arrival again, and some customers their reserves
        producer.send("RestockReceived", arrival)
        for order in orders[:5] + orders[-5:]:
            producer.send("ReserveStock", backorder(order, sku, 1, event_id=f"r-{order}"))
        producer.flush()

    body = wait_stock(worker, sku, version=3 + n, timeout=120)
    # nothing oversold or lost: the 45 units are on hand and held by the first 45
    assert (body["on_hand"], body["reserved"], body["available"]) == (arriving, arriving, 0)
    assert body["incoming"]["waiting"] == 0 and body["incoming"]["staged"] == 0

    got = answers_of(ns, sku, lambda rs: len(rs) >= 2 * n + 10, timeout=120)
    firsts = Counter((a["order_id"], a["outcome"]) for a in got if not a["duplicate"])
    assert set(firsts.values()) == {1}, [k for k, v in firsts.items() if v > 1]
    for i, order in enumerate(orders):
        final = "RESERVED" if i < arriving else "RELEASED"
        assert firsts[(order, "BACKORDERED")] == 1 and firsts[(order, final)] == 1, order
    assert len(firsts) == 2 * n
    settled = [a for a in got if not a["duplicate"] and a["outcome"] != "BACKORDERED"]
    reasons = {a["order_id"]: a["reason"] for a in settled}
    # first placed, first served: the first 45 placed are the ones converted
    assert [reasons[o] for o in orders] == ["backorder_filled"] * arriving + ["po_short"] * (
        n - arriving
    )
    # the re-sent reserves are answered as duplicates with the order's state when they
    # were decided: the orders and restocks topics are not ordered with each other, so
    # before or after the arrival (still BACKORDERED, or its final outcome)
    dups = [a for a in got if a["duplicate"]]
    assert sorted(a["order_id"] for a in dups) == sorted(orders[:5] + orders[-5:])
    for a in dups:
        final = "RESERVED" if a["order_id"] in orders[:5] else "RELEASED"
        assert a["outcome"] in ("BACKORDERED", final), a

    # every StockChanged of the SKU once, versions without a gap, units explained
    changes = read_topic(
        ns.settings,
        ns.settings.stock_changes_topic,
        until=lambda rs: any(
            x.value.get("sku") == sku and x.value.get("version") == 3 + n for x in rs
        ),
        idle=1.0,
        timeout=90,
    )
    mine = [x.value for x in changes if x.name == "StockChanged" and x.value["sku"] == sku]
    versions = sorted({c["version"] for c in mine})
    assert versions == list(range(1, 4 + n))
    last = max(mine, key=lambda c: c["version"])
    assert (last["cause_type"], last["on_hand"], last["reserved"]) == (
        "RestockReceived",
        arriving,
        arriving,
    )
    assert (last["incoming"], last["promised"], last["staged"]) == (0, 0, 0)
