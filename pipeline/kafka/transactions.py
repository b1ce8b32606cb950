"""Kafka transactions for the ledger: one transactional producer per ledger partition.

Why transactions. A worker paused past its session timeout (a VM stall, a
blocked loop) keeps believing it owns its partitions until it next talks to the
group coordinator; meanwhile another worker decides for them. Without fencing,
the paused worker's next writes land in the changelog beside the new owner's
(the same versions twice, with different content: an oversell). Kafka's answer
is the transactional producer: every owner of ledger partition ``p`` uses the
transactional id ``{app_id}-ledger-{p}``, and ``init_transactions`` by a new
owner bumps the producer epoch, aborts the old owner's open transaction and
makes every later write or commit of the old owner fail with a fencing error.
Readers use ``isolation.level=read_committed``, so they never see an aborted
write.

One transaction per batch carries every changelog record of the batch, its
dead letters and re-routed records, and the input offsets it consumed
(``send_offsets_to_transaction`` to the app's consumer group): state, outputs
and input position commit together or not at all.

confluent-kafka's transaction calls block; they run on a thread pool, never on
the event loop. ``retry.backoff.ms`` is low because the coordinator answers
``CONCURRENT_TRANSACTIONS`` for a few ms after each commit (librdkafka's 100 ms
default backoff made each transaction take ~100 ms here).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from config.settings import Settings
from pipeline.clients import confluent_config, watermarks

log = logging.getLogger("inventory.transactions")


class WriterLost(RuntimeError):
    """The producer was fenced by a newer owner, or failed fatally: the partition is lost."""


class BatchAborted(RuntimeError):
    """The transaction was aborted (nothing of it is visible); the batch may be retried."""


class _InDoubt(Exception):
    """A transaction that may or may not have committed (the producer must be replaced)."""


@dataclass(frozen=True, slots=True)
class Out:
    """One record of a batch's transaction."""

    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, str | bytes | None]] | None = None


def transactional_id(cfg: Settings, partition: int) -> str:
    return f"{cfg.app_id}-ledger-{partition}"


def writer_config(cfg: Settings, partition: int) -> dict[str, Any]:
    """librdkafka settings of the transactional producer of ledger partition ``partition``."""
    return confluent_config(
        cfg,
        **{
            "transactional.id": transactional_id(cfg, partition),
            "transaction.timeout.ms": int(cfg.transaction_timeout_s * 1000),
            # what a transactional id implies anyway, stated: idempotent, and every
            # write on min.insync.replicas brokers before it is acknowledged
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 0,
            "batch.size": 1_000_000,
            "message.max.bytes": cfg.max_record_bytes,
            "retry.backoff.ms": 2,
            "retry.backoff.max.ms": 50,
            "queue.buffering.max.messages": 1_000_000,
        },
    )


class BrokerQueries:
    """A confluent-kafka consumer of the app's group that never joins it, kept for the
    process: the group metadata ``send_offsets_to_transaction`` needs, committed offsets
    and log bounds. librdkafka's calls are thread-safe: use it from the thread pool.

    Offsets are committed for the group without a member id or generation, so fencing
    rests on the transactional id (the classic per-partition scheme).
    """

    def __init__(self, cfg: Settings) -> None:
        self._consumer = Consumer(
            confluent_config(cfg, **{"group.id": cfg.app_id, "enable.auto.commit": False})
        )
        self.metadata = self._consumer.consumer_group_metadata()

    def committed(
        self, tps: Iterable[tuple[str, int]], timeout_s: float = 10.0
    ) -> dict[tuple[str, int], int | None]:
        """The group's committed offset of each (topic, partition); None when none."""
        got = self._consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=timeout_s)
        out: dict[tuple[str, int], int | None] = {}
        for tp in got:
            if tp.error is not None:
                raise KafkaException(tp.error)
            out[(tp.topic, tp.partition)] = int(tp.offset) if tp.offset >= 0 else None
        return out

    def bounds(
        self, tps: Iterable[tuple[str, int]], timeout_s: float = 10.0
    ) -> dict[tuple[str, int], tuple[int, int]]:
        """(log start, log end) of each (topic, partition), asked of the broker now."""
        return {(t, p): watermarks(self._consumer, t, p, timeout_s) for t, p in tps}

    def close(self) -> None:
        self._consumer.close()


