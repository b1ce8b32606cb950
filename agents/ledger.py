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
import ctypes
import enum
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson

from config.settings import Settings
from pipeline import batch, metrics
from pipeline.clock import now_ms
from pipeline.dead_letters import dead_letter
from pipeline.domain import core
from pipeline.kafka.feed import BatchFeed, Chunk
from pipeline.kafka.partitioning import partition_for
from pipeline.kafka.topics import ledger_changelogs
from pipeline.kafka.transactions import (
    BatchAborted,
    BrokerQueries,
    Out,
    PartitionWriter,
    ReadResult,
    WriterLost,
    first_committed_offset,
    read_partition,
)
from pipeline.logs import log_context
from pipeline.store import PartitionStore, store_path
from schemas.codec import AvroCodec, DecodeError, retry_while_registry_down
from schemas.registry import RegistryError
from schemas.validation import Invalid, to_command
from tables.stock import (
    EVENT_PREFIX,
    RESERVATION_SEP,
    OpenReservations,
    StoredReservation,
    StoredStock,
    StoredUsage,
    stock_key,
)

log = logging.getLogger("inventory.agents")  # the name operators filter decisions by

REPLY_HEADER = "inventory-reply-to"
# the stock changelog's record of each input's next offset, written in every batch's
# transaction (never a SKU: SKUs hold no control bytes)
POSITIONS_KEY = b"\x00positions"
PRUNE_FIRST_S = 60.0  # the first scan for expired event ids, after taking a partition
PRUNE_EVERY_S = 3600.0  # later scans (or a quarter of the retention, if shorter)
PRUNE_STEP = 2000  # event ids looked at per batch while a scan runs
REPLY_TAGS = frozenset({"saga"})  # the internal reply topics a command may ask for
CACHE_MAX = 10_000  # decoded SKU records kept per partition (the hot ones stay in)
REWIND_GRACE_S = 3.0


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    HALTED = "halted"  # an input's offsets went backwards: nothing is decided
    STOPPED = "stopped"


class OffsetRegression(Exception):
    """An input partition's log ends below the next offset the ledger would apply: the
    topic was deleted and created again, or an unclean leader election truncated it.
    Its new records would look like redeliveries and be skipped (each SKU record's
    watermarks say their offsets were applied), so the partition stops instead."""

    def __init__(self, topic: str, partition: int, end: int, expected: int) -> None:
        super().__init__(
            f"input {topic}/{partition} ends at @{end}, below the next offset to apply "
            f"@{expected} (topic re-created or an unclean leader election)"
        )
        self.topic = topic
        self.partition = partition
        self.end = end
        self.expected = expected


@dataclass(slots=True)
class Prepared:
    """A decided batch waiting for its transaction."""

    result: batch.BatchResult
    inputs: list[batch.Input]
    outs: list[Out]
    held: list[bytes]  # the reservation values, in result.reservations order
    moved: dict[tuple[str, int], int]  # next offset per input topic-partition
    arrivals: list[tuple[float, int]]
    now: int
    positions: dict[str, int]  # every input's next offset after this batch
    events: list[tuple[bytes, bytes]]  # applied event ids (key, value) to store
    deletes: list[bytes]  # event ids past their retention (tombstones)


