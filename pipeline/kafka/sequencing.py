"""Apply each input partition's records strictly in offset order, and own their commits.

Why this exists. Chaos runs (two workers, ``kill -9``, rebalances) showed
faust-streaming 0.15 losing input records around a rebalance and then
committing past them: its fetch loop advances its read offset for a record
whose delivery a rebalance interrupted, its commit logic counts offsets it
never delivered as acked (the "gap" tree) and accepts an acked run that starts
one past the committed offset. The per-SKU watermark cannot catch such a loss:
the next record of the same SKU raises the watermark over the lost one, which
is then treated as a duplicate forever.

So the agents' input topics are consumed with acks disabled (Faust never
commits them) and this module takes over:

* :class:`Sequencer` (pure) keeps, per input partition, the next offset to
  apply. It starts, at the first record after the partition is assigned, at
  the group's committed offset as the broker has it (the log start when nothing
  was ever committed or the committed records were deleted). A record below it
  was applied already (skip), the record at it is applied, a record above it
  means something before it was not delivered: it is not applied.
* :class:`InputGuard` (Faust glue) commits each partition's next offset every
  ``commit_interval_s`` and when partitions are revoked, always after flushing
  the producer, so a committed offset never runs ahead of the changelog records
  of the inputs below it. On a gap it rewinds that partition: stop the fetch
  flow, commit what was applied, seek the partition to its next offset (and
  reset Faust's read offset with it: Faust's ``seek_wait``), resume. The
  missing record is fetched again; records past it that were already queued
  are skipped until it has been applied.
* A watchdog (every ``commit_interval_s``) rewinds any input partition that
  applied nothing for ``stall_after_s`` while the log holds records past its
  next offset: a gap is otherwise only noticed when a later record arrives,
  and Faust's fetcher can lose the re-read records too (a delivery in flight
  when the flow stops still raises its read offset, and it drops records below
  that), or a partition's first records after an assignment.

The start offset is asked of the broker, not taken from Faust's bookkeeping:
Faust (and aiokafka's ``seek_to_committed``) treat a committed offset of 0 as
"nothing committed", and records delivered between Faust's seek and the end of
its rebalance must be judged against the offset the fetch really resumed at.

Correctness does not depend on how Faust loses a record: nothing past a
missing offset is applied or committed. Not handled: offsets that never hold
a record (transaction markers of a transactional producer on an input topic)
would read as a gap that never fills, stalling that partition (never
overselling); the inputs here are written without transactions.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NamedTuple

from pipeline import metrics
from pipeline.clients import watermarks

log = logging.getLogger("inventory.sequencing")


class PartitionOffsets(NamedTuple):
    committed: int | None  # the group's committed offset; None when nothing was committed
    log_start: int  # first offset still in the log
    log_end: int  # offset the next record written will get


class Verdict(enum.Enum):
    APPLY = "apply"  # the next record of its partition
    DUPLICATE = "duplicate"  # below the next offset: already applied
    GAP = "gap"  # above the next offset: a record before it is missing


class Sequencer:
    """Next offset to apply per partition (keys are any hashable partition id)."""

    def __init__(self) -> None:
        self._next: dict[Any, int] = {}

    def known(self, tp: Any) -> bool:
        return tp in self._next

    def start(self, tp: Any, offset: int) -> None:
        """Reading ``tp`` resumes at ``offset`` (its committed offset or the log start)."""
        self._next[tp] = offset

    def check(self, tp: Any, offset: int) -> Verdict:
        nxt = self._next[tp]
        if offset < nxt:
            return Verdict.DUPLICATE
        if offset > nxt:
            return Verdict.GAP
        return Verdict.APPLY

    def done(self, tp: Any, offset: int) -> None:
        """The record at ``offset`` was handled (applied, dead-lettered or re-routed)."""
        if self._next.get(tp) == offset:
            self._next[tp] = offset + 1

    def next_offset(self, tp: Any) -> int | None:
        return self._next.get(tp)

    def positions(self, tps: Iterable[Any] | None = None) -> dict[Any, int]:
        if tps is None:
            return dict(self._next)
        return {tp: self._next[tp] for tp in tps if tp in self._next}

    def forget(self, tps: Iterable[Any] | None = None) -> None:
        if tps is None:
            self._next.clear()
        else:
            for tp in tps:
                self._next.pop(tp, None)


class InputGuard:
    """Faust side of the sequencing: start offsets, commits and rewinds.

    Usage in an agent (concurrency 1 per input topic)::

        async for event in stream.events():
            if await guard.admit(event):
                await handle(event)
                guard.done(event)
    """

    def __init__(
        self,
        app: Any,
        offsets: Callable[[str, int], Awaitable[PartitionOffsets]],
        *,
        commit_interval_s: float = 1.0,
        rewind_retry_s: float = 2.0,
        stall_after_s: float = 3.0,
    ) -> None:
        """``offsets(topic, partition)`` asks the broker about the partition."""
        self.app = app
        self.offsets = offsets
        self.stall_after_s = stall_after_s
        self.topics: set[str] = set()  # the guarded input topics (watched for stalls)
        self._progress: dict[Any, tuple[int, float]] = {}  # next offset, since when
        self.seq = Sequencer()
        self.commit_interval_s = commit_interval_s
        self.rewind_retry_s = rewind_retry_s
        self._committed: dict[Any, int] = {}
        self._rewound_at: dict[Any, float] = {}
        self._gap_reported: dict[Any, int] = {}
        self._lock = asyncio.Lock()
        self._rewind_lock = asyncio.Lock()

    # --- the agent's side -------------------------------------------------

    async def admit(self, event: Any) -> bool:
        msg = event.message
        tp, offset = msg.tp, msg.offset
        # Faust counts a message in only for acking topics; its ack still counts it out
        self.app.sensors.on_message_in(tp, offset, msg)
        if not self.seq.known(tp):
            if tp not in self.app.consumer.assignment():
                # held over from before a rebalance that took the partition away: its
                # new owner applies it
                return False
            # first record since the assignment (or a record held over a rebalance
            # that kept the partition): judged against where this group's reading
            # of the partition resumes
            start = await self._start_offset(tp)
            if tp not in self.app.consumer.assignment():
                return False  # taken away while the broker was asked
            if not self.seq.known(tp):  # (the watchdog may have started it meanwhile)
                self.seq.start(tp, start)
        verdict = self.seq.check(tp, offset)
        if verdict is Verdict.APPLY:
            return True
        if verdict is Verdict.DUPLICATE:
            metrics.REDELIVERED.labels(msg.topic).inc()
            return False
        missing = self.seq.next_offset(tp)
        assert missing is not None
        if self._gap_reported.get(tp) != missing:
            self._gap_reported[tp] = missing
            metrics.INPUT_GAPS.labels(msg.topic).inc(offset - missing)
            log.error(
                "input %s/%d: record @%d arrived but @%d..%d never did; "
                "not applying past the gap, rewinding to @%d",
                msg.topic,
                msg.partition,
                offset,
                missing,
                offset - 1,
                missing,
            )
        await self.rewind(tp)
        return False

    def done(self, event: Any) -> None:
        msg = event.message
        self.seq.done(msg.tp, msg.offset)

    # --- commits and rewinds ---------------------------------------------

    async def _ask(self, tp: Any) -> PartitionOffsets | None:
        """The broker's offsets for ``tp``; None (logged) while the broker does not answer."""
        try:
            return await self.offsets(tp.topic, tp.partition)
        except Exception as exc:  # noqa: BLE001 - broker away: asked again later
            log.warning(
                "input %s/%d: cannot read offsets from the broker (%s); asking again later",
                tp.topic,
                tp.partition,
                exc,
            )
            return None

    async def _start_offset(self, tp: Any) -> int:
        """Where ``tp`` resumes; waits for the broker to answer (nothing flows without it)."""
        while (found := await self._ask(tp)) is None:
            await asyncio.sleep(1.0)
        return self._start_from(tp, found)

    def _start_from(self, tp: Any, found: PartitionOffsets) -> int:
        committed, log_start, _end = found
        if committed is None:
            return log_start
        if committed < log_start:
            log.error(
                "input %s/%d: committed offset @%d is below the log start @%d: "
                "records @%d..%d were deleted before they were applied",
                tp.topic,
                tp.partition,
                committed,
                log_start,
                committed,
                log_start - 1,
            )
            metrics.INPUT_GAPS.labels(tp.topic).inc(log_start - committed)
            return log_start
        return committed

    async def commit(self, tps: Iterable[Any] | None = None, *, revoking: bool = False) -> bool:
        """Flush the producer, then commit the next offset of each partition that moved.

        ``revoking``: called from the revocation step of a rebalance, where the
        group's current generation still owns the partitions; otherwise no commit
        is attempted while a rebalance is under way.
        """
        if self.app.rebalancing and not revoking:
            return False
        async with self._lock:
            consumer = self.app.consumer
            assigned = consumer.assignment()
            positions = {
                tp: off
                for tp, off in self.seq.positions(tps).items()
                if tp in assigned and self._committed.get(tp) != off
            }
            if not positions:
                return True
            # the changelog records of every input below these offsets must be in Kafka
            # before the offsets are: Faust's own commit does the same
            await self.app.producer.flush()
            if self.app.rebalancing and not revoking:
                return False
            ok = bool(await consumer._commit(positions))
            if ok:
                self._committed.update(positions)
                self.app.tables.on_commit(positions)
                self.app.monitor.on_tp_commit(positions)  # Faust's committed-offset gauge
            return ok

    async def rewind(self, tp: Any) -> None:
        """Re-read ``tp`` from its next offset (see module docstring).

        Rewinds run one at a time with the fetch flow stopped from before the
        seek until after it: a record of ``tp`` fetched before the seek and
        delivered after it would raise Faust's read offset past the records the
        seek brings back, and Faust drops records below its read offset.
        """
        now = time.monotonic()
        if now - self._rewound_at.get(tp, -1e9) < self.rewind_retry_s:
            return  # a rewind for this gap is under way: its records are still queued
        if self.app.rebalancing:
            return  # the partition's sequencing restarts when it is assigned again
        self._rewound_at[tp] = now
        async with self._rewind_lock:
            if self.app.rebalancing or not self.seq.known(tp):
                return
            consumer = self.app.consumer
            consumer.stop_flow()
            try:
                # let the fetch loop drop the delivery it was making before the seek
                # resets its read offset
                for _ in range(3):
                    await asyncio.sleep(0)
                await self.commit()
                if self.app.rebalancing or not self.seq.known(tp):
                    return
                offset = self.seq.next_offset(tp)
                assert offset is not None
                found = await self._ask(tp)
                log_start = found.log_start if found is not None else offset
                if offset < log_start:  # deleted by retention before it was applied
                    log.error(
                        "input %s/%d: records @%d..%d were deleted before they were "
                        "applied; resuming at the log start",
                        tp.topic,
                        tp.partition,
                        offset,
                        log_start - 1,
                    )
                    metrics.INPUT_GAPS.labels(tp.topic).inc(log_start - offset)
                    self.seq.start(tp, log_start)
                    offset = log_start
                if self.app.rebalancing:
                    return
                await consumer.seek_wait({tp: offset})
                metrics.INPUT_REWINDS.inc()
            finally:
                if not self.app.rebalancing:
                    consumer.resume_flow()

    def watch(self, *topics: str) -> None:
        """Guard ``topics``: their partitions are watched for stalls (:meth:`watchdog`)."""
        self.topics.update(topics)

    async def watchdog(self) -> None:
        """Rewind every assigned input partition that stopped short of its log end.

        A gap is noticed when a later record arrives. When the records a rewind
        brings back are lost as well (Faust's fetcher dropping a delivery that
        raced the seek), or a partition's first records after an assignment are
        lost, and nothing later arrives, no later record ever reports it: this
        check does. A partition whose next offset has not moved for
        ``stall_after_s`` while the log holds records from it on is rewound; one
        that is merely busy loses nothing by it (what it re-reads is skipped).
        """
        if self.app.rebalancing:
            return
        now = time.monotonic()
        for tp in self.app.consumer.assignment():
            if tp.topic not in self.topics:
                continue
            nxt = self.seq.next_offset(tp)
            mark = -1 if nxt is None else nxt
            seen = self._progress.get(tp)
            if seen is None or seen[0] != mark:
                self._progress[tp] = (mark, now)
                continue
            if now - seen[1] < self.stall_after_s:
                continue
            self._progress[tp] = (seen[0], now)
            found = await self._ask(tp)
            if found is None:
                return  # the broker does not answer: the next tick looks again
            log_end = found.log_end
            if nxt is None:  # no record arrived since the assignment
                start = self._start_from(tp, found)
                if start >= log_end or self.seq.known(tp):
                    continue
                self.seq.start(tp, start)
                nxt = start
            elif nxt >= log_end:
                continue  # caught up
            log.warning(
                "input %s/%d: nothing applied for %.0f s while @%d..%d wait; rewinding",
                tp.topic,
                tp.partition,
                self.stall_after_s,
                nxt,
                log_end - 1,
            )
            metrics.INPUT_STALLS.labels(tp.topic).inc()
            await self.rewind(tp)

    def on_revoked(self, revoked: Iterable[Any]) -> None:
        revoked = list(revoked)
        self.seq.forget(revoked)
        for tp in revoked:
            self._progress.pop(tp, None)
            self._committed.pop(tp, None)
            self._rewound_at.pop(tp, None)
            self._gap_reported.pop(tp, None)

    def on_assigned(self) -> None:
        # every assignment restarts each partition at its committed offset
        self.seq.forget()
        self._committed.clear()
        self._rewound_at.clear()
        self._gap_reported.clear()
        self._progress.clear()


