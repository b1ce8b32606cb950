"""A projection heals itself: a private Redis is FLUSHALLed (and, second, killed and
restarted empty) under a running SinkRunner; every SKU hash must come back within
30 s without an operator, and the runner reports degraded until it has.

Never the shared Redis: a redis-server of its own on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis
from confluent_kafka import Producer

from faults import PrivateRedis
from harness import OUT, Namespace, Worker, metric_total, wait_for
from pipeline import metrics
from pipeline.clients import confluent_config
from pipeline.domain.core import StockRecord
from pipeline.kafka.topics import changelog_topic, ensure_topics
from pipeline.produce import CommandProducer
from pipeline.sinks.redis_sink import RedisProjection
from pipeline.sinks.runner import SinkRunner
from schemas.codec import AvroCodec
from tables.stock import StoredStock

pytestmark = pytest.mark.integration

SKUS = [f"SKU-{i}" for i in range(50)]


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    server = PrivateRedis(OUT / f"heal-redis-{uuid.uuid4().hex[:8]}", persist=False).start()
    yield server
    server.kill()


def test_flushall_and_empty_restart_heal(redis_server: PrivateRedis) -> None:
    port = redis_server.port
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
            redis_server.kill()
            before = replays._value.get()
            seen.clear()
            redis_server.start()
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


def test_single_evicted_key_heals(redis_server: PrivateRedis) -> None:
    """One SKU's hash evicted by ``maxmemory`` (the marker stays): only the server's
    ``evicted_keys`` shows it. Forced exactly: that one key gets a TTL, the policy is
    ``volatile-ttl`` and ``maxmemory`` 1 byte, so the next command evicts it and
    nothing else."""
    port = redis_server.port
    ns = Namespace.fresh("sink-evict", partitions=2)
    s = replace(
        ns.settings,
        redis_url=f"redis://127.0.0.1:{port}/0",
        redis_key_prefix="evict:",
        sink_check_interval_s=1.0,
        sink_max_backoff_s=1.0,
    )
    ensure_topics(s)
    producer = Producer(confluent_config(s))
    for sku in SKUS:
        rec = StockRecord(sku=sku, on_hand=7, reserved=2, safety_stock=0, version=3)
        producer.produce(changelog_topic(s), StoredStock(record=rec).to_bytes(), sku.encode())
    assert producer.flush(30) == 0
    r = redis.Redis(port=port)
    victim = s.redis_stock_key("SKU-7")

    def whole() -> bool:
        for sku in SKUS:
            got = r.hmget(s.redis_stock_key(sku), "version", "available")
            if got != [b"3", b"5"]:
                return False
        return True

    async def until(cond: object, timeout: float, task: asyncio.Task[None]) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert not task.done(), task.exception()
            if cond():  # type: ignore[operator]
                return time.monotonic() - t0
            await asyncio.sleep(0.1)
        raise AssertionError(f"not within {timeout} s")

    async def scenario() -> None:
        runner = SinkRunner(s, RedisProjection(s), AvroCodec())
        replays = metrics.SINK_REPLAYS.labels("redis")
        task = asyncio.create_task(runner.run())
        try:
            await until(lambda: whole() and runner.state == "ok", 30, task)
            markers = ["evict:sink-marker:0", "evict:sink-marker:1"]
            marker = r.mget(markers)
            assert all(marker)
            before = replays._value.get()
            evicted = int(r.info("stats")["evicted_keys"])
            r.expire(victim, 3600)
            r.config_set("maxmemory-policy", "volatile-ttl")
            r.config_set("maxmemory", 1)
            with contextlib.suppress(redis.ResponseError):  # OOM: evicts first
                r.set("evict:probe", "x")
            r.config_set("maxmemory", 0)
            assert int(r.info("stats")["evicted_keys"]) == evicted + 1
            assert r.mget(markers) == marker  # the markers alone would not tell
            took = await until(
                lambda: replays._value.get() > before and whole() and runner.state == "ok",
                30,
                task,
            )
            assert r.ttl(victim) == -1  # written again, without the TTL
            print(f"healed a single evicted key in {took:.1f} s")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await runner.projection.close()

    asyncio.run(scenario())


def test_healthz_says_replaying_while_a_sink_heals(kafka: None, redis_server: PrivateRedis) -> None:
    """Over HTTP on a real worker: after FLUSHALL of its Redis, ``/healthz`` answers 200
    ``{"status": "degraded", "sinks": {"redis": "replaying", ...}}`` while the sink
    re-applies the changelog, and ``ok`` once every hash is back. 800 SKUs read 5
    records a batch make the replay last long enough to be seen."""
    port = redis_server.port
    n = 800
    ns = Namespace.fresh(
        "heal-health",
        partitions=2,
        INVENTORY_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        INVENTORY_SEARCH_INDEX=f"heal-health-{time.time_ns()}",
        INVENTORY_SINK_BATCH_SIZE="5",
        INVENTORY_SINK_CHECK_INTERVAL_S="1",
    )
    worker = Worker(ns).start()
    r = redis.Redis(port=port)
    key = ns.settings.redis_stock_key

    def stock_keys() -> int:
        return sum(1 for _ in r.scan_iter(match=key("") + "*", count=1000))

    try:
        with CommandProducer(ns.settings) as p:
            for i in range(n):
                p.send("RestockReceived", {"sku": f"H-{i}", "qty": 3})
        wait_for(lambda: stock_keys() == n, 60, f"{n} hashes in Redis")
        wait_for(lambda: worker.get_json("/healthz") == (200, ok_body()), 30, "healthz ok")
        r.flushall()
        seen: list[tuple[int, Any]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = worker.get_json("/healthz")
            seen.append(got)
            if got == (200, ok_body()) and stock_keys() == n and len(seen) > 1:
                break
            time.sleep(0.05)
        replaying = (200, {"status": "degraded", "sinks": {"redis": "replaying", "search": "ok"}})
        assert replaying in seen, seen[:5]
        assert seen[-1] == (200, ok_body()), seen[-5:]
        assert stock_keys() == n and r.hget(key("H-7"), "available") == b"3"
        assert metric_total(worker.url, "inventory_sink_replays_total") >= 2  # start + heal
        print(f"{sum(1 for s in seen if s == replaying)} answers said replaying")
    finally:
        worker.stop()
        req = urllib.request.Request(
            f"{ns.settings.opensearch_url}/{ns.extra_env['INVENTORY_SEARCH_INDEX']}",
            method="DELETE",
        )
        with contextlib.suppress(OSError):
            urllib.request.urlopen(req, timeout=10).close()


def ok_body() -> dict[str, Any]:
    return {"status": "ok", "sinks": {"redis": "ok", "search": "ok"}}


def test_two_sinks_of_one_target_each_heal_their_partitions(redis_server: PrivateRedis) -> None:
    """Two runners in one consumer group (two workers), one partition each: after a
    FLUSHALL each re-applies its own partition; the markers are per partition, so the
    one that finishes first cannot mark the other's partition whole."""
    port = redis_server.port
    ns = Namespace.fresh("sink-heal2", partitions=2)
    s = replace(
        ns.settings,
        redis_url=f"redis://127.0.0.1:{port}/0",
        redis_key_prefix="two:",
        sink_check_interval_s=1.0,
        sink_max_backoff_s=1.0,
    )
    ensure_topics(s)
    producer = Producer(confluent_config(s))
    for sku in SKUS:
        rec = StockRecord(sku=sku, on_hand=4, reserved=1, safety_stock=0, version=5)
        producer.produce(changelog_topic(s), StoredStock(record=rec).to_bytes(), sku.encode())
    assert producer.flush(30) == 0
    r = redis.Redis(port=port)

    def whole() -> bool:
        return all(r.hget(s.redis_stock_key(sku), "available") == b"3" for sku in SKUS)

    async def scenario() -> None:
        runners = [SinkRunner(s, RedisProjection(s), AvroCodec()) for _ in range(2)]
        tasks = [asyncio.create_task(x.run()) for x in runners]

        def split() -> bool:
            owned = [x.consumer.assignment() if x.consumer else set() for x in runners]
            return all(len(o) == 1 for o in owned) and owned[0] != owned[1]

        async def until(cond: object, timeout: float) -> float:
            t0 = time.monotonic()
            while time.monotonic() - t0 < timeout:
                for task in tasks:
                    assert not task.done(), task.exception()
                if cond():  # type: ignore[operator]
                    return time.monotonic() - t0
                await asyncio.sleep(0.1)
            raise AssertionError(f"not within {timeout} s")

        replays = metrics.SINK_REPLAYS.labels("redis")
        try:
            await until(lambda: split() and whole() and all(x.state == "ok" for x in runners), 40)
            await asyncio.sleep(1.5)  # both have checked their partition since the split
            assert all(x.state == "ok" for x in runners) and whole()
            before = replays._value.get()
            r.flushall()
            took = await until(
                lambda: whole() and all(x.state == "ok" for x in runners) and split(), 30
            )
            assert replays._value.get() - before == 2  # one replay per runner, of its own
            assert (
                r.mget(["two:sink-marker:0", "two:sink-marker:1"])
                == [r.get("two:sink-marker:0")] * 2
            )
            print(f"two sinks healed their partitions in {took:.1f} s")
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for x in runners:
                await x.projection.close()

    asyncio.run(scenario())
