"""run_forever: a relay's or a sink's loop survives failures and says so in its own log."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pipeline.kafka.consuming import run_forever


def test_a_failure_is_logged_to_the_given_logger_and_run_again(monkeypatch, caplog):
    real_sleep = asyncio.sleep

    async def no_wait(_: float) -> None:  # the 1 s pause between restarts, skipped
        await real_sleep(0)

    monkeypatch.setattr("pipeline.kafka.consuming.asyncio.sleep", no_wait)
    calls = 0
    closed = []

    async def run() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError(f"broker hiccup {calls}")
        await asyncio.Event().wait()  # healthy: runs until cancelled

    async def close() -> None:
        closed.append(True)

    async def scenario() -> None:
        task = asyncio.create_task(
            run_forever(run, "redis sink", close, logging.getLogger("inventory.sink"))
        )
        for _ in range(50):
            await real_sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    assert calls == 3
    assert closed == [True]
    failures = [r for r in caplog.records if "failed; restarting" in r.getMessage()]
    assert [r.name for r in failures] == ["inventory.sink", "inventory.sink"]
    assert failures[0].getMessage() == "redis sink failed; restarting in 1 s"
