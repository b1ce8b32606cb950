"""The order saga's pure core: rules, the stored layout, validation, and a state machine.

The state machine runs the saga against the real ledger core (:func:`pipeline.domain.core.decide`)
over a message "network" that delivers ledger commands and answers in any order,
duplicates and drops them (a crash between a table write and its sends) and lets
the sweeper re-send, time pass, orders expire, commit, cancel and be placed twice.
At rest it compares the ledger with a deliberately simple model derived from the
sagas: reserved units = lines of RESERVED orders, on_hand = initial + restocks -
lines committed; no hold belongs to an order that is not RESERVED.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pytest
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from config.settings import Settings
from pipeline.domain import core
from pipeline.domain import saga as sg
from pipeline.domain.saga import LineState, OrderOutcome, OrderStatus
from schemas import validation
from schemas.validation import Invalid
from tables.orders import StoredSaga, result_to_dict

T0 = 1_700_000_000_000
TTL = 10_000
GRACE = 5_000


def place(order="o1", lines=(("A", 1), ("B", 2)), at=T0, ttl=TTL, eid=None) -> sg.PlaceOrder:
    return sg.PlaceOrder(eid or f"p-{order}", order, tuple(lines), at, "web", ttl)


def answer(saga: sg.Saga, sku: str, outcome: str, action="reserve", avail=0, reason="", at=T0):
    line = saga.line(sku)
    assert line is not None
    return sg.LineResult(
        sg.line_event_id(saga.order_id, sku, action),
        saga.order_id,
        sku,
        outcome,
        line.qty,
        avail,
        at,
        reason,
    )


def run(saga, *inputs):
    d = None
    for inp in inputs:
        d = sg.decide(saga, inp, grace_ms=GRACE)
        saga = d.saga
    return d


# --------------------------------------------------------------------------- rules


def test_place_sums_same_sku_lines_and_reserves_each_with_ttl_plus_grace():
    d = sg.decide(None, place(lines=(("A", 1), ("B", 2), ("A", 3))), grace_ms=GRACE)
    assert [(x.sku, x.qty, x.state) for x in d.saga.lines] == [
        ("A", 4, LineState.PENDING),
        ("B", 2, LineState.PENDING),
    ]
    assert d.result is None and d.changed
    assert [type(c) for c in d.sends] == [core.ReserveStock, core.ReserveStock]
    a = d.sends[0]
    assert (a.event_id, a.order_id, a.sku, a.qty) == ("o1:A:reserve", "o1", "A", 4)
    assert (a.occurred_at, a.ttl_ms) == (T0, TTL + GRACE)
    assert d.saga.expires_at == T0 + TTL


def test_all_reserved_answers_order_reserved_with_the_place_event_id():
    s = sg.decide(None, place(), grace_ms=GRACE).saga
    d1 = sg.decide(s, answer(s, "A", "RESERVED"))
    assert d1.result is None and d1.sends == ()
    d2 = sg.decide(d1.saga, answer(s, "B", "RESERVED"))
    assert d2.result.outcome is OrderOutcome.ORDER_RESERVED
    assert d2.result.event_id == "p-o1" and d2.saga.status is OrderStatus.RESERVED
    assert d2.saga.first_result == d2.result
    assert sg.outstanding(d2.saga) == ()


def test_a_rejected_line_releases_the_reserved_ones_then_answers_rejected():
    s = sg.decide(None, place(lines=(("A", 1), ("B", 2), ("C", 1))), grace_ms=GRACE).saga
    d = sg.decide(s, answer(s, "A", "RESERVED"))
    d = sg.decide(d.saga, answer(s, "B", "REJECTED", avail=1, reason="insufficient_stock"))
    # A is released at once, C (no answer yet) waits for its answer
    assert [c.event_id for c in d.sends] == ["o1:A:release"]
    assert d.result is None and d.saga.status is OrderStatus.RELEASING
    d = sg.decide(d.saga, answer(s, "C", "RESERVED"))
    assert [c.event_id for c in d.sends] == ["o1:C:release"]
    d = sg.decide(d.saga, answer(s, "A", "RELEASED", action="release"))
    assert d.result is None  # C still held
    d = sg.decide(d.saga, answer(s, "C", "RELEASED", action="release"))
    r = d.result
    assert r.outcome is OrderOutcome.ORDER_REJECTED and r.event_id == "p-o1"
    assert [x.sku for x in sg.failed_lines(r)] == ["B"]
    assert "B (wanted 2, available 1)" in r.reason
    assert {x.sku: x.state for x in r.lines} == {
        "A": LineState.RELEASED,
        "B": LineState.REJECTED,
        "C": LineState.RELEASED,
    }


def test_every_line_rejected_answers_at_once():
    s = sg.decide(None, place(lines=(("A", 1),)), grace_ms=GRACE).saga
    d = sg.decide(s, answer(s, "A", "REJECTED", avail=0))
    assert d.result.outcome is OrderOutcome.ORDER_REJECTED and d.sends == ()


def _reserved(lines=(("A", 1), ("B", 2))) -> sg.Saga:
    s = sg.decide(None, place(lines=lines), grace_ms=GRACE).saga
    for sku, _ in lines:
        s = sg.decide(s, answer(s, sku, "RESERVED")).saga
    assert s.status is OrderStatus.RESERVED
    return s


def test_commit_commits_every_line_and_answers_once_all_confirmed():
    s = _reserved()
    d = sg.decide(s, sg.CommitOrder("c1", "o1", T0 + 5))
    assert [(type(c), c.occurred_at) for c in d.sends] == [(core.CommitReservation, T0 + 5)] * 2
    d = sg.decide(d.saga, answer(s, "A", "COMMITTED", action="commit"))
    assert d.result is None
    d = sg.decide(d.saga, answer(s, "B", "COMMITTED", action="commit"))
    assert d.result.outcome is OrderOutcome.ORDER_COMMITTED and d.result.event_id == "c1"
    again = sg.decide(d.saga, sg.CommitOrder("c2", "o1", T0 + 6))
    assert again.result.outcome is OrderOutcome.ORDER_COMMITTED and again.result.duplicate
    assert again.sends == () and not again.changed
    cancel = sg.decide(d.saga, sg.CancelOrder("x", "o1", T0 + 7))
    assert cancel.result.outcome is OrderOutcome.ORDER_INVALID_STATE
    assert cancel.result.reason == "order is COMMITTED"


def test_cancel_releases_every_line():
    s = _reserved()
    d = sg.decide(s, sg.CancelOrder("x1", "o1", T0 + 5))
    assert [c.event_id for c in d.sends] == ["o1:A:release", "o1:B:release"]
    assert all(c.reason == "order cancelled" for c in d.sends)
    d = run(
        d.saga,
        answer(s, "A", "RELEASED", action="release"),
        answer(s, "B", "RELEASED", action="release"),
    )
    assert d.result.outcome is OrderOutcome.ORDER_CANCELLED and d.result.event_id == "x1"
    commit = sg.decide(d.saga, sg.CommitOrder("c1", "o1", T0 + 6))
    assert commit.result.outcome is OrderOutcome.ORDER_INVALID_STATE


def test_cancel_while_reserving_waits_for_each_reserve_answer_before_releasing():
    s = sg.decide(None, place(), grace_ms=GRACE).saga
    d = sg.decide(s, sg.CancelOrder("x1", "o1", T0 + 1))
    # never release a line the ledger has not answered: the release could overtake the
    # reserve and leave a hold behind
    assert d.sends == ()
    assert {type(c) for c in sg.outstanding(d.saga)} == {core.ReserveStock}
    d = sg.decide(d.saga, answer(s, "A", "RESERVED"))
    assert [c.event_id for c in d.sends] == ["o1:A:release"]
    d = run(d.saga, answer(s, "B", "REJECTED"), answer(s, "A", "RELEASED", action="release"))
    assert d.result.outcome is OrderOutcome.ORDER_CANCELLED
    assert d.saga.first_result.outcome is OrderOutcome.ORDER_CANCELLED


def test_commit_while_reserving_is_refused_without_effect():
    s = sg.decide(None, place(), grace_ms=GRACE).saga
    d = sg.decide(s, sg.CommitOrder("c1", "o1", T0 + 1))
    assert d.result.outcome is OrderOutcome.ORDER_INVALID_STATE and d.saga == s


def test_commit_past_expiry_expires_the_order_instead():
    s = _reserved()
    d = sg.decide(s, sg.CommitOrder("c1", "o1", T0 + TTL))
    assert all(isinstance(c, core.ReleaseReservation) for c in d.sends)
    d = run(
        d.saga,
        answer(s, "A", "RELEASED", action="release"),
        answer(s, "B", "RELEASED", action="release"),
    )
    assert d.result.outcome is OrderOutcome.ORDER_EXPIRED and d.result.event_id == "c1"


def test_expiry_command_before_the_expiry_does_nothing_after_it_releases():
    s = _reserved()
    early = sg.decide(s, sg.ExpireOrder("o1:expire", "o1", T0 + TTL - 1))
    assert early.saga == s and early.result is None and not early.changed
    assert not sg.due_for_expiry(s, T0 + TTL - 1) and sg.due_for_expiry(s, T0 + TTL)
    d = sg.decide(s, sg.ExpireOrder("o1:expire", "o1", T0 + TTL))
    assert d.saga.status is OrderStatus.RELEASING and len(d.sends) == 2
    assert all(c.occurred_at == T0 + TTL and c.reason == "order expired" for c in d.sends)
    again = sg.decide(d.saga, sg.ExpireOrder("o1:expire", "o1", T0 + TTL + 5))
    assert again.result is None and again.sends == ()


def test_expiry_of_a_committed_order_does_nothing():
    s = _reserved()
    s = sg.decide(s, sg.CommitOrder("c1", "o1", T0 + 1)).saga
    assert not sg.due_for_expiry(s, T0 + TTL * 10)
    d = sg.decide(s, sg.ExpireOrder("e", "o1", T0 + TTL * 10))
    assert d.result is None and d.sends == ()


def test_duplicate_place_answers_the_first_outcome_with_the_current_status():
    s = sg.decide(None, place(), grace_ms=GRACE).saga
    while_reserving = sg.decide(s, place(eid="p-again"))
    assert while_reserving.result is None and while_reserving.sends == ()
    s = _reserved()
    s = sg.decide(s, sg.CommitOrder("c1", "o1", T0 + 1)).saga
    d = sg.decide(s, place(eid="p-again", lines=(("Z", 9),)))
    assert d.result.outcome is OrderOutcome.ORDER_RESERVED and d.result.duplicate
    assert d.result.event_id == "p-again" and d.result.status is OrderStatus.COMMITTING
    assert [x.sku for x in d.saga.lines] == ["A", "B"] and d.sends == ()


def test_unknown_order_commands():
    d = sg.decide(None, sg.CommitOrder("c1", "nope", T0))
    assert d.unknown_order and d.result.outcome is OrderOutcome.ORDER_UNKNOWN
    assert d.result.status is None and d.saga is None
    d = sg.decide(None, sg.CancelOrder("x1", "nope", T0))
    assert d.unknown_order
    assert sg.decide(None, sg.ExpireOrder("e", "nope", T0)).result is None
    r = sg.LineResult("nope:A:reserve", "nope", "A", "RESERVED", 1, 0, T0)
    assert sg.decide(None, r).saga is None


def test_answers_not_for_this_saga_or_repeated_change_nothing():
    s = sg.decide(None, place(), grace_ms=GRACE).saga
    foreign = sg.LineResult("someone-else", "o1", "A", "RESERVED", 1, 0, T0)
    assert sg.decide(s, foreign).saga == s
    other_sku = sg.LineResult("o1:Q:reserve", "o1", "Q", "RESERVED", 1, 0, T0)
    assert sg.decide(s, other_sku).saga == s
    d = sg.decide(s, answer(s, "A", "RESERVED"))
    repeat = sg.decide(d.saga, answer(s, "A", "RESERVED"))
    assert repeat.saga == d.saga and not repeat.changed
    with pytest.raises(ValueError):
        sg.decide(s, sg.CommitOrder("c", "o2", T0))


def test_ledger_side_expiry_during_an_outage_is_recognised():
    s = _reserved()
    d = sg.decide(s, sg.ExpireOrder("e", "o1", T0 + TTL))
    # the ledger had expired A itself: a release is answered INVALID_STATE, nothing is held
    d = run(
        d.saga,
        answer(s, "A", "INVALID_STATE", action="release", reason="reservation is EXPIRED"),
        answer(s, "B", "RELEASED", action="release"),
    )
    assert d.result.outcome is OrderOutcome.ORDER_EXPIRED
    # a commit whose hold the ledger had already expired cannot commit that line
    s = sg.decide(_reserved(), sg.CommitOrder("c1", "o1", T0 + 1)).saga
    d = run(
        s,
        answer(s, "A", "COMMITTED", action="commit"),
        answer(s, "B", "INVALID_STATE", action="commit", reason="reservation is EXPIRED"),
    )
    assert d.result.outcome is OrderOutcome.ORDER_COMMIT_FAILED
    assert "B" in d.result.reason


def test_duplicate_reserve_answer_reporting_a_closed_hold_expires_a_holding_order():
    s = sg.decide(None, place(), grace_ms=GRACE).saga
    d = run(s, answer(s, "A", "RESERVED"), answer(s, "B", "EXPIRED"))
    assert d.saga.goal is sg.Goal.RELEASE and d.saga.close_reason == "expired"
    assert [c.event_id for c in d.sends] == ["o1:A:release"]


def test_long_ids_give_bounded_deterministic_ledger_event_ids():
    eid = sg.line_event_id("o" * 100, "S" * 64, "release")
    assert len(eid) <= 128 and eid == sg.line_event_id("o" * 100, "S" * 64, "release")
    assert eid != sg.line_event_id("o" * 100, "S" * 63 + "T", "release")
    assert sg.line_event_id("o1", "A", "commit") == "o1:A:commit"


def test_stored_layout_round_trips_every_state():
    s = _reserved()
    d = sg.decide(s, sg.CommitOrder("c1", "o1", T0 + 1))
    stored = StoredSaga(d.saga, {"t": 4}, [result_to_dict(s.first_result)], 123)
    back = StoredSaga.from_bytes(stored.to_bytes())
    assert back == stored and back.applied("t", 4) and not back.applied("t", 5)
    assert back.view()["outstanding"] == 2
    rej = run(
        sg.decide(None, place(), grace_ms=GRACE).saga,
        answer(s, "A", "REJECTED", avail=0),
        answer(s, "B", "REJECTED", avail=1),
    )
    assert StoredSaga.from_bytes(StoredSaga(rej.saga).to_bytes()).saga == rej.saga


def test_result_dicts_fit_the_avro_schema():
    from schemas.codec import AvroCodec

    codec = AvroCodec()
    s = _reserved()
    for r in (s.first_result, sg.decide(None, sg.CommitOrder("c", "x", T0)).result):
        name, back = codec.decode(codec.encode("OrderResult", result_to_dict(r)))
        assert name == "OrderResult" and back == result_to_dict(r)


# --------------------------------------------------------------------------- validation

LIMITS = validation.Limits.of(Settings(max_qty=100, max_sku_len=8))


def rec(**kw):
    base = {
        "event_id": "e1",
        "order_id": "o1",
        "channel": "web",
        "lines": [{"sku": "A", "qty": 1}],
        "ttl_ms": 0,
        "occurred_at": T0,
    }
    base.update(kw)
    return base


def test_valid_place_order():
    cmd = validation.to_order_command(b"o1", "PlaceOrder", rec(), LIMITS)
    assert cmd == sg.PlaceOrder("e1", "o1", (("A", 1),), T0, "web", LIMITS.default_ttl_ms)
    cancel = {"event_id": "e", "order_id": "o1", "occurred_at": T0, "reason": "", "expire": True}
    assert isinstance(
        validation.to_order_command(b"o1", "CancelOrder", cancel, LIMITS), sg.ExpireOrder
    )
    cancel["expire"] = False
    assert validation.to_order_command(b"o1", "CancelOrder", cancel, LIMITS).reason == "cancelled"


@pytest.mark.parametrize(
    ("name", "record", "key", "reason"),
    [
        ("PlaceOrder", rec(lines=[]), b"o1", "no_lines"),
        ("PlaceOrder", rec(lines=[{"sku": "A", "qty": 1}] * 101), b"o1", "too_many_lines"),
        ("PlaceOrder", rec(lines=[{"sku": "A", "qty": 0}]), b"o1", "qty_not_positive"),
        ("PlaceOrder", rec(lines=[{"sku": "A", "qty": -2}]), b"o1", "qty_not_positive"),
        ("PlaceOrder", rec(lines=[{"sku": "A", "qty": 60}] * 2), b"o1", "qty_too_large"),
        ("PlaceOrder", rec(lines=[{"sku": "", "qty": 1}]), b"o1", "empty_sku"),
        ("PlaceOrder", rec(lines=[{"sku": "X" * 9, "qty": 1}]), b"o1", "sku_too_long"),
        ("PlaceOrder", rec(lines=[{"sku": "A\x00", "qty": 1}]), b"o1", "invalid_sku"),
        ("PlaceOrder", rec(order_id=""), b"", "missing_order_id"),
        ("PlaceOrder", rec(order_id="o" * 101), b"o" * 101, "invalid_order_id"),
        ("PlaceOrder", rec(event_id=""), b"o1", "missing_event_id"),
        ("PlaceOrder", rec(occurred_at=0), b"o1", "invalid_occurred_at"),
        ("PlaceOrder", rec(ttl_ms=-5), b"o1", "invalid_ttl"),
        ("PlaceOrder", rec(), b"o2", "key_mismatch"),
        ("ReserveStock", rec(), b"o1", "wrong_topic"),
        ("CommitOrder", {"event_id": "e", "occurred_at": T0}, b"o1", "missing_order_id"),
    ],
)
def test_bad_order_commands_are_dead_lettered(name, record, key, reason):
    with pytest.raises(Invalid) as info:
        validation.to_order_command(key, name, record, LIMITS)
    assert info.value.reason == reason


# --------------------------------------------------------------------------- state machine

SKUS = ("A", "B", "C")


class SagaMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.records: dict[str, core.StockRecord] = {}
        self.holds: dict[tuple[str, str], core.Reservation] = {}
        self.initial: dict[str, int] = defaultdict(int)
        self.sagas: dict[str, sg.Saga] = {}
        self.to_ledger: list[core.OrderCommand] = []
        self.to_saga: list[sg.LineResult] = []
        self.results: dict[str, list[sg.OrderResult]] = defaultdict(list)
        self.n = 0

    # -- plumbing -----------------------------------------------------------------
    def _saga(self, inp) -> sg.SagaDecision:
        d = sg.decide(self.sagas.get(inp.order_id), inp, grace_ms=GRACE)
        if d.saga is not None:
            before = self.sagas.get(inp.order_id)
            if before is not None and not d.changed:
                assert d.saga == before
            self.sagas[inp.order_id] = d.saga
            if d.result is not None:
                self._check_result(d.saga, d.result)
        if d.result is not None:
            self.results[inp.order_id].append(d.result)
        self.to_ledger.extend(d.sends)
        return d

    def _check_result(self, saga: sg.Saga, r: sg.OrderResult) -> None:
        states = {x.state for x in saga.lines}
        if r.duplicate or r.outcome is OrderOutcome.ORDER_INVALID_STATE:
            return
        if r.outcome is OrderOutcome.ORDER_RESERVED:
            assert states == {LineState.RESERVED}
        if r.outcome in (
            OrderOutcome.ORDER_REJECTED,
            OrderOutcome.ORDER_CANCELLED,
            OrderOutcome.ORDER_EXPIRED,
            OrderOutcome.ORDER_COMMIT_FAILED,
        ):
            assert LineState.RESERVED not in states and LineState.PENDING not in states
        if r.outcome is OrderOutcome.ORDER_REJECTED:
            assert sg.failed_lines(r)
        if r.outcome is OrderOutcome.ORDER_COMMITTED:
            assert states == {LineState.COMMITTED}

    def _ledger(self, cmd: core.Command) -> None:
        rec = self.records.get(cmd.sku)
        res = self.holds.get((cmd.sku, cmd.order_id)) if hasattr(cmd, "order_id") else None
        dec = core.decide(rec, cmd, self.now, res)
        self.records[cmd.sku] = dec.record
        if dec.reservation is not None:
            self.holds[(cmd.sku, dec.reservation.order_id)] = dec.reservation
        for e in dec.events:
            if isinstance(e, core.ReservationResult):
                self.to_saga.append(
                    sg.LineResult(
                        e.event_id,
                        e.order_id,
                        e.sku,
                        e.outcome.value,
                        e.qty,
                        e.available,
                        self.now,
                        e.reason,
                        e.duplicate,
                    )
                )

    def _sweep(self) -> None:
        for saga in list(self.sagas.values()):
            if sg.due_for_expiry(saga, self.now):
                self._saga(sg.ExpireOrder(f"{saga.order_id}:expire", saga.order_id, self.now))
            self.to_ledger.extend(sg.outstanding(self.sagas[saga.order_id]))

    # -- rules --------------------------------------------------------------------
    @rule(sku=st.sampled_from(SKUS), qty=st.integers(1, 4))
    def restock(self, sku, qty):
        self.n += 1
        self._ledger(core.RestockReceived(f"r{self.n}", sku, qty, self.now))
        self.initial[sku] += qty

    @rule(
        lines=st.lists(st.tuples(st.sampled_from(SKUS), st.integers(1, 3)), min_size=1, max_size=4),
        ttl=st.sampled_from([1_000, TTL]),
    )
    def place(self, lines, ttl):
        self.n += 1
        oid = f"o{self.n}"
        self._saga(sg.PlaceOrder(f"p{self.n}", oid, tuple(lines), self.now, "web", ttl))

    @precondition(lambda self: self.sagas)
    @rule(data=st.data())
    def place_again(self, data):
        oid = data.draw(st.sampled_from(sorted(self.sagas)))
        first = self.sagas[oid].first_result
        d = self._saga(sg.PlaceOrder(f"dup-{oid}", oid, (("A", 1),), self.now, "web", TTL))
        if first is None:
            assert d.result is None
        else:
            assert d.result.outcome is first.outcome and d.result.duplicate

    @precondition(lambda self: self.sagas)
    @rule(data=st.data())
    def commit(self, data):
        oid = data.draw(st.sampled_from(sorted(self.sagas)))
        self.n += 1
        self._saga(sg.CommitOrder(f"c{self.n}", oid, self.now))

    @precondition(lambda self: self.sagas)
    @rule(data=st.data())
    def cancel(self, data):
        oid = data.draw(st.sampled_from(sorted(self.sagas)))
        self.n += 1
        self._saga(sg.CancelOrder(f"x{self.n}", oid, self.now))

    @precondition(lambda self: self.to_ledger)
    @rule(i=st.integers(0, 1000), dup=st.booleans())
    def deliver_to_ledger(self, i, dup):
        idx = i % len(self.to_ledger)
        cmd = self.to_ledger[idx] if dup else self.to_ledger.pop(idx)
        self._ledger(cmd)

    @precondition(lambda self: self.to_saga)
    @rule(i=st.integers(0, 1000), dup=st.booleans())
    def deliver_to_saga(self, i, dup):
        idx = i % len(self.to_saga)
        ans = self.to_saga[idx] if dup else self.to_saga.pop(idx)
        self._saga(ans)

    @precondition(lambda self: self.to_ledger or self.to_saga)
    @rule(i=st.integers(0, 1000), which=st.booleans())
    def lose(self, i, which):
        """A crash between the table write and the sends (or before an answer landed)."""
        queue = self.to_ledger if (which and self.to_ledger) or not self.to_saga else self.to_saga
        queue.pop(i % len(queue))

    @rule()
    def sweep(self):
        self._sweep()

    @rule(ms=st.sampled_from([100, 1_000, TTL]))
    def tick(self, ms):
        self.now += ms

    @rule()
    def ledger_outage_expiry(self):
        """The saga is down past the grace: the ledger's own sweeper expires its holds."""
        self.now += TTL + GRACE
        for (sku, oid), res in list(self.holds.items()):
            if res.status is core.ReservationStatus.RESERVED and self.now >= res.expires_at:
                self.n += 1
                self._ledger(core.ExpireReservation(f"exp{self.n}", oid, sku, self.now))
        self.to_saga = [a for a in self.to_saga if not a.event_id.startswith("exp")]

    # -- invariants ---------------------------------------------------------------
    @invariant()
    def ledger_never_oversells(self):
        for sku, r in self.records.items():
            assert 0 <= r.reserved <= r.on_hand
            held = sum(
                h.qty
                for (s, _), h in self.holds.items()
                if s == sku and h.status is core.ReservationStatus.RESERVED
            )
            assert held == r.reserved

    @invariant()
    def settled_sagas_need_nothing(self):
        for saga in self.sagas.values():
            if saga.status.final:
                assert sg.outstanding(saga) == ()
            if saga.status is OrderStatus.RESERVED:
                assert {x.state for x in saga.lines} == {LineState.RESERVED}

    @invariant()
    def each_order_settles_at_most_once_per_goal(self):
        for oid, rs in self.results.items():
            firsts = [
                r
                for r in rs
                if not r.duplicate and r.outcome is not OrderOutcome.ORDER_INVALID_STATE
            ]
            outcomes = [r.outcome for r in firsts]
            assert len(outcomes) == len(set(outcomes)), outcomes
            assert len(outcomes) <= 2, outcomes
            if len(outcomes) == 2:
                assert outcomes[0] is OrderOutcome.ORDER_RESERVED
            if firsts:
                assert self.sagas[oid].first_result == firsts[0]

    def teardown(self):
        # drain: deliver everything, sweep (re-sends and expiries) until quiet
        for _ in range(50):
            while self.to_ledger or self.to_saga:
                while self.to_ledger:
                    self._ledger(self.to_ledger.pop(0))
                while self.to_saga:
                    self._saga(self.to_saga.pop(0))
            self._sweep()
            if not self.to_ledger and not self.to_saga:
                break
        else:
            raise AssertionError("the sagas did not settle")
        self._at_rest()

    def _at_rest(self):
        reserved_model: dict[str, int] = defaultdict(int)
        committed_model: dict[str, int] = defaultdict(int)
        for oid, saga in self.sagas.items():
            assert saga.settled, saga
            for line in saga.lines:
                hold = self.holds.get((line.sku, oid))
                if saga.status is OrderStatus.RESERVED:
                    reserved_model[line.sku] += line.qty
                    assert hold is not None and hold.status is core.ReservationStatus.RESERVED
                if line.state is LineState.COMMITTED:
                    committed_model[line.sku] += line.qty
                    assert hold.status is core.ReservationStatus.COMMITTED
                if hold is not None and hold.status is core.ReservationStatus.RESERVED:
                    assert saga.status is OrderStatus.RESERVED, (saga, hold)
                expected = {
                    LineState.RESERVED: {"RESERVED"},
                    LineState.REJECTED: {"REJECTED"},
                    LineState.COMMITTED: {"COMMITTED"},
                    LineState.RELEASED: {"RELEASED", "EXPIRED"},
                }[line.state]
                assert hold is not None and hold.status.value in expected, (line, hold)
            if saga.status is OrderStatus.REJECTED:
                assert any(x.state is LineState.REJECTED for x in saga.lines)
            if saga.status is OrderStatus.COMMITTED:
                assert all(x.state is LineState.COMMITTED for x in saga.lines)
            # every settled order was answered, and its answer is the last state
            last = [r for r in self.results[oid] if not r.duplicate][-1]
            if last.outcome is not OrderOutcome.ORDER_INVALID_STATE:
                assert last.status is saga.status
        for sku in SKUS:
            r = self.records.get(sku, core.StockRecord(sku))
            assert r.reserved == reserved_model[sku], (sku, r, reserved_model)
            assert r.on_hand == self.initial[sku] - committed_model[sku]