def confluent_offsets(
    config: dict[str, Any], group_id: str
) -> Callable[[str, int], Awaitable[PartitionOffsets]]:
    """``offsets`` for :class:`InputGuard` from a confluent-kafka consumer of the app's
    group that never joins it (``committed`` only fetches offsets), queried off the
    event loop."""
    from confluent_kafka import Consumer, TopicPartition

    client: list[Any] = []

    def query(topic: str, partition: int) -> PartitionOffsets:
        if not client:
            client.append(Consumer({**config, "group.id": group_id, "enable.auto.commit": False}))
        tp = TopicPartition(topic, partition)
        (got,) = client[0].committed([tp], timeout=10.0)
        if got.error is not None:
            raise RuntimeError(f"committed offset of {topic}/{partition}: {got.error}")
        low, high = watermarks(client[0], topic, partition, 10.0)
        committed = int(got.offset) if got.offset >= 0 else None
        return PartitionOffsets(committed, int(low), int(high))

    async def offsets(topic: str, partition: int) -> PartitionOffsets:
        return await asyncio.get_running_loop().run_in_executor(None, query, topic, partition)

    return offsets


def install(app: Any, guard: InputGuard) -> None:
    """Wire the guard into the app: periodic commits and the rebalance signals."""

    @app.timer(interval=guard.commit_interval_s)  # type: ignore[untyped-decorator]  # Faust
    async def _commit_inputs() -> None:
        await guard.commit()
        await guard.watchdog()

    @app.on_partitions_revoked.connect  # type: ignore[untyped-decorator]
    async def _commit_before_revoke(sender: Any, revoked: set[Any], **_: Any) -> None:
        # sent after Faust stopped the flow and waited for in-flight events
        await guard.commit(revoked, revoking=True)
        guard.on_revoked(revoked)

    @app.on_partitions_assigned.connect  # type: ignore[untyped-decorator]
    async def _restart_sequencing(sender: Any, assigned: set[Any], **_: Any) -> None:
        guard.on_assigned()
