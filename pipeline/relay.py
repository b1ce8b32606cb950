"""The changelog relay: publishes StockChanged and ReservationResult from the ledger.

Every SKU record in the ledger's changelog carries the effects of the batch that
wrote it (:mod:`pipeline.batch`). The relay consumes the changelog (committed
transactions only) in its own consumer group and publishes those effects, then
commits. ReservationResults of the saga's own commands (tagged ``reply_to``) go
to the internal order-line-results topic, the rest to reservation-results. By default
it runs in every worker (Kafka's group protocol spreads the changelog
partitions over them); with ``INVENTORY_RELAY_ENABLED=0`` on the workers it runs
as its own process instead, ``python -m pipeline.relay`` (any number of them,
same group), which takes its consume-decode-encode-produce work off the
deciding event loop.

Delivery is at-least-once: after a crash the relay re-publishes what it had
not committed, so ``inventory.stock-changes`` may hold a version twice (with
identical content) but never misses one that is in the changelog. Consumers
apply by version, which makes the duplicates harmless. The changelog is
compacted only after ``changelog_min_compaction_lag_ms``, which bounds how long
the relay may be down without missing versions.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import Producer

from config.settings import Settings, settings
from pipeline import metrics
from pipeline.cli import prog
from pipeline.clients import aiokafka_kwargs, confluent_config
from pipeline.kafka.topics import changelog_topic
from pipeline.logs import configure_logging
from schemas.codec import AvroCodec, codec_from_settings
from tables.stock import StoredStock, is_stock_key

log = logging.getLogger("inventory.relay")


def relay_producer_config(cfg: Settings) -> dict[str, Any]:
    """librdkafka settings of the relay's producer."""
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


class ChangelogRelay:
    """Consume the stock changelog, publish each record's effects, commit."""

    def __init__(self, cfg: Settings, codec: AvroCodec) -> None:
        self.cfg = cfg
        self.codec = codec
        self.topic = changelog_topic(cfg)
        self.published = 0  # records sent by this process (for the kill failpoint)

    def outputs(self, key: bytes, value: bytes | None) -> list[tuple[str, bytes, bytes, str]]:
        """(topic, key, value, record name) to publish for one changelog record."""
        if value is None or not is_stock_key(key):
            return []
        stored = StoredStock.from_bytes(value)
        out: list[tuple[str, bytes, bytes, str]] = []
        for name, items in stored.effects.items():
            for item in items:
                if name == "ReservationResult":
                    okey = item["order_id"].encode()
                    # the saga's own commands are answered where only the saga reads
                    topic = (
                        self.cfg.line_results_topic
                        if item.pop("reply_to", "") == "saga"
                        else self.cfg.results_topic
                    )
                else:
                    topic, okey = self.cfg.stock_changes_topic, key
                out.append((topic, okey, self.codec.encode_trusted(name, item), name))
        return out

    async def run(self) -> None:
        await self.codec.ensure_registered(metrics.registry_wait)  # no HTTP on the hot path
        consumer = AIOKafkaConsumer(
            self.topic,
            **aiokafka_kwargs(self.cfg),
            group_id=f"{self.cfg.app_id}-relay",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # the ledger writes its changelog in transactions: never relay an aborted batch
            isolation_level="read_committed",
            fetch_max_wait_ms=20,
            max_poll_records=2000,
            session_timeout_ms=int(self.cfg.session_timeout_s * 1000),
            heartbeat_interval_ms=int(self.cfg.heartbeat_interval_s * 1000),
        )
        producer = Producer(relay_producer_config(self.cfg))
        loop = asyncio.get_running_loop()
        failures: list[str] = []
        counted: dict[str, Any] = {}

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        await self._start_consumer(consumer)
        try:
            while True:
                # a SKU record carries up to a batch of effects: fewer records per round
                batches = await consumer.getmany(timeout_ms=200, max_records=200)
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
                            f"relay: {left} records unacknowledged, failures: {failures[:3]}"
                        )
                self.published += sent
                kill_after = self.cfg.failpoint_relay_kill_after
                if kill_after and self.published >= kill_after:
                    log.warning("failpoint: relay killed after %d records", self.published)
                    os.kill(os.getpid(), signal.SIGKILL)  # published, not committed
                await consumer.commit(offsets)
                await self._update_lag(consumer)
        finally:
            await consumer.stop()
            await loop.run_in_executor(None, producer.flush, 5.0)

    async def _start_consumer(self, consumer: AIOKafkaConsumer) -> None:
        # the changelog is created by Faust when the table starts; wait for it
        while True:
            try:
                await consumer.start()
                return
            except Exception as exc:  # noqa: BLE001 - retried, logged
                log.warning("relay consumer not started yet: %s", exc)
                await asyncio.sleep(1.0)

    async def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        lag = 0
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            if hw is not None:
                lag += max(0, hw - await consumer.position(tp))
        metrics.RELAY_LAG.set(lag)


async def run_forever(relay: ChangelogRelay) -> None:
    """Run the relay, restarting it after any failure (broker hiccups included)."""
    while True:
        try:
            await relay.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the relay must outlive broker hiccups
            log.exception("relay failed; restarting in 1 s")
            await asyncio.sleep(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.relay`` / ``inventory-relay``: the relay alone, until stopped."""
    parser = argparse.ArgumentParser(
        prog=prog("pipeline.relay"),
        description="Publish StockChanged and ReservationResult from the ledger's changelog "
        "without a worker (set INVENTORY_RELAY_ENABLED=0 on the workers then). Any number "
        "may run: they share one consumer group. Configured by the INVENTORY_* variables; "
        "/metrics on INVENTORY_METRICS_PORT (0 = none).",
    )
    parser.parse_args(argv)
    configure_logging(settings.log_level)
    metrics.serve_standalone(settings.metrics_port, settings.web_host)
    asyncio.run(run_forever(ChangelogRelay(settings, codec_from_settings(settings))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
