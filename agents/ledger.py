"""The ledger engine: every input partition decided in batches, one transaction per batch.

Faust's group protocol assigns the input partitions (orders, restocks and
returns are co-partitioned: partition ``p`` of each goes to one worker); the
worker's consumer hands their records to a :class:`pipeline.kafka.feed.BatchFeed`
instead of one Faust event per record. For each assigned partition number ``p``
a :class:`PartitionLedger` task then:

1. **takes ownership**: starts the transactional producer of ``p``
   (``init_transactions`` fences every earlier owner, a paused worker included,
   and aborts its open transaction), reads the changelog of ``p`` from the
   offset its local RocksDB has to the end (the new owner's view now contains
   everything any owner committed), and reads the group's committed offsets of
   the three input partitions: the next record to apply of each;
2. **decides batches**: takes up to ``ledger_batch_max`` records, checks each
   is the next offset of its topic-partition (an earlier one is skipped; a
   later one means a record went missing: the partition re-reads from the
   missing offset, unless the broker shows nothing committed in between, as
   after transaction markers), decodes and validates them (bad input becomes a
   dead letter, a record on the wrong partition is re-sent to the right one),
   and folds the commands (:func:`pipeline.batch.fold`);
3. **commits the batch** in one Kafka transaction: one changelog record per
   touched SKU (state, watermarks, the batch's effects), one per changed
   reservation, the dead letters and re-routed records, and the input offsets.
   Only then it writes local RocksDB (one WriteBatch with the changelog
   offset), so local state is never ahead of the changelog.

A rebalance stops every partition's task after its batch in flight, drops what
the feed buffered, and starts the task again for each partition assigned in the
new generation: ownership is taken again every time, because a worker cannot
tell whether a partition it holds in both generations was elsewhere meanwhile
(it may have been paused through a whole generation). A fenced or failed
producer restarts the partition the same way.

StockChanged and ReservationResult are not sent here: the relay
(:mod:`pipeline.relay`) publishes them from the changelog, so they exist if and
only if the state that caused them does.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from config.settings import Settings
from pipeline import batch, core, metrics
from pipeline.kafka.feed import BatchFeed, Chunk
from pipeline.kafka.transactions import (
    BatchAborted,
    BrokerQueries,
    Out,
    PartitionWriter,
    WriterLost,
    first_committed_offset,
    read_partition,
)
from pipeline.logs import log_context
from pipeline.partitioning import partition_for
from pipeline.store import PartitionStore, store_path
from pipeline.topics import changelog_topic
from pipeline.validation import Invalid, to_command
from schemas.codec import AvroCodec, DecodeError
from schemas.registry import RegistryError
from tables.stock import (
    OpenReservations,
    StoredReservation,
    StoredStock,
    stock_key,
)

log = logging.getLogger("inventory.agents")  # the name operators filter decisions by

REPLY_HEADER = "inventory-reply-to"
REPLY_TAGS = frozenset({"saga"})  # the internal reply topics a command may ask for
CACHE_MAX = 50_000  # decoded SKU records kept per partition
REWIND_GRACE_S = 3.0


def now_ms() -> int:
    return int(time.time() * 1000)


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPED = "stopped"


class PartitionLedger:
    """Owns and decides one ledger partition for one consumer group generation."""

    def __init__(self, engine: LedgerEngine, partition: int, generation: int) -> None:
        self.engine = engine
        self.cfg = engine.cfg
        self.partition = partition
        self.generation = generation
        self.state = State.STARTING
        self.store = engine.store(partition)
        self.writer = PartitionWriter(self.cfg, partition, engine.group, engine.executor)
        self.changelog = changelog_topic(self.cfg)
        self.cache: dict[str, StoredStock] = {}
        self.expected: dict[str, int] = {}  # input topic -> next offset to apply
        self.rewinding: dict[str, float] = {}  # input topic -> when a re-read was asked
        self.known_end = 0  # changelog end after our own last write
        self.starts = 0
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._last_progress = time.monotonic()

    # --- lifecycle --------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self, timeout: float) -> None:
        """Stop after the batch in flight (its transaction commits or aborts)."""
        self._stopping = True
        self.engine.feed.reset([self.partition])  # wakes the task if it waits
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("ledger partition %d: batch still in flight at stop", self.partition)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping
                pass
        await self.writer.close()
        self.state = State.STOPPED

    async def _run(self) -> None:
        backoff = 0.5
        while not self._stopping:
            try:
                await self._take_ownership()
                self.state = State.READY
                self.engine.on_partition_ready(self)
                backoff = 0.5
                await self._decide_forever()
            except asyncio.CancelledError:
                raise
            except WriterLost as exc:
                log.warning(
                    "ledger partition %d lost its writer (%s); taking it again", self.partition, exc
                )
            except Exception:  # noqa: BLE001 - a broker hiccup must not end the partition
                log.exception("ledger partition %d failed; taking it again", self.partition)
            self.state = State.STARTING
            self.cache.clear()
            metrics.LEDGER_RESTARTS.inc()
            if self._stopping:
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _take_ownership(self) -> None:
        self.starts += 1
        started = time.monotonic()
        await self.writer.open()  # fences every earlier owner of this partition
        loop = asyncio.get_running_loop()
        store = self.store
        self.cache.clear()
        before = store.changelog_next

        def apply(records: list[tuple[bytes, bytes | None, int]]) -> None:
            store.write_raw(records, records[-1][2] + 1)

        result = await loop.run_in_executor(
            self.engine.executor,
            lambda: read_partition(
                self.cfg, self.changelog, self.partition, store.changelog_next, apply
            ),
        )
        if result.end != store.changelog_next:
            store.write([], result.end)
        self.known_end = result.end
        inputs = [(t, self.partition) for t in self.cfg.input_topics]
        queries = self.engine.group
        committed = await loop.run_in_executor(self.engine.executor, queries.committed, inputs)
        bounds = await loop.run_in_executor(self.engine.executor, queries.bounds, inputs)
        self.expected = {}
        for (topic, part), offset in committed.items():
            low = bounds[(topic, part)][0]
            start = low if offset is None else offset
            if offset is not None and offset < low:
                log.error(
                    "input %s/%d: committed @%d is below the log start @%d: "
                    "records were deleted before they were applied",
                    topic,
                    part,
                    offset,
                    low,
                )
                metrics.INPUT_GAPS.labels(topic).inc(low - offset)
                start = low
            self.expected[topic] = start
        self.rewinding = {}
        await self.engine.seek(self.partition, self.expected)
        self.engine.feed.reset([self.partition])
        self._last_progress = time.monotonic()
        log.info(
            "ledger partition %d ready: changelog @%d -> @%d (%d records) in %.2f s, inputs %s",
            self.partition,
            before,
            result.end,
            result.records,
            time.monotonic() - started,
            self.expected,
        )

    # --- deciding ---------------------------------------------------------

    async def _decide_forever(self) -> None:
        feed = self.engine.feed
        max_batch = self.cfg.ledger_batch_max
        while not self._stopping:
            if not await feed.wait(self.partition, 1.0):
                await self._watch_for_stall()
                continue
            if self._stopping or not self.engine.owns(self):
                return
            chunks = feed.take(self.partition, max_batch)
            if chunks:
                self._idle.clear()
                try:
                    await self._apply(chunks)
                finally:
                    self._idle.set()

    async def _apply(self, chunks: list[Chunk]) -> None:
        cfg = self.cfg
        inputs: list[batch.Input] = []
        sources: list[Any] = []  # the record of each input (dead letters, logs)
        extra: list[Out] = []
        moved: dict[tuple[str, int], int] = {}
        arrivals: list[tuple[float, int]] = []  # (arrival time, records) per chunk
        dead = 0
        for chunk in chunks:
            if chunk.generation != self.generation:
                continue  # fetched before the current generation: its seek re-reads it
            topic = chunk.tp.topic
            arrivals.append((chunk.arrived, len(chunk.records)))
            for rec in chunk.records:
                verdict = await self._sequence(topic, rec.offset)
                if verdict is None:
                    continue
                if verdict is False:
                    break  # a re-read from the missing offset is under way
                self.expected[topic] = rec.offset + 1
                moved[(topic, self.partition)] = rec.offset + 1
                command, out = await self._classify(topic, rec)
                if command is not None:
                    inputs.append(batch.Input(topic, rec.offset, command, _reply_to(rec.headers)))
                    sources.append(rec)
                elif out is not None:
                    extra.append(out)
                    dead += out.topic == cfg.dead_letters_topic
        if not moved:
            return
        started = time.perf_counter()
        now = now_ms()
        result = batch.fold(
            inputs,
            self._load_stock,
            self._load_reservation,
            now,
            dedupe_window=cfg.dedupe_window,
            low_stock_threshold=cfg.low_stock_threshold,
            max_commands_per_sku=cfg.ledger_batch_max,
        )
        assert result.applied == len(inputs), "batches are cut to the per-SKU cap"
        decided = time.perf_counter()
        outs = self._changelog_records(result)
        for decision, inp, rec in zip(result.decisions, inputs, sources, strict=True):
            if (
                decision is not None
                and decision.outcome is core.Outcome.UNKNOWN_RESERVATION
                and isinstance(inp.command, (core.CommitReservation, core.ReleaseReservation))
            ):
                extra.append(
                    self._dead_letter(
                        "unknown_reservation",
                        f"no reservation for order {inp.command.order_id}",
                        inp.topic,
                        rec,
                    )
                )
        outs.extend(extra)
        delivered = await self._commit(outs, moved)
        committed = time.perf_counter()
        self._store(result, delivered)
        self._last_progress = time.monotonic()
        self._count(result, inputs, now)
        self.engine.on_committed(self.partition, moved)
        metrics.BATCH_SIZE.observe(len(inputs))
        metrics.BATCH_COMMIT_SECONDS.observe(committed - decided)
        metrics.BATCH_FOLD_SECONDS.observe(decided - started)
        done = time.monotonic()
        observe = metrics.DECISION_SECONDS.observe
        for arrived, n in arrivals:
            latency = max(0.0, done - arrived)
            for _ in range(n):
                observe(latency)
        if dead:
            log.debug("batch of partition %d had %d dead letters", self.partition, dead)

    async def _sequence(self, topic: str, offset: int) -> bool | None:
        """True: the next record of its partition; None: seen already (skip); False: a
        record before it is missing (it is re-read; skip this and the rest of the chunk)."""
        expected = self.expected.get(topic)
        if expected is None:
            return None
        if offset < expected:
            metrics.REDELIVERED.labels(topic).inc()
            return None
        if offset == expected:
            self.rewinding.pop(topic, None)
            return True
        since = self.rewinding.get(topic)
        if since is not None and time.monotonic() - since < REWIND_GRACE_S:
            return False  # fetched before the re-read's seek: it comes again
        loop = asyncio.get_running_loop()
        try:
            first = await loop.run_in_executor(
                self.engine.executor,
                first_committed_offset,
                self.cfg,
                topic,
                self.partition,
                expected,
            )
        except Exception as exc:  # noqa: BLE001 - broker away: re-read to be safe
            log.warning(
                "input %s/%d: cannot check a gap at @%d (%s)", topic, self.partition, expected, exc
            )
            first = expected
        if first is None or first >= offset:
            # nothing committed in between: transaction markers or aborted records
            self.rewinding.pop(topic, None)
            return True
        log.error(
            "input %s/%d: record @%d arrived but @%d..%d did not; re-reading from @%d",
            topic,
            self.partition,
            offset,
            expected,
            offset - 1,
            expected,
        )
        metrics.INPUT_GAPS.labels(topic).inc(offset - expected)
        self.rewinding[topic] = time.monotonic()
        await self.engine.seek(self.partition, {topic: expected})
        metrics.INPUT_REWINDS.inc()
        return False

    async def _watch_for_stall(self) -> None:
        """Nothing arrived for a while: re-read any input whose log holds records past
        its next offset (a record lost with nothing after it to reveal the gap)."""
        if time.monotonic() - self._last_progress < self.cfg.ledger_stall_after_s:
            return
        self._last_progress = time.monotonic()
        loop = asyncio.get_running_loop()
        tps = [(t, self.partition) for t in self.expected]
        try:
            bounds = await loop.run_in_executor(self.engine.executor, self.engine.group.bounds, tps)
        except Exception:  # noqa: BLE001 - asked again on the next idle second
            return
        for (topic, _), (_low, high) in bounds.items():
            nxt = self.expected.get(topic)
            if nxt is None or nxt >= high:
                continue
            first = await loop.run_in_executor(
                self.engine.executor, first_committed_offset, self.cfg, topic, self.partition, nxt
            )
            if first is None:
                continue  # only markers past it
            log.warning(
                "input %s/%d: nothing applied for %.0f s while @%d..%d wait; re-reading",
                topic,
                self.partition,
                self.cfg.ledger_stall_after_s,
                nxt,
                high - 1,
            )
            metrics.INPUT_STALLS.labels(topic).inc()
            self.rewinding[topic] = time.monotonic()
            await self.engine.seek(self.partition, {topic: nxt})

    async def _classify(self, topic: str, rec: Any) -> tuple[core.Command | None, Out | None]:
        """The record's command, or the dead letter / re-routed record it becomes."""
        key: bytes | None = rec.key
        value: bytes = rec.value if rec.value is not None else b""
        delay = 0.5
        while True:
            try:
                name, fields = self.engine.codec.decode(value)
                command = to_command(topic, key, name, fields, self.cfg)
                break
            except (DecodeError, Invalid) as exc:
                return None, self._dead_letter(exc.reason, exc.detail, topic, rec)
            except RegistryError as exc:
                # the registry is down, not the record bad: wait, never dead-letter good input
                log.warning("schema registry unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        assert key is not None  # to_command checked key == sku
        expected = partition_for(key, self.cfg.partitions)
        if expected != self.partition:
            # a producer with another partitioner (librdkafka's consistent_random): applying
            # it here would split the SKU's state across two partitions
            metrics.REROUTED.labels(topic).inc()
            log.info(
                "rerouted %s %s/%d@%d to partition %d",
                command.event_id,
                topic,
                self.partition,
                rec.offset,
                expected,
            )
            return None, Out(topic, expected, key, value, list(rec.headers or ()) or None)
        return command, None

    def _dead_letter(self, reason: str, detail: str, topic: str, rec: Any) -> Out:
        metrics.DEAD_LETTERS.labels(reason).inc()
        with log_context(topic=topic, partition=self.partition, offset=rec.offset):
            log.warning(
                "dead letter %s from %s/%d@%d: %s",
                reason,
                topic,
                self.partition,
                rec.offset,
                detail,
            )
        key: bytes | None = rec.key
        record = {
            "reason": reason,
            "detail": detail[:1000],
            "source_topic": topic,
            "source_partition": self.partition,
            "source_offset": rec.offset,
            "key": key,
            "value": rec.value if rec.value is not None else b"",
            "dead_at": now_ms(),
        }
        part = partition_for(key, self.cfg.partitions) if key else self.partition
        return Out(
            self.cfg.dead_letters_topic, part, key, self.engine.codec.encode("DeadLetter", record)
        )

    def _changelog_records(self, result: batch.BatchResult) -> list[Out]:
        outs = [
            Out(self.changelog, self.partition, key, value.to_bytes())
            for key, value in sorted(result.reservations.items())
        ]
        outs.extend(
            Out(self.changelog, self.partition, key, value.to_bytes())
            for key, value in batch.stock_writes(result)
        )
        return outs

    async def _commit(self, outs: list[Out], moved: dict[tuple[str, int], int]) -> list[Any]:
        for attempt in range(5):
            if not self.engine.owns(self):
                raise WriterLost("the partition was revoked before its batch committed")
            try:
                return await self.writer.commit(outs, moved)
            except BatchAborted as exc:
                log.warning(
                    "batch of ledger partition %d aborted (%s); retry %d",
                    self.partition,
                    exc,
                    attempt + 1,
                )
                metrics.BATCH_ABORTS.inc()
                await asyncio.sleep(0.1 * (attempt + 1))
        raise WriterLost("five aborted transactions in a row")

    def _store(self, result: batch.BatchResult, delivered: list[tuple[str, int, int]]) -> None:
        last = max(
            (off for t, p, off in delivered if t == self.changelog and p == self.partition),
            default=None,
        )
        puts: list[tuple[bytes, bytes]] = [
            (k, v.to_bytes()) for k, v in result.reservations.items()
        ]
        for key, stored in batch.stock_writes(result):
            slim = StoredStock(stored.record, stored.watermarks, {}, stored.version_at)
            self.cache[stored.record.sku] = slim
            puts.append((key, slim.to_bytes()))
        nxt = self.store.changelog_next if last is None else last + 1
        self.store.write(puts, nxt)
        if last is not None:
            self.known_end = last + 2  # our commit marker follows our last record
        if len(self.cache) > CACHE_MAX:
            self.cache.clear()
        index = self.engine.open_reservations
        for key, res in result.reservations.items():
            index.note(key, res.current)

    def _load_stock(self, sku: str) -> StoredStock | None:
        stored = self.cache.get(sku)
        if stored is None:
            raw = self.store.get(stock_key(sku))
            if raw is None:
                return None
            stored = StoredStock.from_bytes(raw)
            self.cache[sku] = stored
        return stored

    def _load_reservation(self, key: bytes) -> StoredReservation | None:
        raw = self.store.get(key)
        return StoredReservation.from_bytes(raw) if raw is not None else None

    def _count(self, result: batch.BatchResult, inputs: list[batch.Input], now: int) -> None:
        counters = self.engine.counters
        for decision, inp in zip(result.decisions, inputs, strict=True):
            if decision is None:
                metrics.REDELIVERED.labels(inp.topic).inc()
                continue
            counters.decided(decision, inp.command, now)

    # --- reading ----------------------------------------------------------

    async def fresh(self) -> bool:
        """True when no other writer appended to the changelog since our last write."""
        if self.state is not State.READY or not self.engine.owns(self):
            return False
        loop = asyncio.get_running_loop()
        try:
            bounds = await loop.run_in_executor(
                self.engine.executor,
                self.engine.group.bounds,
                [(self.changelog, self.partition)],
                2.0,
            )
        except Exception:  # noqa: BLE001 - cannot tell: not fresh
            return False
        high = bounds[(self.changelog, self.partition)][1]
        if high <= self.known_end or not self._idle.is_set():
            return True
        return False

    def lookup(self, sku: str) -> StoredStock | None:
        return self._load_stock(sku)


class Counters:
    """Prometheus children cached per label tuple (``labels()`` costs ~1.5 us a call)."""

    def __init__(self) -> None:
        self._commands: dict[tuple[str, str, str], Any] = {}
        self._rejections: dict[str, Any] = {}

    def decided(self, decision: core.Decision, command: core.Command, now: int) -> None:
        metrics.COMMAND_AGE_SECONDS.observe(max(0, now - command.occurred_at) / 1000)
        res = decision.reservation
        if res is not None and decision.outcome is core.Outcome.RESERVED:
            if res.from_allocation:
                metrics.CHANNEL_UNITS_RESERVED.labels(res.channel, "allocation").inc(
                    res.from_allocation
                )
            if res.qty > res.from_allocation:
                metrics.CHANNEL_UNITS_RESERVED.labels(res.channel, "shared").inc(
                    res.qty - res.from_allocation
                )
        for e in decision.events:
            if isinstance(e, core.CommandApplied):
                label = (e.command_type, e.outcome.value, e.channel)
                child = self._commands.get(label)
                if child is None:
                    child = self._commands[label] = metrics.COMMANDS.labels(*label)
                child.inc()
                if e.outcome is core.Outcome.REJECTED:
                    rej = self._rejections.get(e.channel)
                    if rej is None:
                        rej = self._rejections[e.channel] = metrics.REJECTIONS.labels(e.channel)
                    rej.inc()
                elif e.outcome is core.Outcome.SHORTFALL:
                    metrics.SHORTFALLS.inc()
                    log.warning(
                        "shortfall on %s: %s",
                        e.sku,
                        e.reason,
                        extra={"sku": e.sku, "event_id": e.event_id},
                    )
            elif isinstance(e, core.LowStockCrossed):
                metrics.LOW_STOCK.labels(e.direction).inc()


def _reply_to(headers: Any) -> str:
    for name, value in headers or ():
        if name == REPLY_HEADER:
            tag = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            return tag if tag in REPLY_TAGS else ""
    return ""


class LedgerEngine:
    """The worker's ledger partitions: started on assignment, stopped on revocation."""

    def __init__(
        self,
        app: Any,
        cfg: Settings,
        feed: BatchFeed,
        codec: AvroCodec,
        open_reservations: OpenReservations,
    ) -> None:
        self.app = app
        self.cfg = cfg
        self.feed = feed
        self.codec = codec
        self.open_reservations = open_reservations
        self.counters = Counters()
        self.partitions: dict[int, PartitionLedger] = {}
        self._stores: dict[int, PartitionStore] = {}
        self.executor = ThreadPoolExecutor(
            max_workers=max(4, 2 * cfg.partitions + 2), thread_name_prefix="ledger"
        )
        self._group: BrokerQueries | None = None
        self.generation: int | None = None
        self.ready_token = 0  # changes whenever a partition (re)takes ownership

    @property
    def group(self) -> BrokerQueries:
        if self._group is None:
            self._group = BrokerQueries(self.cfg)
        return self._group

    def store(self, partition: int) -> PartitionStore:
        store = self._stores.get(partition)
        if store is None:
            store = self._stores[partition] = PartitionStore(
                store_path(self.app.conf.datadir, partition),
                {
                    "write_buffer_mb": self.cfg.rocksdb_write_buffer_mb,
                    "max_write_buffers": self.cfg.rocksdb_max_write_buffers,
                    "block_cache_mb": self.cfg.rocksdb_block_cache_mb,
                },
            )
        return store

    def owns(self, ledger: PartitionLedger) -> bool:
        return (
            self.partitions.get(ledger.partition) is ledger
            and not self.app.rebalancing
            and self.app.consumer_generation_id == ledger.generation
        )

    def on_partition_ready(self, ledger: PartitionLedger) -> None:
        self.ready_token += 1

    def ready(self) -> bool:
        return all(p.state is State.READY for p in self.partitions.values())

    def ledger_for(self, sku: str) -> PartitionLedger | None:
        return self.partitions.get(partition_for(stock_key(sku), self.cfg.partitions))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every key of every ready partition's local store (for the sweeper's scans)."""
        for ledger in list(self.partitions.values()):
            if ledger.state is State.READY:
                yield from ledger.store.items()

    def on_committed(self, partition: int, moved: dict[tuple[str, int], int]) -> None:
        """Faust's committed-offset gauge (the dashboard's consumer lag) for our commits."""
        new_tp = self.app.consumer._new_topicpartition
        self.app.monitor.on_tp_commit({new_tp(t, p): o for (t, p), o in moved.items()})

    async def seek(self, partition: int, offsets: dict[str, int]) -> None:
        """Point the consumer's fetch position of ``partition``'s inputs at ``offsets``."""
        consumer = self.app.consumer
        tps = {consumer._new_topicpartition(t, partition): o for t, o in offsets.items()}
        assigned = consumer.assignment()
        tps = {tp: o for tp, o in tps.items() if tp in assigned}
        if tps:
            await consumer.seek_wait(tps)

    async def on_revoked(self, revoked: set[Any]) -> None:
        parts = {tp.partition for tp in revoked if tp.topic in self.cfg.input_topics}
        stopping = [self.partitions.pop(p) for p in list(self.partitions) if p in parts]
        self.feed.reset(parts)
        await asyncio.gather(*(ledger.stop(self.cfg.transaction_timeout_s) for ledger in stopping))

    async def on_assigned(self, assigned: set[Any]) -> None:
        generation = self.app.consumer_generation_id
        parts = {tp.partition for tp in assigned if tp.topic in self.cfg.input_topics}
        # anything still running belongs to an older generation
        old = list(self.partitions.values())
        self.partitions = {}
        self.feed.reset()
        await asyncio.gather(*(ledger.stop(self.cfg.transaction_timeout_s) for ledger in old))
        for part in list(self._stores):
            if part not in parts:
                self._stores.pop(part).close()
        self.generation = generation
        for part in sorted(parts):
            ledger = PartitionLedger(self, part, generation)
            self.partitions[part] = ledger
            ledger.start()
        log.info("ledger partitions %s assigned in generation %s", sorted(parts), generation)

    async def stop(self) -> None:
        ledgers = list(self.partitions.values())
        self.partitions = {}
        await asyncio.gather(*(ledger.stop(self.cfg.transaction_timeout_s) for ledger in ledgers))
        for store in self._stores.values():
            store.close()
        self._stores.clear()
        if self._group is not None:
            self._group.close()
