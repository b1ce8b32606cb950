"""An in-memory stand-in for the Kafka I/O of the ledger engine and the saga handler.

Only the I/O boundary is faked; everything between it is the real code:

* :class:`MemoryBroker`: partition logs with offsets, transaction markers (a committed
  or aborted transaction ends with a control record that takes an offset, as in Kafka),
  the group's committed offsets, producer epochs per transactional id (fencing), and the
  broker queries the engine asks (:class:`~pipeline.kafka.transactions.BrokerQueries`'
  ``committed`` / ``bounds``, ``read_partition``, ``first_committed_offset``);
* :class:`MemoryWriter`: the transactional producer of one ledger partition
  (:class:`~pipeline.kafka.transactions.PartitionWriter`'s ``open/commit/close``);
* :class:`MemoryConsumer`: the few calls the engine makes on Faust's consumer
  (``seek_wait``, ``assignment``, ``_commit``) plus :meth:`MemoryConsumer.fetch`, which
  hands the committed records past each fetch position to the real
  :class:`~pipeline.kafka.feed.BatchFeed`, as the worker's fetch loop does;
* :class:`Worker`: one worker's real :class:`~agents.ledger.LedgerEngine` (real
  ``PartitionLedger`` tasks, real RocksDB ``PartitionStore`` files in a temporary
  directory, the real codec without a registry) wired to the above;
* :class:`MemoryTopic`: a Faust topic's ``send``; :class:`SagaRig`: the real
  :class:`~agents.orders.SagaHandler` over a dict for its table and such topics.

Nothing here opens a socket.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from faust.types import TP

from agents.ledger import LedgerEngine, PartitionLedger, State
from config.settings import Settings
from pipeline.kafka.feed import BatchFeed
from pipeline.kafka.partitioning import partition_for
from pipeline.kafka.transactions import BatchAborted, Out, ReadResult, WriterLost
from schemas.codec import AvroCodec
from schemas.validation import records_for_topic
from tables.stock import OpenReservations

SETTLE_S = 10.0  # how long a harness waits for the code under test before it fails


@dataclass(slots=True)
class Entry:
    """One offset of a partition log: a data record, or a transaction's control record."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    control: bool = False
    committed: bool = True  # False: written by a transaction that aborted
    timestamp: float = 0.0
    seq: int = 0  # order of writes across partitions (a fetch hands them over in it)


