"""The live stock stream of a real worker, fed by a simulated Redis sink.

The tests write the Redis hash and PUBLISH the change themselves (what the sink
does), so they check the SSE endpoint alone. The worker runs with the sink off
and its own Redis key prefix.
"""

from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

import pytest
import redis

from config.settings import Settings, settings
from faults import PrivateRedis
from harness import OUT, Namespace, Worker, metric_total, wait_for
from pipeline.web.live import decode_event_id

pytestmark = pytest.mark.integration


@dataclass
class Event:
    event: str
    id: str | None
    data: dict[str, Any]


class SSEClient:
    """A raw HTTP/1.1 SSE reader on a thread: events land in :attr:`events`."""

    def __init__(self, worker: Worker, skus: str, last_event_id: str | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=60)
        self.conn.connect()
        self.sock = self.conn.sock
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", f"/live/stock?sku={quote(skus, safe=',')}", headers=headers)
        self.response = self.conn.getresponse()
        self.events: queue.Queue[Event] = queue.Queue()
        self.comments: list[str] = []
        self.retry: list[int] = []
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fields: dict[str, str] = {}
        try:
            while True:
                raw = self.response.readline()
                if not raw:
                    return
                line = raw.decode("utf-8").rstrip("\r\n")
                if line == "":
                    if "data" in fields:
                        self.events.put(
                            Event(
                                fields.get("event", "message"),
                                fields.get("id"),
                                json.loads(fields["data"]),
                            )
                        )
                    fields = {}
                elif line.startswith(":"):
                    self.comments.append(line)
                else:
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "retry":
                        self.retry.append(int(value))
                    else:
                        fields[name] = value
        except (OSError, ValueError, http.client.HTTPException):
            return
        finally:
            self.ended.set()

    def next(self, timeout: float = 10.0) -> Event:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no SSE event within {timeout}s") from None

    def take_until(self, sku: str, version: int, timeout: float = 10.0) -> list[Event]:
        """Events up to and including ``sku`` at ``version`` (a sentinel)."""
        out: list[Event] = []
        deadline = time.monotonic() + timeout
        while True:
            event = self.next(max(0.1, deadline - time.monotonic()))
            out.append(event)
            if event.data["sku"] == sku and event.data["version"] == version:
                return out

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)  # the reader sees EOF; closing under it would race
        self.conn.close()


class FakeSink:
    """Does what the Redis sink does for one change: HSET the hash, PUBLISH the JSON."""

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg
        self.r = redis.Redis.from_url(cfg.redis_url, decode_responses=True)

    def change(self, sku: str, version: int, available: int, *, publish: bool = True) -> None:
        self.write(sku, version, available)
        if publish:
            self.publish(sku, version, available)

    def write(self, sku: str, version: int, available: int) -> None:
        now = int(time.time() * 1000)
        self.r.hset(
            self.cfg.redis_stock_key(sku),
            mapping={
                "on_hand": available,
                "reserved": 0,
                "safety_stock": 0,
                "available": available,
                "in_stock": 1 if available > 0 else 0,
                "version": version,
                "updated_at": now,
                "occurred_at": now - 5,
            },
        )

    def publish(self, sku: str, version: int, available: int, in_stock: Any = None) -> None:
        now = int(time.time() * 1000)
        message = {
            "sku": sku,
            "version": version,
            "on_hand": available,
            "reserved": 0,
            "safety_stock": 0,
            "available": available,
            "in_stock": available > 0 if in_stock is None else in_stock,
            "updated_at": now,
            "occurred_at": now - 5,
        }
        self.r.publish(self.cfg.redis_channel, json.dumps(message))

    def cleanup(self) -> None:
        keys = list(self.r.scan_iter(match=f"{self.cfg.redis_key_prefix}*", count=500))
        if keys:
            self.r.delete(*keys)
        self.r.close()


CAP = 4


@pytest.fixture
def live(kafka, redis_service):
    """A worker with the sink off and its own Redis prefix, plus a fake sink on that prefix."""
    prefix = f"live-test-{uuid.uuid4().hex[:10]}:"
    ns = Namespace.fresh(
        "live",
        INVENTORY_REDIS_KEY_PREFIX=prefix,
        INVENTORY_SINK_ENABLED="0",
        INVENTORY_LIVE_MAX_CONNECTIONS=str(CAP),  # no test here opens more but the cap's
    )
    worker = Worker(ns).start()
    sink = FakeSink(replace(settings, redis_key_prefix=prefix))
    try:
        yield worker, sink
    finally:
        worker.stop()
        sink.cleanup()
    assert worker.proc is not None and worker.proc.returncode == 0, worker.tail()


