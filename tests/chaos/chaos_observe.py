"""What the chaos run sent and what it sees: the ledger of commands, the tail
of the output topics, the Redis/OpenSearch projections and their sampler."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from chaos_plan import TERMINAL, OrderInfo
from config.settings import Settings
from config.settings import settings as base
from pipeline.clients import confluent_config
from pipeline.kafka.reading import read_to_end
from pipeline.produce import CommandProducer, DeliveryError, producer_config
from schemas.codec import AvroCodec, DecodeError


class Ledger:
    """Every command sent (by event_id), every order and restock, and delivery counts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commands: dict[str, tuple[str, dict[str, Any]]] = {}
        self.attempted: Counter[str] = Counter()
        self.delivered: Counter[str] = Counter()
        self.orders: dict[str, OrderInfo] = {}
        self.restocks: dict[str, tuple[str, int]] = {}  # event_id -> (sku, qty)
        self.sku_round: dict[str, int] = {}
        self.round_sends: Counter[int] = Counter()
        self.event_round: dict[str, int] = {}
        self.sent_at: dict[str, float] = {}  # event_id -> time.time() of its first send
        self.failures: list[str] = []

    def on_delivery(self, label: str, topic: str, partition: int, offset: int) -> None:
        with self.lock:
            self.delivered[label] += 1

    def send(self, p: CommandProducer, type_name: str, fields: dict[str, Any], rnd: int) -> None:
        with self.lock:
            self.commands.setdefault(fields["event_id"], (type_name, dict(fields)))
            self.attempted[fields["event_id"]] += 1
            self.event_round.setdefault(fields["event_id"], rnd)
            self.sent_at.setdefault(fields["event_id"], time.time())
            self.round_sends[rnd] += 1
        p.send(type_name, fields)

    def add_order(self, info: OrderInfo) -> None:
        with self.lock:
            self.orders[info.order_id] = info

    def add_restock(self, event_id: str, sku: str, qty: int) -> None:
        with self.lock:
            self.restocks[event_id] = (sku, qty)


