"""Fills a namespace's stock table through its changelog, for memory and restore runs.

Processing a million restocks through the pipeline takes far longer than this
machine's benchmark budget, so the large tables are written the way the table
itself persists: one changelog record per SKU, on the SKU's partition, whose value
is exactly what the agent stores after one ``RestockReceived`` (made by
:func:`pipeline.domain.core.decide` and :class:`tables.stock.StoredStock`). A worker started
on an empty data dir then restores the table from the changelog. The relay's
consumer group is committed at the end of the changelog first, as if it had already
published those records' effects (otherwise it would re-publish them all).
"""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from config.settings import Settings
from pipeline.domain import core
from pipeline.kafka.partitioning import partition_for
from pipeline.kafka.topics import changelog_topic, ensure_topics
from tables.stock import StoredStock, effects_of, stock_key

PLACEHOLDER = "Q" * 16


def template(cfg: Settings, units: int) -> bytes:
    """The stored value of one SKU after one restock, with :data:`PLACEHOLDER` as SKU."""
    now = int(time.time() * 1000)
    cmd = core.RestockReceived(
        event_id=f"fill-{uuid.uuid4()}",
        sku=PLACEHOLDER,
        qty=units,
        occurred_at=now,
        channel="warehouse",
    )
    decision = core.decide(None, cmd, now)
    stored = StoredStock(decision.record, {cfg.restocks_topic: 0}, effects_of(decision.events), now)
    return stored.to_bytes()


def sku_name(prefix: str, i: int) -> str:
    """16 characters, the length of :data:`PLACEHOLDER`, so values keep their size."""
    return f"{prefix}{i:0{16 - len(prefix)}d}"


def fill_changelog(cfg: Settings, start: int, count: int, prefix: str = "FILL") -> int:
    """Write SKUs ``start .. start+count-1`` to the changelog; returns records written."""
    ensure_topics(cfg)
    topic = changelog_topic(cfg)
    admin = AdminClient({"bootstrap.servers": cfg.kafka_bootstrap})
    if topic not in admin.list_topics(timeout=10).topics:
        fut = admin.create_topics(
            [
                NewTopic(
                    topic,
                    num_partitions=cfg.partitions,
                    replication_factor=1,
                    config={
                        "cleanup.policy": "compact",
                        "min.compaction.lag.ms": str(cfg.changelog_min_compaction_lag_ms),
                    },
                )
            ]
        )[topic]
        fut.result(30)
    value = template(cfg, 100)
    producer = Producer(
        {
            "bootstrap.servers": cfg.kafka_bootstrap,
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "acks": "all",
            "queue.buffering.max.messages": 2_000_000,
            "compression.type": "none",
        }
    )
    ph = PLACEHOLDER.encode()
    for i in range(start, start + count):
        sku = sku_name(prefix, i).encode()
        key = stock_key(sku.decode())
        while True:
            try:
                producer.produce(
                    topic,
                    value.replace(ph, sku),
                    key,
                    partition=partition_for(key, cfg.partitions),
                )
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10000 == 0:
            producer.poll(0)
    left = producer.flush(120)
    if left:
        raise RuntimeError(f"{left} changelog records not delivered")
    commit_relay_to_end(cfg)
    return count


def commit_relay_to_end(cfg: Settings, table: str = "stock", group: str = "relay") -> None:
    """Mark ``table``'s changelog as relayed (the ``<app id>-<group>`` consumer group at
    the high watermark): the stock relay by default, ``("orders", "orders-relay")`` for
    the order relay."""
    topic = changelog_topic(cfg, table)
    c = Consumer(
        {
            "bootstrap.servers": cfg.kafka_bootstrap,
            "group.id": f"{cfg.app_id}-{group}",
            "enable.auto.commit": False,
        }
    )
    try:
        offsets = []
        for p in range(cfg.partitions):
            _low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            offsets.append(TopicPartition(topic, p, high))
        c.commit(offsets=offsets, asynchronous=False)
    finally:
        c.close()


def changelog_size(cfg: Settings) -> int:
    """Records currently in the changelog (sum of high minus low watermarks)."""
    topic = changelog_topic(cfg)
    c = Consumer({"bootstrap.servers": cfg.kafka_bootstrap, "group.id": "bench-size"})
    try:
        total = 0
        for p in range(cfg.partitions):
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
        return total
    finally:
        c.close()