def live_subscribers(sink: FakeSink) -> list[dict[str, Any]]:
    name = "live:" + sink.cfg.redis_channel
    return [c for c in sink.r.client_list(_type="pubsub") if c.get("name") == name]


def wait_subscribed(sink: FakeSink) -> None:
    wait_for(lambda: len(live_subscribers(sink)) == 1, 10, "the worker's live subscription")


def versions(events: list[Event]) -> list[tuple[str, int]]:
    return [(e.data["sku"], e.data["version"]) for e in events]


def test_a_stream_sends_the_snapshot_then_live_changes_of_its_skus_only(live):
    worker, sink = live
    sink.change("A", 3, 8, publish=False)
    sink.change("C", 1, 4, publish=False)
    client = SSEClient(worker, "A,B")
    try:
        assert client.response.status == 200
        assert client.response.getheader("Content-Type").startswith("text/event-stream")
        first = client.next()
        assert (first.event, first.data["sku"], first.data["version"]) == ("stock", "A", 3)
        assert first.data == {
            **first.data,
            "on_hand": 8,
            "reserved": 0,
            "safety_stock": 0,
            "available": 8,
            "in_stock": True,
        }
        assert client.retry == [1000]
        wait_subscribed(sink)

        sink.change("C", 2, 3)  # not requested
        sink.change("B", 1, 0)
        sink.change("A", 4, 7)
        sink.publish("A", 2, 9)  # stale: below what the stream sent
        sink.publish("A", 4, 7)  # duplicate
        sink.publish("A", 5, 0, in_stock=0)  # in_stock as 1/0
        sink.publish("B", 2, 5, in_stock=1)  # sentinel: pub/sub keeps order
        events = client.take_until("B", 2)

        assert versions(events) == [("B", 1), ("A", 4), ("A", 5), ("B", 2)]
        assert [e.data["in_stock"] for e in events] == [False, True, False, True]
        assert all(e.event == "stock" for e in events)
        assert decode_event_id(events[-1].id, ["A", "B"]) == {"A": 5, "B": 2}
        assert client.events.empty()
    finally:
        client.close()


def test_a_reconnect_with_last_event_id_sends_only_newer_versions(live):
    worker, sink = live
    sink.change("A", 5, 5, publish=False)
    sink.change("B", 2, 2, publish=False)
    first = SSEClient(worker, "A,B")
    try:
        got = [first.next(), first.next()]
        assert sorted(versions(got)) == [("A", 5), ("B", 2)]
        last_id = got[-1].id
        assert decode_event_id(last_id, ["A", "B"]) == {"A": 5, "B": 2}
    finally:
        first.close()

    sink.change("A", 6, 4)  # while the browser is away: nobody hears the publish
    resumed = SSEClient(worker, "A,B", last_event_id=last_id)
    try:
        assert versions([resumed.next()]) == [("A", 6)]
        wait_subscribed(sink)
        sink.change("B", 3, 1)
        assert versions(resumed.take_until("B", 3)) == [("B", 3)]
    finally:
        resumed.close()

    # an id of another stream (or garbage) starts over with the full snapshot
    fresh = SSEClient(worker, "A,B", last_event_id="0badc0de:1,1")
    try:
        assert sorted(versions([fresh.next(), fresh.next()])) == [("A", 6), ("B", 3)]
    finally:
        fresh.close()


def test_a_stale_published_version_is_not_forwarded(live):
    worker, sink = live
    sink.change("A", 10, 5, publish=False)
    client = SSEClient(worker, "A")
    try:
        assert versions([client.next()]) == [("A", 10)]
        wait_subscribed(sink)
        for stale in (9, 1, 10):
            sink.publish("A", stale, 99)
        sink.change("A", 11, 4)
        events = client.take_until("A", 11)
        assert versions(events) == [("A", 11)]
        assert events[0].data["available"] == 4
    finally:
        client.close()


def test_streams_share_one_subscription_and_catch_up_after_it_is_lost(live):
    worker, sink = live
    sink.change("A", 1, 5, publish=False)
    one, two = SSEClient(worker, "A"), SSEClient(worker, "A,B")
    try:
        assert versions([one.next()]) == versions([two.next()]) == [("A", 1)]
        wait_subscribed(sink)
        time.sleep(0.5)
        assert len(live_subscribers(sink)) == 1  # one per worker, not one per stream

        # a change whose PUBLISH is lost because the subscription is down
        sink.change("A", 2, 3, publish=False)
        for client in live_subscribers(sink):
            sink.r.execute_command("CLIENT", "KILL", "ID", client["id"])

        # the streams stay open and catch up from the hashes once resubscribed
        assert versions([one.next(15)]) == versions([two.next(15)]) == [("A", 2)]
        wait_subscribed(sink)
        sink.change("B", 1, 1)
        assert versions(two.take_until("B", 1)) == [("B", 1)]
        assert not one.ended.is_set() and not two.ended.is_set()
    finally:
        one.close()
        two.close()


