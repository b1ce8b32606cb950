"""Input sequencing: the pure sequencer and the guard's commit/rewind protocol (fake app)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pipeline import metrics
from pipeline.kafka.sequencing import InputGuard, PartitionOffsets, Sequencer, Verdict


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
    committed: dict[TP, int] = field(default_factory=dict)  # the group's, on the broker
    assigned: set[TP] = field(default_factory=set)
    commit_ok: bool = True

    def assignment(self) -> set[TP]:
        return self.assigned

    async def _commit(self, offsets: dict[TP, int]) -> bool:
        self.calls.append(("commit", dict(offsets)))
        return self.commit_ok

    def stop_flow(self) -> None:
        self.calls.append("stop_flow")

    def resume_flow(self) -> None:
        self.calls.append("resume_flow")

    async def seek_wait(self, offsets: dict[TP, int]) -> None:
        self.calls.append(("seek", dict(offsets)))


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


def guard_for(app: FakeApp, log_start: int = 0, log_end: int = 10**9) -> InputGuard:
    app.log_start, app.log_end = log_start, log_end

    async def offsets(topic: str, partition: int) -> PartitionOffsets:
        app.calls.append(("offsets", topic, partition))
        committed = app.consumer.committed.get(TP(topic, partition))
        return PartitionOffsets(committed, app.log_start, app.log_end)

    g = InputGuard(app, offsets, commit_interval_s=1.0, rewind_retry_s=60.0)
    g.watch("orders")
    return g


def assigned(app: FakeApp, committed: dict[TP, int]) -> None:
    app.consumer.committed.update(committed)
    app.consumer.assigned.update(committed)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def ev(offset: int, topic: str = "orders", partition: int = 0) -> Event:
    return Event(Msg(topic, partition, offset))


def test_the_first_record_after_assignment_must_be_the_committed_offset():
    app = FakeApp()
    tp = TP("orders", 0)
    assigned(app, {tp: 40})
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
    assert app.calls == [("offsets", "orders", 0)]  # asked once, at the first record


def test_a_committed_offset_of_zero_is_an_offset():
    # Faust and aiokafka's seek_to_committed read a committed 0 as "nothing committed"
    app = FakeApp()
    tp = TP("orders", 0)
    assigned(app, {tp: 0})
    g = guard_for(app, log_start=0)
    assert run(g.admit(ev(0))) is True


def test_without_a_committed_offset_reading_starts_at_the_log_start():
    app = FakeApp()
    app.consumer.assigned.add(TP("orders", 0))
    g = guard_for(app, log_start=7)
    assert run(g.admit(ev(7))) is True
    app2 = FakeApp()
    app2.consumer.assigned.add(TP("orders", 0))
    g2 = guard_for(app2, log_start=7)
    assert run(g2.admit(ev(8))) is False  # @7 never arrived


def test_a_committed_offset_below_the_log_start_resumes_at_the_log_start_and_counts():
    app = FakeApp()
    tp = TP("orders", 0)
    assigned(app, {tp: 3})
    g = guard_for(app, log_start=10)
    before = metrics.INPUT_GAPS.labels("orders")._value.get()
    assert run(g.admit(ev(10))) is True
    assert metrics.INPUT_GAPS.labels("orders")._value.get() - before == 7


def test_a_record_of_a_partition_no_longer_assigned_is_left_to_its_owner():
    app = FakeApp()
    g = guard_for(app)
    assert run(g.admit(ev(0))) is False
    assert not g.seq.known(TP("orders", 0))
    assert app.calls == []


def test_a_gap_is_not_applied_and_rewinds_that_partition_to_its_next_offset():
    app = FakeApp()
    tp, other = TP("orders", 0), TP("orders", 1)
    assigned(app, {tp: 10, other: 0})
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
    assert app.calls == [
        ("offsets", "orders", 0),
        "stop_flow",
        "flush",
        ("commit", {tp: 11}),
        ("offsets", "orders", 0),
        ("seek", {tp: 11}),  # only the partition with the gap
        "resume_flow",
    ]
    assert metrics.INPUT_GAPS.labels("orders")._value.get() - before == 2
    assert metrics.INPUT_REWINDS._value.get() - rewinds == 1
    assert g.seq.next_offset(tp) == 11


def test_a_rewind_to_offset_zero_seeks_to_zero():
    # the stall CI hit: nothing committed yet, the first records lost; the rewind
    # committed 0 and Faust's perform_seek ignored it, so the fetch never went back
    app = FakeApp()
    tp = TP("orders", 0)
    app.consumer.assigned.add(tp)
    g = guard_for(app, log_start=0)
    assert run(g.admit(ev(87))) is False
    assert ("seek", {tp: 0}) in app.calls
    assert app.calls[-1] == "resume_flow"


def test_a_rewind_past_records_deleted_by_retention_resumes_at_the_log_start():
    app = FakeApp()
    tp = TP("orders", 0)
    assigned(app, {tp: 5})
    g = guard_for(app, log_start=5)

    async def go() -> None:
        assert await g.admit(ev(5))
        g.done(ev(5))

    run(go())

    async def later(topic: str, partition: int) -> PartitionOffsets:
        app.calls.append(("offsets", topic, partition))
        return PartitionOffsets(6, 20, 30)  # retention removed @6..@19 before they were applied

    g.offsets = later
    assert run(g.admit(ev(25))) is False
    assert ("seek", {tp: 20}) in app.calls
    assert g.seq.next_offset(tp) == 20


def test_commits_flush_first_and_skip_unassigned_unmoved_and_rebalancing():
    app = FakeApp()
    a, b = TP("orders", 0), TP("orders", 1)
    assigned(app, {a: 0, b: 0})
    g = guard_for(app)

    async def go() -> None:
        for e in (ev(0, partition=0), ev(0, partition=1)):
            assert await g.admit(e)
            g.done(e)
        app.consumer.assigned.discard(b)  # taken away: not ours to commit
        assert await g.commit()
        assert await g.commit()  # nothing moved: no second commit
        app.rebalancing = True
        g.seq.done(a, 1)
        assert not await g.commit()
        assert await g.commit([a], revoking=True)

    run(go())
    commits = [c for c in app.calls if c[0] != "offsets"]
    assert commits == ["flush", ("commit", {a: 1}), "flush", ("commit", {a: 2})]
    assert app.monitor.committed == {a: 2}  # Faust's committed-offset gauge follows
    assert app.sensors.seen == [(a, 0), (b, 0)]


def test_a_rewind_never_resumes_the_flow_of_a_rebalance():
    app = FakeApp()
    tp = TP("orders", 0)
    assigned(app, {tp: 0})
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
    # no commit, no seek, flow left to the rebalance
    assert app.calls == [("offsets", "orders", 0), "stop_flow", "flush"]


def test_a_partition_stalled_short_of_its_log_end_is_rewound_by_the_watchdog():
    # the rewound records can be lost as well (a delivery racing the seek); with
    # nothing later arriving, no gap is ever reported: the watchdog notices
    app = FakeApp()
    tp = TP("orders", 0)
    assigned(app, {tp: 3})
    g = guard_for(app, log_end=10)
    g.rewind_retry_s = 0.0
    g.stall_after_s = 0.0
    before = metrics.INPUT_STALLS.labels("orders")._value.get()

    async def go() -> None:
        assert await g.admit(ev(3))
        g.done(ev(3))
        await g.watchdog()  # first look: remembers @4
        await g.watchdog()  # no progress, @4..@9 in the log: rewind

    run(go())
    assert [c for c in app.calls if c[0] == "seek"] == [("seek", {tp: 4})]
    assert metrics.INPUT_STALLS.labels("orders")._value.get() - before == 1


def test_the_watchdog_leaves_caught_up_and_progressing_partitions_alone():
    app = FakeApp()
    tp = TP("orders", 0)
    assigned(app, {tp: 3})
    g = guard_for(app, log_end=4)
    g.stall_after_s = 0.0

    async def go() -> None:
        assert await g.admit(ev(3))
        g.done(ev(3))
        await g.watchdog()
        await g.watchdog()  # caught up: @4 is the log end
        app.log_end = 50
        assert await g.admit(ev(4))
        g.done(ev(4))
        await g.watchdog()  # moved since the last look
        g.stall_after_s = 60.0
        await g.watchdog()  # not for long enough

    run(go())
    assert not [c for c in app.calls if c[0] == "seek"]


def test_the_watchdog_starts_a_partition_whose_first_records_never_arrived():
    app = FakeApp()
    tp = TP("orders", 2)
    assigned(app, {tp: 0})  # a committed 0, records @0..@4 in the log, none delivered
    g = guard_for(app, log_end=5)
    g.stall_after_s = 0.0

    async def go() -> None:
        await g.watchdog()
        await g.watchdog()

    run(go())
    assert ("seek", {tp: 0}) in app.calls
    assert g.seq.next_offset(tp) == 0


def test_the_watchdog_ignores_other_topics_and_rebalances():
    app = FakeApp()
    other = TP("stock-changes", 0)
    app.consumer.assigned.add(other)
    g = guard_for(app, log_end=5)
    g.stall_after_s = 0.0

    async def go() -> None:
        await g.watchdog()
        await g.watchdog()
        app.rebalancing = True
        app.consumer.assigned.add(TP("orders", 0))
        await g.watchdog()
        await g.watchdog()

    run(go())
    assert app.calls == []


def test_rewinds_of_two_partitions_never_overlap():
    app = FakeApp()
    a, b = TP("orders", 0), TP("orders", 1)
    assigned(app, {a: 0, b: 0})
    g = guard_for(app)

    async def go() -> None:
        await asyncio.gather(g.admit(ev(4, partition=0)), g.admit(ev(4, partition=1)))

    run(go())
    flow = [c for c in app.calls if c in ("stop_flow", "resume_flow") or c[0] == "seek"]
    assert flow == [
        "stop_flow",
        ("seek", {a: 0}),
        "resume_flow",
        "stop_flow",
        ("seek", {b: 0}),
        "resume_flow",
    ]


def test_a_broker_that_does_not_answer_crashes_nothing():
    # chaos: the watchdog's offsets query timed out during a broker restart and the
    # exception crashed the worker; now each caller waits or tries again later
    app = FakeApp()
    tp = TP("orders", 0)
    assigned(app, {tp: 3})
    g = guard_for(app, log_end=10)
    g.stall_after_s = 0.0
    answer = g.offsets
    failures = {"left": 0}

    async def flaky(topic: str, partition: int) -> PartitionOffsets:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("Failed to get committed offsets: Local: Timed out")
        return await answer(topic, partition)

    g.offsets = flaky

    async def go() -> None:
        failures["left"] = 1
        assert await g.admit(ev(3))  # asked again after a second, then applied
        g.done(ev(3))
        await g.watchdog()
        failures["left"] = 5
        await g.watchdog()  # stalled, but the broker is away: no crash, no rewind yet
        assert not [c for c in app.calls if c[0] == "seek"]
        failures["left"] = 0
        await g.watchdog()
        await g.watchdog()  # the broker is back: rewound

    run(go())
    assert [c for c in app.calls if c[0] == "seek"] == [("seek", {tp: 4})]
