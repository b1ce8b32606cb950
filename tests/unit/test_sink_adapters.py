"""Error paths of the Redis and OpenSearch projections; no running service needed.

Dead targets are real sockets (a closed port, a port that never answers); the
server replies that are hard to provoke on a shared server (NOSCRIPT, item
errors of a bulk) come from small fake clients.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import orjson
import pytest
from opensearchpy.exceptions import ConnectionTimeout, TransportError
from redis.exceptions import (
    BusyLoadingError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from config.settings import settings
from pipeline.sinks.base import TargetUnavailable
from pipeline.sinks.redis_sink import APPLY_SCRIPT, RedisProjection
from pipeline.sinks.search_sink import MAPPING, SearchProjection, SearchRejected

SECRET = "s3cret-pw"
NOW_MS = 1_767_225_600_123


def change(sku: str, version: int, available: int = 5) -> dict[str, Any]:
    return {
        "sku": sku,
        "version": version,
        "on_hand": available,
        "reserved": 0,
        "safety_stock": 0,
        "available": available,
        "cause_type": "RestockReceived",
        "cause_event_id": f"ev-{version}",
        "order_id": "",
        "channel": "test",
        "occurred_at": NOW_MS - 10,
        "processed_at": NOW_MS - 5,
    }


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose TCP handshake succeeds (listen backlog) but that never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def timed(coro_factory: Callable[[], Any]) -> tuple[BaseException | None, float]:
    """Run one coroutine; return what it raised (or None) and how long it took."""

    async def go() -> BaseException | None:
        try:
            await coro_factory()
        except BaseException as exc:  # noqa: BLE001 - returned for the assertions
            return exc
        return None

    start = time.monotonic()
    exc = asyncio.run(go())
    return exc, time.monotonic() - start


# ---- Redis: real dead sockets ---------------------------------------------------


def test_redis_connection_refused_is_target_unavailable_fast() -> None:
    cfg = replace(settings, redis_url=f"redis://app:{SECRET}@127.0.0.1:{unused_port()}/0")

    async def scenario() -> list[BaseException | None]:
        proj = RedisProjection(cfg)
        seen: list[BaseException | None] = []
        for call in (
            proj.setup,
            lambda: proj.apply([change("A", 1)]),
            lambda: proj.versions(["A"]),
        ):
            try:
                await call()
            except BaseException as exc:  # noqa: BLE001
                seen.append(exc)
            else:
                seen.append(None)
        assert await proj.ping() is False
        await proj.close()
        return seen

    start = time.monotonic()
    seen = asyncio.run(scenario())
    assert time.monotonic() - start < 3
    for exc in seen:
        assert isinstance(exc, TargetUnavailable), exc
        assert isinstance(exc.__cause__, RedisConnectionError)
        assert SECRET not in str(exc)


def test_redis_that_never_answers_times_out_within_3s(silent_port: int) -> None:
    proj = RedisProjection(replace(settings, redis_url=f"redis://127.0.0.1:{silent_port}/0"))

    async def apply_then_close() -> None:
        try:
            await proj.apply([change("A", 1)])
        finally:
            await proj.close()

    exc, took = timed(apply_then_close)
    assert isinstance(exc, TargetUnavailable), exc
    assert took < 3


# ---- Redis: fake client for replies a shared server should not be made to give ---


class FakeScript:
    def __init__(self, text: str) -> None:
        self.script = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


class FakePipeline:
    def __init__(self, client: FakeRedis) -> None:
        self.client = client
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def __aenter__(self) -> FakePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def evalsha(self, sha: str, numkeys: int, *args: Any) -> FakePipeline:
        assert numkeys == 1
        self.calls.append((sha, args))
        return self

    def hget(self, key: str, field: str) -> FakePipeline:
        return self

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        assert raise_on_error is False  # per-command errors must come back as values
        self.client.executed.append(list(self.calls))
        return [self.client.reply(sha, args) for sha, args in self.calls]


class FakeRedis:
    """Knows the script only after SCRIPT LOAD; ``reply`` can be replaced per test."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.loads = 0
        self.executed: list[list[tuple[str, tuple[Any, ...]]]] = []
        self.applied_versions: dict[str, int] = {}

    def register_script(self, text: str) -> FakeScript:
        return FakeScript(text)

    async def script_load(self, text: str) -> str:
        self.loads += 1
        sha = hashlib.sha1(text.encode()).hexdigest()
        self.loaded.add(sha)
        return sha

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)

    def reply(self, sha: str, args: tuple[Any, ...]) -> Any:
        if sha not in self.loaded:
            return NoScriptError("No matching script. Please use EVAL.")
        key, version = args[0], int(args[1])
        if self.applied_versions.get(key, 0) >= version:
            return [0, str(NOW_MS).encode()]
        self.applied_versions[key] = version
        return [1, str(NOW_MS).encode()]