SagaMachine.TestCase.settings = hyp_settings(
    max_examples=300, stateful_step_count=60, deadline=None
)
test_saga_state_machine = SagaMachine.TestCase


def test_replace_keeps_saga_frozen():
    s = _reserved()
    with pytest.raises(AttributeError):
        s.status = OrderStatus.EXPIRED  # type: ignore[misc]
    assert replace(s) == s


def test_the_largest_valid_place_order_fits_the_pre_decode_bound() -> None:
    from schemas.codec import AvroCodec
    from schemas.validation import MAX_CHANNEL_LEN, MAX_ID_LEN

    limits = validation.Limits(max_lines=100, max_sku_len=64)
    bound = validation.max_checkout_bytes(limits)
    widest = "\U0001f600"  # 4 bytes in UTF-8
    record = {
        "event_id": widest * MAX_ID_LEN,
        "order_id": widest * MAX_ID_LEN,
        "channel": widest * MAX_CHANNEL_LEN,
        "lines": [{"sku": f"{i:064d}", "qty": 2**31 - 1} for i in range(limits.max_lines)],
        "ttl_ms": -(2**63),
        "occurred_at": -(2**63),
        "customer_id": widest * validation.MAX_TEXT_LEN["customer_id"],
        "location": widest * validation.MAX_TEXT_LEN["location"],
        "split": True,
    }
    size = len(AvroCodec().encode("PlaceOrder", record))
    assert size <= bound
    # and the bound is not loose enough to let a many-times-larger order through
    assert bound < 2 * size
    assert validation.max_checkout_bytes(replace(limits, max_lines=1000)) > 9 * bound // 2


