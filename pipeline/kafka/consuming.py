"""What every changelog consumer of the workers shares: the relays (stock and order
answers) and the sinks each consume a changelog in their own group, do something with
a batch, commit, and are restarted after a failure. Their consumer settings, lag,
restart loop, and the relays' publish loop (:class:`Relay`) live here once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import Producer

from config.settings import Settings
from pipeline import metrics
from pipeline.clients import aiokafka_kwargs, confluent_config
from schemas.codec import AvroCodec

log = logging.getLogger("inventory.relay")

Output = tuple[str, bytes, bytes, str]
"""One record to publish: (topic, key, value, record name)."""


def changelog_consumer(cfg: Settings, topic: str, group: str, max_records: int) -> AIOKafkaConsumer:
    """A consumer of ``topic`` in group ``<app_id>-<group>`` that commits by hand and
    reads committed transactions only (the ledger writes its changelog in transactions;
    for a changelog written without them it reads the same records)."""
    return AIOKafkaConsumer(
        topic,
        **aiokafka_kwargs(cfg),
        group_id=f"{cfg.app_id}-{group}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_poll_records=max_records,
        fetch_max_wait_ms=20,
        session_timeout_ms=int(cfg.session_timeout_s * 1000),
        heartbeat_interval_ms=int(cfg.heartbeat_interval_s * 1000),
    )


async def lag(consumer: AIOKafkaConsumer) -> int:
    """Records between the consumer's positions and the ends of its partitions."""
    behind = 0
    for tp in consumer.assignment():
        hw = consumer.highwater(tp)
        if hw is not None:
            behind += max(0, hw - await consumer.position(tp))
    return behind


async def run_forever(
    run: Callable[[], Awaitable[None]],
    what: str,
    on_cancel: Callable[[], Awaitable[None]] | None = None,
    logger: logging.Logger = log,
) -> None:
    """Await ``run()`` again a second after any failure (a broker hiccup must not end a
    relay or a sink); ``on_cancel`` releases clients when the worker stops; failures
    are logged to ``logger`` (the relays' by default, the sinks pass theirs)."""
    while True:
        try:
            await run()
        except asyncio.CancelledError:
            if on_cancel is not None:
                await on_cancel()
            raise
        except Exception:  # noqa: BLE001 - logged, and retried
            logger.exception("%s failed; restarting in 1 s", what)
            await asyncio.sleep(1.0)


def relay_producer_config(cfg: Settings) -> dict[str, Any]:
    """librdkafka settings of the relays' producer."""
    # librdkafka: ~1 us a record from C (aiokafka's send is ~4 us of Python); the
    # murmur2 partitioner puts each key where Java and aiokafka clients would
    return confluent_config(
        cfg,
        **{
            "partitioner": "murmur2_random",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 1_000_000,
        },
    )


class Relay:
    """Consume one changelog, publish what each record says to publish
    (:meth:`outputs`), wait for every acknowledgement, then commit.

    Delivery is at-least-once: after a crash a relay publishes again what it had not
    committed; what it publishes carries versions or ids, so a repeat is harmless."""

    group = "relay"
    max_records = 200

    def __init__(self, cfg: Settings, codec: AvroCodec, topic: str) -> None:
        self.cfg = cfg
        self.codec = codec
        self.topic = topic
        self.published = 0  # records sent by this relay

    def outputs(self, key: bytes, value: bytes | None) -> list[Output]:
        """The records to publish for one changelog record."""
        raise NotImplementedError

    def before_commit(self) -> None:
        """Called once a round's records are acknowledged, before its offsets commit."""

    async def after_commit(self, consumer: AIOKafkaConsumer) -> None:
        """Called after each committed round (metrics)."""

    async def run(self) -> None:
        await self.codec.ensure_registered(metrics.registry_wait)  # no HTTP on the hot path
        consumer = changelog_consumer(self.cfg, self.topic, self.group, self.max_records)
        producer = Producer(relay_producer_config(self.cfg))
        loop = asyncio.get_running_loop()
        failures: list[str] = []
        counted: dict[str, Any] = {}

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        await self._start(consumer)
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
                if not batches:
                    continue
                sent = 0
                offsets: dict[TopicPartition, int] = {}
                for tp, records in batches.items():
                    for rec in records:
                        for topic, okey, oval, name in self.outputs(rec.key, rec.value):
                            while True:
                                try:
                                    producer.produce(topic, oval, okey, on_delivery=delivered)
                                    break
                                except BufferError:
                                    await loop.run_in_executor(None, producer.poll, 0.05)
                            sent += 1
                            child = counted.get(name)
                            if child is None:
                                child = counted[name] = metrics.RELAY_PUBLISHED.labels(name)
                            child.inc()
                    offsets[tp] = records[-1].offset + 1
                if sent:
                    left = await loop.run_in_executor(None, producer.flush, 30.0)
                    if left or failures:
                        raise RuntimeError(
                            f"{self.group}: {left} records unacknowledged, failures: {failures[:3]}"
                        )
                self.published += sent
                self.before_commit()
                await consumer.commit(offsets)
                await self.after_commit(consumer)
        finally:
            await consumer.stop()
            await loop.run_in_executor(None, producer.flush, 5.0)

    async def _start(self, consumer: AIOKafkaConsumer) -> None:
        # a changelog is created by Faust when its table starts; wait for it
        while True:
            try:
                await consumer.start()
                return
            except Exception as exc:  # noqa: BLE001 - retried, logged
                log.warning("%s consumer not started yet: %s", self.group, exc)
                await asyncio.sleep(1.0)
