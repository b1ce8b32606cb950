"""``PartitionLedger.fresh``: what a stock query waits for before it answers.

The broker query is replaced by stand-ins (an adapter's error paths); the real
broker's answers are covered by the integration tests of ``GET /stock``."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

from agents.ledger import PartitionLedger, State


def ledger(bounds: Any, known_end: int = 10) -> Any:
    idle = asyncio.Event()
    idle.set()
    engine = SimpleNamespace(
        owns=lambda _ledger: True,
        executor=ThreadPoolExecutor(2),
        group=SimpleNamespace(bounds=bounds),
    )
    return SimpleNamespace(
        state=State.READY,
        engine=engine,
        changelog="cl",
        partition=0,
        known_end=known_end,
        _idle=idle,
    )


def fresh(fake: Any) -> bool:
    async def run() -> bool:
        fake._idle = asyncio.Event()
        fake._idle.set()
        return await PartitionLedger.fresh(fake)

    return asyncio.run(run())


def test_fresh_when_the_changelog_ends_where_this_worker_wrote_it() -> None:
    assert fresh(ledger(lambda tps, timeout: {("cl", 0): (0, 10)})) is True


def test_not_fresh_when_another_writer_appended() -> None:
    assert fresh(ledger(lambda tps, timeout: {("cl", 0): (0, 11)})) is False


def test_not_fresh_when_the_broker_cannot_say() -> None:
    def fails(tps: Any, timeout: float) -> Any:
        raise RuntimeError("broker down")

    assert fresh(ledger(fails)) is False


def test_a_broker_query_that_hangs_answers_not_fresh_within_a_few_seconds() -> None:
    # librdkafka's own timeout did not bound a stock query: CI saw one take over 10 s
    release = threading.Event()

    def hangs(tps: Any, timeout: float) -> Any:
        release.wait(30)
        return {("cl", 0): (0, 10)}

    fake = ledger(hangs)
    started = time.monotonic()
    try:
        assert fresh(fake) is False
        assert time.monotonic() - started < 5.0
    finally:
        release.set()
        fake.engine.executor.shutdown(wait=True)