@dataclass(frozen=True, slots=True)
class Record:
    """What the ledger reads of an aiokafka ``ConsumerRecord``."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp: float = 0.0
    seq: int = 0


@dataclass(slots=True)
class Log:
    entries: list[Entry] = field(default_factory=list)
    start: int = 0  # first offset (a re-created topic or deleted segments move it)

    @property
    def end(self) -> int:
        return self.entries[-1].offset + 1 if self.entries else self.start

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)


class MemoryBroker:
    """Every partition log, the group offsets and the transactional ids of a fake cluster.

    ``transactions`` keeps each committed transaction's records in order (what one
    ``commit`` wrote); ``aborted`` the records of the aborted ones. Tests queue a failure
    for the next commits with :meth:`fail_next_commit`, watch each commit before it lands
    with ``before_commit``, and hold a commit in flight with ``commit_gate``.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.logs: dict[tuple[str, int], Log] = {}
        self.group: dict[tuple[str, int], int] = {}  # the app group's committed offsets
        self.epochs: dict[int, int] = {}  # ledger partition -> current producer epoch
        self.transactions: list[list[Out]] = []
        self.aborted: list[list[Out]] = []
        self.before_commit: list[Callable[[int, list[Out]], None]] = []
        self.commit_gate: asyncio.Event | None = None  # when set: commits wait for it
        self.commits_waiting = 0
        self._failures: list[BaseException] = []
        self.metadata = object()  # the group metadata a real writer sends offsets with
        self._seq = 0

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # --- producing and reading ------------------------------------------

    def log(self, topic: str, partition: int) -> Log:
        with self._lock:
            found = self.logs.get((topic, partition))
            if found is None:
                found = self.logs[(topic, partition)] = Log()
            return found

    def produce(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Iterable[tuple[str, bytes]] = (),
    ) -> int:
        """A plain (non-transactional) write; returns its offset."""
        with self._lock:
            log = self.log(topic, partition)
            offset = log.end
            log.add(
                Entry(
                    offset,
                    key,
                    value,
                    tuple(headers),
                    timestamp=time.time(),
                    seq=self._next_seq(),
                )
            )
            return offset

    def marker(self, topic: str, partition: int, *, committed: bool = True) -> int:
        """A transaction's control record (invisible to readers, but it takes an offset)."""
        with self._lock:
            log = self.log(topic, partition)
            offset = log.end
            log.add(Entry(offset, None, None, control=True, committed=committed))
            return offset

    def records(self, topic: str, partition: int | None = None) -> list[Record]:
        """The committed data records of ``topic`` (one partition, or all in partition
        order), as a read_committed consumer sees them."""
        with self._lock:
            parts = (
                [partition]
                if partition is not None
                else sorted(p for t, p in self.logs if t == topic)
            )
            return [
                Record(topic, p, e.offset, e.key, e.value, e.headers, e.timestamp, e.seq)
                for p in parts
                for e in self.log(topic, p).entries
                if not e.control and e.committed
            ]

    def recreate(self, topic: str, partition: int) -> None:
        """The topic deleted and created again: the partition starts over at offset 0."""
        with self._lock:
            self.logs[(topic, partition)] = Log()

    def delete_records(self, topic: str, partition: int, before: int) -> None:
        """Retention deleted the records below ``before`` (the log start moves)."""
        with self._lock:
            log = self.log(topic, partition)
            log.entries = [e for e in log.entries if e.offset >= before]
            log.start = max(log.start, before)

    # --- what BrokerQueries answers ---------------------------------------

    def committed(
        self, tps: Iterable[tuple[str, int]], timeout_s: float = 10.0
    ) -> dict[tuple[str, int], int | None]:
        with self._lock:
            return {tp: self.group.get(tp) for tp in tps}

    def bounds(
        self, tps: Iterable[tuple[str, int]], timeout_s: float = 10.0
    ) -> dict[tuple[str, int], tuple[int, int]]:
        with self._lock:
            out = {}
            for t, p in tps:
                log = self.log(t, p)
                out[(t, p)] = (log.start, log.end)
            return out

    def close(self) -> None:
        pass

    # --- what read_partition / first_committed_offset answer -------------------

    def read(self, topic: str, partition: int, start: int, apply: Any) -> ReadResult:
        with self._lock:
            log = self.log(topic, partition)
            rows = [
                (e.key, e.value, e.offset)
                for e in log.entries
                if e.offset >= start and not e.control and e.committed
            ]
            end = log.end
        if rows:
            apply(rows)
        return ReadResult(max(start, end), len(rows))

    def first_committed(self, topic: str, partition: int, start: int) -> int | None:
        with self._lock:
            for e in self.log(topic, partition).entries:
                if e.offset >= start and not e.control and e.committed:
                    return e.offset
            return None

    # --- transactions ---------------------------------------------------

    def fail_next_commit(self, exc: BaseException) -> None:
        """The next commit raises ``exc`` (BatchAborted: aborted; WriterLost: fenced)."""
        self._failures.append(exc)

    def fence(self, partition: int) -> int:
        """``init_transactions`` of the partition's transactional id: a new epoch."""
        with self._lock:
            epoch = self.epochs.get(partition, 0) + 1
            self.epochs[partition] = epoch
            return epoch

    def transact(self, partition: int, epoch: int, outs: list[Out]) -> list[tuple[str, int, int]]:
        """One transaction of ledger partition ``partition``'s producer at ``epoch``."""
        with self._lock:
            if self.epochs.get(partition) != epoch:
                raise WriterLost("fenced by a newer producer of the transactional id")
            failure = self._failures.pop(0) if self._failures else None
            for watch in self.before_commit:
                watch(partition, list(outs))
            touched: dict[tuple[str, int], None] = {}
            delivered = []
            for out in outs:
                log = self.log(out.topic, out.partition)
                offset = log.end
                log.add(
                    Entry(
                        offset,
                        out.key,
                        out.value,
                        tuple(out.headers or ()),
                        committed=failure is None,
                        timestamp=time.time(),
                        seq=self._next_seq(),
                    )
                )
                delivered.append((out.topic, out.partition, offset))
                touched[(out.topic, out.partition)] = None
            for t, p in touched:
                self.marker(t, p, committed=failure is None)
            if failure is not None:
                self.aborted.append(list(outs))
                raise failure
            self.transactions.append(list(outs))
            return delivered


