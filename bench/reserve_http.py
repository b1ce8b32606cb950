"""P7: the synchronous reserve API (``POST /reservations``) beside the Kafka path.

One worker, closed loop (one request in flight at a time, so the figures are latency,
not queueing): the Kafka path is what ``docs/asyncapi.yaml`` tells a checkout to do
(send ReserveStock, read ``reservation-results`` from its end until the answer with
the request's event id arrives); the HTTP path is ``POST /reservations`` on a kept-alive
connection, which does the same inside the worker. Then both with ``concurrency``
clients at once (each Kafka client its own producer and reader). Every reserve is granted (stock far above demand).

    python -m bench.reserve_http [--n 500] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench.common import BenchNamespace, percentile, wait_stock
from pipeline.clients import confluent_config
from pipeline.produce import CommandProducer
from schemas.codec import AvroCodec

SKUS = 16


def _pct(v: list[float]) -> dict[str, float]:
    return {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)}


def _kafka_path(cfg: Any, skus: list[str], n: int, tag: str) -> list[float]:
    codec = AvroCodec()
    consumer = Consumer(
        confluent_config(
            cfg,
            **{
                "group.id": f"bench-http-{uuid.uuid4().hex[:6]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": 5,
            },
        )
    )
    parts = [TopicPartition(cfg.results_topic, p) for p in range(cfg.partitions)]
    ends = []
    for tp in parts:  # positioned at the ends before the first command, as documented
        _, high = consumer.get_watermark_offsets(tp, timeout=10)
        ends.append(TopicPartition(tp.topic, tp.partition, high))
    consumer.assign(ends)
    out: list[float] = []
    with CommandProducer(cfg) as producer:
        for i in range(n):
            order = f"k-{tag}-{i}"
            t0 = time.perf_counter()
            event_id = producer.send(
                "ReserveStock", {"order_id": order, "sku": skus[i % len(skus)], "qty": 1}
            )
            producer.flush()
            while True:
                msg = consumer.poll(5)
                if msg is None or msg.error():
                    continue
                if msg.key() == order.encode():
                    _, v = codec.decode(msg.value())
                    if v["event_id"] == event_id:
                        break
            out.append((time.perf_counter() - t0) * 1000)
    consumer.close()
    return out


def _http_client(port: int, skus: list[str], orders: list[str], out: list[float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for i, order in enumerate(orders):
        body = json.dumps({"order_id": order, "sku": skus[i % len(skus)], "qty": 1})
        t0 = time.perf_counter()
        conn.request(
            "POST",
            "/reservations",
            body=body,
            headers={"Idempotency-Key": order, "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        data = json.loads(resp.read())
        if resp.status != 200 or data.get("outcome") != "RESERVED":
            raise RuntimeError(f"POST /reservations answered {resp.status}: {data}")
        out.append((time.perf_counter() - t0) * 1000)
    conn.close()


def measure(n: int = 500, concurrency: int = 8) -> dict[str, Any]:
    ns = BenchNamespace.fresh("http", sink=False)
    cfg = ns.settings
    worker = ns.worker()
    tag = uuid.uuid4().hex[:6]
    skus = [f"H{tag}-{i}" for i in range(SKUS)]
    try:
        worker.start(timeout=180)
        with CommandProducer(cfg) as p:
            for sku in skus:
                p.send("RestockReceived", {"sku": sku, "qty": 1_000_000 // SKUS})
        for sku in skus:
            wait_stock(worker, sku, 1_000_000 // SKUS)
        warm: list[float] = []
        _http_client(worker.port, skus, [f"w-{tag}-{i}" for i in range(50)], warm)
        _kafka_path(cfg, skus, 50, f"warm{tag}")
        kafka = _kafka_path(cfg, skus, n, tag)
        http_seq: list[float] = []
        _http_client(worker.port, skus, [f"h-{tag}-{i}" for i in range(n)], http_seq)
        http_conc: list[float] = []
        threads = [
            threading.Thread(
                target=_http_client,
                args=(worker.port, skus, [f"c{j}-{tag}-{i}" for i in range(n)], http_conc),
            )
            for j in range(concurrency)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        kafka_conc: list[float] = []

        def kafka_client(j: int) -> None:
            kafka_conc.extend(_kafka_path(cfg, skus, n, f"kc{j}{tag}"))

        kthreads = [threading.Thread(target=kafka_client, args=(j,)) for j in range(concurrency)]
        k0 = time.perf_counter()
        for t in kthreads:
            t.start()
        for t in kthreads:
            t.join()
        kafka_wall = time.perf_counter() - k0
    finally:
        worker.stop()
        ns.cleanup()
    return {
        "n": n,
        "concurrency": concurrency,
        "kafka_ms": _pct(kafka),
        "http_ms": _pct(http_seq),
        "http_concurrent_ms": _pct(http_conc),
        "http_concurrent_per_s": len(http_conc) / wall if wall > 0 else float("nan"),
        "kafka_concurrent_ms": _pct(kafka_conc),
        "kafka_concurrent_per_s": len(kafka_conc) / kafka_wall if kafka_wall > 0 else float("nan"),
        "http_over_kafka_p50": _pct(http_seq)["p50"] / _pct(kafka)["p50"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reserve_http", description=__doc__)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.n, args.concurrency), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