def test_redis_noscript_reloads_the_script_and_reruns_only_those_changes() -> None:
    fake = FakeRedis()
    proj = RedisProjection(settings, client=fake)  # type: ignore[arg-type]
    batch = [change("A", 1), change("B", 1), change("A", 1)]

    report = asyncio.run(proj.apply(batch))  # never set up: the server does not know it

    assert (report.applied, report.stale, report.applied_at_ms) == (2, 1, NOW_MS)
    assert fake.loads == 1
    assert [len(run) for run in fake.executed] == [3, 3]
    assert fake.executed[0] == fake.executed[1]
    assert fake.executed[1][0][0] == hashlib.sha1(APPLY_SCRIPT.encode()).hexdigest()

    # the script is known now: the next batch is one pipeline and no load
    report = asyncio.run(proj.apply([change("A", 2)]))
    assert (report.applied, report.stale) == (1, 0)
    assert fake.loads == 1 and len(fake.executed) == 3


def test_redis_noscript_midway_reruns_only_the_failed_changes() -> None:
    fake = FakeRedis()
    proj = RedisProjection(settings, client=fake)  # type: ignore[arg-type]
    asyncio.run(proj.setup())
    answers = iter([[0, b"1"], NoScriptError("No matching script."), [1, b"2"]])
    fake.reply = lambda sha, args: next(answers)  # type: ignore[method-assign]

    report = asyncio.run(proj.apply([change("A", 1), change("B", 1)]))

    assert (report.applied, report.stale) == (1, 1)
    assert fake.loads == 2
    assert [len(run) for run in fake.executed] == [2, 1]
    assert fake.executed[1][0][1][0] == settings.redis_stock_key("B")


@pytest.mark.parametrize(
    "reply",
    [
        ReadOnlyError("You can't write against a read only replica."),
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        ResponseError("OOM command not allowed when used memory > 'maxmemory'."),
    ],
)
def test_redis_script_error_reply_raises_target_unavailable(reply: Exception) -> None:
    fake = FakeRedis()
    proj = RedisProjection(settings, client=fake)  # type: ignore[arg-type]
    asyncio.run(proj.setup())
    fake.reply = lambda sha, args: reply  # type: ignore[method-assign]
    with pytest.raises(TargetUnavailable) as info:
        asyncio.run(proj.apply([change("A", 1)]))
    assert info.value.__cause__ is reply


@pytest.mark.parametrize(
    "error",
    [
        BusyLoadingError("Redis is loading the dataset in memory"),
        RedisTimeoutError("Timeout reading from socket"),
        RedisConnectionError("Connection reset by peer"),
    ],
)
def test_redis_raised_errors_become_target_unavailable(error: Exception) -> None:
    fake = FakeRedis()
    proj = RedisProjection(settings, client=fake)  # type: ignore[arg-type]

    async def boom(raise_on_error: bool = True) -> list[Any]:
        raise error

    def pipeline(transaction: bool = True) -> FakePipeline:
        pipe = FakePipeline(fake)
        pipe.execute = boom  # type: ignore[method-assign]
        return pipe

    fake.pipeline = pipeline  # type: ignore[method-assign]
    for call in (lambda: proj.apply([change("A", 1)]), lambda: proj.versions(["A"])):
        with pytest.raises(TargetUnavailable) as info:
            asyncio.run(call())
        assert info.value.__cause__ is error