class QuietProducer(CommandProducer):
    """The pipeline's producer, minus librdkafka's warnings while the broker is away."""

    def __init__(self, cfg: Settings, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self._producer = Producer({**producer_config(cfg), "log_level": 2})


def flush(p: CommandProducer, ledger: Ledger, timeout: float = 300.0) -> None:
    """Flush through a broker outage; delivery failures are recorded, not raised."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            p.flush(timeout=10)
            return
        except DeliveryError as exc:
            if "failed" in str(exc):
                with ledger.lock:
                    ledger.failures.append(str(exc)[:300])
            if "unacknowledged" not in str(exc):
                return
            if time.monotonic() > deadline:
                with ledger.lock:
                    ledger.failures.append(f"flush gave up after {timeout}s: {exc}")
                return


# --------------------------------------------------------------------------
# reading the output topics


@dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int
    name: str
    value: dict[str, Any]
    ts: int


class TopicTail(threading.Thread):
    """Reads results, stock changes and dead letters from offset 0 for the whole run.

    Keeps every record by (topic, partition, offset); a position read twice (after a
    reconnect) with other content is recorded in ``rewritten``.
    """

    def __init__(self, s: Settings) -> None:
        super().__init__(daemon=True, name="chaos-tail")
        self.s = s
        self.topics = (s.results_topic, s.stock_changes_topic, s.dead_letters_topic)
        self.codec = AvroCodec()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.seen: dict[tuple[str, int, int], Rec] = {}
        self.next_offset: dict[tuple[str, int], int] = defaultdict(int)
        self.rewritten: list[str] = []
        self.undecodable: list[str] = []
        self.by_event: dict[str, list[dict[str, Any]]] = defaultdict(list)  # results
        self.by_order: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.changes: dict[str, list[dict[str, Any]]] = defaultdict(list)  # sku -> StockChanged
        self.dead: list[dict[str, Any]] = []
        self.errors = 0
        self.error_log: list[str] = []  # the first consumer errors, for the report
        self.refilled = 0  # records only a re-read from the beginning found

    def run(self) -> None:
        consumer = Consumer(
            confluent_config(
                self.s,
                **{
                    "group.id": f"chaos-tail-{uuid.uuid4().hex}",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    # the end of a partition written in transactions is a marker, never
                    # delivered: the end-of-partition event tells how far reading got
                    "enable.partition.eof": True,
                    "log_level": 2,
                },
            )
        )
        tps = []
        for topic in self.topics:
            meta = consumer.list_topics(topic, timeout=30)
            for p in meta.topics[topic].partitions:
                tps.append(TopicPartition(topic, p, OFFSET_BEGINNING))
        consumer.assign(tps)
        try:
            while not self.stop_event.is_set():
                for msg in consumer.consume(500, 0.2):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            key = (msg.topic(), msg.partition())
                            with self.lock:
                                self.next_offset[key] = max(self.next_offset[key], msg.offset())
                        else:
                            self._error(str(err))
                        continue
                    self._add(msg)
        except Exception as exc:  # noqa: BLE001 - recorded: the checks refill from the topics
            self._error(f"tail stopped: {exc!r}")
            raise
        finally:
            consumer.close()

    def _error(self, text: str) -> None:
        with self.lock:
            self.errors += 1
            if len(self.error_log) < 20:
                self.error_log.append(f"{time.strftime('%H:%M:%S')} {text[:200]}")

    def refill(self, timeout: float = 120.0) -> int:
        """Re-read every tailed topic from the beginning to its end now, adding what the
        live tail has not seen (a position seen twice is compared, as in the tail). The
        check's ground truth does not depend on one long-lived consumer surviving broker
        restarts; returns how many records only this pass found."""
        before = len(self.seen)
        codec = AvroCodec()  # the tail thread decodes with its own
        for topic in self.topics:
            for msg in read_to_end(self.s, topic, timeout=timeout):
                self._add(msg, codec)
        with self.lock:
            found = len(self.seen) - before
            self.refilled += found
        return found

    def lag(self, high: dict[tuple[str, int], int]) -> dict[str, int]:
        """Records each tailed partition is behind ``high`` (only the ones behind)."""
        with self.lock:
            return {
                f"{t}/{p}": hw - self.next_offset[(t, p)]
                for (t, p), hw in high.items()
                if self.next_offset[(t, p)] < hw
            }

    def _add(self, msg: Any, codec: AvroCodec | None = None) -> None:
        topic, part, off = msg.topic(), msg.partition(), msg.offset()
        try:
            name, value = (codec or self.codec).decode(msg.value() or b"")
        except DecodeError:
            name, value = "?", {"raw": repr((msg.value() or b"")[:60])}
        rec = Rec(topic, part, off, name, value, msg.timestamp()[1])
        with self.lock:
            self.next_offset[(topic, part)] = max(self.next_offset[(topic, part)], off + 1)
            prev = self.seen.get((topic, part, off))
            if prev is not None:
                if (prev.name, prev.value) != (name, value):
                    self.rewritten.append(f"{topic}/{part}@{off}: {prev.value} then {value}")
                return
            self.seen[(topic, part, off)] = rec
            if name == "?":
                self.undecodable.append(f"{topic}/{part}@{off}")
            elif topic == self.s.results_topic:
                self.by_event[value["event_id"]].append(value)
                self.by_order[value["order_id"]].append(value)
            elif topic == self.s.stock_changes_topic and name == "StockChanged":
                self.changes[value["sku"]].append(value)
            elif topic == self.s.dead_letters_topic:
                self.dead.append(value)

    def answers(self, event_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.by_event.get(event_id, ()))

    def first_answer(self, event_id: str) -> dict[str, Any] | None:
        with self.lock:
            got = self.by_event.get(event_id)
            return dict(got[0]) if got else None

    def caused_change(self, sku: str, event_id: str) -> bool:
        with self.lock:
            return any(c["cause_event_id"] == event_id for c in self.changes.get(sku, ()))

    def closed(self, order_id: str) -> bool:
        """True once a non-duplicate COMMITTED, RELEASED or EXPIRED answer of the order arrived."""
        with self.lock:
            return any(
                a["outcome"] in TERMINAL and not a["duplicate"]
                for a in self.by_order.get(order_id, ())
            )

    def max_version(self, sku: str) -> int:
        with self.lock:
            return max((c["version"] for c in self.changes.get(sku, ())), default=0)

    def caught_up(self, high: dict[tuple[str, int], int]) -> bool:
        with self.lock:
            return all(self.next_offset[tp] >= hw for tp, hw in high.items())

    def snapshot(self) -> tuple[dict[str, list[dict]], dict[str, list[dict]], list[dict]]:
        with self.lock:
            return (
                {k: list(v) for k, v in self.by_event.items()},
                {k: list(v) for k, v in self.changes.items()},
                list(self.dead),
            )


def high_watermarks(s: Settings, topics: Iterable[str]) -> dict[tuple[str, int], int]:
    c = Consumer(confluent_config(s, **{"group.id": "chaos-hw", "log_level": 2}))
    try:
        out = {}
        for topic in topics:
            for p in c.list_topics(topic, timeout=30).topics[topic].partitions:
                _, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
                out[(topic, p)] = hi
        return out
    finally:
        c.close()


def read_all(
    s: Settings, topic: str, decode: Callable[[bytes], Any], timeout: float = 120.0
) -> list[tuple[int, int, bytes | None, Any]]:
    """(partition, offset, key, decoded value) of every committed record now in ``topic``."""
    return [
        (msg.partition(), msg.offset(), msg.key(), decode(msg.value()))
        for msg in read_to_end(s, topic, timeout=timeout)
    ]


# --------------------------------------------------------------------------
# projections


FIELDS = ("version", "on_hand", "reserved", "available")


class Projections:
    """Reads the private Redis and (directly, not through the proxy) the search index."""

    def __init__(self, s: Settings, redis_url: str, index: str) -> None:
        self.s = s
        self.index = index
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)

    def redis_state(self, skus: Sequence[str]) -> dict[str, tuple[int, ...]]:
        pipe = self.redis.pipeline(transaction=False)
        for sku in skus:
            pipe.hmget(self.s.redis_stock_key(sku), *FIELDS)
        out = {}
        for sku, vals in zip(skus, pipe.execute(), strict=True):
            if vals[0] is not None:
                out[sku] = tuple(int(v) for v in vals)
        return out

    def search_state(self, skus: Sequence[str]) -> dict[str, tuple[int, ...]]:
        body = json.dumps({"ids": list(skus)}).encode()
        req = urllib.request.Request(
            f"{base.opensearch_url}/{self.index}/_mget",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                docs = json.loads(resp.read())["docs"]
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # no index yet
                return {}
            raise
        return {
            d["_id"]: tuple(int(d["_source"][f]) for f in FIELDS) for d in docs if d.get("found")
        }


class Sampler(threading.Thread):
    """Samples both projections during a round, for the never-regress check (I4)."""

    def __init__(self, proj: Projections, interval: float = 0.3) -> None:
        super().__init__(daemon=True, name="chaos-sampler")
        self.proj = proj
        self.interval = interval
        self.skus: list[str] = []
        self.samples: dict[str, dict[str, list[tuple[float, tuple[int, ...]]]]] = {
            "redis": defaultdict(list),
            "search": defaultdict(list),
        }
        self.failed: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            skus = list(self.skus)
            if not skus:
                continue
            for target, read in (
                ("redis", self.proj.redis_state),
                ("search", self.proj.search_state),
            ):
                try:
                    got = read(skus)
                except Exception:  # noqa: BLE001 - the target is down: nothing to sample
                    self.failed[target] += 1
                    continue
                t = time.time()
                with self.lock:
                    for sku, vals in got.items():
                        self.samples[target][sku].append((t, vals))

    def snapshot(self) -> dict[str, dict[str, list[tuple[float, tuple[int, ...]]]]]:
        with self.lock:
            return {t: {k: list(v) for k, v in d.items()} for t, d in self.samples.items()}
