"""A projection heals itself: a private Redis is FLUSHALLed (and, second, killed and
restarted empty) under a running SinkRunner; every SKU hash must come back within
30 s without an operator, and the runner reports degraded until it has.

Never the shared Redis: a redis-server of its own on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
from confluent_kafka import Producer

from pipeline import metrics
from pipeline.clients import confluent_config
from pipeline.core import StockRecord
from pipeline.sinks.redis_sink import RedisProjection
from pipeline.sinks.runner import SinkRunner
from pipeline.topics import changelog_topic, ensure_topics
from schemas.codec import AvroCodec
from tables.stock import StoredStock
from tests.harness import Namespace, free_port

pytestmark = pytest.mark.integration

STARTED: list[subprocess.Popen[bytes]] = []
SKUS = [f"SKU-{i}" for i in range(50)]


def start_redis(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    STARTED.append(proc)
    client = redis.Redis(port=port)
    for _ in range(100):
        with contextlib.suppress(redis.ConnectionError):
            if client.ping():
                return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("private redis-server did not start")


@pytest.fixture
def private_redis() -> Iterator[int]:
    port = free_port()
    start_redis(port)
    yield port
    for proc in STARTED:
        proc.kill()
        proc.wait()
    STARTED.clear()


def test_flushall_and_empty_restart_heal(private_redis: int) -> None:
    port = private_redis
    ns = Namespace.fresh("sink-heal", partitions=2)
    s = replace(
        ns.settings,
        redis_url=f"redis://127.0.0.1:{port}/0",
        redis_key_prefix="heal:",
        sink_check_interval_s=1.0,
        sink_max_backoff_s=1.0,
    )
    ensure_topics(s)
    producer = Producer(confluent_config(s))
    for sku in SKUS:
        rec = StockRecord(sku=sku, on_hand=7, reserved=0, safety_stock=0, version=3)
        producer.produce(changelog_topic(s), StoredStock(record=rec).to_bytes(), sku.encode())
    assert producer.flush(30) == 0
    r = redis.Redis(port=port)

    def whole() -> bool:
        return all(r.hget(s.redis_stock_key(sku), "version") == b"3" for sku in SKUS)

    async def until(cond: object, timeout: float, task: asyncio.Task[None]) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert not task.done(), task.exception()
            with contextlib.suppress(redis.ConnectionError):
                if cond():  # type: ignore[operator]
                    return time.monotonic() - t0
            await asyncio.sleep(0.1)
        raise AssertionError(f"not within {timeout} s")

    async def scenario() -> None:
        runner = SinkRunner(s, RedisProjection(s), AvroCodec())
        seen: list[bool] = []  # every degraded state the runner took (it may be brief)
        set_degraded = runner._set_degraded

        def spy(failing: bool) -> None:
            set_degraded(failing)
            seen.append(runner.degraded)

        runner._set_degraded = spy  # type: ignore[method-assign]
        replays = metrics.SINK_REPLAYS.labels("redis")
        task = asyncio.create_task(runner.run())
        try:
            await until(lambda: whole() and not runner.degraded, 30, task)
            before = replays._value.get()
            seen.clear()
            r.flushall()
            took = await until(
                lambda: replays._value.get() > before and whole() and not runner.degraded, 30, task
            )
            assert True in seen and seen[-1] is False
            print(f"healed after FLUSHALL in {took:.1f} s")
            # killed and restarted empty on the same port
            proc = subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], check=False)
            del proc
            before = replays._value.get()
            seen.clear()
            start_redis(port)
            took = await until(
                lambda: replays._value.get() > before and whole() and not runner.degraded, 30, task
            )
            assert True in seen and seen[-1] is False
            print(f"healed after an empty restart in {took:.1f} s")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await runner.projection.close()

    asyncio.run(scenario())