# ---- OpenSearch: real dead sockets ----------------------------------------------


def test_opensearch_connection_refused_is_target_unavailable() -> None:
    cfg = replace(settings, opensearch_url=f"http://app:{SECRET}@127.0.0.1:{unused_port()}")

    async def scenario() -> list[BaseException | None]:
        proj = SearchProjection(cfg)
        seen: list[BaseException | None] = []
        for call in (
            proj.setup,
            lambda: proj.apply([change("A", 1)]),
            lambda: proj.versions(["A"]),
        ):
            try:
                await call()
            except BaseException as exc:  # noqa: BLE001
                seen.append(exc)
            else:
                seen.append(None)
        assert await proj.ping() is False
        await proj.close()
        return seen

    start = time.monotonic()
    seen = asyncio.run(scenario())
    assert time.monotonic() - start < 3
    for exc in seen:
        assert isinstance(exc, TargetUnavailable), exc
        assert not isinstance(exc, SearchRejected)
        assert SECRET not in str(exc)


def test_opensearch_that_never_answers_times_out_without_retrying(silent_port: int) -> None:
    proj = SearchProjection(replace(settings, opensearch_url=f"http://127.0.0.1:{silent_port}"))

    async def apply_then_close() -> None:
        try:
            await proj.apply([change("A", 1)])
        finally:
            await proj.close()

    exc, took = timed(apply_then_close)
    assert isinstance(exc, TargetUnavailable) and not isinstance(exc, SearchRejected), exc
    assert isinstance(exc.__cause__, ConnectionTimeout)
    assert took < 8  # one 5 s timeout; a client-side retry would double it


# ---- OpenSearch: fake client for bulk item replies ---------------------------------


class FakeIndices:
    def __init__(self, mapping: dict[str, Any]) -> None:
        self.mapping = mapping
        self.created: list[dict[str, Any]] = []

    async def exists(self, index: str) -> bool:
        return True

    async def create(self, index: str, body: dict[str, Any]) -> dict[str, Any]:
        self.created.append(body)
        return {"acknowledged": True}

    async def get_mapping(self, index: str) -> dict[str, Any]:
        return {index: {"mappings": self.mapping}}


class FakeOpenSearch:
    """``bulk`` answers each item with ``status_of(action, doc)``."""

    def __init__(self, status_of: Callable[[dict[str, Any], dict[str, Any]], int]) -> None:
        self.status_of = status_of
        self.bodies: list[list[dict[str, Any]]] = []
        self.indices = FakeIndices(MAPPING)
        self.mget_reply: dict[str, Any] = {"docs": []}

    async def bulk(self, body: bytes, index: str, **params: Any) -> dict[str, Any]:
        lines = [orjson.loads(line) for line in body.splitlines()]
        self.bodies.append(lines)
        items = []
        for action, doc in zip(lines[::2], lines[1::2], strict=True):
            status = self.status_of(action, doc)
            item: dict[str, Any] = {"status": status}
            if status == 409:
                item["error"] = {"type": "version_conflict_engine_exception", "reason": "..."}
            elif status == 400:
                item["error"] = {"type": "mapper_parsing_exception", "reason": "bad field"}
            elif status >= 300:
                item["error"] = {"type": "es_rejected_execution_exception", "reason": "busy"}
            items.append({"index": item})
        return {"errors": any(i["index"]["status"] >= 300 for i in items), "items": items}

    async def mget(self, index: str, body: dict[str, Any], **params: Any) -> dict[str, Any]:
        return self.mget_reply

    async def close(self) -> None:
        return None


