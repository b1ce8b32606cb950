"""Ownership across rebalances: a worker that lost a partition writes and serves nothing
of it, a revocation lets the batch in flight end, and records fetched in an older
generation are never decided."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from faust.types import TP
from memory_kafka import MemoryBroker, Record, Worker, key_on, settings

from agents.ledger import State
from tables.stock import StoredStock, stock_key

CFG = settings()
P = 3
SKU = key_on(P, CFG)


def run(scenario: Any) -> Any:
    return asyncio.run(scenario)


def restock(w: Worker, qty: int) -> tuple[str, int, int]:
    return w.send("RestockReceived", {"sku": SKU, "qty": qty})


def test_a_paused_worker_whose_partition_moved_on_writes_and_serves_nothing_of_it(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        a = Worker(broker, CFG, tmp_path / "a")
        await a.assign([P], generation=1)
        restock(a, 1)
        await a.settle()
        # a paused past its session: the group gave P to b, whose producer fenced a's
        b = Worker(broker, CFG, tmp_path / "b")
        await b.assign([P], generation=2)
        written = len(broker.transactions)
        restock(a, 10)
        a.consumer.fetch()  # a wakes up and decides what it fetched
        await a.until(lambda: a.ledger(P).state is State.STARTING, "a loses its writer")
        assert len(broker.transactions) == written  # nothing of a's reached the changelog
        assert await a.ledger(P).fresh() is False  # nor does a answer for P
        assert a.ledger(P).lookup(SKU).record.on_hand == 1
        await a.revoke()  # a rejoins the group and is told
        await a.stop()

        await b.settle()
        assert (b.stock(SKU).record.on_hand, b.stock(SKU).record.version) == (11, 2)
        await b.stop()

    run(scenario())


def test_a_revocation_lets_the_batch_in_flight_commit_and_the_next_owner_reads_it(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        a = Worker(broker, CFG, tmp_path / "a")
        await a.assign([P], generation=1)
        gate = broker.commit_gate = asyncio.Event()
        restock(a, 3)
        a.consumer.fetch()
        await a.until(lambda: broker.commits_waiting == 1, "a batch in its commit")
        ledger = a.ledger(P)
        revoking = asyncio.ensure_future(a.revoke())
        await asyncio.sleep(0.01)
        assert not revoking.done()  # the revocation waits for the transaction to end
        broker.commit_gate = None
        gate.set()
        await revoking
        assert ledger.state is State.STOPPED and len(broker.transactions) == 1
        assert StoredStock.from_bytes(ledger.store.get(stock_key(SKU)) or b"").record.on_hand == 3
        await a.stop()

        b = Worker(broker, CFG, tmp_path / "b")
        await b.assign([P], generation=2)
        await b.settle()
        assert b.stock(SKU).record.on_hand == 3 and len(broker.transactions) == 1
        await b.stop()

    run(scenario())


def test_records_fetched_in_an_older_generation_are_not_decided(tmp_path: Path) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P], generation=5)
        _, _, offset = restock(w, 4)
        [record] = broker.records(CFG.restocks_topic, P)
        stale = Record(**{f: getattr(record, f) for f in Record.__slots__})
        w.feed.offer(TP(CFG.restocks_topic, P), [stale], generation=4)  # fetched before
        await w.until(lambda: w.feed.pending(P) == 0, "the stale chunk taken")
        await w.until(w.quiet, "the ledger idle")
        assert broker.transactions == [] and w.ledger(P).expected[CFG.restocks_topic] == 0
        await w.settle()  # this generation's fetch of the same record is decided
        assert w.stock(SKU).record.on_hand == 4
        assert w.ledger(P).expected[CFG.restocks_topic] == offset + 1
        await w.stop()

    run(scenario())
