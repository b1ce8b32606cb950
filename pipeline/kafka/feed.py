"""Hand the records of batched input topics to the ledger in batches, not one by one.

Faust delivers each fetched record on its own: a ``ConsumerMessage``, the
conductor, the channel queue, the stream, the sensors, and a
``Service.wait_first`` (two tasks and an ``asyncio.wait``) around every
delivery. That is about 85 us of CPU per record on this machine
(``../shared/PERF-NOTES.md``), more than deciding the command. So the worker's
consumer is a subclass of Faust's aiokafka consumer whose fetch loop splits each
fetched record map: records of the *batched* topics go, as aiokafka returned
them, into a :class:`BatchFeed` (one buffer per partition number, so the three
input topics of one SKU partition queue together), in one synchronous step per
fetch; every other topic (the saga's inputs, table changelogs during recovery)
keeps Faust's per-message path unchanged.

What the feed guarantees to its reader:

* per topic-partition, records are offered in the order aiokafka returned
  them, each tagged with the consumer group generation they were fetched in;
* :meth:`BatchFeed.reset` (called by the rebalance hooks) drops every buffered
  record, so nothing fetched before a rebalance is offered after it;
* the fetch loop waits while more than ``max_buffered`` records are queued
  (back-pressure: memory stays bounded whatever the lag).

Whether a record is the next one of its partition (and not a redelivery or a
record past a gap) is the reader's business: :mod:`agents.ledger` checks every
record against the partition's next offset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from faust.transport.drivers import aiokafka as faust_aiokafka

log = logging.getLogger("inventory.feed")


@dataclass(slots=True)
class Chunk:
    """Records of one topic-partition from one fetch."""

    tp: Any  # faust TP (topic, partition)
    records: list[Any]  # aiokafka ConsumerRecord, in offset order
    generation: int
    arrived: float = 0.0  # time.monotonic() when the fetch handed it over


class BatchFeed:
    """Buffers of fetched records per partition number, for the ledger's partition workers."""

    def __init__(self, topics: Iterable[str] = (), max_buffered: int = 20_000) -> None:
        self.topics: frozenset[str] = frozenset(topics)
        self.max_buffered = max_buffered
        self._chunks: dict[int, deque[Chunk]] = {}
        self._ready: dict[int, asyncio.Event] = {}
        self._buffered = 0
        self._space: asyncio.Event | None = None
        self.epoch = 0  # bumped by every reset
        self._drops: set[tuple[str, int, int]] = set()  # failpoint: records to lose once

    def watch(self, *topics: str) -> None:
        self.topics = self.topics | frozenset(topics)

    # --- the fetch loop's side -------------------------------------------

    def drop_once(self, drops: set[tuple[str, int, int]], prefix: str) -> None:
        """Tests only: lose the first delivery of each (topic without prefix, partition,
        offset), the way a fetch loop that moves on past a record would."""
        self._drops = {(prefix + t, p, o) for t, p, o in drops}

    def offer(self, tp: Any, records: list[Any], generation: int) -> None:
        if self._drops:
            kept = []
            for r in records:
                mark = (tp.topic, tp.partition, r.offset)
                if mark in self._drops:
                    self._drops.discard(mark)
                    log.warning("failpoint: dropped delivery of %s/%d@%d", *mark)
                else:
                    kept.append(r)
            records = kept
        if not records:
            return
        part = tp.partition
        queue = self._chunks.get(part)
        if queue is None:
            queue = self._chunks[part] = deque()
        queue.append(Chunk(tp, records, generation, time.monotonic()))
        self._buffered += len(records)
        self._event(part).set()

    async def wait_for_space(self) -> None:
        """Back-pressure: returns once fewer than ``max_buffered`` records are queued."""
        while self._buffered >= self.max_buffered:
            if self._space is None:
                self._space = asyncio.Event()
            self._space.clear()
            await self._space.wait()

    # --- the reader's side -----------------------------------------------

    def _event(self, part: int) -> asyncio.Event:
        ev = self._ready.get(part)
        if ev is None:
            ev = self._ready[part] = asyncio.Event()
        return ev

    async def wait(self, part: int, timeout: float | None = None) -> bool:
        """Wait until partition ``part`` has records; False on timeout."""
        if self._chunks.get(part):
            return True
        ev = self._event(part)
        ev.clear()
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            return False
        return bool(self._chunks.get(part))

    def take(self, part: int, max_records: int) -> list[Chunk]:
        """Up to about ``max_records`` records of ``part`` (whole chunks, split if needed)."""
        queue = self._chunks.get(part)
        out: list[Chunk] = []
        if not queue:
            return out
        n = 0
        while queue and n < max_records:
            chunk = queue[0]
            room = max_records - n
            if len(chunk.records) <= room:
                queue.popleft()
                out.append(chunk)
                n += len(chunk.records)
            else:
                out.append(Chunk(chunk.tp, chunk.records[:room], chunk.generation, chunk.arrived))
                chunk.records = chunk.records[room:]
                n += room
        self._release(n)
        return out

    def pending(self, part: int) -> int:
        return sum(len(c.records) for c in self._chunks.get(part, ()))

    def _release(self, n: int) -> None:
        self._buffered -= n
        if self._space is not None and self._buffered < self.max_buffered:
            self._space.set()

    def reset(self, parts: Iterable[int] | None = None) -> None:
        """Drop buffered records (of ``parts``, or all): a rebalance is under way."""
        self.epoch += 1
        targets = list(self._chunks) if parts is None else list(parts)
        for part in targets:
            queue = self._chunks.pop(part, None)
            if queue:
                self._release(sum(len(c.records) for c in queue))
            ev = self._ready.get(part)
            if ev is not None:
                ev.set()  # wake the reader so it sees the reset

    @property
    def buffered(self) -> int:
        return self._buffered


class FeedingConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer whose fetch loop hands batched topics to a :class:`BatchFeed`.

    Also reads with ``isolation_level=read_committed``, so records of aborted
    transactions on any topic are never seen (Faust does so only under its own
    ``exactly_once`` guarantee).
    """

    feed: BatchFeed

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _CommittedReadThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - needs a broker
        feed = self.feed
        callback = self.callback
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        get_read_offset = self._read_offset.get
        set_read_offset = self._read_offset.__setitem__
        monitor = self.app.monitor
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                await feed.wait_for_space()
                records, active = await self._wait_next_records(1.0)
                await asyncio.sleep(0)
                if records is None or self.should_stop:
                    continue
                if not self.flow_active:
                    # a rebalance stopped the flow while this fetch was under way: what it
                    # returned may predate the seeks of the new assignment
                    try:
                        await self.perform_seek()
                    except Exception as exc:  # noqa: BLE001 - Faust does the same
                        log.warning("seek while flow stopped failed: %r", exc)
                    continue
                generation = self.app.consumer_generation_id
                per_message: list[tuple[Any, list[Any]]] = []
                for tp, recs in records.items():
                    if (
                        active is not None
                        and tp not in active
                        and tp not in self._buffered_partitions
                    ):
                        continue
                    if tp.topic in feed.topics:
                        feed.offer(tp, recs, generation)
                        monitor.track_tp_end_offset(tp, self.highwater(tp))
                        count_messages_in(monitor, tp, recs)
                    else:
                        per_message.append((tp, recs))
                for tp, recs in per_message:
                    for record in recs:
                        if not self.flow_active or self.app.consumer_generation_id != generation:
                            break
                        message = self._to_message(tp, record)
                        monitor.track_tp_end_offset(tp, self.highwater(tp))
                        r_offset = get_read_offset(tp)
                        if r_offset is not None and message.offset < r_offset:
                            continue  # below what was delivered already (Faust's rule)
                        await self.wait_first(callback(message), self.suspend_flow.wait())
                        set_read_offset(tp, message.offset)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise


def count_messages_in(monitor: Any, tp: Any, records: list[Any]) -> None:
    """Faust's received-message metrics for records that skip its per-message path."""
    prom = getattr(monitor, "_metrics", None)
    if prom is None or not records:
        return
    n = len(records)
    prom.messages_received.inc(n)
    prom.messages_received_per_topics.labels(topic=tp.topic).inc(n)
    prom.messages_received_per_topics_partition.labels(topic=tp.topic, partition=tp.partition).set(
        records[-1].offset
    )


class _CommittedReadThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka keeps the string until start() builds its fetcher
        consumer._isolation_level = "read_committed"
        return consumer


class FeedingTransport(faust_aiokafka.Transport):
    Consumer = FeedingConsumer


def feeding_transport(app: Any, feed: BatchFeed) -> FeedingTransport:
    """The transport an app's ``_new_transport`` returns so its consumer feeds ``feed``."""
    transport = FeedingTransport(app.conf.broker_consumer, app)
    original = transport.create_consumer

    def create_consumer(callback: Any, **kwargs: Any) -> Any:
        consumer = cast(FeedingConsumer, original(callback, **kwargs))
        consumer.feed = feed
        return consumer

    transport.create_consumer = create_consumer  # type: ignore[method-assign]
    return transport
