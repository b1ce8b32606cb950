"""Write order of a ledger batch: one transaction carries the changelog records (with the
answers and StockChanged they cause), the dead letters and the input positions; the
local store and the group offsets follow only once it committed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from memory_kafka import MemoryBroker, Worker, key_on, settings

from agents.ledger import POSITIONS_KEY
from pipeline.kafka.transactions import BatchAborted, Out
from tables.stock import StoredReservation, StoredStock, reservation_key, stock_key

CFG = settings()
P = 1
SKU = key_on(P, CFG)


def run(scenario: Any) -> Any:
    return asyncio.run(scenario)


def sku_records(outs: list[Out], changelog: str) -> dict[bytes, StoredStock]:
    return {
        o.key: StoredStock.from_bytes(o.value)
        for o in outs
        if o.topic == changelog and o.key != POSITIONS_KEY and o.value is not None
    }


def test_a_batch_goes_out_in_one_transaction_with_its_answers_dead_letters_and_positions(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        w.send("RestockReceived", {"sku": SKU, "qty": 5})
        w.send("ReserveStock", {"sku": SKU, "order_id": "o1", "qty": 2})
        garbage = w.send_raw(CFG.restocks_topic, SKU.encode(), b"not avro at all")
        await w.settle()
        changelog, reservations = w.ledger(P).changelog, w.ledger(P).reservations

        assert len(broker.transactions) == 1
        outs = broker.transactions[0]
        stored = sku_records(outs, changelog)[stock_key(SKU)]
        assert (stored.record.on_hand, stored.record.reserved, stored.record.version) == (5, 2, 2)
        # the answers ride in the SKU record (the relay publishes them from there)
        answers = stored.effects["ReservationResult"]
        assert [(a["order_id"], a["outcome"]) for a in answers] == [("o1", "RESERVED")]
        assert [c["version"] for c in stored.effects["StockChanged"]] == [1, 2]
        held = [o for o in outs if o.key == reservation_key(SKU, "o1")]
        assert [o.topic for o in held] == [reservations]
        assert StoredReservation.from_bytes(held[0].value).current["qty"] == 2
        positions = [o for o in outs if o.key == POSITIONS_KEY]
        assert [(o.topic, orjson.loads(o.value)) for o in positions] == [
            (changelog, {CFG.orders_topic: 1, CFG.returns_topic: 0, CFG.restocks_topic: 2})
        ]
        letters = [o for o in outs if o.topic == CFG.dead_letters_topic]
        assert len(letters) == 1
        letter = w.codec.decode(letters[0].value)[1]
        assert (letter["reason"], letter["source_offset"], letter["value"]) == (
            "undecodable",
            garbage[2],
            b"not avro at all",
        )
        # ... and nothing was written outside that transaction
        assert broker.aborted == []
        await w.stop()

    run(scenario())


def test_the_store_and_the_group_offsets_are_written_only_after_the_commit(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        seen: list[tuple[Any, ...]] = []

        def at_commit(partition: int, outs: list[Out]) -> None:
            ledger = w.ledger(partition)
            seen.append(
                (
                    ledger.store.get(stock_key(SKU)),
                    ledger.store.get(POSITIONS_KEY),
                    ledger.lookup(SKU),
                    dict(w.engine._group_due),
                )
            )

        broker.before_commit.append(at_commit)
        w.send("RestockReceived", {"sku": SKU, "qty": 3})
        await w.settle()

        assert seen == [(None, None, None, {})]
        ledger = w.ledger(P)
        assert ledger.lookup(SKU).record.on_hand == 3
        assert StoredStock.from_bytes(ledger.store.get(stock_key(SKU))).record.on_hand == 3
        # the store remembers where the changelog it now holds ends (the commit marker
        # takes the offset after the batch's last record)
        assert ledger.store.position(ledger.changelog) == broker.log(ledger.changelog, P).end - 1
        assert ledger.known_end == broker.log(ledger.changelog, P).end
        await w.engine.commit_group_offsets()
        assert broker.group == {(CFG.restocks_topic, P): 1}
        await w.stop()

    run(scenario())


def test_an_aborted_commit_stores_nothing_and_the_batch_is_decided_again_once(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, CFG, tmp_path)
        await w.assign([P])
        broker.fail_next_commit(BatchAborted("the coordinator aborted it"))
        stored_at_commit: list[Any] = []
        broker.before_commit.append(
            lambda p, outs: stored_at_commit.append(
                (w.ledger(p).store.get(stock_key(SKU)), dict(w.engine._group_due))
            )
        )
        w.send("RestockReceived", {"sku": SKU, "qty": 4})
        w.send_raw(CFG.restocks_topic, SKU.encode(), b"garbage")
        await w.settle()

        # the first transaction aborted: nothing of it stored, nothing due for the group;
        # the partition took ownership again (a new producer) and re-read the inputs
        assert len(broker.aborted) == 1 and len(broker.transactions) == 1
        assert stored_at_commit == [(None, {}), (None, {})]
        assert w.engine.writers[P].opens == 2 and broker.epochs[P] == 2
        stock = w.stock(SKU)
        assert (stock.record.on_hand, stock.record.version) == (4, 1)
        # readers never see the aborted attempt: one StockChanged, one dead letter
        changes = [
            c
            for r in broker.records(w.ledger(P).changelog, P)
            if r.key == stock_key(SKU)
            for c in StoredStock.from_bytes(r.value).effects["StockChanged"]
        ]
        assert [c["version"] for c in changes] == [1]
        assert [d["reason"] for d in w.dead_letters()] == ["undecodable"]
        await w.stop()

    run(scenario())


def test_a_batch_decided_while_the_last_commits_is_dropped_with_it_when_that_commit_fails(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        broker = MemoryBroker()
        w = Worker(broker, settings(ledger_batch_max=1), tmp_path)  # one record a batch
        await w.assign([P])
        gate = broker.commit_gate = asyncio.Event()
        w.send("RestockReceived", {"sku": SKU, "qty": 5})
        w.send("ReserveStock", {"sku": SKU, "order_id": "o1", "qty": 2})
        w.consumer.fetch()
        await w.until(lambda: broker.commits_waiting == 1, "batch 1 in its commit")
        # batch 2 is taken and folded on top of batch 1's uncommitted result ...
        await w.until(lambda: w.feed.pending(P) == 0, "batch 2 taken")
        assert w.ledger(P).pending[SKU][1].record.on_hand == 5
        # ... but nothing a query reads is ahead of the changelog
        assert w.stock(SKU) is None and w.ledger(P).store.get(stock_key(SKU)) is None
        broker.fail_next_commit(BatchAborted("batch 1 aborted"))
        broker.commit_gate = None
        gate.set()
        await w.settle()

        # batch 2 never reached a transaction of the failed producer
        assert len(broker.aborted) == 1
        aborted = sku_records(broker.aborted[0], w.ledger(P).changelog)[stock_key(SKU)]
        assert "ReservationResult" not in aborted.effects
        stock = w.stock(SKU)
        assert (stock.record.on_hand, stock.record.reserved, stock.record.version) == (5, 2, 2)
        answers = [
            a
            for outs in broker.transactions
            for s in sku_records(outs, w.ledger(P).changelog).values()
            for a in s.effects.get("ReservationResult", [])
        ]
        assert [(a["order_id"], a["outcome"], a["duplicate"]) for a in answers] == [
            ("o1", "RESERVED", False)
        ]
        await w.stop()

    run(scenario())
