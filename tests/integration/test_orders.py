"""The order saga on a real broker: contention, duplicates, expiry, bad input, kill -9.

Orders go to ``<prefix>checkouts`` keyed by order id; answers are read from
``<prefix>order-results``. Stock is read from ``GET /stock/{sku}`` and order
state from ``GET /orders/{order_id}``.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from harness import Namespace, Worker, read_topic, wait_for
from pipeline.clients import confluent_config
from pipeline.clock import now_ms
from pipeline.produce import CommandProducer
from schemas.codec import AvroCodec

pytestmark = pytest.mark.integration

CODEC = AvroCodec()
HOLD_OUTCOMES = ("ORDER_RESERVED", "ORDER_REJECTED")


def _settles(v: dict[str, Any]) -> bool:
    return not v["duplicate"] and v["outcome"] not in ("ORDER_INVALID_STATE", "ORDER_UNKNOWN")


@dataclass
class Answers:
    """OrderResults by order id, in arrival order, with their Kafka timestamps (ms)."""

    by_order: dict[str, list[tuple[int, dict[str, Any]]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def first(self, order: str) -> dict[str, Any] | None:
        """The order's first settling answer (not a refusal of a commit/cancel, not a dup)."""
        rs = [v for _, v in self.by_order.get(order, []) if _settles(v)]
        return rs[0] if rs else None

    def outcomes(self, order: str) -> list[str]:
        return [v["outcome"] for _, v in self.by_order.get(order, []) if not v["duplicate"]]


