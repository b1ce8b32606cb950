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
  apply. It starts at the group's committed offset when the partition is
  assigned (the log start when nothing was ever committed). A record below it
  was applied already (skip), the record at it is applied, a record above it
  means something before it was not delivered: it is not applied.
* :class:`InputGuard` (Faust glue) commits each partition's next offset every
  ``commit_interval_s`` and when partitions are revoked, always after flushing
  the producer, so a committed offset never runs ahead of the changelog records
  of the inputs below it. On a gap it rewinds: stop the fetch flow, commit what
  was applied, seek every assigned partition to its committed offset (Faust's
  own ``perform_seek``, the step its recovery ends with), resume. The missing
  record is fetched again; records past it that were already queued are
  skipped until it has been applied.

Correctness does not depend on how Faust loses a record: nothing past a
missing offset is applied or committed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from pipeline import metrics

log = logging.getLogger("inventory.sequencing")


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
        log_start: Callable[[str, int], Awaitable[int]],
        *,
        commit_interval_s: float = 1.0,
        rewind_retry_s: float = 2.0,
    ) -> None:
        """``log_start(topic, partition)`` returns the partition's first offset in the log."""
        self.app = app
        self.log_start = log_start
        self.seq = Sequencer()
        self.commit_interval_s = commit_interval_s
        self.rewind_retry_s = rewind_retry_s
        self._committed: dict[Any, int] = {}
        self._rewound_at: dict[Any, float] = {}
        self._gap_reported: dict[Any, int] = {}
        self._lock = asyncio.Lock()

    # --- the agent's side -------------------------------------------------

    async def admit(self, event: Any) -> bool:
        msg = event.message
        tp, offset = msg.tp, msg.offset
        # Faust counts a message in only for acking topics; its ack still counts it out
        self.app.sensors.on_message_in(tp, offset, msg)
        if not self.seq.known(tp):
            if self.app.rebalancing:
                # an event fetched before the rebalance: the start offset is not known
                # until the rebalance has sought to the committed offsets; not applied
                # (so not committed) here, it is fetched again after the rebalance
                return False
            self.seq.start(tp, await self._start_offset(tp))
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

    async def _start_offset(self, tp: Any) -> int:
        consumer = self.app.consumer
        committed = consumer._committed_offset.get(tp)  # set by perform_seek at assignment
        if committed is not None:
            return int(committed)
        # nothing committed yet (Faust also maps a committed 0 to None): the log start
        return int(await self.log_start(tp.topic, tp.partition))

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
        """Re-read every assigned partition from what was applied (see module docstring)."""
        now = time.monotonic()
        if now - self._rewound_at.get(tp, -1e9) < self.rewind_retry_s:
            return  # a rewind for this gap is under way: its records are still queued
        if self.app.rebalancing:
            return  # the rebalance ends with a seek to the committed offsets anyway
        self._rewound_at[tp] = now
        consumer = self.app.consumer
        consumer.stop_flow()
        try:
            # let the fetch loop notice the stop before the seek resets its read offsets
            for _ in range(3):
                await asyncio.sleep(0)
            if not await self.commit():
                return
            if self.app.rebalancing:
                return
            await consumer.perform_seek()
            metrics.INPUT_REWINDS.inc()
        finally:
            if not self.app.rebalancing:
                consumer.resume_flow()

    def on_revoked(self, revoked: Iterable[Any]) -> None:
        revoked = list(revoked)
        self.seq.forget(revoked)
        for tp in revoked:
            self._committed.pop(tp, None)
            self._rewound_at.pop(tp, None)
            self._gap_reported.pop(tp, None)

    def on_assigned(self) -> None:
        # every assignment restarts each partition at its committed offset
        self.seq.forget()
        self._committed.clear()
        self._rewound_at.clear()
        self._gap_reported.clear()


def confluent_log_start(config: dict[str, Any]) -> Callable[[str, int], Awaitable[int]]:
    """``log_start`` from a group-less confluent-kafka consumer, queried off the event loop."""
    from confluent_kafka import Consumer, TopicPartition

    client: list[Any] = []

    def query(topic: str, partition: int) -> int:
        if not client:
            client.append(Consumer({**config, "group.id": "inventory-log-start"}))
        low, _high = client[0].get_watermark_offsets(
            TopicPartition(topic, partition), timeout=10.0, cached=False
        )
        return int(low)

    async def log_start(topic: str, partition: int) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, query, topic, partition)

    return log_start


def install(app: Any, guard: InputGuard) -> None:
    """Wire the guard into the app: periodic commits and the rebalance signals."""

    @app.timer(interval=guard.commit_interval_s)
    async def _commit_inputs() -> None:
        await guard.commit()

    @app.on_partitions_revoked.connect
    async def _commit_before_revoke(sender: Any, revoked: set[Any], **_: Any) -> None:
        # sent after Faust stopped the flow and waited for in-flight events
        await guard.commit(revoked, revoking=True)
        guard.on_revoked(revoked)

    @app.on_partitions_assigned.connect
    async def _restart_sequencing(sender: Any, assigned: set[Any], **_: Any) -> None:
        guard.on_assigned()
