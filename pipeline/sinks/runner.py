"""The sink runner: keeps one projection in step with the ledger's stock changelog.

It reads the SKU records of ``{app_id}-stock-changelog`` (committed transactions
only), not ``inventory.stock-changes``: each record carries the SKU's state after a
whole batch, so a hot SKU costs one write per batch, and an order reaches Redis and
the search index one Kafka hop sooner (without the relay in between). The
projection still holds, per SKU, the highest version seen.

One consumer group per target (``{app_id}-sink-{target}``), so a Redis outage
never holds back the search index and vice versa. It runs inside every worker
(one process to operate, and the worker's ``/healthz`` and ``/metrics`` show the
sink's state) and can also run alone: ``python -m pipeline.sinks``.

Delivery contract, per batch:

1. fetch up to ``sink_batch_size`` records and keep them in memory;
2. apply them to the target; the target applies by version, so repeats and
   reordering are harmless;
3. on :class:`TargetUnavailable`: pause every assigned partition (no new
   fetches, so memory stays bounded by one batch), back off exponentially with
   jitter up to ``sink_max_backoff_s`` while still polling the paused consumer
   (so the group does not evict it during a long outage), then retry the same
   batch;
4. commit the batch's offsets only after it was applied, and resume.

So the committed offset never passes a change the target lacks, and a crash
at any point re-applies at most one batch.

A SKU record it cannot read (a bug, or a foreign producer on the changelog) is
never skipped silently: it goes to the dead-letter topic (reason
``unreadable_changelog_record``, counted in ``inventory_dead_letters_total``) and
the batch's offsets are committed only once the broker acknowledged the dead
letter; while it cannot be written the batch is held and retried like an outage.
Dead-lettering rather than holding the partition: the records after it are other
SKUs' states (and newer versions of the same SKU), which a held partition would
keep from the target for ever; the unreadable one is kept, with where it was, for
an operator to replay or discard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from config.settings import Settings
from pipeline import metrics
from pipeline.clients import aiokafka_kwargs
from pipeline.clock import now_ms
from pipeline.dead_letters import dead_letter
from pipeline.kafka.consuming import changelog_consumer, lag
from pipeline.kafka.consuming import run_forever as restarted
from pipeline.kafka.partitioning import partition_for
from pipeline.kafka.topics import changelog_topic
from pipeline.sinks.base import ApplyReport, Projection, StockChange, TargetUnavailable
from schemas.codec import AvroCodec
from tables.stock import StoredStock, is_stock_key

log = logging.getLogger("inventory.sink")

INITIAL_BACKOFF_S = 0.2
UNREADABLE = "unreadable_changelog_record"


class Backoff:
    """Exponential backoff with full jitter; ``reset`` after a success."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        self.failures += 1
        ceiling = min(self.maximum, self.initial * 2 ** (self.failures - 1))
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.failures = 0


