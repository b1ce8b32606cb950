"""The synchronous reserve API against two real workers on the shared broker.

``w1`` answers within the default timeout; ``w2`` runs with
``INVENTORY_RESERVE_API_TIMEOUT_MS=1`` so that every request it serves takes the 202
path. The SKUs cover every partition, so ``w1`` answers for SKUs that ``w2`` owns.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from harness import Namespace, Worker, restock_and_wait, wait_for, wait_stock
from pipeline.kafka.partitioning import partition_for
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration

PARTITIONS = 4


def post(
    worker: Worker, path: str, body: Any, key: str | None = "k", raw: bytes | None = None
) -> tuple[int, Any, dict[str, str]]:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    req = urllib.request.Request(worker.url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        text = exc.read()
        return exc.code, json.loads(text) if text else None, dict(exc.headers)


def sku_per_partition(tag: str) -> list[str]:
    found: dict[int, str] = {}
    i = 0
    while len(found) < PARTITIONS:
        sku = f"RA-{tag}-{i}"
        found.setdefault(partition_for(sku.encode(), PARTITIONS), sku)
        i += 1
    return [found[p] for p in range(PARTITIONS)]


class Cluster:
    def __init__(self, ns: Namespace, w1: Worker, w2: Worker) -> None:
        self.ns, self.w1, self.w2 = ns, w1, w2
        self.producer = CommandProducer(ns.settings)

    def restock(self, sku: str, qty: int) -> None:
        restock_and_wait(self.w1, self.producer, sku, qty)

    def owned_by(self, worker: Worker) -> set[int]:
        _, body = worker.get_json("/readyz")
        return {int(p) for p in body["partitions"]}


@pytest.fixture(scope="module")
def cluster(kafka: None) -> Iterator[Cluster]:
    ns = Namespace.fresh("rapi", partitions=PARTITIONS)
    w1 = Worker(ns, "w1").start(wait=False)  # the environment is taken at start
    ns.extra_env["INVENTORY_RESERVE_API_TIMEOUT_MS"] = "1"
    w2 = Worker(ns, "w2").start(wait=False)
    try:
        w1.wait_healthy()
        w2.wait_healthy()
        wait_for(
            lambda: w1.status("/healthz") == 200 and w2.status("/healthz") == 200,
            60,
            "both workers healthy after the rebalance",
        )
        c = Cluster(ns, w1, w2)
        yield c
    finally:  # nothing to check after: no clean shutdown needed
        w2.kill()
        w1.kill()


def test_reserve_reject_retry_commit_cancel_on_every_partition(cluster: Cluster) -> None:
    w1 = cluster.w1
    skus = sku_per_partition("a")
    # w1 serves SKUs of partitions w2 owns: the answer still reaches it
    assert cluster.owned_by(cluster.w2), "w2 owns no partition: the test proves nothing"
    for sku in skus:
        cluster.restock(sku, 3)
    for sku in skus:
        order = f"o1-{sku}"
        body = {"order_id": order, "sku": sku, "qty": 2}
        status, got, headers = post(w1, "/reservations", body, key=f"key-{sku}")
        assert status == 200, got
        assert got["outcome"] == "RESERVED" and got["available"] == 1 and got["qty"] == 2
        # a retry with the same key: the original answer, and nothing reserved twice
        status2, again, headers2 = post(w1, "/reservations", body, key=f"key-{sku}")
        assert (status2, again) == (status, got)
        assert headers2.get("Idempotent-Replayed") == "true"
        assert "Idempotent-Replayed" not in headers
        # sold out for a second order: 409 with what is available
        status, got, _ = post(
            w1, "/reservations", {"order_id": f"o2-{sku}", "sku": sku, "qty": 2}, key="x"
        )
        assert status == 409, got
        assert got["outcome"] == "REJECTED" and got["available"] == 1
        # the same key and order with another quantity: refused, not re-answered as if same
        status, got, _ = post(w1, "/reservations", {**body, "qty": 1}, key=f"key-{sku}")
        assert status == 422 and got["error"] == "idempotency_key_mismatch", got
        wait_stock(w1, sku, on_hand=3, reserved=2, available=1)

    sku = skus[0]
    status, got, _ = post(w1, f"/reservations/o1-{sku}/commit", {"sku": sku}, key="c1")
    assert status == 200 and got["outcome"] == "COMMITTED", got
    status, again, _ = post(w1, f"/reservations/o1-{sku}/commit", {"sku": sku}, key="c1")
    assert (status, again) == (200, got)
    status, got, _ = post(w1, f"/reservations/o1-{skus[1]}/cancel", {"sku": skus[1]}, key="r1")
    assert status == 200 and got["outcome"] == "RELEASED", got
    status, got, _ = post(w1, "/reservations/nobody/commit", {"sku": sku}, key="c2")
    assert status == 404 and got["outcome"] == "UNKNOWN_RESERVATION", got
    wait_stock(w1, sku, on_hand=1, reserved=0, available=1)
    wait_stock(w1, skus[1], on_hand=3, reserved=0, available=3)
    for w in (cluster.w1, cluster.w2):  # the status URL is routed to the owner
        assert w.get_json(f"/reservations/o1-{sku}?sku={sku}")[1]["status"] == "COMMITTED"
        assert w.get_json(f"/reservations/o1-{skus[1]}?sku={skus[1]}")[1]["status"] == "RELEASED"


def test_orders_multi_line_commit_and_cancel(cluster: Cluster) -> None:
    w1 = cluster.w1
    a, b, c, _ = sku_per_partition("b")
    for sku in (a, b, c):
        cluster.restock(sku, 2)
    place = {"order_id": "ord-1", "lines": [{"sku": a, "qty": 1}, {"sku": b, "qty": 2}]}
    status, got, _ = post(w1, "/orders", place, key="p1")
    assert status == 200 and got["outcome"] == "ORDER_RESERVED", got
    assert {(x["sku"], x["qty"]) for x in got["lines"]} == {(a, 1), (b, 2)}
    assert post(w1, "/orders", place, key="p1")[:2] == (200, got)
    changed = {**place, "lines": [{"sku": a, "qty": 2}]}
    assert post(w1, "/orders", changed, key="p1")[0] == 422
    # b is all held by ord-1: all or nothing, the failing line names what is available
    other = {"order_id": "ord-2", "lines": [{"sku": c, "qty": 1}, {"sku": b, "qty": 1}]}
    status, got, _ = post(w1, "/orders", other, key="p2")
    assert status == 409 and got["outcome"] == "ORDER_REJECTED", got
    assert [x["available"] for x in got["lines"] if x["sku"] == b] == [0]
    status, got, _ = post(w1, "/orders/ord-1/commit", {}, key="p1c")
    assert status == 200 and got["outcome"] == "ORDER_COMMITTED", got
    place3 = {"order_id": "ord-3", "lines": [{"sku": c, "qty": 2}]}
    assert post(w1, "/orders", place3, key="p3")[0] == 200
    status, got, _ = post(w1, "/orders/ord-3/cancel", {"reason": "changed mind"}, key="p3x")
    assert status == 200 and got["outcome"] == "ORDER_CANCELLED", got
    status, got, _ = post(w1, "/orders/ord-404/commit", {}, key="p4")
    assert status == 404 and got["outcome"] == "ORDER_UNKNOWN", got
    wait_stock(w1, b, on_hand=0, reserved=0)
    wait_stock(w1, c, on_hand=2, reserved=0, available=2)


def test_slow_answer_is_202_with_a_status_url_and_a_retry_gets_the_outcome(
    cluster: Cluster,
) -> None:
    w1, w2 = cluster.w1, cluster.w2  # w2 waits 1 ms for any answer
    skus = sku_per_partition("c")
    for sku in skus:
        cluster.restock(sku, 5)
    sku = skus[0]
    body = {"order_id": "slow-1", "sku": sku, "qty": 4}
    status, got, headers = post(w2, "/reservations", body, key="slow")
    assert status == 202, got
    assert got["status"] == "PENDING" and headers["Location"] == got["status_url"]
    assert got["status_url"] == f"/reservations/slow-1?sku={sku}"
    # the command was sent even though the request stopped waiting
    wait_for(
        lambda: w2.get_json(got["status_url"])[1].get("status") == "RESERVED",
        20,
        "the 202'd reservation to show RESERVED",
    )
    # the retry (on the other worker) gets the outcome; nothing reserved twice
    status, again, _ = post(w1, "/reservations", body, key="slow")
    assert status == 200 and again["outcome"] == "RESERVED" and again["available"] == 1
    wait_stock(w1, sku, on_hand=5, reserved=4)

    order = {"order_id": "slow-ord", "lines": [{"sku": s, "qty": 1} for s in skus[1:]]}
    status, got, _ = post(w2, "/orders", order, key="slow-o")
    assert status == 202 and got["status_url"] == "/orders/slow-ord", got
    wait_for(
        lambda: w2.get_json("/orders/slow-ord")[1].get("status") == "RESERVED",
        20,
        "the 202'd order to show RESERVED",
    )
    assert post(w1, "/orders", order, key="slow-o")[:2][0] == 200


def test_bad_requests_are_answered_at_once_and_send_nothing(cluster: Cluster) -> None:
    w1 = cluster.w1
    sku = f"RA-bad-{uuid.uuid4().hex[:6]}"
    ok = {"order_id": "bad-1", "sku": sku, "qty": 1}
    cases: list[tuple[str, Any, str | None, bytes | None, int, str]] = [
        ("/reservations", None, "k", b"{not json", 400, "invalid_json"),
        ("/reservations", None, "k", b"[1, 2]", 400, "invalid_json"),
        ("/reservations", ok, None, None, 400, "missing_idempotency_key"),
        ("/reservations", ok, "has space", None, 400, "invalid_idempotency_key"),
        ("/reservations", {**ok, "qty": 0}, "k", None, 422, "qty_not_positive"),
        ("/reservations", {**ok, "qty": True}, "k", None, 422, "invalid_field"),
        ("/reservations", {**ok, "qty": "1"}, "k", None, 422, "invalid_field"),
        ("/reservations", {**ok, "sku": ""}, "k", None, 422, "empty_sku"),
        ("/reservations", {**ok, "qty": 10**9}, "k", None, 422, "qty_too_large"),
        ("/reservations", {**ok, "event_id": "mine"}, "k", None, 422, "unknown_field"),
        ("/reservations", {"sku": sku, "qty": 1}, "k", None, 422, "missing_field"),
        ("/orders", {"order_id": "bad-2", "lines": []}, "k", None, 422, "no_lines"),
        ("/orders", {"order_id": "bad-2", "lines": [1]}, "k", None, 422, "invalid_field"),
        ("/orders", None, "k", b"x" * 70_000, 413, "body_too_large"),
    ]
    for path, body, key, raw, want, error in cases:
        status, got, _ = post(w1, path, body, key=key, raw=raw)
        assert (status, got["error"]) == (want, error), (path, body, key, got)
    assert w1.get_json(f"/reservations/bad-1?sku={sku}")[0] == 404
    assert w1.get_json("/reservations/bad-1")[0] == 400
    assert w1.status("/livez") == 200


def test_a_checkout_can_take_a_preorder_and_commit_it_once_the_goods_arrive(
    cluster: Cluster,
) -> None:
    """allow_backorder over HTTP: 200 BACKORDERED with the purchase order and its date,
    409 with the reason once the cap is reached, a retry answers the same; the delivery
    turns the backorder into a hold (the status URL shows it) that the checkout commits."""
    w1 = cluster.w1
    sku = f"RA-pre-{uuid.uuid4().hex[:6]}"
    due = 1_800_000_000_000
    p = cluster.producer
    p.send("BackorderCapSet", {"sku": sku, "max_units": 3})
    p.send("IncomingStock", {"sku": sku, "po_id": "po-1", "qty": 5, "expected_at": due})
    p.flush()
    wait_stock(w1, sku, version=2)
    body = {"order_id": "pre-1", "sku": sku, "qty": 2, "allow_backorder": True}
    status, got, _ = post(w1, "/reservations", body, key="pre-1")
    assert status == 200, got
    assert (got["outcome"], got["qty"], got["po_id"], got["expected_at"]) == (
        "BACKORDERED",
        2,
        "po-1",
        due,
    )
    status, again, headers = post(w1, "/reservations", body, key="pre-1")
    assert (status, again, headers.get("Idempotent-Replayed")) == (200, got, "true")
    # one unit of the cap is left: a second preorder of 2 is refused with the reason
    status, got, _ = post(w1, "/reservations", {**body, "order_id": "pre-2"}, key="pre-2")
    assert status == 409 and got["reason"] == "backorder_cap" and got["available"] == 1, got
    # without allow_backorder a sold-out SKU is refused as before
    plain = {"order_id": "pre-3", "sku": sku, "qty": 1}
    assert post(w1, "/reservations", plain, key="pre-3")[0] == 409
    p.send("RestockReceived", {"sku": sku, "qty": 5, "po_id": "po-1", "final": True})
    p.flush()
    wait_stock(w1, sku, on_hand=5, reserved=2, available=3)
    assert w1.get_json(f"/reservations/pre-1?sku={sku}")[1]["status"] == "RESERVED"
    status, got, _ = post(w1, "/reservations/pre-1/commit", {"sku": sku}, key="pay-pre-1")
    assert status == 200 and got["outcome"] == "COMMITTED", got
    wait_stock(w1, sku, on_hand=3, reserved=0, available=3)
