"""Input sequencing: the pure sequencer and the guard's commit/rewind protocol (fake app)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pipeline import metrics
from pipeline.sequencing import InputGuard, Sequencer, Verdict


def test_sequencer_applies_only_the_next_offset():
    s = Sequencer()
    s.start("t0", 5)
    assert s.check("t0", 5) is Verdict.APPLY
    s.done("t0", 5)
    assert s.check("t0", 5) is Verdict.DUPLICATE
    assert s.check("t0", 4) is Verdict.DUPLICATE
    assert s.check("t0", 7) is Verdict.GAP
    assert s.next_offset("t0") == 6
    s.done("t0", 7)  # done out of order moves nothing
    assert s.next_offset("t0") == 6


def test_sequencer_partitions_are_independent_and_forgettable():
    s = Sequencer()
    s.start("a", 0)
    s.start("b", 10)
    s.done("a", 0)
    assert s.positions() == {"a": 1, "b": 10}
    assert s.positions(["b", "zz"]) == {"b": 10}
    s.forget(["a"])
    assert not s.known("a") and s.known("b")
    s.forget()
    assert s.positions() == {}


@dataclass(frozen=True)
class TP:
    topic: str
    partition: int


@dataclass
class Msg:
    topic: str
    partition: int
    offset: int

    @property
    def tp(self) -> TP:
        return TP(self.topic, self.partition)


@dataclass
class Event:
    message: Msg


@dataclass
class FakeConsumer:
    calls: list[Any]
    committed_at_assignment: dict[TP, int] = field(default_factory=dict)
    assigned: set[TP] = field(default_factory=set)
    commit_ok: bool = True

    @property
    def _committed_offset(self) -> dict[TP, int]:
        return self.committed_at_assignment

    def assignment(self) -> set[TP]:
        return self.assigned

    async def _commit(self, offsets: dict[TP, int]) -> bool:
        self.calls.append(("commit", dict(offsets)))
        return self.commit_ok

    def stop_flow(self) -> None:
        self.calls.append("stop_flow")

    def resume_flow(self) -> None:
        self.calls.append("resume_flow")

    async def perform_seek(self) -> None:
        self.calls.append("seek")


class FakeProducer:
    def __init__(self, calls: list[Any]) -> None:
        self.calls = calls

    async def flush(self) -> None:
        self.calls.append("flush")


class FakeTables:
    def on_commit(self, offsets: Any) -> None:
        pass


class FakeSensors:
    def __init__(self) -> None:
        self.seen: list[tuple[Any, int]] = []
        self.committed: dict[Any, int] = {}

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        self.seen.append((tp, offset))

    def on_tp_commit(self, offsets: Any) -> None:
        self.committed.update(offsets)


class FakeApp:
    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.consumer = FakeConsumer(self.calls)
        self.producer = FakeProducer(self.calls)
        self.tables = FakeTables()
        self.sensors = self.monitor = FakeSensors()
        self.rebalancing = False


def guard_for(app: FakeApp, log_start: int = 0) -> InputGuard:
    async def start(topic: str, partition: int) -> int:
        app.calls.append(("log_start", topic, partition))
        return log_start

    return InputGuard(app, start, commit_interval_s=1.0, rewind_retry_s=60.0)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def ev(offset: int, topic: str = "orders", partition: int = 0) -> Event:
    return Event(Msg(topic, partition, offset))


def test_the_first_record_after_assignment_must_be_the_committed_offset():
    app = FakeApp()
    tp = TP("orders", 0)
    app.consumer.committed_at_assignment[tp] = 40
    app.consumer.assigned.add(tp)
    g = guard_for(app)

    async def go() -> list[bool]:
        out = [await g.admit(ev(39))]  # below: already applied by someone
        out.append(await g.admit(ev(40)))
        g.done(ev(40))
        out.append(await g.admit(ev(41)))
        g.done(ev(41))
        return out

    assert run(go()) == [False, True, True]
    assert g.seq.next_offset(tp) == 42
    assert "seek" not in app.calls


def test_without_a_committed_offset_reading_starts_at_the_log_start():
    app = FakeApp()
    g = guard_for(app, log_start=7)
    assert run(g.admit(ev(7))) is True
    assert app.calls[0] == ("log_start", "orders", 0)
    app2 = FakeApp()
    g2 = guard_for(app2, log_start=7)
    assert run(g2.admit(ev(8))) is False  # @7 never arrived


def test_a_gap_is_not_applied_and_rewinds_after_committing_what_was_applied():
    app = FakeApp()
    tp = TP("orders", 0)
    app.consumer.committed_at_assignment[tp] = 10
    app.consumer.assigned.add(tp)
    g = guard_for(app)
    before = metrics.INPUT_GAPS.labels("orders")._value.get()
    rewinds = metrics.INPUT_REWINDS._value.get()

    async def go() -> list[bool]:
        out = [await g.admit(ev(10))]
        g.done(ev(10))
        out.append(await g.admit(ev(13)))  # @11 and @12 missing
        out.append(await g.admit(ev(14)))  # still missing: no second rewind yet
        return out

    assert run(go()) == [True, False, False]
    assert app.calls == ["stop_flow", "flush", ("commit", {tp: 11}), "seek", "resume_flow"]
    assert metrics.INPUT_GAPS.labels("orders")._value.get() - before == 2
    assert metrics.INPUT_REWINDS._value.get() - rewinds == 1
    assert g.seq.next_offset(tp) == 11


def test_commits_flush_first_and_skip_unassigned_unmoved_and_rebalancing():
    app = FakeApp()
    a, b = TP("orders", 0), TP("orders", 1)
    app.consumer.committed_at_assignment.update({a: 0, b: 0})
    app.consumer.assigned.update({a})
    g = guard_for(app)

    async def go() -> None:
        for e in (ev(0, partition=0), ev(0, partition=1)):
            assert await g.admit(e)
            g.done(e)
        assert await g.commit()
        assert await g.commit()  # nothing moved: no second commit
        app.rebalancing = True
        g.seq.done(a, 1)
        assert not await g.commit()
        assert await g.commit([a], revoking=True)

    run(go())
    assert app.calls == ["flush", ("commit", {a: 1}), "flush", ("commit", {a: 2})]
    assert app.monitor.committed == {a: 2}  # Faust's committed-offset gauge follows
    assert app.sensors.seen == [(a, 0), (b, 0)]


def test_a_rewind_never_resumes_the_flow_of_a_rebalance():
    app = FakeApp()
    tp = TP("orders", 0)
    app.consumer.committed_at_assignment[tp] = 0
    app.consumer.assigned.add(tp)
    g = guard_for(app)

    async def flush_then_rebalance() -> None:
        app.calls.append("flush")
        app.rebalancing = True

    app.producer.flush = flush_then_rebalance  # type: ignore[method-assign]

    async def go() -> None:
        assert await g.admit(ev(0))
        g.done(ev(0))
        assert not await g.admit(ev(5))

    run(go())
    assert app.calls == ["stop_flow", "flush"]  # no commit, no seek, flow left to the rebalance


def test_a_record_held_over_a_rebalance_is_dropped_for_refetching():
    app = FakeApp()
    app.rebalancing = True
    g = guard_for(app)
    assert run(g.admit(ev(3))) is False
    assert not g.seq.known(TP("orders", 0))
    assert app.calls == []