class SinkRunner:
    """Consume stock changes and apply them to one :class:`Projection`."""

    def __init__(self, cfg: Settings, projection: Projection, codec: AvroCodec) -> None:
        self.cfg = cfg
        self.projection = projection
        self.codec = codec
        self.target = projection.name
        self.degraded = False
        # the partitions being re-applied from the beginning after the target lost data
        self.replaying: set[TopicPartition] = set()
        self.failing = False  # the target refuses writes now
        self.next_check = 0.0
        # while replaying: per partition, the committed offset when the replay began;
        # unreadable records below it were dead-lettered already
        self.dead_lettered_below: dict[TopicPartition, int] = {}
        self.backoff = Backoff(INITIAL_BACKOFF_S, cfg.sink_max_backoff_s)
        self.consumer: AIOKafkaConsumer | None = None
        # exported at 0 from the start, so an alert's increase() sees the first one
        metrics.DEAD_LETTERS.labels(UNREADABLE)
        metrics.SINK_REPLAYS.labels(self.target)

    def decode(self, records: Sequence[Any]) -> tuple[list[StockChange], list[tuple[Any, str]]]:
        """The current StockChanged of each SKU record of a fetched batch (reservation
        records and the positions record are not SKU records), and the SKU records it
        could not read, each with why."""
        changes: list[StockChange] = []
        unreadable: list[tuple[Any, str]] = []
        for rec in records:
            if rec.key is None or rec.value is None or not is_stock_key(rec.key):
                continue
            try:
                changes.append(StoredStock.from_bytes(rec.value).latest_change())
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                # a bug or a foreign producer: dead-lettered by the caller, never skipped
                log.error(
                    "unreadable SKU record on %s/%d@%d: %s",
                    rec.topic,
                    rec.partition,
                    rec.offset,
                    exc,
                )
                unreadable.append((rec, f"{type(exc).__name__}: {exc}"))
        return changes, unreadable

    async def run(self) -> None:
        consumer = changelog_consumer(
            self.cfg, changelog_topic(self.cfg), f"sink-{self.target}", self.cfg.sink_batch_size
        )
        self.consumer = consumer  # for checks from outside (tests)
        await self._until_ready(consumer)
        producer: AIOKafkaProducer | None = None
        try:
            while True:
                await self._check_intact(consumer)
                batches = await consumer.getmany(
                    timeout_ms=200, max_records=self.cfg.sink_batch_size
                )
                if not batches:
                    await self._update_lag(consumer)
                    await self._replay_done(consumer)
                    continue
                records = [r for recs in batches.values() for r in recs]
                offsets = {tp: recs[-1].offset + 1 for tp, recs in batches.items()}
                changes, unreadable = self.decode(records)
                unreadable = [
                    (rec, why)
                    for rec, why in unreadable
                    if rec.offset
                    >= self.dead_lettered_below.get(TopicPartition(rec.topic, rec.partition), 0)
                ]
                if unreadable:
                    producer = await self._dead_letter_all(consumer, producer, unreadable)
                if changes:
                    latest = coalesce(changes)
                    report = await self._apply_until_done(consumer, latest)
                    if report is None:
                        # the target lost data while it refused the batch: the replay
                        # that began re-reads this batch too (its dead letters are out);
                        # the batch's other partitions are read again from where it began
                        for tp, recs in batches.items():
                            if tp not in self.replaying:
                                consumer.seek(tp, recs[0].offset)
                            elif unreadable:
                                self.dead_lettered_below[tp] = max(
                                    self.dead_lettered_below.get(tp, 0), offsets[tp]
                                )
                        continue
                    self._observe(latest, report, coalesced=len(changes) - len(latest))
                await self._commit(consumer, offsets)
                await self._update_lag(consumer)
                await self._replay_done(consumer)
        finally:
            if producer is not None:
                await producer.stop()
            await consumer.stop()

    async def _dead_letter_all(
        self,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer | None,
        unreadable: list[tuple[Any, str]],
    ) -> AIOKafkaProducer:
        """Write a dead letter for each unreadable record and wait for the broker's
        acknowledgement; until it comes the batch is held (paused, backing off) and
        nothing is committed. Returns the (started) producer to reuse."""
        paused = False
        while True:
            try:
                if producer is None:
                    producer = AIOKafkaProducer(
                        **aiokafka_kwargs(self.cfg),
                        acks="all",
                        enable_idempotence=True,
                        max_request_size=self.cfg.max_record_bytes,
                    )
                    await producer.start()
                futures = [await producer.send(*self._dead_letter(r, why)) for r, why in unreadable]
                await asyncio.gather(*futures)
                break
            except KafkaError as exc:
                metrics.SINK_ERRORS.labels(self.target).inc()
                if not paused:
                    consumer.pause(*consumer.assignment())
                    paused = True
                delay = self.backoff.next_delay()
                log.warning(
                    "%s sink: dead letters not written (%s); batch held, retry in %.1fs",
                    self.target,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
        if paused:
            consumer.resume(*consumer.assignment())
        for _rec, _why in unreadable:
            metrics.DEAD_LETTERS.labels(UNREADABLE).inc()
        return producer

    def _dead_letter(self, rec: Any, why: str) -> tuple[str, bytes, bytes | None, int]:
        key, record = dead_letter(
            reason=UNREADABLE,
            detail=f"{self.target} sink: {why}",
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            key=rec.key,
            value=rec.value,
            dead_at=now_ms(),
            max_bytes=self.cfg.max_record_bytes,
        )
        part = partition_for(key, self.cfg.partitions) if key else rec.partition
        return (
            self.cfg.dead_letters_topic,
            self.codec.encode("DeadLetter", record),
            key,
            part,
        )

    async def _check_intact(self, consumer: AIOKafkaConsumer) -> bool:
        """Every ``sink_check_interval_s`` (not while replaying): if the target lost
        records of assigned partitions, repair it (the search index re-created with its
        mapping) and read those partitions again from the beginning (degraded, state
        ``replaying``, until caught up). True when it started a replay. Also called
        while a batch is held by a failing target: a wrongly mapped index refuses
        every batch, so only the check gets the sink out of that."""
        if self.replaying or time.monotonic() < self.next_check:
            return False
        self.next_check = time.monotonic() + self.cfg.sink_check_interval_s
        assigned = sorted(consumer.assignment(), key=lambda tp: tp.partition)
        if not assigned:
            return False
        try:
            lost = await self.projection.lost([tp.partition for tp in assigned])
        except TargetUnavailable as exc:
            log.info("%s sink: cannot check the target now: %s", self.target, exc)
            return False
        if not lost:
            return False
        try:
            await self.projection.repair(sorted(lost))
        except TargetUnavailable as exc:
            # retried at the next check; meanwhile writes fail or land in what is there
            log.warning("%s sink: target lost data, cannot repair it now: %s", self.target, exc)
            return False
        tps = [tp for tp in assigned if tp.partition in lost]
        log.warning(
            "%s sink: target lost data of partitions %s; re-applying them from the changelog",
            self.target,
            ", ".join(str(tp.partition) for tp in tps),
        )
        metrics.SINK_REPLAYS.labels(self.target).inc()
        self.replaying = set(tps)
        self._set_degraded(self.failing)
        self.dead_lettered_below = {tp: await consumer.committed(tp) or 0 for tp in tps}
        await consumer.seek_to_beginning(*tps)
        return True

    async def _replay_done(self, consumer: AIOKafkaConsumer) -> None:
        """Mark each replayed partition whole once it is at its end (a partition a
        rebalance took away is its new owner's to check)."""
        if not self.replaying:
            return
        self.replaying &= consumer.assignment()
        done = []
        for tp in self.replaying:
            hw = consumer.highwater(tp)
            if hw is not None and await consumer.position(tp) >= hw:
                done.append(tp)
        if done:
            try:
                await self.projection.mark_intact(sorted(tp.partition for tp in done))
            except TargetUnavailable:
                return
            self.replaying -= set(done)
        if not self.replaying:
            log.info("%s sink: re-applied the changelog; target whole again", self.target)
            self.dead_lettered_below = {}
        self._set_degraded(self.failing)

    async def _until_ready(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                await self.projection.setup()
                await consumer.start()
                return
            except TargetUnavailable as exc:
                self._set_degraded(True)
                delay = self.backoff.next_delay()
                log.warning(
                    "%s sink: target not ready (%s); retry in %.1fs", self.target, exc, delay
                )
                # e.g. an index created with a wrong mapping while the sink was down: the
                # repair re-creates it (no partition is marked: each is checked once running)
                with contextlib.suppress(TargetUnavailable):
                    await self.projection.repair([])
                await asyncio.sleep(delay)

    async def _apply_until_done(
        self, consumer: AIOKafkaConsumer, changes: list[StockChange]
    ) -> ApplyReport | None:
        """Apply ``changes``, retrying while the target fails; None when a check found
        meanwhile that the target lost data and a replay began instead."""
        paused = False
        while True:
            try:
                report = await self.projection.apply(changes)
            except TargetUnavailable as exc:
                metrics.SINK_ERRORS.labels(self.target).inc()
                self._set_degraded(True)
                if not paused:
                    consumer.pause(*consumer.assignment())
                    paused = True
                if await self._check_intact(consumer):
                    consumer.resume(*consumer.assignment())
                    self._set_degraded(False)
                    return None
                delay = self.backoff.next_delay()
                log.warning(
                    "%s sink: %s; batch of %d held, retry in %.1fs",
                    self.target,
                    exc,
                    len(changes),
                    delay,
                )
                # polling a paused consumer fetches nothing but keeps it in the group
                deadline = time.monotonic() + delay
                while (left := deadline - time.monotonic()) > 0:
                    got = await consumer.getmany(timeout_ms=int(min(left, 1.0) * 1000) + 1)
                    for tp, recs in got.items():
                        # a rebalance handed us unpaused partitions: put their records back
                        consumer.seek(tp, recs[0].offset)
                        consumer.pause(tp)
                    await self._update_lag(consumer, held=len(changes))
                continue
            if paused:
                consumer.resume(*consumer.assignment())
                log.info("%s sink: target back, batch applied", self.target)
            self.backoff.reset()
            self._set_degraded(False)
            return report

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        mine = {tp: o for tp, o in offsets.items() if tp in consumer.assignment()}
        if not mine:
            return
        try:
            await consumer.commit(mine)
        except (CommitFailedError, IllegalStateError) as exc:
            # a rebalance took the partitions: their new owner re-applies (idempotent)
            log.info("%s sink: commit skipped after rebalance: %s", self.target, exc)

    def _observe(self, changes: list[StockChange], report: ApplyReport, coalesced: int = 0) -> None:
        metrics.SINK_APPLIED.labels(self.target, "applied").inc(report.applied)
        metrics.SINK_APPLIED.labels(self.target, "stale").inc(report.stale)
        if coalesced:
            metrics.SINK_APPLIED.labels(self.target, "coalesced").inc(coalesced)
        hist = metrics.SINK_FRESHNESS.labels(self.target)
        for change in changes:
            hist.observe(max(0, report.applied_at_ms - change["occurred_at"]) / 1000)

    @property
    def state(self) -> str:
        """For /healthz: ``degraded`` while the target fails, ``replaying`` while it is
        re-applied from the changelog after it lost data, else ``ok``."""
        if self.failing:
            return "degraded"
        return "replaying" if self.replaying else "ok"

    def _set_degraded(self, failing: bool) -> None:
        """Degraded while the target fails or while it is being re-applied."""
        self.failing = failing
        self.degraded = failing or bool(self.replaying)
        metrics.SINK_STATE.labels(self.target).set(1 if self.degraded else 0)
        metrics.SINK_REPLAYING.labels(self.target).set(1 if self.replaying else 0)

    async def _update_lag(self, consumer: AIOKafkaConsumer, held: int = 0) -> None:
        """Records behind the end of the topic, counting a batch held back by an outage."""
        metrics.SINK_LAG.labels(self.target).set(held + await lag(consumer))


def coalesce(changes: Sequence[StockChange]) -> list[StockChange]:
    """The highest version of each SKU in ``changes`` (first-seen SKU order).

    A projection holds the newest version only, so the older ones of a batch would
    be applied just to be overwritten: a hot SKU costs one write per batch, not one
    per change. What the target ends up holding is the same either way.
    """
    best: dict[str, StockChange] = {}
    for change in changes:
        held = best.get(change["sku"])
        if held is None or change["version"] > held["version"]:
            best[change["sku"]] = change
    return list(best.values())


def build_projections(cfg: Settings) -> list[Projection]:
    """The configured targets: Redis and the search index."""
    from pipeline.sinks.redis_sink import RedisProjection
    from pipeline.sinks.search_sink import SearchProjection

    return [RedisProjection(cfg), SearchProjection(cfg)]


async def run_forever(runner: SinkRunner) -> None:
    """Run one runner, restarting it after unexpected errors (logged); a stopping worker
    releases the target's client sessions."""
    await restarted(runner.run, f"{runner.target} sink", runner.projection.close, log)