def test_closed_streams_are_cleaned_up(live):
    worker, sink = live
    clients = [SSEClient(worker, f"S{i}") for i in range(3)]
    wait_subscribed(sink)
    for client in clients:
        client.close()

    def open_streams() -> float:
        with urllib.request.urlopen(worker.url + "/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("inventory_live_streams "):
                    return float(line.split()[1])
        return -1

    wait_for(lambda: open_streams() == 0, 10, "the closed streams to be released")


def test_past_the_cap_a_stream_is_refused_503_until_one_closes(live):
    worker, sink = live
    clients = [SSEClient(worker, f"C{i}") for i in range(CAP)]
    try:
        assert all(c.response.status == 200 for c in clients)
        wait_subscribed(sink)
        conn = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=10)
        conn.request("GET", "/live/stock?sku=C9")
        refused = conn.getresponse()
        body = json.loads(refused.read())
        conn.close()
        assert refused.status == 503
        assert refused.getheader("Content-Type", "").startswith("application/json")
        assert refused.getheader("Retry-After") == "5"
        assert body["error"] == "too_many_streams" and str(CAP) in body["detail"]
        assert metric_total(worker.url, "inventory_live_refused_total") == 1
        clients.pop().close()  # one leaves: its slot is free within about a second
        wait_for(
            lambda: metric_total(worker.url, "inventory_live_streams") == CAP - 1,
            10,
            "the slot to be freed",
        )
        clients.append(SSEClient(worker, "C9"))
        assert clients[-1].response.status == 200
        sink.change("C9", 1, 3)
        assert clients[-1].next().data["sku"] == "C9"  # a stream like any other
    finally:
        for c in clients:
            c.close()


def http_get(worker: Worker, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(worker.url + path, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?sku=",
        "?sku=A,,B",
        "?sku=%01",
        "?sku=" + "x" * 65,
        "?sku=" + ",".join(map(str, range(51))),
    ],
)
def test_a_bad_sku_query_is_answered_400(live, query):
    worker, _ = live
    status, ctype, body = http_get(worker, "/live/stock" + query)
    assert status == 400, body
    assert ctype.startswith("application/json") and json.loads(body)["error"] == "bad_request"


def test_the_product_page_is_served_for_a_valid_sku_only(live):
    worker, _ = live
    status, ctype, body = http_get(worker, "/product/SKU-1")
    assert status == 200 and ctype.startswith("text/html")
    assert b'id="available"' in body and b"/live/stock?sku=" in body
    assert http_get(worker, "/product/%01")[0] == 400


def test_a_stopping_worker_ends_its_open_streams_at_once(live):
    worker, sink = live
    sink.change("A", 1, 1, publish=False)
    client = SSEClient(worker, "A")
    try:
        assert versions([client.next()]) == [("A", 1)]
        started = time.monotonic()
        worker.stop()
        assert client.ended.wait(10), "the stream outlived the worker"
        assert time.monotonic() - started < 20, "open streams held up the shutdown"
    finally:
        client.close()


def test_streams_stay_open_while_redis_is_down_and_catch_up_when_it_returns(kafka):
    server = PrivateRedis(OUT / f"live-redis-{uuid.uuid4().hex[:8]}").start()
    ns = Namespace.fresh("live", INVENTORY_REDIS_URL=server.url, INVENTORY_SINK_ENABLED="0")
    sink = FakeSink(replace(settings, redis_url=server.url))
    worker = None
    client = None
    try:
        worker = Worker(ns).start()
        sink.change("A", 1, 5, publish=False)
        client = SSEClient(worker, "A")
        assert versions([client.next()]) == [("A", 1)]
        wait_subscribed(sink)

        sink.change("A", 2, 4, publish=False)  # its publish is lost with the outage
        sink.r.close()
        server.stop()
        time.sleep(3)  # the worker retries against a refused port meanwhile
        assert not client.ended.is_set(), "the stream closed while Redis was down"
        assert client.events.empty()

        server.start()  # same port, same data
        assert versions([client.next(20)]) == [("A", 2)]
        wait_subscribed(sink)
        sink.change("A", 3, 2)
        assert versions(client.take_until("A", 3)) == [("A", 3)]
    finally:
        if client is not None:
            client.close()
        if worker is not None:
            worker.stop()
        server.stop()
    assert worker.proc.returncode == 0, worker.tail()
