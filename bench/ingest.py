"""Prototype of the two ways to pay Faust's per-record ingestion cost per batch.

    python -m bench.ingest [--records 200000] [--report out.json]

Measures, on one hot partition pre-filled with ``--records`` small records, the
time and CPU a Faust worker needs to hand every record to application code:

* ``stream``: today's path, a Faust agent iterating ``stream.events()``;
* ``feed`` (candidate b): :class:`pipeline.kafka.feed.FeedingConsumer` hands each
  fetched record list to a :class:`pipeline.kafka.feed.BatchFeed`; a task drains it;
* ``envelope`` (candidate a): a confluent-kafka stage packs up to 500 raw records
  (with topic, partition, offset) into one envelope on an internal topic, and a
  Faust agent unpacks the envelopes. CPU is the stage's plus the worker's.

The worker is a real ``faust -A bench.ingest worker`` subprocess (this module is
also its app, selected by ``BENCH_INGEST_MODE``). Broker CPU is measured too
(the Kafka JVM's /proc counters over the same window).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BOOTSTRAP = os.environ.get("INVENTORY_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
MODE = os.environ.get("BENCH_INGEST_MODE", "")
SRC = os.environ.get("BENCH_INGEST_SRC", "")
ENV_TOPIC = os.environ.get("BENCH_INGEST_ENVELOPES", "")
COUNT = int(os.environ.get("BENCH_INGEST_COUNT", "0") or 0)
ENVELOPE_MAX = 500
_CREATED: list[str] = []  # topics _measure created (run_all deletes them afterwards)
_HEAD = struct.Struct(">qqHI")  # offset, timestamp, key length, value length


def pack(records: list[Any]) -> bytes:
    """One envelope: topic, partition, then (offset, timestamp, key, value) per record."""
    first = records[0]
    topic = first.topic().encode()
    parts = [struct.pack(">HI", len(topic), first.partition()), topic]
    for r in records:
        key = r.key() or b""
        value = r.value() or b""
        parts.append(_HEAD.pack(r.offset(), r.timestamp()[1], len(key), len(value)))
        parts.append(key)
        parts.append(value)
    return b"".join(parts)


def unpack(data: bytes) -> list[tuple[int, bytes, bytes]]:
    tlen, _partition = struct.unpack_from(">HI", data, 0)
    pos = 6 + tlen
    out = []
    head = _HEAD
    n = len(data)
    while pos < n:
        offset, _ts, klen, vlen = head.unpack_from(data, pos)
        pos += head.size
        key = data[pos : pos + klen]
        pos += klen
        out.append((offset, key, data[pos : pos + vlen]))
        pos += vlen
    return out


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _broker_pid() -> int | None:
    path = Path(__file__).resolve().parent.parent / ".stack" / "kafka" / "kafka.pid"
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------
# the worker app (imported by ``faust -A bench.ingest``)

if MODE:
    import faust

    from pipeline.kafka.feed import BatchFeed, feeding_transport

    class _App(faust.App):
        def _new_transport(self) -> Any:
            if MODE == "feed":
                return feeding_transport(self, feed)
            return super()._new_transport()

    feed = BatchFeed([SRC])
    app = _App(
        f"ingest-{uuid.uuid4().hex[:8]}",
        broker=f"kafka://{BOOTSTRAP}",
        web_enabled=False,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
    )
    state = {"n": 0, "first": 0.0}

    def _done() -> None:
        done = {"records": state["n"], "seconds": time.monotonic() - state["first"]}
        Path(os.environ["BENCH_INGEST_OUT"]).write_text(json.dumps(done))

    def _count(n: int) -> None:
        if not state["first"]:
            state["first"] = time.monotonic()
        state["n"] += n
        if state["n"] >= COUNT:
            _done()
            os._exit(0)

    if MODE == "stream":
        src_topic = app.topic(
            SRC, value_type=bytes, key_type=bytes, value_serializer="raw", acks=False
        )

        @app.agent(src_topic)
        async def consume(stream: Any) -> None:
            async for _event in stream.events():
                _count(1)

    elif MODE == "feed":
        src_topic = app.topic(
            SRC, value_type=bytes, key_type=bytes, value_serializer="raw", acks=False
        )

        @app.agent(src_topic)
        async def consume(stream: Any) -> None:  # subscribes the topic; the feed gets it all
            async for _event in stream.events():
                pass

        @app.task
        async def drain() -> None:
            while True:
                if await feed.wait(0, 1.0):
                    for chunk in feed.take(0, 5000):
                        _count(len(chunk.records))

    elif MODE == "envelope":
        env_topic = app.topic(
            ENV_TOPIC, value_type=bytes, key_type=bytes, value_serializer="raw", acks=False
        )

        @app.agent(env_topic)
        async def consume(stream: Any) -> None:
            async for event in stream.events():
                _count(len(unpack(event.value)))


# --------------------------------------------------------------------------
# the packing stage (candidate a)


def run_packer(src: str, dst: str, count: int) -> None:
    from confluent_kafka import Consumer, Producer

    consumer = Consumer(
        {
            "bootstrap.servers": BOOTSTRAP,
            "group.id": f"packer-{src}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    producer = Producer(
        {"bootstrap.servers": BOOTSTRAP, "linger.ms": 1, "message.max.bytes": 8_000_000}
    )
    consumer.subscribe([src])
    done = 0
    while done < count:
        msgs = consumer.consume(ENVELOPE_MAX, 0.1)
        good = [m for m in msgs if m.error() is None]
        if not good:
            continue
        producer.produce(dst, value=pack(good), partition=good[0].partition())
        producer.poll(0)
        done += len(good)
        consumer.commit(asynchronous=True)
    producer.flush()
    consumer.close()


# --------------------------------------------------------------------------
# the runner


def _fill(topic: str, count: int, size: int = 120) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    for fut in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        fut.result()
    producer = Producer({"bootstrap.servers": BOOTSTRAP, "linger.ms": 20})
    value = b"x" * size
    for i in range(count):
        producer.produce(topic, key=b"HOT-SKU", value=value)
        if i % 10_000 == 0:
            producer.poll(0)
    producer.flush()


def _measure(mode: str, count: int) -> dict[str, Any]:
    from confluent_kafka.admin import AdminClient, NewTopic

    src = f"ingest-src-{uuid.uuid4().hex[:8]}"
    env_topic = f"{src}-env"
    _CREATED.extend([src, env_topic])
    _fill(src, count)
    if mode == "envelope":
        admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
        for fut in admin.create_topics([NewTopic(env_topic, 1, 1)]).values():
            fut.result()
    result_file = Path(tempfile.mkdtemp()) / "result.json"
    env = dict(
        os.environ,
        BENCH_INGEST_OUT=str(result_file),
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
        BENCH_INGEST_MODE=mode,
        BENCH_INGEST_SRC=src,
        BENCH_INGEST_ENVELOPES=env_topic,
        BENCH_INGEST_COUNT=str(count),
    )
    broker = _broker_pid()
    broker_cpu0 = _cpu(broker) if broker else 0.0
    t0 = time.monotonic()
    worker = subprocess.Popen(
        [sys.executable, "-m", "faust", "-A", "bench.ingest", "worker", "-l", "warn"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=result_file.parent,
    )
    packer = None
    if mode == "envelope":
        packer = subprocess.Popen(
            [sys.executable, "-m", "bench.ingest", "--pack", src, env_topic, str(count)],
            env={k: v for k, v in env.items() if k != "BENCH_INGEST_MODE"},
        )
    cpu = {"worker": 0.0, "packer": 0.0}
    while worker.poll() is None:
        try:
            cpu["worker"] = _cpu(worker.pid)
            if packer is not None and packer.poll() is None:
                cpu["packer"] = _cpu(packer.pid)
        except OSError:
            pass
        time.sleep(0.05)
    wall = time.monotonic() - t0
    out = json.loads(result_file.read_text())
    if packer is not None:
        packer.wait(30)
    broker_cpu = (_cpu(broker) - broker_cpu0) if broker else 0.0
    # the worker's CPU includes its start-up (imports, group join): subtract an idle start
    return {
        "mode": mode,
        "records": out["records"],
        "consume_seconds": out["seconds"],
        "records_per_s": out["records"] / out["seconds"] if out["seconds"] else 0.0,
        "wall_seconds": wall,
        "worker_cpu_s": cpu["worker"],
        "packer_cpu_s": cpu["packer"],
        "broker_cpu_s": broker_cpu,
    }


def _startup_cpu() -> float:
    """CPU of a worker that starts, joins, and consumes 1 record (subtracted as overhead)."""
    return _measure("stream", 1)["worker_cpu_s"]


def run_all(records: int, echo: bool = True) -> dict[str, Any]:
    """Measure every mode over ``records`` records; ``{"startup_cpu_s", "rows"}`` as
    ``--report`` writes it (what ``bench.run`` calls). Deletes the topics it created."""
    try:
        base = _startup_cpu()
        rows = []
        for mode in ("stream", "feed", "envelope"):
            row = _measure(mode, records)
            n = row["records"]
            row["worker_us_per_record"] = max(0.0, row["worker_cpu_s"] - base) / n * 1e6
            row["packer_us_per_record"] = row["packer_cpu_s"] / n * 1e6
            row["broker_us_per_record"] = row["broker_cpu_s"] / n * 1e6
            rows.append(row)
            if echo:
                print(
                    f"{mode:9s} {row['records_per_s']:>10,.0f} records/s  worker "
                    f"{row['worker_us_per_record']:6.1f} us/rec  packer "
                    f"{row['packer_us_per_record']:5.1f}"
                    f"  broker {row['broker_us_per_record']:5.1f}",
                    flush=True,
                )
        return {"startup_cpu_s": base, "rows": rows}
    finally:
        _delete_created()


def _delete_created() -> None:
    from confluent_kafka.admin import AdminClient

    names, _CREATED[:] = list(_CREATED), []
    if not names:
        return
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    existing = set(admin.list_topics(timeout=10).topics)
    names = [t for t in names if t in existing]
    if names:
        for fut in admin.delete_topics(names, operation_timeout=30).values():
            try:
                fut.result(30)
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--report", type=Path)
    ap.add_argument("--pack", nargs=3, metavar=("SRC", "DST", "COUNT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pack:
        run_packer(args.pack[0], args.pack[1], int(args.pack[2]))
        return 0
    result = run_all(args.records)
    if args.report:
        args.report.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__" and not MODE:
    raise SystemExit(main())
