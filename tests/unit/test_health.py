"""Liveness and readiness (GET /livez, /readyz) next to the unchanged /healthz.

The checks are tested on fakes, then the real app's views through aiohttp's test
server (no Kafka: the app is never started, so its tables have not recovered).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from mode.utils.locks import Event

from pipeline.web.health import liveness, readiness


def fake_app(recovered: bool = True, rebalancing: bool = False) -> Any:
    completed = Event()
    if recovered:
        completed.set()
    return SimpleNamespace(
        tables=SimpleNamespace(recovery=SimpleNamespace(completed=completed)),
        rebalancing=rebalancing,
        crashed=False,
        crash_reason=None,
        _consumer=None,
    )


def fake_engine(**states: str) -> Any:
    partitions = {
        int(p.removeprefix("p")): SimpleNamespace(state=SimpleNamespace(value=s))
        for p, s in states.items()
    }
    return SimpleNamespace(
        partitions=partitions, ready=lambda: all(s == "ready" for s in states.values())
    )


def test_a_recovered_worker_with_every_partition_caught_up_is_ready():
    state = readiness(fake_app(), fake_engine(p0="ready", p3="ready"))
    assert state.ready and state.reasons == []
    assert state.body() == {
        "status": "ready",
        "reasons": [],
        "partitions": {"0": "ready", "3": "ready"},
    }


@pytest.mark.parametrize(
    ("app", "engine", "reason"),
    [
        (fake_app(recovered=False), fake_engine(p0="ready"), "tables recovering"),
        (fake_app(rebalancing=True), fake_engine(p0="ready"), "rebalancing"),
        (
            fake_app(),
            fake_engine(p0="ready", p1="starting", p2="starting"),
            "ledger partitions not caught up: 1, 2",
        ),
    ],
)
def test_a_worker_that_recovers_rebalances_or_catches_up_is_not_ready(app, engine, reason):
    state = readiness(app, engine)
    assert not state.ready
    assert state.reasons == [reason]
    assert state.body()["status"] == "not ready"


def test_every_failing_check_is_named():
    state = readiness(fake_app(recovered=False, rebalancing=True), fake_engine(p5="stopped"))
    assert state.reasons == [
        "tables recovering",
        "rebalancing",
        "ledger partitions not caught up: 5",
    ]


def test_a_halted_partition_is_named_with_its_cause():
    engine = fake_engine(p0="ready", p2="halted", p4="starting")
    engine.partitions[2].halted = "input inventory.orders/2 ends at @3, below @40"
    state = readiness(fake_app(), engine)
    assert not state.ready
    assert state.reasons == [
        "ledger partition 2 halted: input inventory.orders/2 ends at @3, below @40",
        "ledger partitions not caught up: 4",
    ]
    assert state.body()["partitions"] == {"0": "ready", "2": "halted", "4": "starting"}


def test_a_rebalancing_worker_is_alive_but_not_ready():
    app = fake_app(rebalancing=True)
    assert liveness(app) == []
    assert not readiness(app, fake_engine()).ready


def test_a_crashed_app_or_consumer_is_not_alive():
    app = fake_app()
    app.crashed, app.crash_reason = True, RuntimeError("agent blew up")
    assert liveness(app) == ["app crashed: RuntimeError('agent blew up')"]
    app = fake_app()
    app._consumer = SimpleNamespace(crashed=True, crash_reason=None)
    assert liveness(app) == ["consumer crashed"]


# --- the real app's endpoints --------------------------------------------


# aiohttp binds an Application to the first loop that serves it: one loop for this module
LOOP = asyncio.new_event_loop()


def get(paths: list[str]) -> dict[str, tuple[int, Any]]:
    from aiohttp.test_utils import TestClient, TestServer

    import pipeline.web.views  # noqa: F401 - registers the views
    from pipeline.app import app

    async def run() -> dict[str, tuple[int, Any]]:
        out = {}
        async with TestClient(TestServer(app.web.web_app)) as client:
            for path in paths:
                resp = await client.get(path)
                out[path] = (resp.status, await resp.json())
        return out

    return LOOP.run_until_complete(run())


@pytest.fixture
def worker_app(monkeypatch):
    import pipeline.app  # first: it imports the agents and views
    from agents.stock import engine

    app = pipeline.app.app

    monkeypatch.setattr(app.tables.recovery, "completed", Event())
    monkeypatch.setattr(app, "rebalancing", False)
    monkeypatch.setattr(engine, "partitions", {})
    return app, engine


def test_the_app_serves_the_three_endpoints_while_recovering(worker_app):
    got = get(["/livez", "/readyz", "/healthz"])
    assert got["/livez"] == (200, {"status": "alive"})
    assert got["/readyz"] == (
        503,
        {"status": "not ready", "reasons": ["tables recovering"], "partitions": {}},
    )
    assert got["/healthz"] == (503, {"status": "recovering"})  # unchanged contract


def test_the_app_is_ready_once_recovered_and_caught_up(worker_app, monkeypatch):
    app, engine = worker_app
    app.tables.recovery.completed.set()
    monkeypatch.setattr(
        engine, "partitions", {2: SimpleNamespace(state=SimpleNamespace(value="ready"))}
    )
    monkeypatch.setattr(engine, "ready", lambda: True)
    got = get(["/readyz", "/healthz"])
    assert got["/readyz"] == (200, {"status": "ready", "reasons": [], "partitions": {"2": "ready"}})
    assert got["/healthz"][0] == 200 and got["/healthz"][1]["status"] in ("ok", "degraded")
    monkeypatch.setattr(app, "rebalancing", True)
    got = get(["/livez", "/readyz", "/healthz"])
    assert got["/livez"][0] == 200
    assert got["/readyz"] == (
        503,
        {"status": "not ready", "reasons": ["rebalancing"], "partitions": {"2": "ready"}},
    )
    assert got["/healthz"][0] == 503


def test_livez_is_503_once_the_app_crashed(worker_app, monkeypatch):
    app, _ = worker_app
    crashed = Event()
    crashed.set()
    monkeypatch.setattr(app, "_crashed", crashed)
    monkeypatch.setattr(app, "_crash_reason", RuntimeError("boom"))
    status, body = get(["/livez"])["/livez"]
    assert status == 503
    assert body == {"status": "dead", "reasons": ["app crashed: RuntimeError('boom')"]}
