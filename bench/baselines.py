"""The baselines the pipeline is compared with, on the same machine and workload.

* :class:`PostgresCluster`: Debian's PostgreSQL in a throw-away cluster (``initdb`` as the
  ``postgres`` user in a temp dir, its own port, ``synchronous_commit=on``, ``fsync=on``);
  :func:`postgres_flash` runs the hot-SKU reservations as one transaction each over 32
  connections: ``UPDATE stock SET reserved = reserved + $1 WHERE sku = $2 AND
  on_hand - reserved - safety >= $1``.
* :func:`redis_flash`: the same reservations as a Lua check-and-increment on one Redis hash
  (the stack's Redis, no persistence), 32 client threads.
* :func:`passthrough`: a bare consume-and-produce loop (aiokafka, Faust's own client, or
  confluent-kafka) over the same messages on the same broker, in a subprocess like the
  worker (``python -m bench.passthrough``).
* :func:`bare_latency`: produce-to-consume latency of plain Kafka at a given rate.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from bench.common import REPO, create_topics, delete_topics, harness, percentile
from bench.loadgen import TopicReader, end_offsets
from config.settings import Settings
from pipeline.produce import producer_config
from schemas.codec import AvroCodec

CLIENTS = 32


@dataclass
class FlashResult:
    attempts: int
    units: int
    granted: int
    seconds: float
    oversold: int
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.attempts / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "units": self.units,
            "granted": self.granted,
            "seconds": self.seconds,
            "throughput_per_s": self.throughput,
            "oversold_units": self.oversold,
            "latency_ms": {
                "p50": percentile(self.latencies_ms, 50),
                "p99": percentile(self.latencies_ms, 99),
            },
        }


def _run_clients(attempts: int, clients: int, one: Any, setup: Any) -> tuple[float, list[float]]:
    """Run ``attempts`` calls of ``one(conn)`` over ``clients`` threads; (seconds, latencies)."""
    lock = threading.Lock()
    left = [attempts]
    lat: list[float] = []
    conns = [setup() for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def loop(conn: Any) -> None:
        mine: list[float] = []
        start.wait()
        while True:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
            t = time.perf_counter()
            one(conn)
            mine.append((time.perf_counter() - t) * 1000)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    for c in conns:
        with contextlib.suppress(Exception):
            c.close()
    return seconds, lat


# ---------------------------------------------------------------- PostgreSQL


def pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    return harness.free_port()


class PostgresCluster:
    """A throw-away PostgreSQL cluster; ``with PostgresCluster() as pg: pg.dsn``."""

    def __init__(self) -> None:
        bindir = pg_bindir()
        if bindir is None:
            raise RuntimeError(
                "PostgreSQL is not installed: apt-get install -y postgresql (Debian's package)"
            )
        self.bindir = bindir
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        self.data = self.dir / "data"
        self.version = ""

    def _as_postgres(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        runner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run(
            [*runner, *cmd], check=True, capture_output=True, text=True, cwd=str(self.dir)
        )

    def __enter__(self) -> PostgresCluster:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._as_postgres(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"
        )
        opts = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            "-c synchronous_commit=on -c fsync=on -c max_connections=100 "
            "-c shared_buffers=128MB"
        )
        self._as_postgres(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            opts,
            "-l",
            str(self.dir / "pg.log"),
            "-w",
            "start",
        )
        self.version = self._as_postgres(str(self.bindir / "postgres"), "--version").stdout.strip()
        return self

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._as_postgres(
                str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"
            )
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_flash(dsn: str, units: int, attempts: int, clients: int = CLIENTS) -> FlashResult:
    """Hot-SKU reservations, one transaction each, over ``clients`` connections."""
    import psycopg

    sku = f"HOT-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(
            "CREATE TABLE IF NOT EXISTS stock (sku text PRIMARY KEY, on_hand int NOT NULL,"
            " reserved int NOT NULL DEFAULT 0, safety int NOT NULL DEFAULT 0)"
        )
        c.execute("INSERT INTO stock (sku, on_hand) VALUES (%s, %s)", (sku, units))
    granted = [0]
    lock = threading.Lock()
    sql = (
        "UPDATE stock SET reserved = reserved + %s"
        " WHERE sku = %s AND on_hand - reserved - safety >= %s"
    )

    def setup() -> Any:
        return psycopg.connect(dsn, autocommit=False)

    def one(conn: Any) -> None:
        cur = conn.execute(sql, (1, sku, 1))
        n = cur.rowcount
        conn.commit()
        if n:
            with lock:
                granted[0] += 1

    seconds, lat = _run_clients(attempts, clients, one, setup)
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(
            "SELECT on_hand, reserved, safety FROM stock WHERE sku = %s", (sku,)
        ).fetchone()
    assert row is not None
    on_hand, reserved, safety = row
    oversold = max(0, reserved - (on_hand - safety), granted[0] - units)
    return FlashResult(attempts, units, granted[0], seconds, oversold, lat)


# ---------------------------------------------------------------- Redis

RESERVE_LUA = """
local v = redis.call('HMGET', KEYS[1], 'on_hand', 'reserved', 'safety')
local qty = tonumber(ARGV[1])
if tonumber(v[1]) - tonumber(v[2]) - tonumber(v[3]) >= qty then
  redis.call('HINCRBY', KEYS[1], 'reserved', qty)
  return 1