class ResultReader:
    """Follows the order-results topic from the beginning in a background thread."""

    def __init__(self, ns: Namespace) -> None:
        s = ns.settings
        self.topic = s.order_results_topic
        self.consumer = Consumer(
            {
                **confluent_config(s),
                "group.id": f"reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        parts = self.consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
        self.consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
        self.answers = Answers()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            msg = self.consumer.poll(0.1)
            if msg is None or msg.error() is not None:
                continue
            _, value = CODEC.decode(msg.value())
            with self.lock:
                self.answers.by_order[value["order_id"]].append((msg.timestamp()[1], value))

    def wait(self, pred, timeout: float, what: str) -> None:
        def check() -> bool:
            with self.lock:
                return pred(self.answers)

        wait_for(check, timeout, what, interval=0.1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.consumer.close()


class Checkout:
    """Sends order commands, keyed by order id, like a checkout service would."""

    def __init__(self, p: CommandProducer) -> None:
        self.p = p
        self.topic = p.settings.checkouts_topic

    def send(self, name: str, fields: dict[str, Any]) -> str:
        fields = {"event_id": str(uuid.uuid4()), "occurred_at": now_ms(), **fields}
        self.p.send_raw(self.topic, fields["order_id"].encode(), CODEC.encode(name, fields))
        return fields["event_id"]

    def place(self, order: str, lines: list[tuple[str, int]], **kw: Any) -> str:
        return self.send(
            "PlaceOrder",
            {"order_id": order, "lines": [{"sku": s, "qty": q} for s, q in lines], **kw},
        )

    def commit(self, order: str, **kw: Any) -> str:
        return self.send("CommitOrder", {"order_id": order, **kw})

    def cancel(self, order: str, **kw: Any) -> str:
        return self.send("CancelOrder", {"order_id": order, **kw})


def stock(worker: Worker, sku: str) -> dict:
    status, body = worker.get_json(f"/stock/{sku}")
    assert status == 200, body
    return body


def order_state(worker: Worker, order: str) -> dict:
    status, body = worker.get_json(f"/orders/{order}")
    assert status == 200, body
    return body


def restock(ns: Namespace, units: dict[str, int]) -> None:
    with CommandProducer(ns.settings) as p:
        for sku, qty in units.items():
            p.send("RestockReceived", {"sku": sku, "qty": qty})


def check_at_rest(worker: Worker, orders: dict[str, list[tuple[str, int]]], skus, initial):
    """Every order settled; the ledger's holds are exactly the RESERVED orders' lines."""
    reserved: dict[str, int] = defaultdict(int)
    committed: dict[str, int] = defaultdict(int)
    for order in orders:
        st = order_state(worker, order)
        assert st["outstanding"] == 0, st
        assert st["status"] in (
            "RESERVED",
            "REJECTED",
            "COMMITTED",
            "CANCELLED",
            "EXPIRED",
        ), st
        for line in st["lines"]:
            if st["status"] == "RESERVED":
                assert line["state"] == "RESERVED", st
                reserved[line["sku"]] += line["qty"]
            else:
                assert line["state"] != "RESERVED" and line["state"] != "PENDING", st
            if line["state"] == "COMMITTED":
                committed[line["sku"]] += line["qty"]
    for sku in skus:
        body = stock(worker, sku)
        assert body["reserved"] == reserved[sku], (sku, body, reserved[sku])
        assert body["on_hand"] == initial[sku] - committed[sku], (sku, body)
        assert 0 <= body["reserved"] <= body["on_hand"]
    return reserved, committed


# --------------------------------------------------------------------------- one worker


@pytest.fixture(scope="module")
def ns() -> Namespace:
    return Namespace.fresh("orders", partitions=4, INVENTORY_EXPIRY_SCAN_INTERVAL_S="0.2")


@pytest.fixture(scope="module")
def worker(ns, kafka):
    with CommandProducer(ns.settings):
        pass  # creates the namespace's topics
    w = Worker(ns).start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def reader(ns, worker):
    r = ResultReader(ns)
    yield r
    r.close()


@pytest.fixture()
def checkout(ns):
    with CommandProducer(ns.settings) as p:
        yield Checkout(p)


def test_contention_for_the_last_units(ns, worker, reader):
    skus = ["HOT-A", "HOT-B", "HOT-C"]
    initial = {"HOT-A": 30, "HOT-B": 20, "HOT-C": 10}
    restock(ns, initial)
    wait_for(lambda: all(worker.status(f"/stock/{s}") == 200 for s in skus), 30, "stock")
    rng = random.Random(11)
    orders: dict[str, list[tuple[str, int]]] = {}
    for i in range(240):
        lines = [(rng.choice(skus), rng.randint(1, 2)) for _ in range(rng.randint(1, 4))]
        orders[f"flash-{i}"] = lines
    names = list(orders)

    def send(part: list[str]) -> None:
        with CommandProducer(ns.settings) as p:
            c = Checkout(p)
            for order in part:
                c.place(order, orders[order])

    threads = [threading.Thread(target=send, args=(names[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.wait(lambda a: all(a.first(o) for o in orders), 90, "every order answered")

    with reader.lock:
        firsts = {o: reader.answers.first(o) for o in orders}
    outcomes = {v["outcome"] for v in firsts.values()}
    assert outcomes <= set(HOLD_OUTCOMES), outcomes
    assert "ORDER_REJECTED" in outcomes and "ORDER_RESERVED" in outcomes
    for o, v in firsts.items():
        summed: dict[str, int] = defaultdict(int)
        for s, q in orders[o]:
            summed[s] += q
        assert {x["sku"]: x["qty"] for x in v["lines"]} == summed
        if v["outcome"] == "ORDER_REJECTED":
            assert any(x["outcome"] == "REJECTED" for x in v["lines"]), v
            assert all(x["outcome"] in ("REJECTED", "RELEASED") for x in v["lines"]), v
    reserved, _ = check_at_rest(worker, orders, skus, initial)
    # the last units went somewhere: no SKU has more free units than the smallest rejected line
    assert sum(reserved.values()) > 0

    # commit half of the reserved orders, cancel the rest: stock conserved exactly
    held = [o for o, v in firsts.items() if v["outcome"] == "ORDER_RESERVED"]
    with CommandProducer(ns.settings) as p:
        c = Checkout(p)
        for i, o in enumerate(held):
            (c.commit if i % 2 == 0 else c.cancel)(o)
    want = {o: ("ORDER_COMMITTED" if i % 2 == 0 else "ORDER_CANCELLED") for i, o in enumerate(held)}
    reader.wait(
        lambda a: all(want[o] in a.outcomes(o) for o in held), 60, "commits and cancels answered"
    )
    _, committed = check_at_rest(worker, orders, skus, initial)
    for sku in skus:
        assert stock(worker, sku)["reserved"] == 0
    assert sum(committed.values()) == sum(reserved.values()) - sum(
        q for i, o in enumerate(held) if i % 2 for _, q in orders[o]
    )
    # settle time: PlaceOrder's occurred_at (set at send) to the OrderResult's timestamp
    _report_settle(ns, orders, reader)


def _report_settle(ns, orders, reader) -> None:
    # occurred_at of each PlaceOrder, read back from the checkouts topic
    s = ns.settings
    placed = read_topic(
        s,
        s.checkouts_topic,
        timeout=30,
        until=lambda rs: len({r.value.get("order_id") for r in rs}) >= len(orders),
    )
    at = {r.value["order_id"]: r.value["occurred_at"] for r in placed if r.name == "PlaceOrder"}
    with reader.lock:
        lat = sorted(
            next(t for t, v in reader.answers.by_order[o] if _settles(v)) - at[o] for o in orders
        )
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(f"\nsettle time over {len(lat)} orders: p50 {p50:.0f} ms, p99 {p99} ms, max {lat[-1]} ms")


def test_duplicate_place_order_is_answered_with_the_first_outcome(ns, worker, reader, checkout):
    restock(ns, {"DUP-A": 5, "DUP-B": 5})
    first = checkout.place("dup-1", [("DUP-A", 2), ("DUP-B", 1)])
    checkout.p.flush()
    reader.wait(lambda a: a.first("dup-1") is not None, 30, "first answer")
    second = checkout.place("dup-1", [("DUP-A", 5)])
    checkout.p.flush()
    reader.wait(
        lambda a: any(v["duplicate"] for _, v in a.by_order["dup-1"]), 30, "duplicate answer"
    )
    with reader.lock:
        answers = [v for _, v in reader.answers.by_order["dup-1"]]
    assert answers[0]["event_id"] == first and answers[0]["outcome"] == "ORDER_RESERVED"
    dup = next(v for v in answers if v["duplicate"])
    assert dup["event_id"] == second and dup["outcome"] == "ORDER_RESERVED"
    assert stock(worker, "DUP-A")["reserved"] == 2 and stock(worker, "DUP-B")["reserved"] == 1


def test_orders_expire_whole(ns, worker, reader, checkout):
    restock(ns, {"EXP-A": 4, "EXP-B": 4})
    checkout.place("exp-1", [("EXP-A", 2), ("EXP-B", 3)], ttl_ms=1500)
    checkout.place("exp-2", [("EXP-A", 1)], ttl_ms=60_000)
    checkout.p.flush()
    reader.wait(lambda a: "ORDER_EXPIRED" in a.outcomes("exp-1"), 30, "expiry")
    assert reader.answers.outcomes("exp-1") == ["ORDER_RESERVED", "ORDER_EXPIRED"]
    wait_for(lambda: stock(worker, "EXP-B")["reserved"] == 0, 10, "EXP-B released")
    assert stock(worker, "EXP-A")["reserved"] == 1  # exp-2 still holds its unit
    late = checkout.commit("exp-1")
    checkout.p.flush()
    reader.wait(
        lambda a: any(v["event_id"] == late for _, v in a.by_order["exp-1"]), 30, "late commit"
    )
    ans = next(v for _, v in reader.answers.by_order["exp-1"] if v["event_id"] == late)
    assert ans["outcome"] == "ORDER_INVALID_STATE" and ans["reason"] == "order is EXPIRED"
    # a commit stamped past the expiry expires the order instead
    checkout.place("exp-3", [("EXP-B", 1)], ttl_ms=60_000)
    checkout.p.flush()
    reader.wait(lambda a: a.first("exp-3") is not None, 30, "exp-3 reserved")
    checkout.commit("exp-3", occurred_at=now_ms() + 120_000)
    checkout.p.flush()
    reader.wait(lambda a: "ORDER_EXPIRED" in a.outcomes("exp-3"), 30, "commit past expiry")
    wait_for(lambda: stock(worker, "EXP-B")["reserved"] == 0, 10, "EXP-B released again")


def test_bad_order_commands_go_to_dead_letters(ns, worker, reader, checkout):
    checkout.place("bad-1", [])
    checkout.place("bad-2", [("BAD-A", 0)])
    checkout.place("bad-3", [("", 1)])
    checkout.commit("never-placed")
    checkout.p.send_raw(checkout.topic, b"bad-4", b"\x00garbage")
    checkout.p.flush()
    s = ns.settings

    def reasons(rs) -> dict[str, str]:
        out = {}
        for r in rs:
            if r.name == "DeadLetter" and r.value["source_topic"] == s.checkouts_topic:
                out[(r.key or b"").decode()] = r.value["reason"]
        return out

    dls = read_topic(s, s.dead_letters_topic, timeout=30, until=lambda rs: len(reasons(rs)) >= 5)
    assert reasons(dls) == {
        "bad-1": "no_lines",
        "bad-2": "qty_not_positive",
        "bad-3": "empty_sku",
        "never-placed": "unknown_order",
        "bad-4": "unknown_schema",
    }
    reader.wait(lambda a: a.outcomes("never-placed") == ["ORDER_UNKNOWN"], 30, "unknown answer")


# --------------------------------------------------------------------------- kill -9


def test_kill_9_mid_saga_leaves_nothing_half_reserved(kafka):
    ns = Namespace.fresh("orders-kill", partitions=4, INVENTORY_EXPIRY_SCAN_INTERVAL_S="0.5")
    skus = [f"K-{i}" for i in range(4)]
    initial = {s: 40 for s in skus}
    restock(ns, initial)
    worker = Worker(ns).start()
    reader = ResultReader(ns)
    rng = random.Random(5)
    orders: dict[str, list[tuple[str, int]]] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def load() -> None:
        try:
            with CommandProducer(ns.settings) as p:
                c = Checkout(p)
                i = 0
                while not stop.is_set():
                    order = f"k-{i}"
                    lines = [
                        (rng.choice(skus), rng.randint(1, 3)) for _ in range(rng.randint(2, 3))
                    ]
                    orders[order] = lines
                    c.place(order, lines)
                    if rng.random() < 0.1:
                        c.place(order, lines)  # a checkout retrying
                    if i >= 5 and rng.random() < 0.5:
                        old = f"k-{rng.randrange(i - 5)}" if i > 5 else "k-0"
                        (c.commit if rng.random() < 0.5 else c.cancel)(old)
                    i += 1
                    p.flush()
                    time.sleep(0.03)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    kills = 0
    try:
        for _ in range(3):
            time.sleep(rng.uniform(1.0, 3.0))
            worker.kill()
            kills += 1
            worker.start()
        time.sleep(1.0)
        stop.set()
        t.join(30)
        assert not errors, errors
        reader.wait(lambda a: all(a.first(o) for o in orders), 90, "every order answered")

        def settled() -> bool:
            return all(order_state(worker, o)["outstanding"] == 0 for o in orders)

        wait_for(settled, 60, "every saga settled", interval=1.0)
        check_at_rest(worker, orders, skus, initial)
        with reader.lock:
            for o in orders:
                first = reader.answers.first(o)
                assert first is not None
                assert first["outcome"] in HOLD_OUTCOMES + ("ORDER_CANCELLED",), (o, first)
        print(f"\nkill -9 mid-saga: {kills} kills, {len(orders)} orders, all settled")
    finally:
        stop.set()
        reader.close()
        worker.stop()


def test_settle_time_one_order_at_a_time(ns, worker, reader, checkout):
    """Latency without queueing: each PlaceOrder is sent after the previous one settled."""
    restock(ns, {"LAT-A": 100, "LAT-B": 100, "LAT-C": 100})
    lat = []
    for i in range(30):
        order = f"lat-{i}"
        sent = now_ms()
        checkout.place(order, [("LAT-A", 1), ("LAT-B", 1), ("LAT-C", 1)], occurred_at=sent)
        checkout.p.flush()
        reader.wait(lambda a, o=order: a.first(o) is not None, 30, order)
        with reader.lock:
            ts = next(t for t, v in reader.answers.by_order[order] if _settles(v))
        lat.append(ts - sent)
    lat.sort()
    print(
        f"\nunloaded settle time, 3-line orders: p50 {statistics.median(lat):.0f} ms, "
        f"p99 {lat[-1]} ms (max of {len(lat)})"
    )