class PartitionWriter:
    """The transactional producer of one ledger partition."""

    def __init__(
        self,
        cfg: Settings,
        partition: int,
        group: BrokerQueries,
        executor: Executor,
        timeout_s: float = 30.0,
    ) -> None:
        self.cfg = cfg
        self.partition = partition
        self.group = group
        self.executor = executor
        self.timeout_s = timeout_s
        self._producer: Producer | None = None
        self._delivered: list[tuple[str, int, int]] = []
        self._failed: list[str] = []

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def open(self) -> None:
        """Start a fresh producer and fence every earlier owner of the partition."""
        await self.close()
        producer = Producer(writer_config(self.cfg, self.partition))
        try:
            await self._run(producer.init_transactions, self.timeout_s)
        except KafkaException as exc:
            await self._run(producer.flush, 0)
            raise WriterLost(f"init_transactions failed: {exc.args[0]}") from None
        self._producer = producer

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await self._run(producer.flush, 1.0)
            except Exception:  # noqa: BLE001 - closing a producer that failed
                pass

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed.append(str(err))
        else:
            self._delivered.append((msg.topic(), msg.partition(), msg.offset()))

    async def commit(
        self, records: Sequence[Out], offsets: dict[tuple[str, int], int] | None = None
    ) -> list[tuple[str, int, int]]:
        """Write ``records`` (and commit ``offsets``, next offset per input topic-partition,
        to the app's group) in one transaction; returns (topic, partition, offset) of
        every record written.

        Raises :class:`BatchAborted` when the transaction was aborted (retry the batch)
        and :class:`WriterLost` when this producer can no longer write (fenced or fatal).
        """
        if self._producer is None:
            raise WriterLost("no producer")
        try:
            done: list[tuple[str, int, int]] = await self._run(
                self._commit_sync, self._producer, records, offsets or {}
            )
            return done
        except _InDoubt as exc:
            # neither committed nor aborted for sure: a new producer's init_transactions
            # settles it, and the catch-up that follows reads whatever committed
            self._producer = None
            raise WriterLost(f"transaction outcome unknown: {exc}") from None
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.fatal() or err.code() in _FENCED:
                self._producer = None
                raise WriterLost(str(err)) from None
            raise BatchAborted(str(err)) from None

    def _commit_sync(
        self, producer: Producer, records: Sequence[Out], offsets: dict[tuple[str, int], int]
    ) -> list[tuple[str, int, int]]:
        """One transaction, on a pool thread. Any error before the commit aborts it
        (``KafkaException`` out: the batch may be retried); an error that leaves its
        outcome open raises :class:`_InDoubt`."""
        self._delivered = []
        self._failed = []
        producer.begin_transaction()
        try:
            for out in records:
                self._produce(producer, out)
            if offsets:
                producer.send_offsets_to_transaction(
                    [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    self.group.metadata,
                    self.timeout_s,
                )
        except KafkaException as exc:
            if exc.args[0].fatal():
                raise
            self._abort(producer, exc)
            raise
        except BufferError as exc:  # the local queue stayed full: abort, retry the batch
            self._abort(producer, exc)
            raise KafkaException(KafkaError(KafkaError._QUEUE_FULL, str(exc))) from None
        for attempt in range(5):
            try:
                producer.commit_transaction(self.timeout_s)
                break
            except KafkaException as exc:
                err: KafkaError = exc.args[0]
                if err.fatal():
                    raise
                if err.txn_requires_abort():
                    self._abort(producer, exc)
                    raise
                if err.retriable() and attempt < 4:
                    log.warning("commit of ledger partition %d: %s; retrying", self.partition, err)
                    continue
                raise _InDoubt(str(err)) from None
        if self._failed:  # cannot happen after a successful commit; be loud if it does
            raise _InDoubt("committed with failed deliveries: " + "; ".join(self._failed))
        return self._delivered

    def _abort(self, producer: Producer, cause: BaseException) -> None:
        try:
            producer.abort_transaction(self.timeout_s)
        except KafkaException as exc:
            raise _InDoubt(f"{cause}; abort failed: {exc.args[0]}") from None

    def _produce(self, producer: Producer, out: Out) -> None:
        for _ in range(100):
            try:
                producer.produce(
                    out.topic,
                    value=out.value,
                    key=out.key,
                    partition=out.partition,
                    headers=out.headers,
                    on_delivery=self._on_delivery,
                )
                return
            except BufferError:
                producer.poll(0.05)
        raise BufferError("producer queue full for 5 s")


_FENCED = {
    KafkaError._FENCED,
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
}


# --------------------------------------------------------------------------
# reading a changelog partition (catch-up and restore)


@dataclass(slots=True)
class ReadResult:
    end: int  # the offset reading stopped at: the partition's end when it was reached
    records: int


def _reader(cfg: Settings, **extra: Any) -> Consumer:
    """A consumer that reads assigned partitions, committed records only, and reports
    each partition's end (it never joins or commits to a group)."""
    return Consumer(
        confluent_config(
            cfg,
            **{
                "group.id": f"{cfg.app_id}-ledger-reader",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed",
                **extra,
            },
        )
    )


def read_partition(
    cfg: Settings,
    topic: str,
    partition: int,
    start: int,
    apply: Any,
    *,
    chunk: int = 5_000,
    timeout_s: float = 30.0,
) -> ReadResult:
    """Read ``topic``/``partition`` (committed records only) from ``start`` to its end,
    calling ``apply(list of (key, value, offset))`` per chunk. Blocking: run it on a thread.

    The end is the end of the log when reading began: call it after fencing, when no
    transaction but this process's own can be open on the partition.
    """
    consumer = _reader(
        cfg,
        **{
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 10,
            # librdkafka's prefetch queue: 64 MiB each (its default) times the partitions
            # restoring at once held ~800 MB after a cold restore of 1M SKUs
            "queued.max.messages.kbytes": 8192,
            "fetch.queue.backoff.ms": 5,  # librdkafka waits 1 s when that queue is full
        },
    )
    try:
        low, high = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=timeout_s, cached=False
        )
        begin = max(start, low)
        if begin >= high:
            return ReadResult(max(start, high), 0)
        consumer.assign([TopicPartition(topic, partition, begin)])
        position = begin
        count = 0
        idle_since = time.monotonic()
        while position < high:
            # consume() waits until it has ``chunk`` messages or the timeout: keep the
            # timeout short, the prefetch queue may hold fewer than a chunk
            msgs = consumer.consume(chunk, 0.05)
            if not msgs:
                if time.monotonic() - idle_since > timeout_s:
                    raise TimeoutError(f"{topic}/{partition}: no progress at @{position}")
                continue
            idle_since = time.monotonic()
            batch = []
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        position = max(position, _offset(m))
                        high = min(high, position)  # reached the (stable) end
                        continue
                    raise KafkaException(err)
                batch.append((m.key(), m.value(), _offset(m)))
                position = _offset(m) + 1
            if batch:
                apply(batch)
                count += len(batch)
        return ReadResult(max(position, high), count)
    finally:
        consumer.close()


def first_committed_offset(
    cfg: Settings, topic: str, partition: int, start: int, timeout_s: float = 10.0
) -> int | None:
    """Offset of the first committed record at or after ``start`` (None: none up to the end).

    Tells a gap a read_committed consumer may legitimately skip (transaction markers,
    aborted records) from a record that was lost on its way.
    """
    consumer = _reader(cfg)
    try:
        consumer.assign([TopicPartition(topic, partition, start)])
        waited = 0.0
        while waited < timeout_s:
            msgs = consumer.consume(1, 0.5)
            waited += 0.5
            for m in msgs:
                err = m.error()
                if err is None:
                    return _offset(m)
                if err.code() == KafkaError._PARTITION_EOF:
                    return None
                raise KafkaException(err)
        raise TimeoutError(f"{topic}/{partition}: no answer from @{start}")
    finally:
        consumer.close()


def _offset(msg: Any) -> int:
    """The offset of a fetched record or end-of-partition event (always set for those;
    the stubs type it optional for client-level errors)."""
    off = msg.offset()
    if off is None:
        raise KafkaException(msg.error())
    return int(off)
