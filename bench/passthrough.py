"""A bare consume-and-produce loop, the ceiling a Kafka stream processor can reach here.

``python -m bench.passthrough aiokafka|confluent BOOTSTRAP IN OUT COUNT`` reads every
partition of IN from the start, sends each record unchanged to OUT (acks=all, linger
1 ms like the worker's producer), commits as it goes, and exits after COUNT records.
It prints ``ready`` once its consumer is assigned.
"""

from __future__ import annotations

import asyncio
import sys
import time


async def run_aiokafka(bootstrap: str, src: str, dst: str, count: int) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=f"pass-{src}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
        max_poll_records=2000,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=1, enable_idempotence=True
    )
    await producer.start()
    await consumer.start()
    parts = consumer.partitions_for_topic(src) or set()
    while not parts:
        await asyncio.sleep(0.1)
        await consumer._client.force_metadata_update()  # noqa: SLF001 - fresh topic
        parts = consumer.partitions_for_topic(src) or set()
    tps = [TopicPartition(src, p) for p in sorted(parts)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    print("ready", flush=True)
    done = 0
    last_commit = time.monotonic()
    try:
        while done < count:
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            for _tp, recs in batches.items():
                for r in recs:
                    await producer.send(dst, key=r.key, value=r.value)
                    done += 1
            if time.monotonic() - last_commit > 1.0:
                await consumer.commit()
                last_commit = time.monotonic()
        await producer.flush()
        await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


def run_confluent(bootstrap: str, src: str, dst: str, count: int) -> None:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"pass-{src}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "linger.ms": 1,
            "enable.idempotence": True,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    meta = consumer.list_topics(src, timeout=10)
    consumer.assign(
        [TopicPartition(src, p, OFFSET_BEGINNING) for p in sorted(meta.topics[src].partitions)]
    )
    print("ready", flush=True)
    done = 0
    last_commit = time.monotonic()
    while done < count:
        for m in consumer.consume(num_messages=2000, timeout=0.1):
            if m.error() is not None:
                continue
            while True:
                try:
                    producer.produce(dst, m.value(), m.key())
                    break
                except BufferError:
                    producer.poll(0.01)
            done += 1
        producer.poll(0)
        if time.monotonic() - last_commit > 1.0:
            consumer.commit(asynchronous=True)
            last_commit = time.monotonic()
    producer.flush(60)
    consumer.commit(asynchronous=False)
    consumer.close()


def main(argv: list[str]) -> int:
    client, bootstrap, src, dst, count = argv
    if client == "aiokafka":
        asyncio.run(run_aiokafka(bootstrap, src, dst, int(count)))
    else:
        run_confluent(bootstrap, src, dst, int(count))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