# --------------------------------------------------------------------------- pruning

RETAIN = 5_000


def _finished() -> sg.Saga:
    s = _reserved()
    d = sg.decide(s, sg.CommitOrder("c1", "o1", T0 + 100))
    d = run(
        d.saga,
        answer(s, "A", "COMMITTED", action="commit"),
        answer(s, "B", "COMMITTED", action="commit"),
    )
    assert d.saga.status is OrderStatus.COMMITTED
    return d.saga


def test_a_finished_saga_is_pruned_only_once_its_retention_is_over():
    s = _finished()
    due = sg.prune_due(s, RETAIN)
    assert due == max(s.expires_at, s.placed_at, s.goal_at) + RETAIN
    early = sg.decide(s, sg.PruneOrder("o1:prune", "o1", due - 1), retention_ms=RETAIN)
    assert not early.prune and early.saga == s and early.result is None
    d = sg.decide(s, sg.PruneOrder("o1:prune", "o1", due), retention_ms=RETAIN)
    assert d.prune and d.result is None and d.sends == ()


def test_an_open_saga_an_unknown_one_or_retention_zero_is_never_pruned():
    s = _reserved()
    assert sg.prune_due(s, RETAIN) is None
    d = sg.decide(s, sg.PruneOrder("o1:prune", "o1", T0 + 10**9), retention_ms=RETAIN)
    assert not d.prune and d.saga == s
    assert sg.prune_due(_finished(), 0) is None
    d = sg.decide(_finished(), sg.PruneOrder("o1:prune", "o1", T0 + 10**9), retention_ms=0)
    assert not d.prune
    # no saga: nothing, and no unknown-order answer (the sweeper may send it twice)
    d = sg.decide(None, sg.PruneOrder("o1:prune", "o1", T0 + 10**9), retention_ms=RETAIN)
    assert not d.prune and not d.unknown_order and d.result is None


