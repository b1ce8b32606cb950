"""The load generator's Kafka side: consumer settings, end offsets, a topic reader
thread, the result collector and the paced multi-producer sender."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from bench.loadgen_result import Answer
from config.settings import Settings
from pipeline.produce import producer_config
from schemas.codec import AvroCodec


def consumer_config(cfg: Settings, group: str) -> dict[str, Any]:
    """The reading side used everywhere in the benchmarks (results, passthrough, bare Kafka)."""
    return {
        "bootstrap.servers": cfg.kafka_bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 10,
        "enable.partition.eof": False,
    }


def end_offsets(cfg: Settings, topic: str) -> list[TopicPartition]:
    """The topic's current high watermarks, to read only what comes next."""
    c = Consumer(consumer_config(cfg, f"bench-probe-{uuid.uuid4().hex}"))
    try:
        deadline = time.monotonic() + 30
        while True:  # a topic created a moment ago may not be in the metadata yet
            meta = c.list_topics(topic, timeout=10)
            t = meta.topics.get(topic)
            if t is not None and t.error is None and t.partitions:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {topic} has no partitions in the metadata")
            time.sleep(0.2)
        out = []
        for p in sorted(meta.topics[topic].partitions):
            deadline = time.monotonic() + 30
            while True:  # a topic created a moment ago may not have a leader yet
                try:
                    _low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                    break
                except KafkaException:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            out.append(TopicPartition(topic, p, high))
        return out
    finally:
        c.close()


class TopicReader(threading.Thread):
    """Reads a topic from given offsets in a thread; ``handle(msg, now)`` per message."""

    def __init__(
        self,
        cfg: Settings,
        start: list[TopicPartition],
        handle: Callable[[Any, float], None],
        warm: float = 1.0,
    ) -> None:
        super().__init__(daemon=True)
        self.consumer = Consumer(consumer_config(cfg, f"bench-reader-{uuid.uuid4().hex}"))
        self.consumer.assign(start)
        self.handle = handle
        self.stopping = threading.Event()
        self.count = 0
        # connect and start fetching before the caller sends anything, so the first
        # records' latency does not include the consumer's start-up
        self.pending = self.consumer.consume(num_messages=1000, timeout=warm) if warm else []

    def run(self) -> None:
        try:
            now = time.time()
            for m in self.pending:
                if m.error() is None:
                    self.count += 1
                    self.handle(m, now)
            while not self.stopping.is_set():
                msgs = self.consumer.consume(num_messages=1000, timeout=0.05)
                now = time.time()
                for m in msgs:
                    if m.error() is None:
                        self.count += 1
                        self.handle(m, now)
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


class ResultCollector:
    """Answers on ``reservation-results`` by event id (and expiries by order id)."""

    def __init__(self, cfg: Settings, codec: AvroCodec) -> None:
        self.codec = codec
        self.answers: dict[str, list[Answer]] = defaultdict(list)
        self.expired: dict[str, Answer] = {}
        self.outcomes: Counter[str] = Counter()
        self.last_at = 0.0
        self.total = 0  # answers except expiries
        self.tracked: set[str] = set()
        self.tracked_answered = 0  # tracked event ids with at least one answer
        self.listeners: list[Callable[[str, Answer], None]] = []
        self.reader = TopicReader(cfg, end_offsets(cfg, cfg.results_topic), self._on_message)

    def _on_message(self, msg: Any, now: float) -> None:
        name, v = self.codec.decode(msg.value())
        if name != "ReservationResult":
            return
        a = Answer(now, v["outcome"], v["qty"], v["duplicate"], v["order_id"], v["sku"])
        self.outcomes[a.outcome] += 1
        self.last_at = now
        if a.outcome == "EXPIRED" and not a.duplicate:
            self.expired[a.order_id] = a
        else:
            got = self.answers[v["event_id"]]
            if not got and v["event_id"] in self.tracked:
                self.tracked_answered += 1
            got.append(a)
            self.total += 1
        for listen in self.listeners:
            listen(v["event_id"], a)

    def start(self) -> None:
        self.reader.start()

    def stop(self) -> None:
        self.reader.stop()


class Sender:
    """Paced sends from K threads; records send times."""

    def __init__(self, cfg: Settings, codec: AvroCodec, threads: int, rate: float | None) -> None:
        self.cfg = cfg
        self.codec = codec
        self.threads = max(1, threads)
        self.rate = rate
        self.sent: dict[str, float] = {}
        self.failures: list[str] = []

    def _producer(self) -> Producer:
        conf = producer_config(self.cfg)
        conf["queue.buffering.max.messages"] = 1_000_000
        # a delivery report (a Python callback) only for failures: the sends are counted
        # by flush(), and a callback per record would be load-generator CPU on every send
        conf["delivery.report.only.error"] = True
        return Producer(conf)

    def send_all(self, commands: list[tuple[str, dict[str, Any]]]) -> None:
        """Send ``(type, fields)`` commands; returns when all are acknowledged."""
        if not commands:
            return
        slices = [s for s in (commands[i :: self.threads] for i in range(self.threads)) if s]
        # every thread connects its producer first; the pacing clock starts when all have
        start: list[float] = []
        barrier = threading.Barrier(len(slices), action=lambda: start.append(time.perf_counter()))
        workers = [
            threading.Thread(target=self._run, args=(i, part, barrier, start), daemon=True)
            for i, part in enumerate(slices)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def _run(
        self,
        index: int,
        part: list[tuple[str, dict[str, Any]]],
        barrier: threading.Barrier,
        start: list[float],
    ) -> None:
        from pipeline.produce import topic_for_type

        producer = self._producer()
        producer.list_topics(timeout=10)  # connected before the clock starts
        barrier.wait()
        t0 = start[0]
        interval = self.threads / self.rate if self.rate else 0.0
        offset = index / self.rate if self.rate else 0.0

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                self.failures.append(str(err))

        for j, (type_name, fields) in enumerate(part):
            if interval:
                due = t0 + offset + j * interval
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            now = time.time()
            record = dict(fields)
            record["occurred_at"] = int(now * 1000)
            # built here from known-good values: no validation pass (the worker validates)
            value = self.codec.encode_trusted(type_name, record)
            while True:
                try:
                    producer.produce(
                        topic_for_type(self.cfg, type_name),
                        value,
                        record["sku"].encode(),
                        on_delivery=delivered,
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
            self.sent.setdefault(record["event_id"], now)
            if not j & 63:
                producer.poll(0)
        left = producer.flush(60)
        if left:
            self.failures.append(f"{left} records not acknowledged in 60 s")