class MemoryWriter:
    """A ledger partition's transactional producer on a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, partition: int) -> None:
        self.broker = broker
        self.partition = partition
        self.epoch: int | None = None
        self.opens = 0

    async def open(self) -> None:
        self.epoch = self.broker.fence(self.partition)
        self.opens += 1

    async def commit(
        self, records: list[Out], offsets: dict[tuple[str, int], int] | None = None
    ) -> list[tuple[str, int, int]]:
        if self.epoch is None:
            raise WriterLost("no producer")
        gate = self.broker.commit_gate
        if gate is not None:
            self.broker.commits_waiting += 1
            try:
                await gate.wait()
            finally:
                self.broker.commits_waiting -= 1
        try:
            return self.broker.transact(self.partition, self.epoch, list(records))
        except (WriterLost, BatchAborted):
            raise
        except Exception as exc:  # a failure a test queued: a fatal producer error
            self.epoch = None
            raise WriterLost(str(exc)) from None

    async def close(self) -> None:
        self.epoch = None


class MemoryConsumer:
    """The Faust consumer calls of :class:`~agents.ledger.LedgerEngine`, and its fetch loop."""

    def __init__(self, broker: MemoryBroker, feed: BatchFeed, app: Any) -> None:
        self.broker = broker
        self.feed = feed
        self.app = app
        self.assigned: set[TP] = set()
        self.positions: dict[TP, int] = {}
        self.seeks: list[dict[TP, int]] = []
        self.group_commits: list[dict[TP, int]] = []

    def _new_topicpartition(self, topic: str, partition: int) -> TP:
        return TP(topic, partition)

    def assignment(self) -> set[TP]:
        return set(self.assigned)

    async def seek_wait(self, tps: dict[TP, int]) -> None:
        self.seeks.append(dict(tps))
        self.positions.update(tps)

    async def _commit(self, offsets: dict[TP, int]) -> bool:
        self.group_commits.append(dict(offsets))
        with self.broker._lock:
            for tp, offset in offsets.items():
                self.broker.group[(tp.topic, tp.partition)] = offset
        return True

    def behind(self) -> bool:
        """True when some assigned input has committed records past its fetch position."""
        return any(
            r.offset >= self.positions.get(tp, 0)
            for tp in self.assigned
            for r in self.broker.records(tp.topic, tp.partition)[-1:]
        )

    def fetch(self, *, skip: set[tuple[str, int, int]] | None = None) -> int:
        """One fetch: every committed record past each position goes to the feed (in one
        chunk per topic-partition); ``skip`` loses those (topic, partition, offset) on the
        way, as a fetch loop that moved past a record would. Returns the records handed."""
        handed = 0
        fetched = []
        for tp in self.assigned:
            start = self.positions.get(tp, 0)
            found = [r for r in self.broker.records(tp.topic, tp.partition) if r.offset >= start]
            if found:
                fetched.append((found[0].seq, tp, found))
        # in the order they were written (records of one topic-partition stay together)
        for _, tp, found in sorted(fetched):
            self.positions[tp] = found[-1].offset + 1
            kept = [
                r for r in found if skip is None or (r.topic, r.partition, r.offset) not in skip
            ]
            if kept:
                self.feed.offer(tp, kept, self.app.consumer_generation_id)
                handed += len(kept)
        return handed


class MemoryEngine(LedgerEngine):
    """The real engine whose Kafka I/O goes to a :class:`MemoryBroker`."""

    def __init__(self, app: Any, cfg: Settings, feed: BatchFeed, codec: AvroCodec, broker: Any):
        super().__init__(app, cfg, feed, codec, OpenReservations())
        self.broker = broker
        self.writers: dict[int, MemoryWriter] = {}

    @property
    def group(self) -> Any:
        return self.broker

    def new_writer(self, partition: int) -> Any:
        writer = self.writers[partition] = MemoryWriter(self.broker, partition)
        return writer

    def read_changelog(self, topic: str, partition: int, start: int, apply: Any) -> ReadResult:
        result: ReadResult = self.broker.read(topic, partition, start, apply)
        return result

    def first_committed(self, topic: str, partition: int, start: int) -> int | None:
        found: int | None = self.broker.first_committed(topic, partition, start)
        return found


def settings(**overrides: Any) -> Settings:
    """Settings of a test app: its own topic names, 4 partitions, small batches."""
    base: dict[str, Any] = {
        "app_id": "agents-test",
        "topic_prefix": "agents-test.",
        "partitions": 4,
        "ledger_batch_max": 50,
        "max_qty": 1000,
    }
    base.update(overrides)
    return Settings(**base)


def key_on(partition: int, cfg: Settings, prefix: str = "SKU") -> str:
    """The first ``{prefix}-{n}`` whose key lands on ``partition``."""
    for n in range(10_000):
        name = f"{prefix}-{n}"
        if partition_for(name.encode("utf-8"), cfg.partitions) == partition:
            return name
    raise AssertionError(f"no key on partition {partition}")


_EVENT_IDS = itertools.count(1)


def now_ms() -> int:
    return int(time.time() * 1000)


class Worker:
    """One worker's ledger engine over a :class:`MemoryBroker` (see the module docstring)."""

    def __init__(self, broker: MemoryBroker, cfg: Settings, datadir: Path) -> None:
        self.broker = broker
        self.cfg = cfg
        self.codec = AvroCodec()
        self.feed = BatchFeed(cfg.input_topics)
        recovered = threading.Event()
        recovered.set()
        self.app = SimpleNamespace(
            conf=SimpleNamespace(datadir=datadir),
            rebalancing=False,
            consumer_generation_id=0,
            tables=SimpleNamespace(recovery=SimpleNamespace(completed=recovered)),
            monitor=SimpleNamespace(on_tp_commit=lambda offsets: None),
        )
        self.consumer = MemoryConsumer(broker, self.feed, self.app)
        self.app.consumer = self.consumer
        self.engine = MemoryEngine(self.app, cfg, self.feed, self.codec, broker)

    # --- the group protocol ------------------------------------------------

    async def assign(self, partitions: Iterable[int], generation: int | None = None) -> None:
        """A rebalance gave this worker ``partitions`` (of every input topic); returns once
        each has taken ownership (ready, or halted)."""
        parts = sorted(partitions)
        self.app.consumer_generation_id = (
            generation if generation is not None else self.app.consumer_generation_id + 1
        )
        tps = {TP(t, p) for t in self.cfg.input_topics for p in parts}
        self.consumer.assigned = tps
        for tp in tps:
            self.consumer.positions.setdefault(tp, 0)
        await self.engine.on_assigned(tps)
        await self.until(
            lambda: all(
                ledger.state in (State.READY, State.HALTED)
                for ledger in self.engine.partitions.values()
            ),
            "every assigned partition took ownership",
        )

    async def revoke(self) -> None:
        tps = set(self.consumer.assigned)
        self.consumer.assigned = set()
        await self.engine.on_revoked(tps)

    async def stop(self) -> None:
        await self.engine.stop()
        self.engine.executor.shutdown(wait=False, cancel_futures=True)

    # --- producing into the inputs ------------------------------------------

    def send(
        self,
        name: str,
        fields: dict[str, Any],
        *,
        partition: int | None = None,
        key: bytes | None = None,
        headers: Iterable[tuple[str, bytes]] = (),
    ) -> tuple[str, int, int]:
        """Encode ``name`` and write it to its input topic (keyed by its sku, on the key's
        partition unless told otherwise); returns (topic, partition, offset)."""
        topic = topic_of(self.cfg, name)
        record = {"event_id": f"e-{next(_EVENT_IDS)}", "occurred_at": now_ms(), **fields}
        value = self.codec.encode(name, record)
        k = key if key is not None else record["sku"].encode("utf-8")
        return self.send_raw(topic, k, value, partition=partition, headers=headers)

    def send_raw(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        *,
        partition: int | None = None,
        headers: Iterable[tuple[str, bytes]] = (),
    ) -> tuple[str, int, int]:
        part = (
            partition if partition is not None else partition_for(key or b"", self.cfg.partitions)
        )
        return topic, part, self.broker.produce(topic, part, key, value, headers)

    # --- waiting for the code under test -----------------------------------

    async def until(self, done: Callable[[], bool], what: str, timeout: float = SETTLE_S) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout} s: {what}")
            await asyncio.sleep(0.002)

    def quiet(self) -> bool:
        """Every partition's ledger took all it was handed and committed it (or halted)."""
        for ledger in self.engine.partitions.values():
            if ledger.state is State.HALTED:
                continue
            if ledger.state is not State.READY or not ledger._idle.is_set():
                return False
            if ledger._carry or self.feed.pending(ledger.partition):
                return False
            flight = ledger._in_flight
            if flight is not None and not flight.done():
                return False
        return True

    async def settle(self, timeout: float = SETTLE_S) -> None:
        """Fetch and wait until every record of the assigned inputs has been decided
        (a re-read the ledger asks for with a seek is fetched too)."""
        deadline = time.monotonic() + timeout
        while True:
            self.consumer.fetch()
            await asyncio.sleep(0.002)
            if self.quiet() and not self.consumer.behind():
                await asyncio.sleep(0.005)  # one more turn: nothing new was asked for
                if self.quiet() and not self.consumer.behind():
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"the ledger did not settle within {timeout} s")

    # --- reading what happened -----------------------------------------------

    def ledger(self, partition: int) -> PartitionLedger:
        return self.engine.partitions[partition]

    def stock(self, sku: str) -> Any:
        """The SKU's committed state as ``GET /stock`` reads it (None: unknown)."""
        ledger = self.engine.ledger_for(sku)
        assert ledger is not None, f"{sku}'s partition is not assigned here"
        return ledger.lookup(sku)

    def dead_letters(self) -> list[dict[str, Any]]:
        return [
            self.codec.decode(r.value)[1]
            for r in self.broker.records(self.cfg.dead_letters_topic)
            if r.value is not None
        ]


