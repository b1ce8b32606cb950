"""Per-customer caps on the real stack: one worker, HTTP and Kafka producers, kill -9.

Customer ``c1`` has a cap of 2 units of ``SKU`` in sale ``bf`` and sends reserves
and orders over two channels (web over HTTP, mobile over HTTP and straight to Kafka),
some re-sent with the same event id / Idempotency-Key; the worker is killed with
SIGKILL in between and restarted on its data dir, later killed again and started on
an empty one (a restore from the changelog). ``c1`` never holds plus buys more
than 2 units, ``c2`` is not limited by ``c1``'s usage, a release gives the allowance
back and a commit does not, and the refusals are counted in their own metric.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

from harness import Namespace, Worker, metric_total, read_topic, restock_and_wait, wait_for
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration

CAP = 2


def post(worker: Worker, path: str, body: Any, key: str) -> tuple[int, Any, dict[str, str]]:
    """POST as a checkout does: a 503 (a worker still starting) or a 202 (no answer in
    time) is retried with the same Idempotency-Key, which sends the same command again
    and gets its one outcome; the final answer is returned."""
    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
    data = json.dumps(body).encode()
    deadline = time.monotonic() + 60
    while True:
        req = urllib.request.Request(worker.url + path, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                answer = resp.status, json.loads(resp.read()), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            answer = exc.code, json.loads(exc.read()), dict(exc.headers)
        if answer[0] not in (202, 503) or time.monotonic() > deadline:
            return answer
        print(f"POST {path} ({key}): {answer[0]} {answer[1]}; retried")
        time.sleep(0.5)


def held_plus_bought(worker: Worker, sku: str, orders: list[str]) -> int:
    total = 0
    for order in orders:
        status, body = worker.get_json(f"/reservations/{order}?sku={sku}")
        if status == 200 and body["status"] in ("RESERVED", "COMMITTED"):
            total += body["qty"]
    return total


def test_a_customer_cap_holds_across_orders_channels_resends_and_a_crash(kafka: None) -> None:
    # the answers are asserted, so a slow one (a loaded machine, a restarted worker) must
    # not become a 202 with a status URL: that path has its own test (test_reserve_api)
    ns = Namespace.fresh("climit", partitions=2, INVENTORY_RESERVE_API_TIMEOUT_MS="10000")
    w = Worker(ns, "w1").start()
    producer = CommandProducer(ns.settings)
    tag = uuid.uuid4().hex[:6]
    sku, other = f"CL-{tag}", f"CL2-{tag}"
    c1_orders: list[str] = []
    try:
        restock_and_wait(w, producer, other, 10)
        producer.send("CustomerLimitSet", {"sku": sku, "max_units": CAP, "sale_id": "bf"})
        # the restock after the cap on the same topic and partition: once it shows, the
        # cap is applied
        restock_and_wait(w, producer, sku, 10)

        # c1, web over HTTP: 1 unit
        body = {"order_id": "a1", "sku": sku, "qty": 1, "customer_id": "c1", "channel": "web"}
        status, got, _ = post(w, "/reservations", body, key="a1")
        assert (status, got["outcome"]) == (200, "RESERVED"), got
        c1_orders.append("a1")
        # the same request again (same key, so the same event id): nothing reserved twice
        status, again, headers = post(w, "/reservations", body, key="a1")
        assert (status, again) == (200, got) and headers.get("Idempotent-Replayed") == "true"
        # c1, mobile: an order of two SKUs; each SKU applies its own cap (other: none)
        order = {
            "order_id": "a2",
            "lines": [{"sku": sku, "qty": 1}, {"sku": other, "qty": 3}],
            "customer_id": "c1",
            "channel": "mobile",
        }
        status, got, _ = post(w, "/orders", order, key="a2")
        assert (status, got["outcome"]) == (200, "ORDER_RESERVED"), got
        c1_orders.append("a2")
        # c1 is at the cap: a third unit over HTTP is refused, saying 0 are left
        status, got, _ = post(
            w, "/reservations", {**body, "order_id": "a3", "channel": "mobile"}, key="a3"
        )
        assert (status, got["reason"], got["available"]) == (409, "customer_limit", 0), got
        c1_orders.append("a3")
        # an order with a line over the cap is rejected as a whole (its other line released)
        status, got, _ = post(w, "/orders", {**order, "order_id": "a4"}, key="a4")
        assert (status, got["outcome"]) == (409, "ORDER_REJECTED"), got
        assert "customer_limit" in got["reason"], got
        c1_orders.append("a4")
        # straight to Kafka on the mobile channel, the same event id sent three times
        for _ in range(3):
            producer.send(
                "ReserveStock",
                {"event_id": "k-a5", "order_id": "a5", "sku": sku, "qty": 1, "customer_id": "c1"},
            )
        producer.flush()
        c1_orders.append("a5")
        wait_for(lambda: w.get_json(f"/reservations/a5?sku={sku}")[0] == 200, 30, "a5 decided")
        assert w.get_json(f"/reservations/a5?sku={sku}")[1]["reason"] == "customer_limit"
        refused = metric_total(w.url, "inventory_customer_limit_rejections_total")
        assert refused >= 3, refused  # a3, a4's line, a5 (its re-sends are duplicates)

        # kill -9 and restart on the same data dir: the count survives
        w.kill()
        w.start()
        status, got, _ = post(w, "/reservations", {**body, "order_id": "a6"}, key="a6")
        assert (status, got["reason"]) == (409, "customer_limit"), got
        c1_orders.append("a6")
        # c2 is not limited by c1's usage
        status, got, _ = post(
            w, "/reservations", {**body, "order_id": "b1", "customer_id": "c2", "qty": 2}, key="b1"
        )
        assert (status, got["outcome"]) == (200, "RESERVED"), got
        # nor is a reserve without a customer
        status, got, _ = post(
            w, "/reservations", {"order_id": "n1", "sku": sku, "qty": 3}, key="n1"
        )
        assert (status, got["outcome"]) == (200, "RESERVED"), got

        # a commit keeps the units counted; a cancel of the order gives 1 back
        status, got, _ = post(w, "/reservations/a1/commit", {"sku": sku}, key="a1c")
        assert (status, got["outcome"]) == (200, "COMMITTED"), got
        status, got, _ = post(w, "/orders/a2/cancel", {}, key="a2x")
        assert status == 200, got
        wait_for(
            lambda: w.get_json(f"/reservations/a2?sku={sku}")[1]["status"] == "RELEASED",
            30,
            "a2's line released",
        )
        status, got, _ = post(w, "/reservations", {**body, "order_id": "a7", "qty": 2}, key="a7")
        assert (status, got["reason"], got["available"]) == (409, "customer_limit", 1), got
        status, got, _ = post(
            w,
            "/reservations",
            {**body, "order_id": "a8", "qty": 2, "allow_partial": True},
            key="a8",
        )
        assert (status, got["outcome"], got["qty"]) == (200, "RESERVED", 1), got
        c1_orders += ["a7", "a8"]
        assert held_plus_bought(w, sku, c1_orders) == CAP
        # kill -9 again and start cold, on an empty data dir: the counts come back from
        # the changelog (what a crash after a batch's transaction but before its local
        # write leaves)
        w.kill()
        w = Worker(ns, "w1-cold").start()
        status, got, _ = post(w, "/reservations", {**body, "order_id": "a9"}, key="a9")
        assert (status, got["reason"], got["available"]) == (409, "customer_limit", 0), got
        c1_orders.append("a9")
        assert held_plus_bought(w, sku, c1_orders) == CAP
        # every answer of c1 on the results topic: never more than the cap granted at once
        granted = [
            r.value
            for r in read_topic(ns.settings, ns.settings.results_topic, timeout=5)
            if r.value.get("sku") == sku and r.value["order_id"] in c1_orders
        ]
        assert sum(1 for g in granted if g["reason"] == "customer_limit") >= 5
    finally:
        w.kill()
