"""A record Faust never delivers is fetched again, never skipped (pipeline.kafka.sequencing).

The failpoint drops the first delivery of chosen records between Faust's fetch
loop and the agents, the way faust-streaming 0.15 was seen to lose records at
rebalances. Without the sequencing guard the dropped reserve is never applied
(the next reserve of the same SKU raises its watermark over it) and this test
fails; with it, the worker notices the jump, rewinds, and applies every record
exactly once, in order.
"""

from __future__ import annotations

import re
import urllib.request

import pytest

from harness import Namespace, Record, Worker, read_topic, wait_for
from pipeline.kafka.partitioning import partition_for
from pipeline.produce import CommandProducer

SKU = "SEQ-1"
PARTITIONS = 2
P = partition_for(SKU.encode(), PARTITIONS)


@pytest.fixture(scope="module")
def ns() -> Namespace:
    # orders@1 is the second reserve, restocks@2 the third restock of the SKU
    return Namespace.fresh(
        "seq",
        partitions=PARTITIONS,
        INVENTORY_FAILPOINT_DROP_DELIVERY=f"orders:{P}:1,restocks:{P}:2",
    )


@pytest.fixture(scope="module")
def worker(ns, kafka):
    w = Worker(ns).start()
    yield w
    w.stop()


def stock(worker: Worker) -> dict:
    status, body = worker.get_json(f"/stock/{SKU}")
    return body if status == 200 else {}


def wait_stock(worker: Worker, **expected: int) -> dict:
    try:
        wait_for(
            lambda: all(stock(worker).get(k) == v for k, v in expected.items()),
            60,
            f"{SKU} to reach {expected}",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it is {stock(worker)}") from None
    return stock(worker)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def results(ns: Namespace, orders: set[str]) -> list[Record]:
    recs = read_topic(
        ns.settings,
        ns.settings.results_topic,
        until=lambda rs: orders <= {r.value["order_id"] for r in rs},
        timeout=60,
        idle=1.0,
    )
    return [r for r in recs if r.value["order_id"] in orders]


def test_a_record_faust_never_delivered_is_applied_in_order(ns, worker):
    with CommandProducer(ns.settings) as producer:
        producer.send("RestockReceived", {"sku": SKU, "qty": 10})  # restocks@0
        producer.flush()
        wait_stock(worker, on_hand=10, version=1)
        for order in ("seq-a", "seq-b", "seq-c"):  # orders@0..2; @1's first delivery is dropped
            producer.send("ReserveStock", {"order_id": order, "sku": SKU, "qty": 1})
        for qty in (5, 7, 1):  # restocks@1..3; @2's first delivery is dropped
            producer.send("RestockReceived", {"sku": SKU, "qty": qty})
        producer.flush()

    body = wait_stock(worker, on_hand=23, reserved=3, version=7)
    assert body["available"] == 20
    log = worker.tail(100_000)
    assert "failpoint: dropped delivery" in log and log.count("failpoint: dropped") == 2

    answers = [r.value for r in results(ns, {"seq-a", "seq-b", "seq-c"})]
    firsts = sorted((a["order_id"], a["outcome"]) for a in answers if not a["duplicate"])
    assert firsts == [("seq-a", "RESERVED"), ("seq-b", "RESERVED"), ("seq-c", "RESERVED")]

    with urllib.request.urlopen(worker.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert metric(text, "inventory_input_gaps_total", topic=ns.settings.orders_topic) >= 1
    assert metric(text, "inventory_input_gaps_total", topic=ns.settings.restocks_topic) >= 1
    assert metric(text, "inventory_input_rewinds_total") >= 2


def test_a_restart_after_the_rewind_applies_nothing_twice(ns, worker):
    before = wait_stock(worker, version=7)
    worker.stop()
    worker.start()
    # a marker restock proves the restarted worker consumed past everything before it
    with CommandProducer(ns.settings) as producer:
        producer.send("RestockReceived", {"sku": SKU, "qty": 2})
        producer.flush()
    after = wait_stock(worker, version=8)
    assert (after["on_hand"], after["reserved"]) == (before["on_hand"] + 2, before["reserved"])
