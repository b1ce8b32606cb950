"""Chaos rounds: flash sales under random faults, checked against invariants I1..I6.

One run = one namespace (topics, app id), two workers, a private redis-server
(append-only, so a stop/start keeps its data), a TCP proxy in front of the
shared OpenSearch node and an index of its own. Each round:

1. restocks a fresh set of SKUs (a few hot ones with little stock, a few cold
   ones with plenty), then several concurrent "shopper" threads (each with its
   own idempotent producer) run a flash sale: reserves, checkouts (commit or
   release after a think time, some committed blindly right after the
   reserve), abandoned carts with a short TTL that must EXPIRE, late payments
   after the expiry, restocks, immediate producer re-sends of the same
   event_id, and client retries of commands not answered within a few seconds;
2. injects the round's faults at random moments while traffic flows, each in
   its own thread (they may overlap): ``kill9`` (SIGKILL a worker, restart it:
   two rebalances), ``broker`` (``scripts/stack.sh down kafka`` then ``up
   kafka``; a worker that dies or hangs because of it is recorded as an
   incident and restarted), ``leader_kill`` (on the 3-node cluster only,
   ``ChaosConfig.cluster``: SIGKILL the broker that leads the hot SKU's partition,
   restart it once that leadership has moved, wait until every replica is in sync),
   ``redis`` (the private redis-server stopped, then
   started), ``search_refuse`` / ``search_blackhole`` (the OpenSearch proxy
   refuses connections or accepts and never answers), ``dupes`` (a burst of
   verbatim re-sends of commands that were already answered, from any round);
3. once traffic stops: waits until every checkout is closed, every abandoned
   cart expired and every command answered, then checks I1..I6 (DESIGN.md
   section 4) over *every* SKU of the run so far, from the table (``GET
   /stock/{sku}`` on both workers), the stock-changes, reservation-results and
   dead-letters topics (tailed from offset 0 by a consumer of our own), the
   private Redis and the search index, and the projection versions sampled
   while the round ran. See :func:`check_invariants` for the exact rules.

Expiry bound (I6): an abandoned reservation must be EXPIRED by the pipeline
no later than ``expires_at + expiry_slack_s`` (10 s: the 0.5 s sweep interval
of these workers, the sweeper's 5 s re-send delay if its first command is
lost, and processing lag on a loaded 2-core machine; measured without
disruption it stays under about 4 s), plus the length of every disruption
that overlaps the time between its expiry and its EXPIRED change. A
disruption (kill -9, broker restart) lasts from the fault until both workers
are healthy *and* every order command sent since the fault began has been
answered: the backlog it left behind is processed. It must never expire early
(the expiring command's time is at or after ``expires_at``).

Each violation is counted in the round where it first shows (the checks cover
every SKU of the run, so a violation from round 2 would otherwise repeat).
Unanswered commands get a diagnosis: their offsets in the input topic and
whether the table's changelog ever applied them.

CLI: ``tests/chaos/run_chaos.py`` (``make chaos``); tests: ``test_chaos.py``.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

import cluster
from config.settings import Settings
from config.settings import settings as base
from crashload import audit_changelog
from faults import PrivateRedis, TcpProxy
from harness import OUT, REPO, Namespace, Worker
from pipeline.clients import confluent_config
from pipeline.kafka.reading import read_to_end
from pipeline.partitioning import partition_for
from pipeline.produce import CommandProducer, DeliveryError, now_ms, producer_config
from pipeline.topics import changelog_topic, ensure_topics
from schemas.codec import AvroCodec, DecodeError

STACK = REPO / "scripts" / "stack.sh"
FAULT_KINDS = (
    "kill9",
    "broker",
    "leader_kill",
    "redis",
    "search_refuse",
    "search_blackhole",
    "dupes",
)
# ``broker`` restarts the shared single broker, ``leader_kill`` crashes one node of the
# 3-node cluster: each only in its own mode (ChaosConfig.cluster)
SINGLE_BROKER_ONLY = ("broker",)
CLUSTER_ONLY = ("leader_kill",)
INVARIANTS = ("I1", "I2", "I3", "I4", "I5", "I6")
TERMINAL = ("COMMITTED", "RELEASED", "EXPIRED")
ORDER_TYPES = ("ReserveStock", "CommitReservation", "ReleaseReservation")
DEFAULT_TTL_MS = 15 * 60 * 1000


@dataclass
class ChaosConfig:
    rounds: int = 10
    seed: int = 1
    traffic_s: float = 14.0  # how long each round's flash sale sends new orders
    shoppers: int = 3  # concurrent producer threads
    rate: float = 90.0  # new orders + restocks per second over all shoppers (closes extra)
    hot_skus: int = 2
    cold_skus: int = 3
    hot_units: int = 12
    cold_units: int = 30
    hot_share: float = 0.75  # of new orders, on a hot SKU
    restock_share: float = 0.06
    short_ttl_share: float = 0.15  # abandoned carts with a short ttl
    short_ttl_ms: tuple[int, int] = (1500, 4000)
    late_commit_share: float = 0.25  # of the abandoned carts: paid after the expiry
    fast_checkout_share: float = 0.1  # commit sent right after the reserve, unanswered yet
    commit_share: float = 0.6  # of the orders checked out: commit (else release)
    think_s: tuple[float, float] = (0.2, 1.5)
    resend_share: float = 0.08  # immediate producer re-send of the same command
    retry_after_s: float = 4.0  # client re-sends a command not answered by then
    max_retries: int = 3
    dupes_burst: int = 120  # commands re-sent by a ``dupes`` fault
    # faults
    plan: list[list[str]] | None = None  # explicit faults per round; else random
    faults_per_round: tuple[int, int] = (1, 3)
    broker_restarts: int = 3  # at most this many broker restarts in a random plan
    fault_window: tuple[float, float] = (0.1, 0.8)  # when faults start, share of traffic_s
    outage_s: tuple[float, float] = (3.0, 7.0)  # redis/search outage length
    kill_down_s: tuple[float, float] = (0.5, 3.0)  # dead time of a killed worker
    # run on the local 3-node cluster (tests/cluster.py: RF 3, min ISR 2, 1 standby)
    # instead of the shared single broker; its own fault: leader_kill
    cluster: bool = False
    # dead time of a killed leader broker (at least; and until its leadership of the hot
    # partition has moved): past the cluster's broker.session.timeout.ms (6 s)
    leader_down_s: tuple[float, float] = (7.0, 10.0)
    # after each round, also audit the committed changelog's version chain
    # (crashload.audit_changelog: no gap, no version written twice)
    audit_changelog: bool = False
    # checks
    expiry_slack_s: float = 10.0
    drain_timeout_s: float = 180.0
    answer_timeout_s: float = 60.0
    converge_timeout_s: float = 90.0
    partitions: int = 4
    delete_topics_on_success: bool = True


def round_plan(cfg: ChaosConfig) -> list[list[str]]:
    """The faults of every round: ``cfg.plan`` or a seeded random choice."""
    if cfg.plan is not None:
        plan = [list(p) for p in cfg.plan]
        while len(plan) < cfg.rounds:
            plan.append(list(cfg.plan[len(plan) % len(cfg.plan)]))
        return plan[: cfg.rounds]
    rng = random.Random(cfg.seed * 7919 + 1)
    plan = []
    restarts = 0
    excluded = SINGLE_BROKER_ONLY if cfg.cluster else CLUSTER_ONLY
    for _ in range(cfg.rounds):
        kinds = [
            k
            for k in FAULT_KINDS
            if k not in excluded
            and (k not in ("broker", "leader_kill") or restarts < cfg.broker_restarts)
        ]
        if "search_refuse" in kinds and "search_blackhole" in kinds:
            # one search fault per round: they act on the same proxy
            kinds.remove(rng.choice(["search_refuse", "search_blackhole"]))
        n = rng.randint(*cfg.faults_per_round)
        chosen = rng.sample(kinds, min(n, len(kinds)))
        restarts += "broker" in chosen or "leader_kill" in chosen
        plan.append(sorted(chosen, key=FAULT_KINDS.index))
    return plan


# --------------------------------------------------------------------------
# what was sent


@dataclass
class OrderInfo:
    order_id: str
    sku: str
    qty: int
    occurred_at: int
    ttl_ms: int  # 0 = the workers' default (15 min)
    plan: str  # commit, release, abandon, late_commit
    round: int

    @property
    def short(self) -> bool:
        return self.plan in ("abandon", "late_commit")

    @property
    def expires_at(self) -> int:
        return self.occurred_at + (self.ttl_ms or DEFAULT_TTL_MS)


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
                            self.errors += 1
                        continue
                    self._add(msg)
        finally:
            consumer.close()

    def _add(self, msg: Any) -> None:
        topic, part, off = msg.topic(), msg.partition(), msg.offset()
        try:
            name, value = self.codec.decode(msg.value())
        except DecodeError:
            name, value = "?", {"raw": repr(msg.value()[:60])}
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


def delete_index(index: str) -> None:
    req = urllib.request.Request(f"{base.opensearch_url}/{index}", method="DELETE")
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise


# --------------------------------------------------------------------------
# one round's traffic


@dataclass
class Pending:
    order: OrderInfo
    stage: str  # reserve, think, wait, close
    event_id: str  # the command whose answer we wait for
    type_name: str
    fields: dict[str, Any]
    last_sent: float
    retries: int = 0
    at: float = 0.0  # think/wait: when to send the close (time.time())
    fast: dict[str, Any] | None = None  # the commit sent right after the reserve


@dataclass
class RoundCtx:
    number: int
    prefix: str
    hot: list[str]
    cold: list[str]
    stop_traffic: threading.Event = field(default_factory=threading.Event)
    stopped_at: float = 0.0  # time.time() when the sale stopped

    @property
    def skus(self) -> list[str]:
        return self.hot + self.cold


class Shopper(threading.Thread):
    """One client of the flash sale, with its own idempotent producer."""

    def __init__(self, run: ChaosRun, rnd: RoundCtx, idx: int, seed: int) -> None:
        super().__init__(daemon=True, name=f"shopper-{rnd.number}-{idx}")
        self.run_ = run
        self.rnd = rnd
        self.idx = idx
        self.rng = random.Random(seed)
        self.pending: dict[str, Pending] = {}
        self.error: str | None = None
        self.unfinished: list[str] = []

    def run(self) -> None:
        try:
            self._run()
        except BaseException:  # noqa: BLE001 - surfaced by the round
            self.error = traceback.format_exc()

    def _run(self) -> None:
        cfg = self.run_.cfg
        ledger = self.run_.ledger
        p = QuietProducer(self.run_.ns.settings, on_delivery=ledger.on_delivery)
        interval = cfg.shoppers / cfg.rate
        next_at = time.monotonic()
        i = 0
        while not self.rnd.stop_traffic.is_set():
            self.step(p, i)
            i += 1
            self.tick(p, draining=False)
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        deadline = time.monotonic() + cfg.drain_timeout_s
        while self.pending and time.monotonic() < deadline:
            self.tick(p, draining=True)
            time.sleep(0.05)
        self.unfinished = sorted(self.pending)
        flush(p, ledger)

    def send(self, p: CommandProducer, type_name: str, fields: dict[str, Any]) -> None:
        self.run_.ledger.send(p, type_name, fields, self.rnd.number)

    def step(self, p: CommandProducer, i: int) -> None:
        cfg = self.run_.cfg
        rng = self.rng
        hot = rng.random() < cfg.hot_share
        sku = rng.choice(self.rnd.hot if hot else self.rnd.cold)
        tag = f"{self.rnd.prefix}-{self.idx}-{i}"
        if rng.random() < cfg.restock_share:
            qty = rng.randint(1, 3)
            fields = {"sku": sku, "qty": qty, "event_id": f"rs-{tag}", "occurred_at": now_ms()}
            self.run_.ledger.add_restock(fields["event_id"], sku, qty)
            self.send(p, "RestockReceived", fields)
            if rng.random() < cfg.resend_share:
                self.send(p, "RestockReceived", fields)
            return
        oid = f"o-{tag}"
        qty = rng.randint(1, 2) if hot else rng.randint(1, 3)
        short = rng.random() < cfg.short_ttl_share
        if short:
            plan = "late_commit" if rng.random() < cfg.late_commit_share else "abandon"
            ttl = rng.randint(*cfg.short_ttl_ms)
        else:
            plan = "commit" if rng.random() < cfg.commit_share else "release"
            ttl = 0
        fields = {"event_id": f"r-{oid}", "order_id": oid, "sku": sku, "qty": qty}
        fields["occurred_at"] = now_ms()
        if ttl:
            fields["ttl_ms"] = ttl
        info = OrderInfo(oid, sku, qty, fields["occurred_at"], ttl, plan, self.rnd.number)
        self.run_.ledger.add_order(info)
        self.send(p, "ReserveStock", fields)
        if rng.random() < cfg.resend_share:
            self.send(p, "ReserveStock", fields)  # a producer re-send of the same event
        pend = Pending(
            info, "reserve", fields["event_id"], "ReserveStock", fields, time.monotonic()
        )
        if plan == "commit" and rng.random() < cfg.fast_checkout_share:
            # pay at once, before the answer: a rejected order gets UNKNOWN_RESERVATION
            pend.fast = self._close_fields(info, "commit")
            self.send(p, "CommitReservation", pend.fast)
        self.pending[oid] = pend

    def _close_fields(self, info: OrderInfo, kind: str) -> dict[str, Any]:
        f: dict[str, Any] = {
            "event_id": f"{'c' if kind == 'commit' else 'x'}-{info.order_id}",
            "order_id": info.order_id,
            "sku": info.sku,
            "occurred_at": now_ms(),
        }
        if kind == "release":
            f["reason"] = "cancelled"
        return f

    def _close(self, p: CommandProducer, pend: Pending, kind: str) -> None:
        type_name = "CommitReservation" if kind == "commit" else "ReleaseReservation"
        fields = self._close_fields(pend.order, kind)
        self.send(p, type_name, fields)
        pend.stage, pend.event_id, pend.type_name, pend.fields = (
            "close",
            fields["event_id"],
            type_name,
            fields,
        )
        pend.last_sent, pend.retries = time.monotonic(), 0

    def tick(self, p: CommandProducer, draining: bool) -> None:
        cfg = self.run_.cfg
        tail = self.run_.tail
        now = time.monotonic()
        for oid, pend in list(self.pending.items()):
            if pend.stage in ("reserve", "close"):
                ans = tail.first_answer(pend.event_id)
                if ans is None:
                    if now - pend.last_sent > cfg.retry_after_s and pend.retries < cfg.max_retries:
                        self.send(p, pend.type_name, pend.fields)  # the client retries
                        pend.retries += 1
                        pend.last_sent = now
                    continue
                if pend.stage == "close":
                    del self.pending[oid]
                    continue
                plan = pend.order.plan
                if pend.fast is not None:  # now wait for the answer of that commit
                    pend.stage, pend.event_id, pend.type_name, pend.fields = (
                        "close",
                        pend.fast["event_id"],
                        "CommitReservation",
                        pend.fast,
                    )
                    pend.last_sent, pend.retries = now, 0
                elif ans["outcome"] != "RESERVED" or plan == "abandon":
                    del self.pending[oid]
                elif plan == "late_commit":
                    pend.stage = "wait"
                    pend.at = pend.order.expires_at / 1000 + self.rng.uniform(0.2, 2.0)
                else:
                    pend.stage = "think"
                    pend.at = time.time() + self.rng.uniform(*cfg.think_s)
            elif pend.stage == "think" and (draining or time.time() >= pend.at):
                self._close(p, pend, pend.order.plan)
            elif pend.stage == "wait" and time.time() >= pend.at:
                self._close(p, pend, "commit")


# --------------------------------------------------------------------------
# the run


@dataclass
class FaultRecord:
    kind: str
    detail: str = ""
    start: float = 0.0  # time.time()
    end: float = 0.0
    disruptive: bool = False  # stops processing (kill -9, broker): widens the expiry bound
    error: str | None = None

    def label(self) -> str:
        return f"{self.kind}({self.detail})" if self.detail else self.kind


@dataclass
class RoundResult:
    number: int
    faults: list[FaultRecord]
    commands: int
    violations: dict[str, list[str]]
    seconds: float
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())


def pick_skus(prefix: str, n: int, partitions: int, start_part: int) -> list[str]:
    """``n`` SKU names spread over distinct partitions (as far as they go)."""
    out: list[str] = []
    i = 0
    want = [(start_part + k) % partitions for k in range(n)]
    while len(out) < n:
        sku = f"{prefix}-{i}"
        if partition_for(sku.encode(), partitions) == want[len(out)] or i > 200 * n:
            out.append(sku)
        i += 1
    return out


class ChaosRun:
    def __init__(self, cfg: ChaosConfig, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.log = log
        self.rng = random.Random(cfg.seed)
        self.ledger = Ledger()
        self.results: list[RoundResult] = []
        self.disruptions: list[tuple[float, float]] = []
        self.incidents: list[str] = []
        self.broker_restarted = False
        self.killed_nodes: set[int] = set()  # cluster nodes a leader_kill left down
        self._rnd: RoundCtx | None = None
        self.t0 = time.monotonic()
        self.worker_locks: dict[str, threading.Lock] = {}
        self.workers: list[Worker] = []
        self._round_notes: list[str] = []
        self._current_round = 0
        self.reported: set[str] = set()
        self.given_up: set[str] = set()  # commands reported unanswered: not awaited again
        self.tag = uuid.uuid4().hex[:8]
        self.index = f"chaos-{self.tag}"

    def say(self, msg: str) -> None:
        self.log(f"[chaos {time.monotonic() - self.t0:7.1f}s] {msg}")

    # -- setup / teardown --------------------------------------------------
    def setup(self) -> None:
        self.redis = PrivateRedis(OUT / f"chaos-redis-{self.tag}").start()
        host, port = base.opensearch_url.rsplit("//", 1)[1].split(":")
        self.proxy = TcpProxy(host, int(port)).start()
        self.ns = Namespace.fresh(
            "chaos",
            partitions=self.cfg.partitions,
            base=cluster.cluster_settings() if self.cfg.cluster else None,
            INVENTORY_REDIS_URL=self.redis.url,
            INVENTORY_OPENSEARCH_URL=f"http://127.0.0.1:{self.proxy.port}",
            INVENTORY_SEARCH_INDEX=self.index,
            INVENTORY_SINK_MAX_BACKOFF_S="2",
            INVENTORY_EXPIRY_SCAN_INTERVAL_S="0.5",
        )
        ensure_topics(self.ns.settings)
        self.workers = [Worker(self.ns, "w1"), Worker(self.ns, "w2")]
        self.worker_locks = {w.name: threading.Lock() for w in self.workers}
        for w in self.workers:
            w.start(wait=False)
        for w in self.workers:
            w.wait_healthy(120)
        self.tail = TopicTail(self.ns.settings)
        self.tail.start()
        self.proj = Projections(self.ns.settings, self.redis.url, self.index)
        self.sampler = Sampler(self.proj)
        self.sampler.start()
        self.say(
            f"namespace {self.ns.name}, workers {[w.url for w in self.workers]}, "
            f"redis {self.redis.url}, index {self.index} via proxy :{self.proxy.port}"
        )

    def teardown(self, success: bool) -> None:
        for closer in (
            lambda: self.sampler.stop_event.set(),
            lambda: self.tail.stop_event.set(),
            *[(lambda w=w: w.stop()) for w in self.workers],
            lambda: self.proxy.close(),
            lambda: self.redis.stop(),
            lambda: delete_index(self.index),
            lambda: self._broker_up_at_end(),
            lambda: self._delete_topics() if success and self.cfg.delete_topics_on_success else 0,
        ):
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
                self.say(f"cleanup step failed: {exc}")

    def _broker_up_at_end(self) -> None:
        if self.broker_restarted:
            subprocess.run([str(STACK), "up", "kafka"], capture_output=True, timeout=600)
        for node in sorted(self.killed_nodes):
            cluster.start_node(node)

    def _delete_topics(self) -> None:
        s = self.ns.settings
        admin = AdminClient(confluent_config(s))
        names = [
            t
            for t in admin.list_topics(timeout=30).topics
            if t.startswith(s.topic_prefix) or t.startswith(s.app_id + "-")
        ]
        if names:
            for fut in admin.delete_topics(names, operation_timeout=30).values():
                fut.result(60)
        self.say(f"deleted {len(names)} topics of {self.ns.name}")

    # -- workers -----------------------------------------------------------
    def worker_healthy(self, w: Worker) -> bool:
        return w.proc is not None and w.proc.poll() is None and w.status("/healthz") == 200

    def restart_worker(self, w: Worker, why: str, timeout: float = 180.0) -> None:
        """Start ``w`` and wait until healthy; a start that dies is logged and retried."""
        for attempt in range(3):
            w.start(wait=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if w.proc is not None and w.proc.poll() is not None:
                    break
                if w.status("/healthz") == 200:
                    return
                time.sleep(0.25)
            rc = w.proc.poll() if w.proc is not None else None
            self.incident(
                f"{w.name} restart #{attempt + 1} after {why} "
                + (f"exited rc={rc}" if rc is not None else f"not healthy in {timeout:.0f}s"),
                w,
            )
            w.kill()
        raise AssertionError(f"{w.name} could not be restarted after {why}")

    def incident(self, text: str, w: Worker | None = None) -> None:
        tail = ""
        if w is not None:
            tail = "\n    " + "\n    ".join(w.tail(25).splitlines())
        self.incidents.append(text + tail)
        self._round_notes.append(text)
        self.say(f"INCIDENT: {text}{tail}")

    def wait_workers(self, why: str, timeout: float = 120.0) -> None:
        """Until both workers are healthy; a dead or hung one is recorded and restarted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.worker_healthy(w) for w in self.workers):
                return
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None:
                    lock = self.worker_locks[w.name]
                    if lock.acquire(blocking=False):
                        try:
                            if w.proc.poll() is not None:
                                self.incident(
                                    f"{w.name} exited rc={w.proc.returncode} ({why}); restarted",
                                    w,
                                )
                                self.restart_worker(w, why)
                        finally:
                            lock.release()
            time.sleep(0.25)
        for w in self.workers:
            if not self.worker_healthy(w):
                with self.worker_locks[w.name]:
                    self.incident(f"{w.name} not healthy {timeout:.0f}s after {why}; killed", w)
                    w.kill()
                    self.restart_worker(w, f"hang after {why}")

    def wait_backlog(self, start: float, since: float, timeout: float = 60.0) -> None:
        """Until every order command sent between ``start`` (a disruption began) and
        ``since`` (the workers were healthy again) is answered: the backlog the
        disruption left behind is processed, which ends the disruption's window."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.ledger.lock:
                due = [
                    eid
                    for eid, at in self.ledger.sent_at.items()
                    if start - 5 <= at < since
                    and self.ledger.commands[eid][0] in ORDER_TYPES
                    and eid not in self.given_up
                ]
            if all(self.tail.answers(eid) for eid in due):
                return
            time.sleep(0.5)
        self.say(f"backlog of commands sent before the recovery not answered in {timeout:.0f}s")

    # -- faults ------------------------------------------------------------
    def run_fault(self, fr: FaultRecord, rng: random.Random) -> None:
        try:
            getattr(self, f"fault_{fr.kind}")(fr, rng)
        except BaseException:  # noqa: BLE001 - recorded; the round goes on
            fr.error = traceback.format_exc()
            self.say(f"fault {fr.kind} failed:\n{fr.error}")
        fr.end = time.time()
        if fr.disruptive:
            self.disruptions.append((fr.start, fr.end))

    def fault_kill9(self, fr: FaultRecord, rng: random.Random) -> None:
        w = rng.choice(self.workers)
        fr.disruptive = True
        with self.worker_locks[w.name]:
            fr.start = time.time()
            w.kill()
            self.say(f"kill -9 {w.name}")
            time.sleep(rng.uniform(*self.cfg.kill_down_s))
            self.restart_worker(w, "kill -9")
        self.wait_workers("kill -9")
        healthy = time.time() - fr.start
        self.wait_backlog(fr.start, time.time())
        fr.detail = (
            f"{w.name}, healthy after {healthy:.1f}s, caught up after {time.time() - fr.start:.1f}s"
        )

    def fault_broker(self, fr: FaultRecord, rng: random.Random) -> None:
        fr.disruptive = True
        fr.start = time.time()
        self.broker_restarted = True
        self.say("broker restart: scripts/stack.sh down kafka")
        down = subprocess.run(
            [str(STACK), "down", "kafka"], capture_output=True, text=True, timeout=300
        )
        t_down = time.time() - fr.start
        if down.returncode != 0:
            self.incident(f"stack.sh down kafka rc={down.returncode}: {down.stderr[-500:]}")
        time.sleep(rng.uniform(0.5, 2.0))
        t1 = time.time()
        up = subprocess.run(
            [str(STACK), "up", "kafka"], capture_output=True, text=True, timeout=600
        )
        if up.returncode != 0:
            self.incident(f"stack.sh up kafka rc={up.returncode}: {up.stderr[-500:]}")
            subprocess.run([str(STACK), "up", "kafka"], capture_output=True, timeout=600)
        t_up = time.time() - t1
        self.say(f"broker back (down took {t_down:.1f}s, up {t_up:.1f}s)")
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None:
                with self.worker_locks[w.name]:
                    if w.proc.poll() is not None:
                        self.incident(
                            f"{w.name} died during the broker restart rc={w.proc.returncode};"
                            " restarted",
                            w,
                        )
                        self.restart_worker(w, "broker restart")
        self.wait_workers("broker restart", timeout=180)
        healthy = time.time() - fr.start
        self.wait_backlog(fr.start, time.time())
        fr.detail = (
            f"down {t_down:.0f}s+up {t_up:.0f}s, workers healthy after {healthy:.0f}s, "
            f"caught up after {time.time() - fr.start:.0f}s"
        )

    def fault_leader_kill(self, fr: FaultRecord, rng: random.Random) -> None:
        """SIGKILL the broker leading the hot SKU's partition of the ledger's changelog
        (where the ledger writes that SKU's state in transactions; the node usually leads
        that partition of other topics too, inputs and results: logged), keep it down
        until that leadership has moved to another in-sync replica and at least
        ``leader_down_s``, start it again, wait until every replica is in sync again."""
        if not self.cfg.cluster:
            raise RuntimeError("leader_kill needs the cluster (ChaosConfig.cluster / --cluster)")
        s = self.ns.settings
        assert self._rnd is not None
        hot = self._rnd.hot[0]
        part = partition_for(hot.encode(), s.partitions)
        names = [
            t
            for t in AdminClient(confluent_config(s)).list_topics(timeout=20).topics
            if t.startswith((s.topic_prefix, s.app_id + "-"))
        ]
        leaders = cluster.partition_leaders(s, names, part)
        node = leaders.get(changelog_topic(s), -1)
        if node < 0:
            raise RuntimeError(f"{changelog_topic(s)}[{part}] has no leader: {leaders}")
        led = sorted(t.removeprefix(s.topic_prefix) for t, n in leaders.items() if n == node)
        fr.disruptive = True
        fr.start = time.time()
        cluster.kill_node(node)
        self.killed_nodes.add(node)
        self.say(
            f"leader kill: kafka-{node} SIGKILLed; it led partition {part} ({hot}) of "
            f"{len(led)}/{len(leaders)} topics: {', '.join(led)}"
        )
        # down until the controller has fenced it and its leaderships moved to the
        # other in-sync replicas (the sale goes on against them), and at least
        # leader_down_s; the fencing takes at least the cluster's 6 s broker session
        # timeout (one run here: still not moved 10 s after the kill, so a fixed sleep
        # is not enough)
        target = rng.uniform(*self.cfg.leader_down_s)
        moved_after: float | None = None
        moved: dict[str, int] = {}
        while time.time() - fr.start < 60:
            try:
                moved = cluster.partition_leaders(s, names, part)
            except Exception:  # noqa: BLE001 - metadata while leaderships move: retry
                moved = {}
            if moved.get(changelog_topic(s), node) not in (node, -1):
                moved_after = time.time() - fr.start
                break
            time.sleep(0.5)
        if moved_after is None:
            self.incident(
                f"leader kill: {changelog_topic(s)}[{part}] still on kafka-{node} 60 s on"
            )
        time.sleep(max(2.0, target - (time.time() - fr.start)))
        moved = cluster.partition_leaders(s, names, part)
        t1 = time.time()
        t_up = cluster.start_node(node)
        self.killed_nodes.discard(node)
        self.say(
            f"leader kill: kafka-{node} back after {t1 - fr.start:.1f}s (start {t_up:.1f}s); "
            f"p{part} of the changelog led by kafka-{moved.get(changelog_topic(s))} "
            f"{moved_after or -1:.1f}s after the kill"
        )
        self.wait_workers("leader kill", timeout=180)
        healthy = time.time() - fr.start
        in_sync = cluster.wait_in_sync(s, (s.topic_prefix, s.app_id + "-"))
        self.wait_backlog(fr.start, time.time())
        still = sorted(t for t, n in moved.items() if n == node)
        if still:  # a leadership the dead node kept: nothing moved it
            self.incident(f"leader kill: kafka-{node} still led {still} while down")
        stall = self.longest_gap(s.stock_changes_topic, part, fr.start, self._rnd.stopped_at or t1)
        fr.detail = (
            f"kafka-{node}, led {len(led)} topics at p{part}, moved after {moved_after or -1:.0f}s, "
            f"p{part} changes stalled {stall:.0f}s, "
            f"down {t1 - fr.start:.0f}s, workers healthy after {healthy:.0f}s, "
            f"in sync {in_sync:.0f}s later, caught up after {time.time() - fr.start:.0f}s"
        )

    def longest_gap(self, topic: str, part: int, start: float, end: float) -> float:
        """The longest time between ``start`` and ``end`` (time.time()) in which no record
        arrived in ``topic[part]`` (by record timestamp): how long a fault stalled it."""
        with self.tail.lock:
            ts = sorted(
                r.ts / 1000
                for (t, p, _), r in self.tail.seen.items()
                if t == topic and p == part and start <= r.ts / 1000 <= end
            )
        points = [start, *ts, max(start, end)]
        return max(b - a for a, b in zip(points, points[1:], strict=False))

    def fault_redis(self, fr: FaultRecord, rng: random.Random) -> None:
        fr.start = time.time()
        self.redis.stop()
        self.say("private redis stopped")
        time.sleep(rng.uniform(*self.cfg.outage_s))
        self.redis.start()
        fr.detail = f"{time.time() - fr.start:.1f}s"
        self.say("private redis started")

    def _search(self, fr: FaultRecord, rng: random.Random, mode: str) -> None:
        fr.start = time.time()
        self.proxy.set_mode(mode)
        self.say(f"opensearch proxy: {mode}")
        time.sleep(rng.uniform(*self.cfg.outage_s))
        self.proxy.set_mode("up")
        fr.detail = f"{time.time() - fr.start:.1f}s"
        self.say("opensearch proxy: up")

    def fault_search_refuse(self, fr: FaultRecord, rng: random.Random) -> None:
        self._search(fr, rng, "refuse")

    def fault_search_blackhole(self, fr: FaultRecord, rng: random.Random) -> None:
        self._search(fr, rng, "blackhole")

    def fault_dupes(self, fr: FaultRecord, rng: random.Random) -> None:
        """Re-send, verbatim, commands whose first send was already applied (any round)."""
        fr.start = time.time()
        with self.ledger.lock:
            candidates = [
                (eid, t, f)
                for eid, (t, f) in self.ledger.commands.items()
                if not eid.startswith("init-")
            ]
        rng.shuffle(candidates)
        chosen = []
        for eid, type_name, fields in candidates:
            if len(chosen) >= self.cfg.dupes_burst:
                break
            if type_name == "RestockReceived":
                if not self.tail.caused_change(fields["sku"], eid):
                    continue
            elif not self.tail.answers(eid):
                continue  # not answered yet: a re-send could overtake the original
            chosen.append((type_name, fields))
        p = QuietProducer(self.ns.settings, on_delivery=self.ledger.on_delivery)
        current = self._current_round
        for type_name, fields in chosen:
            self.ledger.send(p, type_name, fields, current)
        flush(p, self.ledger)
        fr.detail = f"{len(chosen)} re-sent"
        self.say(f"duplicate injection: {len(chosen)} commands re-sent")

    # -- rounds ------------------------------------------------------------
    def run(self) -> list[RoundResult]:
        plan = round_plan(self.cfg)
        ok = False
        try:
            self.setup()
            for n, kinds in enumerate(plan, start=1):
                res = self.round(n, kinds)
                self.results.append(res)
                self.say(format_row(res))
                self.say(f"round {n} stats: {res.stats}")
                for inv, items in res.violations.items():
                    for item in items[:10]:
                        self.say(f"  VIOLATION {inv}: {item}")
            ok = all(r.ok for r in self.results)
            return self.results
        finally:
            self.teardown(success=ok)

    def round(self, n: int, kinds: list[str]) -> RoundResult:
        cfg = self.cfg
        started = time.monotonic()
        self._round_notes = []
        self._current_round = n
        rng = random.Random(self.rng.randrange(1 << 30))
        prefix = f"R{n}"
        rnd = RoundCtx(
            n,
            prefix,
            pick_skus(f"{prefix}-HOT", cfg.hot_skus, cfg.partitions, 0),
            pick_skus(f"{prefix}-COLD", cfg.cold_skus, cfg.partitions, cfg.hot_skus),
        )
        for sku in rnd.skus:
            self.ledger.sku_round[sku] = n
        old = [s for s in self.ledger.sku_round if s not in rnd.skus]
        self.sampler.skus = rnd.skus + rng.sample(old, min(2, len(old)))
        self._rnd = rnd
        self.say(f"round {n}: faults {kinds}; hot {rnd.hot}, cold {rnd.cold}")

        p = QuietProducer(self.ns.settings, on_delivery=self.ledger.on_delivery)
        for sku in rnd.skus:
            qty = cfg.hot_units if sku in rnd.hot else cfg.cold_units
            eid = f"init-{sku}"
            self.ledger.add_restock(eid, sku, qty)
            self.ledger.send(p, "RestockReceived", {"sku": sku, "qty": qty, "event_id": eid}, n)
        flush(p, self.ledger)

        shoppers = [Shopper(self, rnd, i, rng.randrange(1 << 30)) for i in range(cfg.shoppers)]
        faults = [FaultRecord(k) for k in kinds]
        offsets = [rng.uniform(*cfg.fault_window) * cfg.traffic_s for _ in faults]
        for s in shoppers:
            s.start()
        traffic_start = time.monotonic()
        traffic_wall = time.time()
        threads = []
        for fr, off in sorted(zip(faults, offsets, strict=True), key=lambda x: x[1]):
            frng = random.Random(rng.randrange(1 << 30))

            def go(fr: FaultRecord = fr, off: float = off, frng: random.Random = frng) -> None:
                time.sleep(max(0.0, traffic_start + off - time.monotonic()))
                self.run_fault(fr, frng)

            t = threading.Thread(target=go, daemon=True, name=f"fault-{fr.kind}")
            t.start()
            threads.append(t)
        while time.monotonic() - traffic_start < cfg.traffic_s:
            time.sleep(0.5)
            self._watchdog()
        traffic_wall_end = rnd.stopped_at = time.time()
        rnd.stop_traffic.set()
        self.say(f"round {n}: traffic stopped; draining")
        for t in threads:
            while t.is_alive():
                t.join(1.0)
                self._watchdog()
        for s in shoppers:
            while s.is_alive():
                s.join(1.0)
                self._watchdog()
        self.wait_workers(f"round {n} end")
        notes = list(self._round_notes)
        for s in shoppers:
            if s.error:
                notes.append(f"shopper {s.name} crashed: {s.error}")
        for fr in faults:
            if fr.error:
                notes.append(f"fault {fr.kind} failed: {fr.error.splitlines()[-1]}")
        violations, stats = self.settle_and_check(rnd, shoppers)
        stats["traffic"] = (traffic_wall, traffic_wall_end)  # time.time() of the sale
        if cfg.audit_changelog:
            try:
                stats["changelog_skus"] = len(audit_changelog(self.ns.settings))
            except AssertionError as exc:
                violations["I4"].append(f"changelog version chain: {exc}")
        for s in shoppers:
            if s.error:
                violations["I6"].append(f"shopper {s.name} crashed:\n{s.error}")
        with self.ledger.lock:
            commands = self.ledger.round_sends[n]
            if self.ledger.failures:
                notes.extend(f"delivery: {f}" for f in self.ledger.failures)
                self.ledger.failures.clear()
        return RoundResult(
            n, faults, commands, violations, time.monotonic() - started, notes, stats
        )

    def diagnose_unanswered(self, eids: Sequence[str]) -> list[str]:
        """Where each unanswered command sits in its input topic, how often it was
        answered, and whether the table's changelog ever applied that input offset."""
        s = self.ns.settings
        want = set(eids)
        codec = AvroCodec()

        def avro(v: bytes | None) -> dict[str, Any]:
            try:
                return codec.decode(v or b"")[1]
            except DecodeError:
                return {}

        where: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
        for topic in (s.orders_topic, s.restocks_topic):
            for part, off, _, value in read_all(s, topic, avro):
                if value.get("event_id") in want:
                    where[value["event_id"]].append((topic, part, off))
        applied: set[tuple[str, int, int]] = set()
        for part, _, key, value in read_all(s, changelog_topic(s), lambda v: v):
            if key is None or value is None or b"\x00" in key:
                continue
            for topic, off in orjson.loads(value).get("w", {}).items():
                applied.add((topic, part, off))

        def spot(t: str, p: int, o: int) -> str:
            return f"{t.rsplit('.', 1)[-1]}/{p}@{o}"

        out = []
        for eid in eids:
            spots = where.get(eid, [])
            lost = [spot(*x) for x in spots if x not in applied]
            verdict = (
                "never applied by the table (no changelog record carries the input offsets "
                + ", ".join(lost)
                + ")"
                if lost
                else "every input offset was applied (the answer was lost after the table)"
            )
            answered = "" if eid.startswith("rs-") else f", {len(self.tail.answers(eid))} answers"
            out.append(
                f"{eid}: {len(spots)} records in the input topic "
                f"({', '.join(spot(*x) for x in spots)}){answered}; {verdict}"
            )
        return out

    def _watchdog(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None:
                lock = self.worker_locks[w.name]
                if lock.acquire(blocking=False):
                    try:
                        if w.proc.poll() is not None:
                            self.incident(
                                f"{w.name} exited on its own rc={w.proc.returncode}; restarted", w
                            )
                            self.restart_worker(w, "unexpected exit")
                    finally:
                        lock.release()

    # -- settle, then check ------------------------------------------------
    def table_views(self, skus: Sequence[str], timeout: float = 90.0) -> tuple[dict, list[str]]:
        """Every SKU from both workers (they must agree); problems as strings."""
        views: dict[str, dict] = {}
        problems: list[str] = []
        deadline = time.monotonic() + timeout
        for sku in skus:
            while True:
                got = []
                for w in self.workers:
                    try:
                        got.append(w.get_json(f"/stock/{sku}"))
                    except Exception as exc:  # noqa: BLE001 - retried
                        got.append((None, str(exc)))
                if all(st == 200 for st, _ in got) and got[0][1] == got[1][1]:
                    views[sku] = got[0][1]
                    break
                if time.monotonic() > deadline:
                    problems.append(f"{sku}: workers answered {got}")
                    ok = [b for st, b in got if st == 200]
                    if ok:
                        views[sku] = ok[0]
                    break
                time.sleep(0.3)
        return views, problems

    def settle_and_check(
        self, rnd: RoundCtx, shoppers: list[Shopper]
    ) -> tuple[dict[str, list[str]], dict[str, Any]]:
        cfg = self.cfg
        led = self.ledger
        tail = self.tail
        settle: dict[str, list[str]] = defaultdict(list)
        stats: dict[str, Any] = {}
        t_settle = time.monotonic()

        for s in shoppers:
            if s.unfinished:
                settle["I6"].append(
                    f"{s.name}: {len(s.unfinished)} checkouts not finished in "
                    f"{cfg.drain_timeout_s:.0f}s, e.g. {s.unfinished[:5]}"
                )

        # every abandoned cart of this round gets its EXPIRED (or a late commit's answer)
        with led.lock:
            orders = [o for o in led.orders.values() if o.round == rnd.number]

        def reserved_short_open() -> list[str]:
            out = []
            for o in orders:
                if not o.short:
                    continue
                answers = tail.answers(f"r-{o.order_id}")
                if not any(a["outcome"] == "RESERVED" and not a["duplicate"] for a in answers):
                    continue
                if not tail.closed(o.order_id):
                    out.append(o.order_id)
            return out

        last_expiry = max((o.expires_at for o in orders if o.short), default=0) / 1000
        dis = sum(b - a for a, b in self.disruptions if b >= last_expiry - cfg.traffic_s)
        deadline = max(time.time(), last_expiry) + cfg.expiry_slack_s + dis + 30
        while (left := reserved_short_open()) and time.time() < deadline:
            time.sleep(0.5)
        if left:
            settle["I6"].append(f"{len(left)} short-ttl reservations never closed: {left[:8]}")

        # every delivered order command answered (at least once per delivery)
        def unanswered() -> list[str]:
            with led.lock:
                items = [
                    (eid, n)
                    for eid, n in led.delivered.items()
                    if led.commands[eid][0] in ORDER_TYPES
                ]
            return [
                eid for eid, n in items if eid not in self.given_up and len(tail.answers(eid)) < n
            ]

        deadline = time.monotonic() + cfg.answer_timeout_s
        while (missing := unanswered()) and time.monotonic() < deadline:
            time.sleep(0.5)
        if missing:
            self.given_up.update(missing)
            settle["I6"].append(
                f"{len(missing)} delivered commands not answered as often as sent "
                f"after {cfg.answer_timeout_s:.0f}s: {missing[:8]}"
            )
            try:
                settle["I6"].extend(self.diagnose_unanswered(missing[:20]))
            except Exception as exc:  # noqa: BLE001 - a diagnosis must not hide the finding
                settle["I6"].append(f"(diagnosis failed: {exc})")

        # the table is stable and the relay has published its last version of every SKU
        skus = sorted(led.sku_round)
        deadline = time.monotonic() + 90
        while True:
            views, problems = self.table_views(skus)
            behind = [s for s in skus if tail.max_version(s) < views.get(s, {}).get("version", 0)]
            if not behind:
                again, _ = self.table_views(skus)
                if again == views:
                    break
            if time.monotonic() > deadline:
                settle["I4"].append(f"relay never published the table's version of {behind[:8]}")
                break
            time.sleep(0.5)
        for p in problems:
            settle["I5"].append(f"table not readable or workers disagree: {p}")
        s = self.ns.settings
        hw = high_watermarks(s, (s.results_topic, s.stock_changes_topic, s.dead_letters_topic))
        deadline = time.monotonic() + 60
        while not tail.caught_up(hw) and time.monotonic() < deadline:
            time.sleep(0.2)
        stats["settle_s"] = round(time.monotonic() - t_settle, 1)

        # I5: Redis and the search index reach the table's versions and numbers
        t_conv = time.monotonic()
        want = {k: tuple(v[f] for f in FIELDS) for k, v in views.items()}
        diff: dict[str, Any] = {}
        deadline = time.monotonic() + cfg.converge_timeout_s
        while True:
            diff = {}
            try:
                got_r = self.proj.redis_state(skus)
                got_s = self.proj.search_state(skus)
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                diff = {"error": str(exc)}
                got_r, got_s = {}, {}
            for sku, w in want.items():
                if got_r.get(sku) != w or got_s.get(sku) != w:
                    diff[sku] = {"table": w, "redis": got_r.get(sku), "search": got_s.get(sku)}
            if not diff or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        stats["converge_s"] = round(time.monotonic() - t_conv, 1)
        if diff:
            settle["I5"].append(
                f"not converged after {cfg.converge_timeout_s:.0f}s "
                f"(version, on_hand, reserved, available): "
                + "; ".join(f"{k}: {v}" for k, v in list(diff.items())[:8])
            )

        by_event, changes, dead = tail.snapshot()
        with led.lock:
            ledger_view = LedgerView(
                dict(led.commands),
                Counter(led.delivered),
                dict(led.orders),
                dict(led.restocks),
                list(led.sku_round),
            )
        found, extra = check_invariants(
            ledger_view,
            by_event,
            changes,
            dead,
            views,
            self.sampler.snapshot(),
            list(self.disruptions),
            cfg.expiry_slack_s,
            list(tail.rewritten) + [f"undecodable {u}" for u in tail.undecodable],
            rnd.number,
        )
        stats.update(extra)
        lost_restocks = [
            m.split()[1]
            for m in found.get("I3", [])
            if m.startswith("restock ") and m.endswith(" applied 0 times")
        ]
        lost_restocks = [e for e in lost_restocks if e not in self.given_up]
        if lost_restocks:
            self.given_up.update(lost_restocks)
            try:
                found["I3"].extend(self.diagnose_unanswered(lost_restocks[:20]))
            except Exception as exc:  # noqa: BLE001 - a diagnosis must not hide the finding
                found["I3"].append(f"(diagnosis failed: {exc})")
        for inv in INVARIANTS:
            # checks cover the whole run: count a violation in the round it first shows
            fresh = dict.fromkeys(settle.get(inv, []) + found.get(inv, []))
            found[inv] = [x for x in fresh if x not in self.reported]
            self.reported.update(found[inv])
        return found, stats


# --------------------------------------------------------------------------
# the invariants


@dataclass
class LedgerView:
    commands: dict[str, tuple[str, dict[str, Any]]]
    delivered: Counter[str]
    orders: dict[str, OrderInfo]
    restocks: dict[str, tuple[str, int]]
    skus: list[str]


def check_invariants(
    led: LedgerView,
    by_event: dict[str, list[dict[str, Any]]],
    changes: dict[str, list[dict[str, Any]]],
    dead: list[dict[str, Any]],
    table: dict[str, dict[str, Any]],
    samples: dict[str, dict[str, list[tuple[float, tuple[int, ...]]]]],
    disruptions: list[tuple[float, float]],
    expiry_slack_s: float,
    topic_anomalies: list[str],
    round_no: int | None = None,
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """I1..I6 over every SKU and order of the run; returns violations and stats.

    * I1 no oversell: 0 <= reserved <= on_hand in the table and in *every*
      StockChanged version; units committed plus still reserved never exceed
      the units restocked.
    * I2 conservation: table on_hand = restocked - committed (answers) and
      reserved = units of orders still open; replaying the versions 1..V, each
      step's change of (on_hand, reserved) is exactly what its cause did
      (restock +qty; reserve +qty held; commit -qty both; release/expiry -qty
      held), and available = on_hand - reserved.
    * I3 exactly-once effect: per (order, event_id) the non-duplicate answers
      agree (a relay re-send is identical); an order is RESERVED at most once
      and closed at most once; every RESERVED/COMMITTED/RELEASED/EXPIRED answer
      has exactly one StockChanged of that cause and vice versa; each cause
      event_id makes at most one version; every restock sent is applied
      exactly once; duplicate answers (duplicate=true) repeat an outcome of
      the order; re-sent commands change nothing.
    * I4 versions: each SKU's versions are 1..V without a gap, a version seen
      twice has identical content, the table's version is V and its numbers
      are version V's; projections sampled during the rounds never go
      backwards, never run ahead of the ledger and show version v's numbers.
    * I5 convergence: checked by the caller (Redis and search equal the table).
    * I6 liveness: every delivered order command answered (also checked by the
      caller); every RESERVED order ends COMMITTED, RELEASED or EXPIRED; an
      abandoned cart ends EXPIRED, never before its expiry and no later than
      the bound; a long-ttl order never expires; dead letters only for
      commits of orders that were never reserved.
    """
    v: dict[str, list[str]] = defaultdict(list)
    stats: dict[str, Any] = {}

    # answers per order, keyed by event id; non-duplicate and duplicate
    nondup: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    dups: dict[str, list[dict]] = defaultdict(list)
    for eid, answers in by_event.items():
        for a in answers:
            if a["duplicate"]:
                dups[a["order_id"]].append(a)
            else:
                nondup[a["order_id"]][eid].append(a)

    # versions per SKU
    versions: dict[str, dict[int, dict]] = defaultdict(dict)
    for sku, items in changes.items():
        for c in items:
            prev = versions[sku].get(c["version"])
            if prev is not None and prev != c:
                v["I4"].append(f"{sku} v{c['version']} published twice, differently: {prev} / {c}")
            versions[sku].setdefault(c["version"], c)
    for a in topic_anomalies:
        v["I4"].append(f"topic record changed or unreadable: {a}")

    # I3: per (order, event) agreement; outcome of each order
    order_outcome: dict[str, dict[str, str]] = {}  # order -> {"reserve": .., "close": .., ...}
    state_changing = ("RESERVED",) + TERMINAL
    for oid, per_event in nondup.items():
        reserve_eids, close_eids = [], []
        for eid, answers in per_event.items():
            first = answers[0]
            for a in answers[1:]:
                both = first["outcome"] in state_changing and a["outcome"] in state_changing
                if both or first["outcome"] == a["outcome"]:
                    # a relay re-send is identical; for a no-op outcome such as
                    # UNKNOWN_RESERVATION 'available' is that of the moment
                    key = ("qty", "reason") if not both else tuple(first)
                    same = all(a.get(k) == first.get(k) for k in key)
                    if not same:
                        v["I3"].append(f"{oid} {eid}: answers disagree: {first} / {a}")
                else:
                    # a re-send of the same event_id answered with another outcome as if
                    # new (duplicate=false): the client is not told the original outcome
                    v["I6"].append(
                        f"{oid}: re-sent {eid} answered {a['outcome']} ({a['reason']!r}, "
                        f"duplicate=false); its original answer was {first['outcome']}"
                    )
            if first["outcome"] == "RESERVED":
                reserve_eids.append(eid)
            elif first["outcome"] in TERMINAL:
                close_eids.append(eid)
        if len(reserve_eids) > 1:
            v["I3"].append(f"{oid} RESERVED by several events: {reserve_eids}")
        if len(close_eids) > 1:
            v["I3"].append(f"{oid} closed by several events: {close_eids}")
        if close_eids and not reserve_eids:
            v["I3"].append(f"{oid} closed without being reserved")
        out = {}
        for eid, answers in per_event.items():
            out[eid] = answers[0]["outcome"]
        order_outcome[oid] = out
    for oid, answers in dups.items():
        known = set(order_outcome.get(oid, {}).values())
        for a in answers:
            if a["outcome"] not in known:
                v["I3"].append(f"{oid}: duplicate answer {a['outcome']} not among {sorted(known)}")

    # I3: answers <-> changes, one each; each cause makes at most one version
    cause_versions: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for sku, per in versions.items():
        for ver, c in per.items():
            cause_versions[c["cause_event_id"]].add((sku, ver))
    for eid, vs in cause_versions.items():
        if len(vs) > 1:
            v["I3"].append(f"event {eid} applied {len(vs)} times: versions {sorted(vs)}")
    for oid, per_event in nondup.items():
        for eid, answers in per_event.items():
            outcome = answers[0]["outcome"]
            if outcome in state_changing and len(cause_versions.get(eid, ())) != 1:
                v["I3"].append(
                    f"{oid} {eid} answered {outcome} but made "
                    f"{len(cause_versions.get(eid, ()))} versions"
                )
    answered_changes = {eid for per in nondup.values() for eid in per}
    for eid, vs in cause_versions.items():
        sku, ver = next(iter(vs))
        c = versions[sku][ver]
        if c["cause_type"] != "RestockReceived" and eid not in answered_changes:
            v["I3"].append(f"{sku} v{ver} ({c['cause_type']} {eid}) has no answer")
    for eid, (sku, _) in led.restocks.items():
        if led.delivered.get(eid, 0) and len(cause_versions.get(eid, ())) != 1:
            v["I3"].append(
                f"restock {eid} on {sku} applied {len(cause_versions.get(eid, ()))} times"
            )

    # committed / open units per SKU from the answers
    committed: dict[str, int] = defaultdict(int)
    open_units: dict[str, int] = defaultdict(int)
    restocked: dict[str, int] = defaultdict(int)
    for eid, (sku, qty) in led.restocks.items():
        if led.delivered.get(eid, 0):
            restocked[sku] += qty
    term_of: dict[str, tuple[str, str]] = {}
    for oid, per_event in nondup.items():
        outs = {eid: a[0]["outcome"] for eid, a in per_event.items()}
        info = led.orders.get(oid)
        if info is None:
            continue
        res = [e for e, o in outs.items() if o == "RESERVED"]
        term = [(e, o) for e, o in outs.items() if o in TERMINAL]
        if res:
            qty = per_event[res[0]][0]["qty"]
            if term:
                term_of[oid] = term[0]
                if term[0][1] == "COMMITTED":
                    committed[info.sku] += qty
            else:
                open_units[info.sku] += qty

    # per SKU: table, version history, replay
    for sku in led.skus:
        t = table.get(sku)
        per = versions.get(sku, {})
        if t is None:
            v["I5"].append(f"{sku}: table did not answer")
            continue
        if not 0 <= t["reserved"] <= t["on_hand"] or t["available"] < 0:
            v["I1"].append(f"{sku}: table {t}")
        if committed[sku] + open_units[sku] > restocked[sku]:
            v["I1"].append(
                f"{sku}: {committed[sku]} committed + {open_units[sku]} held > "
                f"{restocked[sku]} restocked"
            )
        if t["on_hand"] != restocked[sku] - committed[sku]:
            v["I2"].append(
                f"{sku}: on_hand {t['on_hand']} != restocked {restocked[sku]} - "
                f"committed {committed[sku]}"
            )
        if t["reserved"] != open_units[sku]:
            v["I2"].append(f"{sku}: reserved {t['reserved']} != open orders' {open_units[sku]}")
        V = t["version"]
        if sorted(per) != list(range(1, V + 1)):
            have = sorted(per)
            gaps = sorted(set(range(1, max(have + [V]) + 1)) - set(have))
            v["I4"].append(
                f"{sku}: versions {len(have)} (max {max(have, default=0)}), table v{V}, missing {gaps[:10]}"
            )
        elif V:
            last = per[V]
            if (last["on_hand"], last["reserved"]) != (t["on_hand"], t["reserved"]):
                v["I4"].append(f"{sku}: table {t} but v{V} is {last}")
        prev_on, prev_res = 0, 0
        for ver in sorted(per):
            c = per[ver]
            if not 0 <= c["reserved"] <= c["on_hand"]:
                v["I1"].append(f"{sku} v{ver}: reserved {c['reserved']} on_hand {c['on_hand']}")
            if c["available"] != max(0, c["on_hand"] - c["reserved"] - c["safety_stock"]):
                v["I2"].append(f"{sku} v{ver}: available {c['available']} inconsistent")
            if ver - 1 not in per and ver != 1:
                prev_on, prev_res = c["on_hand"], c["reserved"]  # after a gap (reported)
                continue
            d = (c["on_hand"] - prev_on, c["reserved"] - prev_res)
            expect = _expected_delta(c, led, nondup)
            if d not in expect:
                v["I2"].append(
                    f"{sku} v{ver}: {c['cause_type']} {c['cause_event_id']} changed "
                    f"(on_hand, reserved) by {d}, expected one of {expect}"
                )
            prev_on, prev_res = c["on_hand"], c["reserved"]

    # I4: sampled projections never regress, never run ahead, show the right numbers
    sampled = 0
    for target, per_sku in samples.items():
        for sku, items in per_sku.items():
            last = None
            top = table.get(sku, {}).get("version")
            for _t, vals in items:
                sampled += 1
                ver = vals[0]
                if last is not None and ver < last[0]:
                    v["I4"].append(f"{target} {sku} went back from v{last[0]} to v{ver}")
                if top is not None and ver > top:
                    v["I4"].append(f"{target} {sku} v{ver} ahead of the ledger's v{top}")
                c = versions.get(sku, {}).get(ver)
                if c is not None and (c["on_hand"], c["reserved"], c["available"]) != vals[1:]:
                    v["I4"].append(f"{target} {sku} v{ver} shows {vals[1:]}, the ledger {c}")
                last = vals
    stats["samples"] = sampled

    # I6: every reserved order closed; expiry on time; dead letters explained
    lateness: list[float] = []
    calm: list[float] = []  # expiries no disruption overlapped
    for oid, info in led.orders.items():
        outs = order_outcome.get(oid, {})
        if not led.delivered.get(f"r-{oid}", 0):
            continue
        if f"r-{oid}" not in outs:
            continue  # reported as unanswered
        if outs[f"r-{oid}"] != "RESERVED":
            continue
        term = term_of.get(oid)
        if term is None:
            v["I6"].append(f"{oid} ({info.plan}) reserved and never closed")
            continue
        eid, outcome = term
        if not info.short:
            if outcome == "EXPIRED":
                v["I6"].append(f"{oid}: a 15-min reservation EXPIRED")
            continue
        if outcome != "EXPIRED":
            v["I6"].append(f"{oid}: short-ttl reservation ended {outcome}, not EXPIRED")
            continue
        c = _change_of(eid, versions, info.sku)
        if c is None:
            continue  # reported under I3
        if c["occurred_at"] < info.expires_at:
            v["I6"].append(f"{oid} expired early: at {c['occurred_at']} < {info.expires_at}")
        late = (c["processed_at"] - info.expires_at) / 1000
        t0, t1 = info.expires_at / 1000, c["processed_at"] / 1000
        allowed = expiry_slack_s + sum(b - a for a, b in disruptions if a <= t1 and b >= t0)
        if round_no is None or info.round == round_no:  # stats of this round's orders
            lateness.append(late)
            if allowed == expiry_slack_s:
                calm.append(late)
        if late > allowed:
            v["I6"].append(
                f"{oid} expired {late:.1f}s after its expiry; bound {allowed:.1f}s "
                f"({c['cause_type']})"
            )
    stats["expired"] = len(lateness)
    stats["expiry_late_max_s"] = round(max(lateness, default=0.0), 2)
    stats["expiry_late_max_undisrupted_s"] = round(max(calm, default=0.0), 2)
    reason_counts: Counter[str] = Counter()
    for d in dead:
        reason_counts[d["reason"]] += 1
        if d["reason"] != "unknown_reservation":
            v["I6"].append(f"dead letter {d['reason']}: {d['detail']}")
            continue
        oid = d["detail"].rsplit(" ", 1)[-1]
        if order_outcome.get(oid, {}).get(f"r-{oid}") == "RESERVED":
            v["I6"].append(f"unknown_reservation dead letter for reserved order {oid}")
    stats["dead_letters"] = dict(reason_counts)
    stats["orders_total"] = len(led.orders)
    stats["answers_total"] = sum(len(a) for a in by_event.values())
    stats["changes_total"] = sum(len(c) for c in changes.values())
    return v, stats


def _change_of(eid: str, versions: dict[str, dict[int, dict]], sku: str) -> dict | None:
    for c in versions.get(sku, {}).values():
        if c["cause_event_id"] == eid:
            return c
    return None


def _expected_delta(
    c: dict[str, Any], led: LedgerView, nondup: dict[str, dict[str, list[dict]]]
) -> list[tuple[int, int]]:
    cause, eid, oid = c["cause_type"], c["cause_event_id"], c["order_id"]
    if cause == "RestockReceived":
        got = led.restocks.get(eid)
        return [(got[1], 0)] if got else []
    info = led.orders.get(oid)
    if info is None:
        return []
    q = info.qty
    if cause == "ReserveStock":
        return [(0, q)]
    if cause == "CommitReservation":
        outcome = (nondup.get(oid, {}).get(eid) or [{}])[0].get("outcome")
        return [(0, -q)] if outcome == "EXPIRED" else [(-q, -q)]
    if cause in ("ReleaseReservation", "ExpireReservation"):
        return [(0, -q)]
    return []


# --------------------------------------------------------------------------
# report


HEADER = (
    f"{'round':>5} {'cmds':>6}  "
    + " ".join(f"{i:>3}" for i in INVARIANTS)
    + f"  {'time':>7}  {'settle':>6} {'conv':>5} {'exp.lag':>7}  faults; notes"
)


def format_row(r: RoundResult) -> str:
    counts = " ".join(f"{len(r.violations.get(i, ())):>3}" for i in INVARIANTS)
    faults = ", ".join(f.label() for f in r.faults) or "-"
    notes = "".join("; " + n.splitlines()[0] for n in r.notes)
    st = r.stats
    return (
        f"{r.number:>5} {r.commands:>6}  {counts}  {r.seconds:6.1f}s  "
        f"{st.get('settle_s', 0):5.1f}s {st.get('converge_s', 0):4.1f}s "
        f"{st.get('expiry_late_max_s', 0):6.1f}s  {faults}{notes}"
    )


def format_table(results: list[RoundResult]) -> str:
    lines = [
        "cmds: commands sent (re-sends included); I1..I6: new violations; settle: until "
        "every command was answered and the relay caught up; conv: until Redis and "
        "search equalled the table; exp.lag: latest expiry after its deadline",
        HEADER,
        "-" * 100,
    ]
    lines += [format_row(r) for r in results]
    total = {i: sum(len(r.violations.get(i, ())) for r in results) for i in INVARIANTS}
    lines.append(
        f"{'all':>5} {sum(r.commands for r in results):>6}  "
        + " ".join(f"{total[i]:>3}" for i in INVARIANTS)
        + f"  {sum(r.seconds for r in results):6.1f}s"
    )
    return "\n".join(lines)


def violation_report(results: list[RoundResult], limit: int = 20) -> str:
    out = []
    for r in results:
        for inv in INVARIANTS:
            items = r.violations.get(inv, ())
            for item in items[:limit]:
                out.append(f"round {r.number} {inv}: {item}")
            if len(items) > limit:
                out.append(f"round {r.number} {inv}: ... {len(items) - limit} more")
    return "\n".join(out)


def run_chaos(cfg: ChaosConfig, log: Callable[[str], None] = print) -> list[RoundResult]:
    """Run ``cfg.rounds`` rounds and return their results (cleans up in any case)."""
    run = ChaosRun(cfg, log)
    try:
        results = run.run()
    finally:
        if run.incidents:
            log("incidents:\n  " + "\n  ".join(run.incidents))
    log(format_table(results))
    return results


__all__ = [
    "ChaosConfig",
    "ChaosRun",
    "RoundResult",
    "check_invariants",
    "format_table",
    "round_plan",
    "run_chaos",
    "violation_report",
]
