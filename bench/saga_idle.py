"""Idle CPU and RSS of a worker whose orders table holds N final sagas.

The saga sweeper once decoded every saga of the table each second; sagas are never
pruned, so an idle worker's CPU grew with every order ever placed. This fills a fresh
namespace's orders changelog with N final (cancelled and released) sagas, starts a
worker that restores them, and measures its CPU over 10 s once it has settled::

    python -m bench.saga_idle 100000

Needs the local stack (``make stack-up``). Compare two commits by running it from
each checkout (with that checkout on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import time

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench.common import cpu_seconds, harness, rss_mb
from bench.tablefill import commit_relay_to_end
from pipeline.domain import saga as sg
from pipeline.kafka.partitioning import partition_for
from pipeline.kafka.topics import changelog_topic, ensure_topics
from tables.orders import StoredSaga

PLACEHOLDER = b"ORDER-QQQQQQQQQQ"


def final_saga_value(order: str, at: int) -> bytes:
    """The stored value of an order placed, cancelled and released: a final saga."""
    s = sg.decide(
        None, sg.PlaceOrder(f"p-{order}", order, (("A", 1),), at, "web", 10_000), grace_ms=0
    )
    s = sg.decide(s.saga, sg.CancelOrder(f"c-{order}", order, at + 1), grace_ms=0)
    saga = s.saga
    for action, outcome in (("reserve", "RESERVED"), ("release", "RELEASED")):
        result = sg.LineResult(
            sg.line_event_id(order, "A", action), order, "A", outcome, 1, 0, at + 2
        )
        saga = sg.decide(saga, result, grace_ms=0).saga
    assert saga is not None and saga.status.final
    return StoredSaga(saga, {}, [], at).to_bytes()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sagas", type=int)
    n = p.parse_args().sagas
    ns = harness.Namespace.fresh("sagaidle", 8, INVENTORY_SINK_ENABLED="0")
    cfg = ns.settings
    ensure_topics(cfg)
    topic = changelog_topic(cfg, "orders")
    admin = AdminClient({"bootstrap.servers": cfg.kafka_bootstrap})
    compact = {"cleanup.policy": "compact"}
    admin.create_topics([NewTopic(topic, cfg.partitions, 1, config=compact)])[topic].result(30)
    value = final_saga_value(PLACEHOLDER.decode(), int(time.time() * 1000))
    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap, "linger.ms": 20})
    for i in range(n):
        key = f"ORDER-{i:010d}".encode()
        while True:
            try:
                producer.produce(
                    topic, value.replace(PLACEHOLDER, key), key, partition_for(key, cfg.partitions)
                )
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError("saga changelog records not delivered")
    commit_relay_to_end(cfg, "orders", "orders-relay")  # nothing to re-publish
    worker = harness.Worker(ns, "w1")
    try:
        started = time.monotonic()
        worker.start(timeout=600)
        print(f"healthy after {time.monotonic() - started:.1f} s", flush=True)
        time.sleep(20)  # recovery done, both sweepers' first index rebuilds done
        assert worker.proc is not None
        pid = worker.proc.pid
        c0 = cpu_seconds(pid)
        time.sleep(10)
        idle = (cpu_seconds(pid) - c0) / 10
        print(f"{n} final sagas: idle CPU {idle:.2f} core, RSS {rss_mb(pid)[0]:.0f} MB")
    finally:
        worker.stop()
        names = [
            t
            for t in admin.list_topics(timeout=10).topics
            if t.startswith(cfg.topic_prefix) or t.startswith(cfg.app_id)
        ]
        if names:
            admin.delete_topics(names)


if __name__ == "__main__":
    main()
