"""Read a whole topic to its end, transaction markers included.

A partition written in transactions ends with a commit marker: a consumer never
receives the record at ``high watermark - 1``, so "stop when the last offset
arrived" waits forever. Reading ``read_committed`` with partition-EOF events, a
partition is done once the end-of-partition event reaches the high watermark it
had when reading began (an open transaction holds it back until it commits or
aborts).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from config.settings import Settings
from pipeline.clients import confluent_config


def read_to_end(
    cfg: Settings, topic: str, *, timeout: float = 120.0, chunk: int = 5000
) -> Iterator[Any]:
    """Every committed record of every partition of ``topic``, from the beginning up to
    the end each partition had when called (confluent-kafka ``Message`` objects).

    Raises ``LookupError`` when the topic does not exist, ``TimeoutError`` when the
    end is not reached within ``timeout`` seconds.
    """
    consumer = Consumer(
        confluent_config(
            cfg,
            **{
                "group.id": f"read-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "log_level": 2,
            },
        )
    )
    try:
        meta = consumer.list_topics(topic, timeout=10)
        if topic not in meta.topics or meta.topics[topic].error is not None:
            raise LookupError(f"topic {topic} not found")
        ends: dict[int, int] = {}
        for p in meta.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=10, cached=False
            )
            if high > low:
                ends[p] = high
        if not ends:
            return
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        done: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(done) < len(ends):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: end not reached in {timeout} s")
            for msg in consumer.consume(chunk, 0.5):
                err = msg.error()
                part, off = msg.partition(), msg.offset()
                if part is None or off is None:  # a client-level error, of no partition
                    continue
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and off >= ends[part]:
                        done.add(part)
                    continue
                if part in done:
                    continue
                yield msg
                if off + 1 >= ends[part]:
                    done.add(part)
    finally:
        consumer.close()