def test_opensearch_409_item_is_stale_and_batch_keeps_each_skus_highest_version() -> None:
    fake = FakeOpenSearch(lambda action, doc: 409 if doc["sku"] == "B" else 201)
    proj = SearchProjection(settings, client=fake)  # type: ignore[arg-type]
    batch = [change("A", 2), change("B", 7), change("A", 3), change("A", 1), change("A", 3)]

    report = asyncio.run(proj.apply(batch))

    # A: v3 sent (v2, v1, duplicate v3 superseded); B: v7 sent, answered 409
    assert (report.applied, report.stale) == (1, 4)
    [lines] = fake.bodies
    actions = [line["index"] for line in lines[::2]]
    assert actions == [
        {"_id": "A", "version": 3, "version_type": "external"},
        {"_id": "B", "version": 7, "version_type": "external"},
    ]
    assert set(lines[1]) == set(MAPPING["properties"])
    assert lines[1]["in_stock"] is True and lines[1]["updated_at"] == report.applied_at_ms


def test_opensearch_400_mapping_item_raises_search_rejected() -> None:
    fake = FakeOpenSearch(lambda action, doc: 400 if doc["sku"] == "BAD" else 409)
    proj = SearchProjection(settings, client=fake)  # type: ignore[arg-type]
    with pytest.raises(SearchRejected, match="mapper_parsing_exception"):
        asyncio.run(proj.apply([change("A", 1), change("BAD", 1)]))
    assert issubclass(SearchRejected, TargetUnavailable)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_opensearch_transient_item_error_raises_target_unavailable(status: int) -> None:
    fake = FakeOpenSearch(lambda action, doc: status if doc["sku"] == "B" else 201)
    proj = SearchProjection(settings, client=fake)  # type: ignore[arg-type]
    with pytest.raises(TargetUnavailable) as info:
        asyncio.run(proj.apply([change("A", 1), change("B", 1)]))
    assert not isinstance(info.value, SearchRejected)


@pytest.mark.parametrize(
    ("error", "rejected"),
    [
        (TransportError(503, "unavailable_shards_exception", {}), False),
        (TransportError(429, "circuit_breaking_exception", {}), False),
        (TransportError(400, "illegal_argument_exception", {}), True),
        (ConnectionTimeout("TIMEOUT", "timed out", None), False),
    ],
)
def test_opensearch_request_errors(error: Exception, rejected: bool) -> None:
    fake = FakeOpenSearch(lambda action, doc: 201)

    async def boom(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise error

    fake.bulk = boom  # type: ignore[method-assign]
    proj = SearchProjection(settings, client=fake)  # type: ignore[arg-type]
    with pytest.raises(TargetUnavailable) as info:
        asyncio.run(proj.apply([change("A", 1)]))
    assert isinstance(info.value, SearchRejected) is rejected
    assert info.value.__cause__ is error


def test_opensearch_setup_rejects_an_index_with_a_different_mapping() -> None:
    fake = FakeOpenSearch(lambda action, doc: 201)
    # what a write before setup would have auto-created
    fake.indices.mapping = {
        "properties": {
            "sku": {"type": "text", "fields": {"keyword": {"type": "keyword"}}},
            "in_stock": {"type": "boolean"},
            "updated_at": {"type": "long"},
        }
    }
    proj = SearchProjection(settings, client=fake)  # type: ignore[arg-type]
    with pytest.raises(SearchRejected, match="dynamic") as info:
        asyncio.run(proj.setup())
    assert "'sku' has type 'text'" in str(info.value)
    assert "'version' missing" in str(info.value)


def test_opensearch_versions_treat_a_missing_index_as_never_written() -> None:
    fake = FakeOpenSearch(lambda action, doc: 201)
    fake.mget_reply = {
        "docs": [
            {"_id": "A", "error": {"type": "index_not_found_exception", "reason": "no such index"}}
        ]
    }
    proj = SearchProjection(settings, client=fake)  # type: ignore[arg-type]
    assert asyncio.run(proj.versions(["A"])) == {}
    fake.mget_reply = {"docs": [{"_id": "A", "error": {"type": "shard_not_available"}}]}
    with pytest.raises(TargetUnavailable):
        asyncio.run(proj.versions(["A"]))
