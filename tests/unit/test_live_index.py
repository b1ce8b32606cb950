"""The sweepers' indexes of open items (tables/index.py) and their sliced rebuild
(pipeline/kafka/indexing.py), without a broker: a fake app and table stand in for Faust."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from pipeline.domain import saga as sg
from pipeline.kafka import indexing
from pipeline.kafka.indexing import IndexRefresher
from tables.index import LiveIndex
from tables.orders import OpenSagas, StoredSaga

T0 = 1_700_000_000_000


def _saga_value(order: str, final: bool) -> tuple[bytes, sg.Saga]:
    saga = sg.decide(
        None, sg.PlaceOrder(f"p-{order}", order, (("A", 1),), T0, "web", 10_000), grace_ms=0
    ).saga
    assert saga is not None
    if final:
        saga = sg.decide(saga, sg.CancelOrder(f"c-{order}", order, T0 + 1), grace_ms=0).saga
        line = saga.line("A")
        assert line is not None
        # the reserve answer, then the release answer: the cancel completes
        for action, outcome in (("reserve", "RESERVED"), ("release", "RELEASED")):
            result = sg.LineResult(
                sg.line_event_id(order, "A", action), order, "A", outcome, 1, 0, T0 + 2
            )
            saga = sg.decide(saga, result, grace_ms=0).saga
        assert saga.status.final
    return StoredSaga(saga, {}, [], T0).to_bytes(), saga


def test_open_sagas_keep_only_sagas_that_are_not_final():
    idx = OpenSagas()
    open_v, open_s = _saga_value("o1", final=False)
    done_v, done_s = _saga_value("o1", final=True)
    idx.note(b"o1", open_v, open_s)
    assert dict(idx.items()) == {b"o1": open_v}
    idx.note(b"o1", done_v, done_s)
    assert len(idx) == 0
    assert OpenSagas.entry_of(b"o2", open_v) == open_v
    assert OpenSagas.entry_of(b"o2", done_v) is None


class FakeTable:
    def __init__(self, items: dict[bytes, bytes], on_item: Any = None) -> None:
        self.items_ = items
        self.on_item = on_item
        self.data = self

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for i, kv in enumerate(list(self.items_.items())):
            if self.on_item is not None:
                self.on_item(i)
            yield kv


def fake_app(generation: int = 1) -> SimpleNamespace:
    completed = asyncio.Event()
    completed.set()
    return SimpleNamespace(
        rebalancing=False,
        in_recovery=False,
        consumer_generation_id=generation,
        tables=SimpleNamespace(recovery=SimpleNamespace(completed=completed)),
    )


def entry_of(key: bytes, value: bytes) -> bytes | None:
    return value if value == b"open" else None


def refresher(app: Any, table: Any, index: LiveIndex[bytes]) -> IndexRefresher[bytes]:
    return IndexRefresher("test", app, table.data.items, index, entry_of, full_scan_s=300)


def test_rebuild_in_slices_lets_notes_made_during_the_scan_win(monkeypatch):
    monkeypatch.setattr(indexing, "SCAN_SLICE", 2)
    items = {f"k{i}".encode(): b"open" for i in range(6)}
    index: LiveIndex[bytes] = LiveIndex()

    def agent_writes(i: int) -> None:
        if i == 3:  # mid-scan: the agent closes k0 (already read) and opens k9
            index.put(b"k0", None)
            index.put(b"k9", b"open")

    app = fake_app()
    assert asyncio.run(refresher(app, FakeTable(items, agent_writes), index).refresh())
    assert sorted(k for k, _ in index.items()) == [b"k1", b"k2", b"k3", b"k4", b"k5", b"k9"]


def test_rebuild_runs_again_only_after_the_partitions_change():
    index: LiveIndex[bytes] = LiveIndex()
    app = fake_app(generation=1)
    table = FakeTable({b"a": b"open"})
    ref = refresher(app, table, index)
    assert asyncio.run(ref.refresh()) and len(index) == 1
    table.items_ = {b"a": b"open", b"b": b"open"}  # written by a restore, not noted
    assert asyncio.run(ref.refresh()) and len(index) == 1  # not due yet
    app.consumer_generation_id = 2
    assert asyncio.run(ref.refresh()) and len(index) == 2


def test_a_rebalance_during_the_scan_aborts_it_and_keeps_the_old_index(monkeypatch):
    monkeypatch.setattr(indexing, "SCAN_SLICE", 2)
    index: LiveIndex[bytes] = LiveIndex()
    index.put(b"old", b"open")
    app = fake_app()

    def rebalance(i: int) -> None:
        if i == 1:
            app.rebalancing = True

    items = {f"k{i}".encode(): b"open" for i in range(6)}
    ref = refresher(app, FakeTable(items, rebalance), index)
    assert asyncio.run(ref.refresh()) is False
    assert [k for k, _ in index.items()] == [b"old"]
    app.rebalancing = False  # the next tick scans again
    ref.items = FakeTable(items).data.items
    assert asyncio.run(ref.refresh()) and len(index) == 6


def test_a_table_error_during_the_scan_is_retried_not_raised():
    index: LiveIndex[bytes] = LiveIndex()
    index.put(b"old", b"open")

    def closed(i: int) -> None:
        raise RuntimeError("partition closed")

    ref = refresher(fake_app(), FakeTable({b"a": b"open"}, closed), index)
    assert asyncio.run(ref.refresh()) is False
    assert [k for k, _ in index.items()] == [b"old"]
