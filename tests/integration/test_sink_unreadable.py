"""A SKU record the sink cannot read is dead-lettered, never skipped-and-committed.

A plain (non-transactional) producer writes, into a fresh namespace's stock
changelog, one good SKU record, one unreadable one and a second good one, all on
partition 0. A real SinkRunner over real Redis and Kafka must apply both good
records, write exactly one dead letter (reason ``unreadable_changelog_record``,
with the source offset and the original bytes) and only then commit past all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import replace

import pytest
import redis
from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import Producer

from pipeline import metrics
from pipeline.clients import aiokafka_kwargs, confluent_config
from pipeline.domain.core import StockRecord
from pipeline.kafka.topics import changelog_topic, ensure_topics
from pipeline.sinks.redis_sink import RedisProjection
from pipeline.sinks.runner import UNREADABLE, SinkRunner
from schemas.codec import AvroCodec
from tables.stock import StoredStock
from tests.harness import Namespace, read_topic

pytestmark = pytest.mark.integration


def good(sku: str, version: int) -> bytes:
    rec = StockRecord(sku=sku, on_hand=10 * version, reserved=0, safety_stock=0, version=version)
    return StoredStock(record=rec, version_at=1_767_225_600_000).to_bytes()


def test_unreadable_sku_record_is_dead_lettered_and_later_records_applied() -> None:
    ns = Namespace.fresh("sink-unreadable", partitions=1)
    s = replace(ns.settings, redis_key_prefix=f"test-{uuid.uuid4().hex[:8]}:")
    ensure_topics(s)
    topic = changelog_topic(s)
    bad_value = b"\x00not json at all"
    producer = Producer(confluent_config(s))
    for key, value in (
        (b"SKU-A", good("SKU-A", 1)),
        (b"SKU-B", bad_value),
        (b"SKU-C", good("SKU-C", 2)),
    ):
        producer.produce(topic, value, key, partition=0)
    assert producer.flush(30) == 0
    r = redis.Redis.from_url(s.redis_url)
    before = metrics.DEAD_LETTERS.labels(UNREADABLE)._value.get()

    async def scenario() -> int | None:
        runner = SinkRunner(s, RedisProjection(s), AvroCodec())
        task = asyncio.create_task(runner.run())
        try:
            for _ in range(300):
                if r.hget(s.redis_stock_key("SKU-C"), "version") == b"2":
                    break
                assert not task.done(), task.exception()
                await asyncio.sleep(0.1)
            # the commit follows the apply: wait for it
            probe = AIOKafkaConsumer(
                **aiokafka_kwargs(s), group_id=f"{s.app_id}-sink-redis", enable_auto_commit=False
            )
            await probe.start()
            try:
                tp = TopicPartition(topic, 0)
                committed = None
                for _ in range(100):
                    committed = await probe.committed(tp)
                    if committed == 3:
                        break
                    await asyncio.sleep(0.1)
                return committed
            finally:
                await probe.stop()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    try:
        committed = asyncio.run(scenario())
        assert r.hget(s.redis_stock_key("SKU-A"), "on_hand") == b"10"
        assert r.hget(s.redis_stock_key("SKU-C"), "on_hand") == b"20"
        assert not r.exists(s.redis_stock_key("SKU-B"))
        assert committed == 3
        dead = read_topic(s, s.dead_letters_topic, until=lambda rs: len(rs) >= 1, idle=1.0)
        assert len(dead) == 1
        letter = dead[0].value
        assert letter["reason"] == UNREADABLE
        assert (letter["source_topic"], letter["source_partition"], letter["source_offset"]) == (
            topic,
            0,
            1,
        )
        assert letter["key"] == b"SKU-B" and letter["value"] == bad_value
        assert "redis sink" in letter["detail"]
        assert metrics.DEAD_LETTERS.labels(UNREADABLE)._value.get() == before + 1
    finally:
        for key in r.scan_iter(match=s.redis_key_prefix + "*"):
            r.delete(key)