def topic_of(cfg: Settings, name: str) -> str:
    """The input topic that carries record type ``name``."""
    for topic, names in records_for_topic(cfg).items():
        if name in names:
            return topic
    raise AssertionError(f"{name} is no ledger input")


class MemoryTopic:
    """A Faust topic's ``send`` (what the saga handler awaits), kept in a list."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[SimpleNamespace] = []

    async def send(
        self,
        *,
        key: bytes | None = None,
        value: bytes | None = None,
        partition: int | None = None,
        headers: Any = None,
    ) -> None:
        self.sent.append(
            SimpleNamespace(key=key, value=value, partition=partition, headers=headers)
        )


class SagaRig:
    """The real :class:`~agents.orders.SagaHandler` over a dict for its Faust table and
    :class:`MemoryTopic` outputs; :meth:`checkout` and :meth:`answer` hand it one event
    each, as the ``order_saga`` agent does, with the next offset of their partition."""

    def __init__(self, cfg: Settings) -> None:
        from agents.orders import SagaHandler, SagaOutputs
        from tables.orders import FinishedSagas, OpenSagas

        self.cfg = cfg
        self.codec = AvroCodec()
        self.table: dict[bytes, bytes] = {}
        self.open_sagas = OpenSagas()
        self.finished = FinishedSagas()
        self.outputs = SagaOutputs(
            checkouts=MemoryTopic(cfg.checkouts_topic),
            ledger=MemoryTopic(cfg.orders_topic),
            order_results=MemoryTopic(cfg.order_results_topic),
            dead_letters=MemoryTopic(cfg.dead_letters_topic),
        )
        self.handler = SagaHandler(
            self.table, self.codec, cfg, self.open_sagas, self.finished, self.outputs
        )
        self._offsets: dict[tuple[str, int], int] = {}

    def partition_of(self, key: bytes) -> int:
        return partition_for(key, self.cfg.partitions)

    async def deliver(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> tuple[str, int, int]:
        """One record of ``topic`` to the handler; returns its (topic, partition, offset)."""
        part = partition if partition is not None else self.partition_of(key or b"")
        offset = self._offsets.get((topic, part), 0)
        self._offsets[(topic, part)] = offset + 1
        await self.redeliver(topic, key, value, part, offset)
        return topic, part, offset

    async def redeliver(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int, offset: int
    ) -> None:
        message = SimpleNamespace(
            topic=topic, partition=partition, offset=offset, timestamp=time.time()
        )
        await self.handler.handle(SimpleNamespace(key=key, value=value, message=message))

    async def checkout(
        self, name: str, fields: dict[str, Any], *, partition: int | None = None
    ) -> tuple[str, int, int]:
        """A checkouts command (PlaceOrder, CommitOrder, CancelOrder) keyed by its order."""
        record = {"event_id": f"c-{next(_EVENT_IDS)}", "occurred_at": now_ms(), **fields}
        key = record["order_id"].encode("utf-8")
        value = self.codec.encode(name, record)
        return await self.deliver(self.cfg.checkouts_topic, key, value, partition)

    async def answer(self, command: SimpleNamespace, outcome: str, **fields: Any) -> None:
        """The ledger's ReservationResult to one of the saga's ledger commands."""
        record = {
            "event_id": command.fields["event_id"],
            "order_id": command.fields["order_id"],
            "sku": command.fields["sku"],
            "outcome": outcome,
            "qty": command.fields.get("qty", 0),
            "available": 0,
            **fields,
        }
        key = record["order_id"].encode("utf-8")
        await self.deliver(
            self.cfg.line_results_topic, key, self.codec.encode("ReservationResult", record)
        )

    # --- what it did ---------------------------------------------------------

    def saga(self, order_id: str) -> Any:
        from tables.orders import StoredSaga

        raw = self.table.get(order_id.encode("utf-8"))
        return StoredSaga.from_bytes(raw) if raw is not None else None

    def take_commands(self) -> list[SimpleNamespace]:
        """The ledger commands sent since the last call, decoded."""
        sent, self.outputs.ledger.sent = self.outputs.ledger.sent, []
        out = []
        for s in sent:
            name, fields = self.codec.decode(s.value)
            out.append(SimpleNamespace(name=name, fields=fields, **vars(s)))
        return out

    def dead_letters(self) -> list[dict[str, Any]]:
        return [self.codec.decode(s.value)[1] for s in self.outputs.dead_letters.sent]
