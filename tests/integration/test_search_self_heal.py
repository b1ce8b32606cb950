"""The search projection heals itself: under a running SinkRunner the index is deleted
(second, created again with a wrong mapping that refuses the next change; third, the
same while no sink runs, before one starts); every SKU document must come back
with its values within 30 s without an operator, in an index with the sink's mapping.

The shared OpenSearch, with an index of the test's own name.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
from confluent_kafka import Producer
from opensearchpy import OpenSearch

from pipeline import metrics
from pipeline.clients import confluent_config
from pipeline.domain.core import StockRecord
from pipeline.kafka.topics import changelog_topic, ensure_topics
from pipeline.sinks.runner import SinkRunner
from pipeline.sinks.search_sink import MAPPING, MARKERS_SUFFIX, SearchProjection
from schemas.codec import AvroCodec
from tables.stock import StoredStock
from tests.harness import Namespace

pytestmark = pytest.mark.integration

SKUS = [f"SKU-{i}" for i in range(50)]


def test_deleted_and_wrongly_mapped_index_heal() -> None:
    ns = Namespace.fresh("search-heal", partitions=2)
    s = replace(
        ns.settings,
        search_index=f"heal-{ns.name}".lower(),
        sink_check_interval_s=1.0,
        sink_max_backoff_s=1.0,
    )
    ensure_topics(s)
    producer = Producer(confluent_config(s))
    for i, sku in enumerate(SKUS):
        rec = StockRecord(sku=sku, on_hand=7 + i, reserved=i % 3, safety_stock=1, version=3)
        producer.produce(changelog_topic(s), StoredStock(record=rec).to_bytes(), sku.encode())
    assert producer.flush(30) == 0
    es = OpenSearch(hosts=[s.opensearch_url])
    index = s.search_index

    versions: dict[str, int] = {}

    def whole() -> bool:
        try:
            got = es.mget(index=index, body={"ids": SKUS})["docs"]
        except Exception:  # noqa: BLE001 - the index is gone or being created
            return False
        for i, doc in enumerate(got):
            src = doc.get("_source") if doc.get("found") else None
            if src is None or src["version"] != versions.get(SKUS[i], 3) or src["on_hand"] != 7 + i:
                return False
            if src["reserved"] != i % 3 or src["available"] != 7 + i - i % 3 - 1:
                return False
        mapping = es.indices.get_mapping(index=index)[index]["mappings"]
        return mapping["properties"] == MAPPING["properties"] and mapping["dynamic"] == "strict"

    def uuid() -> str:
        return es.indices.get(index=index)[index]["settings"]["index"]["uuid"]

    def markers() -> dict[str, str]:
        docs = es.mget(index=index + MARKERS_SUFFIX, body={"ids": ["0", "1"]})["docs"]
        return {d["_id"]: d["_source"]["index_uuid"] for d in docs if d.get("found")}

    async def until(cond: Callable[[], bool], timeout: float, task: asyncio.Task[None]) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert not task.done(), task.exception()
            if await asyncio.to_thread(cond):
                return time.monotonic() - t0
            await asyncio.sleep(0.2)
        raise AssertionError(f"not within {timeout} s")

    async def scenario() -> None:
        runner = SinkRunner(s, SearchProjection(s), AvroCodec())
        seen: list[str] = []
        set_degraded = runner._set_degraded

        def spy(failing: bool) -> None:
            set_degraded(failing)
            seen.append(runner.state)

        runner._set_degraded = spy  # type: ignore[method-assign]
        replays = metrics.SINK_REPLAYS.labels("search")
        task = asyncio.create_task(runner.run())
        try:
            await until(lambda: whole() and runner.state == "ok", 30, task)
            assert markers() == {"0": uuid(), "1": uuid()}  # both partitions applied to it

            before = replays._value.get()
            seen.clear()
            es.indices.delete(index=index)
            took = await until(
                lambda: replays._value.get() > before and whole() and runner.state == "ok",
                30,
                task,
            )
            assert "replaying" in seen and seen[-1] == "ok", seen
            print(f"healed after the index was deleted in {took:.1f} s")

            # created again by someone else, with a mapping the sink cannot write to
            before = replays._value.get()
            seen.clear()
            es.indices.delete(index=index)
            wrong = {"dynamic": "strict", "properties": {"sku": {"type": "text"}}}
            # the next check only in 3 s: a new change meets the wrong index first, so
            # the sink holds a batch the index refuses, and must heal from there
            runner.next_check = time.monotonic() + 3
            errors = metrics.SINK_ERRORS.labels("search")._value.get()
            with contextlib.suppress(Exception):  # the sink may have auto-created it
                es.indices.create(index=index, body={"mappings": wrong})
            rec = StockRecord(sku="SKU-0", on_hand=7, reserved=0, safety_stock=1, version=4)
            producer.produce(changelog_topic(s), StoredStock(record=rec).to_bytes(), b"SKU-0")
            assert producer.flush(30) == 0
            versions["SKU-0"] = 4
            took = await until(
                lambda: replays._value.get() > before and whole() and runner.state == "ok",
                30,
                task,
            )
            assert "replaying" in seen and seen[-1] == "ok", seen
            print(f"healed after a wrongly mapped index in {took:.1f} s")
            assert metrics.SINK_ERRORS.labels("search")._value.get() > errors  # it was refused
            assert markers() == {"0": uuid(), "1": uuid()}

            # a wrong mapping made while no sink ran: the starting sink repairs it too
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await runner.projection.close()
            es.indices.delete(index=index)
            es.indices.create(index=index, body={"mappings": wrong})
            runner = SinkRunner(s, SearchProjection(s), AvroCodec())
            task = asyncio.create_task(runner.run())
            took = await until(lambda: whole() and runner.state == "ok", 30, task)
            print(f"a starting sink healed a wrongly mapped index in {took:.1f} s")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await runner.projection.close()
            es.indices.delete(index=index, ignore_unavailable=True)
            es.indices.delete(index=index + MARKERS_SUFFIX, ignore_unavailable=True)
            es.close()

    asyncio.run(scenario())