class PartitionLedger:
    """Owns and decides one ledger partition for one consumer group generation."""

    def __init__(self, engine: LedgerEngine, partition: int, generation: int) -> None:
        self.engine = engine
        self.cfg = engine.cfg
        self.partition = partition
        self.generation = generation
        self.state = State.STARTING
        self.store = engine.store(partition)
        self.writer = engine.new_writer(partition)
        self.changelog, self.reservations = ledger_changelogs(self.cfg)
        self.cache: dict[str, StoredStock] = {}  # committed SKU records
        # decided, not yet committed: (batch number, value), newest wins
        self.pending: dict[str, tuple[int, StoredStock]] = {}
        self.pending_res: dict[bytes, tuple[int, StoredReservation]] = {}
        self.pending_ev: dict[bytes, tuple[int, int]] = {}  # event key -> (batch, at)
        self.pending_use: dict[bytes, tuple[int, StoredUsage]] = {}  # per-customer usages
        self._seq = 0
        self.expected: dict[str, int] = {}  # input topic -> next offset to apply
        self.rewinding: dict[str, float] = {}  # input topic -> when a re-read was asked
        # records taken from the feed but left for the next batch (see _prepare's budget)
        self._carry: list[Chunk] = []
        self.known_end = 0  # changelog end after our own last write
        self.starts = 0
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._in_flight: asyncio.Task[None] | None = None
        self._last_progress = time.monotonic()
        self.halted: str = ""  # why the partition stopped deciding (State.HALTED)
        self._regression_checked: dict[str, float] = {}  # topic -> last log-end check
        # the scan for event ids past their retention: where it goes on, when it starts
        self._prune_cursor: bytes | None = None
        self._prune_due = time.monotonic() + min(
            PRUNE_FIRST_S, self.cfg.event_id_retention_ms / 4000
        )
        # the same for closed reservations past theirs
        self._res_cursor: bytes | None = None
        self._res_due = time.monotonic() + min(
            PRUNE_FIRST_S, self.cfg.reservation_retention_ms / 4000
        )

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
        for task in (self._task, self._in_flight):
            if task is not None and not task.done():
                # a cancelled commit never writes local state; if its transaction
                # committed anyway, the next owner reads it from the changelog
                task.cancel()
                try:
                    await task
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
            except OffsetRegression as exc:
                metrics.OFFSET_REGRESSIONS.labels(exc.topic).inc()
                await self._halt(exc)
                return
            except Exception:  # noqa: BLE001 - a broker hiccup must not end the partition
                log.exception("ledger partition %d failed; taking it again", self.partition)
            self.state = State.STARTING
            self.cache.clear()
            metrics.LEDGER_RESTARTS.inc()
            if self._stopping:
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _halt(self, exc: OffsetRegression) -> None:
        """Decide nothing more until the partition is revoked or the worker stops."""
        self.state = State.HALTED
        self.halted = str(exc)
        metrics.LEDGER_HALTED.labels(str(self.partition)).set(1)
        log.error(
            "ledger partition %d HALTED: %s. Nothing on it is decided: its new records "
            "would be taken for ones already applied. An operator must decide what the new "
            "log means (see README, 'Offsets that go backwards')",
            self.partition,
            exc,
        )
        try:
            while not self._stopping:
                await asyncio.sleep(0.5)
        finally:
            metrics.LEDGER_HALTED.labels(str(self.partition)).set(0)

    async def _take_ownership(self) -> None:
        self.starts += 1
        started = time.monotonic()
        await self.writer.open()  # fences every earlier owner of this partition
        loop = asyncio.get_running_loop()
        # registered now, off the loop: encoding a decision must not wait on HTTP
        await self.engine.codec.ensure_registered(metrics.registry_wait, self.engine.executor)
        store = self.store
        self.cache.clear()
        before = dict(store.positions)
        read = 0
        # SKU records first: a reservation key written before the reservations had a
        # changelog of their own is overridden by any later record of it there
        for topic in (self.changelog, self.reservations):

            def apply(records: list[tuple[bytes, bytes | None, int]], topic: str = topic) -> None:
                store.write_raw(topic, records)

            async with self.engine.restoring:  # a few at a time: memory, and 2 cores
                result = await loop.run_in_executor(
                    self.engine.executor,
                    lambda t=topic, a=apply: self.engine.read_changelog(
                        t, self.partition, store.position(t), a
                    ),
                )
            if result.end != store.position(topic):
                store.write([], {topic: result.end})
            read += result.records
            if result.records > 10_000:
                # a restore filled the memtables: hand them to SST files now rather than
                # hold their memory until the next writes fill them again
                await loop.run_in_executor(self.engine.executor, store.flush)
                self.engine.after_restore()
            if topic == self.changelog:
                self.known_end = result.end
        self.expected = await self._input_positions()
        self.rewinding = {}
        self._carry = []
        await self.engine.seek(self.partition, self.expected)
        self.engine.feed.reset([self.partition])
        self._last_progress = time.monotonic()
        log.info(
            "ledger partition %d ready: changelog @%d -> @%d (%d records) in %.2f s, inputs %s",
            self.partition,
            before.get(self.changelog, 0),
            store.position(self.changelog),
            read,
            time.monotonic() - started,
            self.expected,
        )

    async def _input_positions(self) -> dict[str, int]:
        """Where each input of the partition resumes: after the last batch the changelog
        holds (its positions record, written in the batch's transaction), or the
        group's committed offset (a partition no batch of this design has written),
        or the log start."""
        loop = asyncio.get_running_loop()
        inputs = [(t, self.partition) for t in self.cfg.input_topics]
        raw = self.store.get(POSITIONS_KEY)
        logged: dict[str, int] = orjson.loads(raw) if raw is not None else {}
        queries = self.engine.group
        committed: dict[tuple[str, int], int | None] = {}
        try:
            committed = await loop.run_in_executor(
                self.engine.executor, queries.committed, inputs, 5.0
            )
        except Exception as exc:  # noqa: BLE001 - the group coordinator may be loading
            if len(logged) < len(inputs):
                raise  # nothing else says where to resume: ask again
            log.warning(
                "ledger partition %d: group offsets unreadable (%s); resuming at the "
                "changelog's positions",
                self.partition,
                exc,
            )
        bounds = await loop.run_in_executor(self.engine.executor, queries.bounds, inputs)
        out: dict[str, int] = {}
        for topic, part in inputs:
            low, high = bounds[(topic, part)]
            known = [o for o in (logged.get(topic), committed.get((topic, part))) if o is not None]
            start = max(known) if known else low
            if start > high:
                raise OffsetRegression(topic, part, high, start)
            if start < low:
                log.error(
                    "input %s/%d: resuming @%d below the log start @%d: "
                    "records were deleted before they were applied",
                    topic,
                    part,
                    start,
                    low,
                )
                metrics.INPUT_GAPS.labels(topic).inc(low - start)
                start = low
            out[topic] = start
        return out

    # --- deciding ---------------------------------------------------------

    async def _decide_forever(self) -> None:
        """Take, decide, commit; the next batch is decided while the last one commits.

        Transactions of one producer cannot overlap, so batch k+1's transaction starts
        only after batch k's committed; but its records are taken, decoded and folded
        meanwhile, on top of batch k's results (``self.pending``). If batch k fails,
        the exception ends this loop: batch k+1 is dropped with it and the partition
        takes ownership again from what the changelog holds.
        """
        feed = self.engine.feed
        max_batch = self.cfg.ledger_batch_max
        in_flight: asyncio.Task[None] | None = None
        self._in_flight = None
        try:
            while not self._stopping:
                if not self._carry and not feed.pending(self.partition):
                    if in_flight is not None:
                        # nothing to decide meanwhile: finish the commit first
                        await in_flight
                        in_flight = None
                        self._idle.set()
                        continue
                    if not await feed.wait(self.partition, 1.0):
                        await self._watch_for_stall()
                        continue
                if self._stopping or not self.engine.owns(self):
                    return
                chunks, self._carry = self._carry, []
                carried = sum(len(c.records) for c in chunks)
                if carried < max_batch:
                    chunks.extend(feed.take(self.partition, max_batch - carried))
                if not chunks:
                    continue
                self._idle.clear()
                prepared = await self._prepare(chunks)
                if in_flight is not None:
                    await in_flight
                    in_flight = None
                if prepared is None:
                    self._idle.set()
                    continue
                self._seq += 1
                self._hold(prepared, self._seq)
                in_flight = self._in_flight = asyncio.ensure_future(
                    self._finish(prepared, self._seq)
                )
        finally:
            if in_flight is not None:
                if self._stopping:
                    await asyncio.shield(in_flight)  # let the last transaction end
                else:
                    in_flight.cancel()
            self.pending.clear()
            self.pending_res.clear()
            self.pending_ev.clear()
            self.pending_use.clear()
            self._idle.set()

    async def _prepare(self, chunks: list[Chunk]) -> Prepared | None:
        """Sequence, decode, validate and fold the records of ``chunks``."""
        cfg = self.cfg
        inputs: list[batch.Input] = []
        sources: list[Any] = []  # the record of each input (dead letters, logs)
        extra: list[Out] = []
        moved: dict[tuple[str, int], int] = {}
        arrivals: list[tuple[float, int]] = []  # (arrival time, records) per chunk
        expected = self.expected
        part = self.partition
        budget = batch.RecordBudget(
            cfg.max_record_bytes,
            self._load_stock,
            cfg.restocks_topic,
            located_topics=(cfg.returns_topic,),
        )
        for index, chunk in enumerate(chunks):
            if chunk.generation != self.generation:
                continue  # fetched before the current generation: its seek re-reads it
            topic = chunk.tp.topic
            arrivals.append((chunk.arrived, len(chunk.records)))
            if self.engine.codec.registry is not None:
                await self._lookups(chunk.records)
            for position, rec in enumerate(chunk.records):
                if not budget.admit(topic, rec.key, rec.value):
                    # this SKU's changelog record is full: the rest waits for the next batch
                    rest = Chunk(
                        chunk.tp, chunk.records[position:], chunk.generation, chunk.arrived
                    )
                    self._carry = [rest, *chunks[index + 1 :]]
                    arrivals[-1] = (chunk.arrived, position)
                    metrics.BATCH_CUTS.inc()
                    break
                nxt = expected.get(topic)
                offset = rec.offset
                if nxt is None or offset < nxt:
                    if nxt is not None:
                        metrics.REDELIVERED.labels(topic).inc()
                        if topic not in self.rewinding:
                            await self._check_regression(topic, nxt)
                    continue
                if offset > nxt and not await self._gap(topic, offset):
                    break  # a re-read from the missing offset is under way
                if offset == nxt:
                    self.rewinding.pop(topic, None)
                expected[topic] = offset + 1
                moved[(topic, part)] = offset + 1
                command, out = self._classify(topic, rec)
                if command is None and out is None:
                    command, out = await self._classify_waiting(topic, rec)
                if command is not None:
                    headers = rec.headers
                    reply = _reply_to(headers) if headers else ""
                    inputs.append(batch.Input(topic, offset, command, reply))
                    sources.append(rec)
                elif out is not None:
                    extra.append(out)
            if self._carry:
                break
        if not moved:
            return None
        positions = dict(expected)  # every input's next offset once this batch is in
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
            load_event=self._load_event if cfg.event_id_retention_ms > 0 else None,
            event_retention_ms=cfg.event_id_retention_ms,
            load_usage=self._load_usage,
            location_priority=cfg.location_priority,
        )
        assert result.applied == len(inputs), "batches are cut to the per-SKU cap"
        outs, held = self._changelog_records(result)
        events = [(key, orjson.dumps({"at": at})) for key, at in result.events.items()]
        outs.extend(Out(self.reservations, part, key, value) for key, value in events)
        deletes = [key for key in self._prune_step(now) if key not in result.events]
        deletes.extend(
            key
            for key in self._prune_reservations(now)
            if key not in result.reservations and key not in self.pending_res
        )
        outs.extend(Out(self.reservations, part, key, None) for key in deletes)
        outs.append(Out(self.changelog, part, POSITIONS_KEY, orjson.dumps(positions)))
        for decision, inp, rec in zip(result.decisions, inputs, sources, strict=True):
            if decision is not None and decision.outcome is core.Outcome.LIMIT_EXCEEDED:
                why = next(e.reason for e in decision.events if isinstance(e, core.CommandApplied))
                extra.append(self._dead_letter("limit_exceeded", why, inp.topic, rec))
            elif (
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
        metrics.BATCH_FOLD_SECONDS.observe(time.perf_counter() - started)
        return Prepared(
            result, inputs, outs, held, moved, arrivals, now, positions, events, deletes
        )

    def _hold(self, prepared: Prepared, seq: int) -> None:
        """The batch's results, decided but not committed: the next batch builds on them."""
        for sku, stored in prepared.result.stocks.items():
            self.pending[sku] = (seq, stored)
        for key, res in prepared.result.reservations.items():
            self.pending_res[key] = (seq, res)
        for key, at in prepared.result.events.items():
            self.pending_ev[key] = (seq, at)
        for key, use in prepared.result.usages.items():
            self.pending_use[key] = (seq, use)

    async def _finish(self, prepared: Prepared, seq: int) -> None:
        """Commit the batch's transaction, then write local state and count."""
        started = time.perf_counter()
        delivered = await self._commit(prepared.outs)
        committed = time.perf_counter()
        self._store(prepared, delivered)
        for sku in [k for k, (s, _) in self.pending.items() if s == seq]:
            del self.pending[sku]
        for key in [k for k, (s, _) in self.pending_res.items() if s == seq]:
            del self.pending_res[key]
        for key in [k for k, (s, _) in self.pending_ev.items() if s == seq]:
            del self.pending_ev[key]
        for key in [k for k, (s, _) in self.pending_use.items() if s == seq]:
            del self.pending_use[key]
        self._last_progress = time.monotonic()
        self._count(prepared.result, prepared.inputs, prepared.now)
        self.engine.on_committed(self.partition, prepared.moved)
        metrics.BATCH_SIZE.observe(len(prepared.inputs))
        metrics.BATCH_COMMIT_SECONDS.observe(committed - started)
        done = time.monotonic()
        observe = metrics.DECISION_SECONDS.observe
        for arrived, n in prepared.arrivals:
            latency = max(0.0, done - arrived)
            for _ in range(n):
                observe(latency)

    async def _gap(self, topic: str, offset: int) -> bool:
        """A record past the next offset of its partition: True when nothing committed is
        missing in between (transaction markers, aborted records), else False (the
        missing records are re-read; skip this one and the rest of its chunk)."""
        expected = self.expected[topic]
        since = self.rewinding.get(topic)
        if since is not None and time.monotonic() - since < REWIND_GRACE_S:
            return False  # fetched before the re-read's seek: it comes again
        loop = asyncio.get_running_loop()
        try:
            first = await loop.run_in_executor(
                self.engine.executor,
                self.engine.first_committed,
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

    async def _check_regression(self, topic: str, nxt: int) -> None:
        """An unasked-for record below the next offset: raise :class:`OffsetRegression`
        when the log now ends below that offset (checked at most once a second)."""
        now = time.monotonic()
        if now - self._regression_checked.get(topic, 0.0) < 1.0:
            return
        self._regression_checked[topic] = now
        loop = asyncio.get_running_loop()
        try:
            bounds = await loop.run_in_executor(
                self.engine.executor, self.engine.group.bounds, [(topic, self.partition)], 5.0
            )
        except Exception:  # noqa: BLE001 - asked again with the next such record
            return
        high = bounds[(topic, self.partition)][1]
        if high < nxt:
            raise OffsetRegression(topic, self.partition, high, nxt)

    async def _watch_for_stall(self) -> None:
        """Nothing arrived for a while: re-read any input whose log holds records past
        its next offset (a record lost with nothing after it to reveal the gap)."""
        if time.monotonic() - self._last_progress < self.cfg.ledger_stall_after_s:
            return
        app = self.engine.app
        if app.rebalancing or not app.tables.recovery.completed.is_set():
            return  # Faust keeps the inputs paused until its own tables are restored
        self._last_progress = time.monotonic()
        loop = asyncio.get_running_loop()
        tps = [(t, self.partition) for t in self.expected]
        try:
            bounds = await loop.run_in_executor(self.engine.executor, self.engine.group.bounds, tps)
        except Exception:  # noqa: BLE001 - asked again on the next idle second
            return
        for (topic, _), (_low, high) in bounds.items():
            nxt = self.expected.get(topic)
            if nxt is not None and high < nxt:
                raise OffsetRegression(topic, self.partition, high, nxt)
            if nxt is None or nxt >= high:
                continue
            first = await loop.run_in_executor(
                self.engine.executor, self.engine.first_committed, topic, self.partition, nxt
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

    def _classify(self, topic: str, rec: Any) -> tuple[core.Command | None, Out | None]:
        """The record's command, or the dead letter / re-routed record it becomes;
        (None, None) when the schema registry did not answer (see _classify_waiting)."""
        value: bytes = rec.value if rec.value is not None else b""
        try:
            name, fields = self.engine.codec.decode(value)
            command = to_command(topic, rec.key, name, fields, self.cfg)
        except (DecodeError, Invalid) as exc:
            return None, self._dead_letter(exc.reason, exc.detail, topic, rec)
        except RegistryError:
            return None, None
        return self._placed(topic, rec, command)

    async def _lookups(self, records: Sequence[Any]) -> None:
        """Fetch the writer schemas ``records`` need from the registry, off the event loop
        (so that _classify does no I/O); while the registry is down, wait."""
        codec, executor = self.engine.codec, self.engine.executor
        await retry_while_registry_down(
            lambda: codec.prepare((r.value for r in records), executor), metrics.registry_wait
        )

    async def _classify_waiting(
        self, topic: str, rec: Any
    ) -> tuple[core.Command | None, Out | None]:
        """_classify after a registry failure: look the schema up again off the loop."""
        while True:
            await self._lookups([rec])
            command, out = self._classify(topic, rec)
            if command is not None or out is not None:
                return command, out

    def _placed(
        self, topic: str, rec: Any, command: core.Command
    ) -> tuple[core.Command | None, Out | None]:
        """``command``, unless its record is on another partition than its key's."""
        key: bytes = rec.key  # to_command checked key == sku
        expected = self.engine.partition_of(key)
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
            return None, Out(topic, expected, key, rec.value, list(rec.headers or ()) or None)
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
        key, record = dead_letter(
            reason=reason,
            detail=detail,
            topic=topic,
            partition=self.partition,
            offset=rec.offset,
            key=rec.key,
            value=rec.value if rec.value is not None else b"",
            dead_at=now_ms(),
            max_bytes=self.cfg.max_record_bytes,
        )
        part = partition_for(key, self.cfg.partitions) if key else self.partition
        return Out(
            self.cfg.dead_letters_topic, part, key, self.engine.codec.encode("DeadLetter", record)
        )

    def _changelog_records(self, result: batch.BatchResult) -> tuple[list[Out], list[bytes]]:
        """The batch's changelog records, and each reservation's value (stored locally too)."""
        held = [value.to_bytes() for value in result.reservations.values()]
        outs = [
            Out(self.reservations, self.partition, key, value)
            for key, value in zip(result.reservations, held, strict=True)
        ]
        # per-customer usages go with the reservations (and are stored locally like them)
        outs.extend(
            Out(self.reservations, self.partition, key, value.to_bytes())
            for key, value in result.usages.items()
        )
        outs.extend(
            Out(self.changelog, self.partition, key, value.to_bytes())
            for key, value in batch.stock_writes(result)
        )
        return outs, held

    async def _commit(self, outs: list[Out]) -> list[Any]:
        """The batch's transaction. An aborted one is not retried on the same producer
        (after failed deliveries librdkafka's next transaction can stall on sequence
        errors for the transaction timeout): the partition takes ownership again, with
        a new producer, from what the changelog holds; the batch's records are fetched
        again."""
        if not self.engine.owns(self):
            raise WriterLost("the partition was revoked before its batch committed")
        try:
            return await self.writer.commit(outs)
        except BatchAborted as exc:
            metrics.BATCH_ABORTS.inc()
            raise WriterLost(f"batch aborted: {exc}") from None

    def _store(self, prepared: Prepared, delivered: list[tuple[str, int, int]]) -> None:
        result, held = prepared.result, prepared.held
        last: dict[str, int] = {}
        for topic, part, off in delivered:
            if part == self.partition and topic in (self.changelog, self.reservations):
                if off > last.get(topic, -1):
                    last[topic] = off
        puts: list[tuple[bytes, bytes]] = list(zip(result.reservations, held, strict=True))
        puts.extend(prepared.events)
        puts.extend((key, value.to_bytes()) for key, value in result.usages.items())
        puts.append((POSITIONS_KEY, orjson.dumps(prepared.positions)))
        for key, stored in batch.stock_writes(result):
            slim = StoredStock(stored.record, stored.watermarks, {}, stored.version_at)
            self.cache[stored.record.sku] = slim
            puts.append((key, slim.to_bytes()))
        self.store.write(puts, {t: off + 1 for t, off in last.items()}, prepared.deletes)
        if self.changelog in last:
            self.known_end = last[self.changelog] + 2  # our commit marker follows
        if len(self.cache) > CACHE_MAX:
            self.cache.clear()
        index = self.engine.open_reservations
        for key, res in result.reservations.items():
            index.note(key, res.current)

    def _load_stock(self, sku: str) -> StoredStock | None:
        held = self.pending.get(sku)
        if held is not None:
            return held[1]
        stored = self.cache.get(sku)
        if stored is None:
            raw = self.store.get(stock_key(sku))
            if raw is None:
                return None
            stored = StoredStock.from_bytes(raw)
            self.cache[sku] = stored
        return stored

    def _load_event(self, key: bytes) -> int | None:
        """When the stock command of event key ``key`` was applied, None if never (or
        pruned)."""
        held = self.pending_ev.get(key)
        if held is not None:
            return held[1]
        raw = self.store.get(key)
        return int(orjson.loads(raw)["at"]) if raw is not None else None

    def _prune_step(self, now: int) -> list[bytes]:
        """The next few event ids past their retention, to delete with this batch: one
        bounded step of a scan that starts every PRUNE_EVERY_S."""
        retention = self.cfg.event_id_retention_ms
        if retention <= 0:
            return []
        if self._prune_cursor is None:
            if time.monotonic() < self._prune_due:
                return []
            self._prune_cursor = EVENT_PREFIX
        keys, self._prune_cursor = self.store.expired_events(
            self._prune_cursor, now - retention, PRUNE_STEP
        )
        if self._prune_cursor is None:
            self._prune_due = time.monotonic() + min(PRUNE_EVERY_S, retention / 4000)
        if keys:
            metrics.EVENT_IDS_PRUNED.inc(len(keys))
        return keys

    def _prune_reservations(self, now: int) -> list[bytes]:
        """The next few closed reservations past their retention, to delete with this
        batch (tombstones on the reservations changelog keep restores bounded)."""
        retention = self.cfg.reservation_retention_ms
        if retention <= 0:
            return []
        if self._res_cursor is None:
            if time.monotonic() < self._res_due:
                return []
            self._res_cursor = b""
        found, self._res_cursor = self.store.scan(self._res_cursor, PRUNE_STEP)
        if self._res_cursor is None:
            self._res_due = time.monotonic() + min(PRUNE_EVERY_S, retention / 4000)
        before = now - retention
        keys = [
            key
            for key, value in found
            if RESERVATION_SEP in key and StoredReservation.from_bytes(value).closed_before(before)
        ]
        if keys:
            metrics.RESERVATIONS_PRUNED.inc(len(keys))
        return keys

    def _load_usage(self, key: bytes) -> StoredUsage | None:
        held = self.pending_use.get(key)
        if held is not None:
            return held[1]
        raw = self.store.get(key)
        return StoredUsage.from_bytes(raw) if raw is not None else None

    def _load_reservation(self, key: bytes) -> StoredReservation | None:
        held = self.pending_res.get(key)
        if held is not None:
            return held[1]
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
        """True when no other writer appended to the changelog since our last write.

        Answers within about 3 s whatever the broker does (a query waiting for a thread
        or a slow broker says "not fresh"): a stock query is answered 503, never hung."""
        if self.state is not State.READY or not self.engine.owns(self):
            return False
        loop = asyncio.get_running_loop()
        try:
            bounds = await asyncio.wait_for(
                loop.run_in_executor(
                    self.engine.executor,
                    self.engine.group.bounds,
                    [(self.changelog, self.partition)],
                    2.0,
                ),
                3.0,
            )
        except Exception:  # noqa: BLE001 - cannot tell (or not in time): not fresh
            return False
        high = bounds[(self.changelog, self.partition)][1]
        if high <= self.known_end or not self._idle.is_set():
            return True
        return False

    def lookup(self, sku: str) -> StoredStock | None:
        """The SKU's committed state (never a batch still in its transaction)."""
        stored = self.cache.get(sku)
        if stored is None:
            raw = self.store.get(stock_key(sku))
            stored = StoredStock.from_bytes(raw) if raw is not None else None
        return stored


class Counters:
    """Prometheus children cached per label tuple (``labels()`` costs ~1.5 us a call).

    Producers choose channels: only the configured ones (``INVENTORY_METRIC_CHANNELS``)
    become label values, any other is ``other``, so neither the metrics nor these
    caches grow with what producers send."""

    def __init__(self, channels: tuple[str, ...] = Settings.metric_channels) -> None:
        self._commands: dict[tuple[str, str, str], Any] = {}
        self._rejections: dict[tuple[str, bool], Any] = {}
        self._channel_units: dict[tuple[str, str], Any] = {}
        self._known = frozenset(channels)

    def label(self, channel: str) -> str:
        """``channel`` as a metric label value: a configured one, else ``other``."""
        return channel if channel in self._known else "other"

    def _units(self, channel: str, source: str) -> Any:
        key = (self.label(channel), source)
        child = self._channel_units.get(key)
        if child is None:
            child = self._channel_units[key] = metrics.CHANNEL_UNITS_RESERVED.labels(*key)
        return child

    def decided(self, decision: core.Decision, command: core.Command, now: int) -> None:
        metrics.COMMAND_AGE_SECONDS.observe(max(0, now - command.occurred_at) / 1000)
        res = decision.reservation
        if res is not None and decision.outcome is core.Outcome.RESERVED:
            if res.from_allocation:
                self._units(res.channel, "allocation").inc(res.from_allocation)
            if res.qty > res.from_allocation:
                self._units(res.channel, "shared").inc(res.qty - res.from_allocation)
        for e in decision.events:
            if isinstance(e, core.CommandApplied):
                channel = self.label(e.channel)
                label = (e.command_type, e.outcome.value, channel)
                child = self._commands.get(label)
                if child is None:
                    child = self._commands[label] = metrics.COMMANDS.labels(*label)
                child.inc()
                if e.outcome is core.Outcome.REJECTED:
                    capped = e.reason == core.CUSTOMER_LIMIT_REASON
                    rej = self._rejections.get((channel, capped))
                    if rej is None:
                        family = metrics.CUSTOMER_LIMIT_REJECTIONS if capped else metrics.REJECTIONS
                        rej = self._rejections[(channel, capped)] = family.labels(channel)
                    rej.inc()
                elif e.outcome is core.Outcome.SHORTFALL:
                    metrics.SHORTFALLS.inc()
                    log.warning(
                        "shortfall on %s: %s",
                        e.sku,
                        e.reason,
                        extra={"sku": e.sku, "event_id": e.event_id},
                    )
                elif e.outcome is core.Outcome.TRANSFER_RECEIVED and e.units_lost:
                    # units lost in transit: reported, never silently dropped
                    metrics.TRANSFER_UNITS_LOST.inc(e.units_lost)
                    log.warning(
                        "transfer received short on %s: %s",
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
        self.counters = Counters(cfg.metric_channels)
        self.partitions: dict[int, PartitionLedger] = {}
        self._stores: dict[int, PartitionStore] = {}
        self.executor = ThreadPoolExecutor(
            max_workers=max(4, 2 * cfg.partitions + 2), thread_name_prefix="ledger"
        )
        self._group: BrokerQueries | None = None
        self.generation: int | None = None
        self.ready_token = 0  # changes whenever a partition (re)takes ownership
        self._partition_cache: dict[bytes, int] = {}
        self._group_due: dict[tuple[str, int], int] = {}
        self._libc: Any = None
        self.restoring = asyncio.Semaphore(2)  # partitions reading their changelog at once

    # --- the partitions' Kafka I/O (tests/agents replaces these with in-memory fakes) ---

    @property
    def group(self) -> BrokerQueries:
        if self._group is None:
            self._group = BrokerQueries(self.cfg)
        return self._group

    def new_writer(self, partition: int) -> PartitionWriter:
        """The transactional producer of ledger partition ``partition`` (not opened yet)."""
        return PartitionWriter(self.cfg, partition, self.group, self.executor)

    def read_changelog(self, topic: str, partition: int, start: int, apply: Any) -> ReadResult:
        """:func:`read_partition` of a changelog partition (blocking: run it on a thread)."""
        return read_partition(self.cfg, topic, partition, start, apply)

    def first_committed(self, topic: str, partition: int, start: int) -> int | None:
        """:func:`first_committed_offset` of an input partition (blocking: on a thread)."""
        return first_committed_offset(self.cfg, topic, partition, start)

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
                default_topic=ledger_changelogs(self.cfg)[0],
            )
        return store

    def owns(self, ledger: PartitionLedger) -> bool:
        return (
            self.partitions.get(ledger.partition) is ledger
            and not self.app.rebalancing
            and self.app.consumer_generation_id == ledger.generation
        )

    def after_restore(self) -> None:
        """Give the memory a restore's chunks left in glibc's free lists back to the OS."""
        if self._libc is None:
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = False
        if self._libc:
            self._libc.malloc_trim(0)

    def on_partition_ready(self, ledger: PartitionLedger) -> None:
        self.ready_token += 1

    def ready(self) -> bool:
        return all(p.state is State.READY for p in self.partitions.values())

    def partition_of(self, key: bytes) -> int:
        """murmur2 partition of ``key`` (pure Python, ~3 us: cached for hot SKUs)."""
        part = self._partition_cache.get(key)
        if part is None:
            if len(self._partition_cache) > 100_000:
                self._partition_cache.clear()
            part = self._partition_cache[key] = partition_for(key, self.cfg.partitions)
        return part

    def ledger_for(self, sku: str) -> PartitionLedger | None:
        return self.partitions.get(self.partition_of(stock_key(sku)))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every key of every ready partition's local store (for the sweeper's scans)."""
        for ledger in list(self.partitions.values()):
            if ledger.state is State.READY:
                yield from ledger.store.items()

    def on_committed(self, partition: int, moved: dict[tuple[str, int], int]) -> None:
        """A batch committed: its input positions are due for the group (best effort)."""
        self._group_due.update(moved)

    async def commit_group_offsets(self, *, revoking: bool = False) -> None:
        """Copy the committed batches' input positions to the consumer group, from the
        group member itself (Faust's consumer). Only monitoring (consumer lag) and
        Faust's seek on assignment read them: the ledger resumes from the positions
        its changelog holds, so a coordinator that is away never stops a batch."""
        if not self._group_due or (self.app.rebalancing and not revoking):
            return
        due, self._group_due = self._group_due, {}
        consumer = self.app.consumer
        new_tp = consumer._new_topicpartition
        assigned = consumer.assignment()
        offsets = {new_tp(t, p): o for (t, p), o in due.items()}
        offsets = {tp: o for tp, o in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            ok = await consumer._commit(offsets)
        except Exception as exc:  # noqa: BLE001 - retried with the next positions
            ok = False
            log.debug("group offsets not committed: %s", exc)
        if ok:
            self.app.monitor.on_tp_commit(offsets)  # Faust's committed-offset gauge
        else:
            for (t, p), o in due.items():
                self._group_due.setdefault((t, p), o)

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