end
return 0
"""


def redis_flash(
    url: str, units: int, attempts: int, clients: int = CLIENTS, pipeline_depth: int = 1
) -> FlashResult:
    """Hot-SKU reservations as one Lua check-and-increment each (``pipeline_depth`` per trip)."""
    import redis

    key = f"bench:{uuid.uuid4().hex[:8]}:hot"
    r = redis.Redis.from_url(url)
    r.hset(key, mapping={"on_hand": units, "reserved": 0, "safety": 0})
    sha = r.script_load(RESERVE_LUA)
    granted = [0]
    lock = threading.Lock()
    calls = max(1, attempts // pipeline_depth)

    def setup() -> Any:
        return redis.Redis.from_url(url)

    def one(conn: Any) -> None:
        if pipeline_depth == 1:
            n = int(conn.evalsha(sha, 1, key, 1))
        else:
            p = conn.pipeline(transaction=False)
            for _ in range(pipeline_depth):
                p.evalsha(sha, 1, key, 1)
            n = sum(int(x) for x in p.execute())
        if n:
            with lock:
                granted[0] += n

    seconds, lat = _run_clients(calls, clients, one, setup)
    on_hand, reserved, safety = (int(x) for x in r.hmget(key, "on_hand", "reserved", "safety"))
    r.delete(key)
    oversold = max(0, reserved - (on_hand - safety), granted[0] - units)
    done = calls * pipeline_depth
    return FlashResult(done, units, granted[0], seconds, oversold, lat)


def redis_version(url: str) -> str:
    import redis

    with contextlib.suppress(Exception):
        return str(redis.Redis.from_url(url).info("server")["redis_version"])
    return "?"


# ---------------------------------------------------------------- Kafka passthrough


@dataclass
class PassResult:
    client: str
    messages: int
    seconds: float

    @property
    def throughput(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("nan")


def passthrough(cfg: Settings, client: str, values: list[tuple[bytes, bytes]]) -> PassResult:
    """Forward ``values`` (key, value) through a bare loop; first send to last output seen."""
    run = uuid.uuid4().hex[:8]
    src, dst = f"{cfg.topic_prefix}pass-{run}-in", f"{cfg.topic_prefix}pass-{run}-out"
    create_topics(cfg, [src, dst])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.passthrough",
            client,
            cfg.kafka_bootstrap,
            src,
            dst,
            str(len(values)),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"passthrough did not start: {line}{proc.stdout.read()}")
        seen = [0, 0.0]

        def handle(msg: Any, now: float) -> None:
            seen[0] += 1
            seen[1] = now

        reader = TopicReader(cfg, end_offsets(cfg, dst), handle)
        reader.start()
        producer = Producer(dict(producer_config(cfg), **{"queue.buffering.max.messages": 10**6}))
        t0 = time.time()
        for k, v in values:
            while True:
                try:
                    producer.produce(src, v, k)
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        producer.flush(60)
        deadline = time.monotonic() + 300
        while seen[0] < len(values) and time.monotonic() < deadline:
            time.sleep(0.05)
        reader.stop()
        return PassResult(client, seen[0], seen[1] - t0)
    finally:
        with contextlib.suppress(Exception):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()
        delete_topics(cfg, [src, dst])


# ---------------------------------------------------------------- bare Kafka latency


def bare_latency(cfg: Settings, rate: float, seconds: float, size: int = 100) -> list[float]:
    """Produce-to-consume latencies (ms) of plain Kafka at ``rate`` msgs/s, same clients."""
    topic = f"{cfg.topic_prefix}bare-{uuid.uuid4().hex[:8]}"
    create_topics(cfg, [topic])
    lat: list[float] = []
    sent: dict[bytes, float] = {}

    def handle(msg: Any, now: float) -> None:
        t = sent.get(msg.value()[:16])
        if t is not None:
            lat.append((now - t) * 1000)

    reader = TopicReader(cfg, end_offsets(cfg, topic), handle)
    reader.start()
    producer = Producer(producer_config(cfg))
    producer.list_topics(timeout=10)
    n = int(rate * seconds)
    t0 = time.perf_counter()
    pad = b"x" * max(0, size - 16)
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        tag = f"{i:016d}".encode()
        sent[tag] = time.time()
        producer.produce(topic, tag + pad, f"k{i % 1000}".encode())
        producer.poll(0)
    producer.flush(30)
    deadline = time.monotonic() + 30
    while len(lat) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    reader.stop()
    delete_topics(cfg, [topic])
    return lat


def reserve_messages(cfg: Settings, count: int, sku: str = "PASS-HOT") -> list[tuple[bytes, bytes]]:
    """``count`` encoded ReserveStock messages of one SKU, as the loadgen sends them."""
    codec = AvroCodec()
    now = int(time.time() * 1000)
    run = uuid.uuid4().hex[:8]
    out = []
    for i in range(count):
        rec = {
            "event_id": f"r-{run}-{i}",
            "order_id": f"o-{run}-{i}",
            "sku": sku,
            "qty": 1,
            "channel": "web",
            "ttl_ms": 0,
            "occurred_at": now,
        }
        out.append((sku.encode(), codec.encode("ReserveStock", rec)))
    return out