def test_the_prune_command_is_a_cancel_order_with_expire_and_reason_pruned():
    limits = validation.Limits(max_lines=10, max_qty=100, default_ttl_ms=TTL)
    rec = {"event_id": "o1:prune", "order_id": "o1", "occurred_at": T0, "channel": "system"}
    cmd = validation.to_order_command(
        b"o1", "CancelOrder", {**rec, "expire": True, "reason": "pruned"}, limits
    )
    assert cmd == sg.PruneOrder("o1:prune", "o1", T0)
    expire = validation.to_order_command(b"o1", "CancelOrder", {**rec, "expire": True}, limits)
    assert isinstance(expire, sg.ExpireOrder)
    cancel = validation.to_order_command(b"o1", "CancelOrder", {**rec, "reason": "pruned"}, limits)
    assert isinstance(cancel, sg.CancelOrder)


def test_finished_sagas_are_taken_earliest_first_bounded_and_once():
    from tables.orders import FinishedSagas

    f = FinishedSagas(limit=3)
    done = _finished()
    due = sg.prune_due(done, RETAIN)
    assert due is not None
    for i, shift in enumerate((30, 10, 20, 0)):
        f.note(b"k%d" % i, replace(done, expires_at=done.expires_at + shift), RETAIN)
    assert len(f) == 3  # the fourth waits for a later scan
    f.note(b"k0", _reserved(), RETAIN)  # open again: not prunable
    assert len(f) == 2
    assert f.take_due(due + 15, 10) == [b"k1"]
    assert f.take_due(due + 100, 10) == [b"k2"]
    assert f.take_due(due + 100, 10) == []


def test_an_order_at_a_location_holds_every_line_there_and_keeps_it_when_stored():
    record = rec(location="store-7", split=True)
    cmd = validation.to_order_command(b"o1", "PlaceOrder", record, LIMITS)
    assert (cmd.location, cmd.split) == ("store-7", True)
    d = sg.decide(None, cmd, grace_ms=GRACE)
    assert [(c.location, c.split) for c in d.sends] == [("store-7", True)]
    back = StoredSaga.from_bytes(StoredSaga(d.saga).to_bytes()).saga
    assert (back.location, back.split) == ("store-7", True)
    plain_cmd = validation.to_order_command(b"o1", "PlaceOrder", rec(), LIMITS)
    plain = sg.decide(None, plain_cmd, grace_ms=0)
    assert [(c.location, c.split) for c in plain.sends] == [("", False)]
    with pytest.raises(Invalid) as info:
        validation.to_order_command(b"o1", "PlaceOrder", rec(location="a\x00"), LIMITS)
    assert info.value.reason == "invalid_location"
