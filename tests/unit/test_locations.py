"""Stock per location (pipeline.domain.locations): examples, then a Hypothesis model.

The model runs random restocks, counts, holds (at a named location, by priority,
split or not), releases, commits and transfers (shipped, received in part or
cancelled) over a few locations, and checks after every step: no hold is granted
beyond a location's available units, units are conserved (per location and in
total, transfers included) and no count goes negative.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pipeline.domain import locations as loc
from pipeline.domain.locations import LocationStock, Transfer

A, B, C = "wh-a", "wh-b", "store-c"


def stock(**on_hand: int) -> tuple[LocationStock, ...]:
    out: tuple[LocationStock, ...] = ()
    for name, qty in on_hand.items():
        out = loc.restock(out, name.replace("_", "-"), qty)
    return out


def test_a_named_location_is_the_only_one_used() -> None:
    s = stock(wh_a=5, wh_b=1)
    assert loc.plan_hold(s, 1, at=B) == ((B, 1),)
    assert loc.plan_hold(s, 2, at=B) is None  # wh-a's units are not lent
    assert loc.plan_hold(s, 1, at="nowhere") is None


def test_priority_picks_the_first_location_that_has_it_all() -> None:
    s = stock(wh_a=2, wh_b=5, store_c=9)
    assert loc.plan_hold(s, 2, priority=(B, A)) == ((B, 2),)
    assert loc.plan_hold(s, 6, priority=(B, A)) == ((C, 6),)  # unlisted ones come after
    assert loc.plan_hold(s, 1) == ((C, 1),)  # no priority: by name


def test_split_only_when_asked_and_only_in_full() -> None:
    s = stock(wh_a=2, wh_b=3)
    assert loc.plan_hold(s, 4) is None
    assert loc.plan_hold(s, 4, split=True, priority=(B,)) == ((B, 3), (A, 1))
    assert loc.plan_hold(s, 6, split=True) is None
    assert loc.grantable(s) == 3 and loc.grantable(s, split=True) == 5
    assert loc.grantable(s, at=A) == 2


def test_held_units_are_not_available_and_a_commit_sells_them_where_held() -> None:
    s = stock(wh_a=2, wh_b=3)
    held = loc.plan_hold(s, 4, split=True)
    assert held == ((A, 2), (B, 2))
    s = loc.hold(s, held)
    assert loc.available(s) == 1 and loc.plan_hold(s, 1, at=A) is None
    sold = loc.commit(s, held)
    assert loc.totals(sold) == (1, 0, 0)
    assert loc.totals(loc.release(s, held)) == (5, 0, 0)


def test_safety_stock_of_one_location_lends_nothing_to_another() -> None:
    s = (LocationStock(A, on_hand=3, safety_stock=3), LocationStock(B, on_hand=1))
    assert loc.available(s) == 1
    assert loc.plan_hold(s, 2, split=True) is None


def test_a_transfer_is_at_neither_end_until_it_arrives() -> None:
    s = stock(wh_a=5)
    t = Transfer("t-1", A, C, 4)
    shipped = loc.ship(s, t)
    assert not isinstance(shipped, str)
    assert loc.find(shipped, A) == LocationStock(A, on_hand=1)
    assert loc.find(shipped, C) == LocationStock(C, inbound=4)
    assert loc.plan_hold(shipped, 1, at=C) is None  # inbound units are not sellable
    got = loc.receive(shipped, t, 3)
    assert not isinstance(got, str)
    arrived, lost = got
    assert lost == 1
    assert loc.find(arrived, C) == LocationStock(C, on_hand=3)
    back = loc.cancel_transfer(shipped, t)
    assert loc.totals(back) == (5, 0, 0) and loc.find(back, C) == LocationStock(C)


def test_a_transfer_ships_only_available_units() -> None:
    s = loc.hold(stock(wh_a=5), ((A, 3),))
    assert isinstance(loc.ship(s, Transfer("t", A, B, 3)), str)
    assert isinstance(loc.ship(s, Transfer("t", A, A, 1)), str)
    assert isinstance(loc.ship(s, Transfer("t", A, B, 0)), str)
    assert not isinstance(loc.ship(s, Transfer("t", A, B, 2)), str)
    assert isinstance(loc.receive(s, Transfer("t", A, B, 2), 3), str)


def test_a_count_below_the_holds_reports_the_shortfall() -> None:
    s = loc.hold(stock(wh_a=5), ((A, 3),))
    counted, short = loc.count(s, A, 1)
    assert short == 2 and loc.find(counted, A) == LocationStock(A, on_hand=1, reserved=3)
    assert loc.available(counted) == 0
    assert loc.count(s, B, 4)[0][-1] == LocationStock(B, on_hand=4)


def test_consistent_names_what_is_wrong() -> None:
    assert loc.consistent(stock(wh_a=1, wh_b=2)) == ""
    assert "twice" in loc.consistent((LocationStock(A), LocationStock(A)))
    assert "negative" in loc.consistent((LocationStock(A, inbound=-1),))
    assert loc.consistent((LocationStock(A, on_hand=-1),)) == ""  # sold after a shortfall


NAMES = st.sampled_from([A, B, C])


class LocationModel(RuleBasedStateMachine):
    """Random operations against the rules, with the units each location must hold
    recomputed from the operations alone."""

    def __init__(self) -> None:
        super().__init__()
        self.s: tuple[LocationStock, ...] = ()
        self.holds: list[loc.Hold] = []
        self.transfers: list[Transfer] = []
        self.n = 0
        # units that entered or left, per location (restock, count, sale, transfer)
        self.expected_on_hand = {A: 0, B: 0, C: 0}
        self.expected_inbound = {A: 0, B: 0, C: 0}

    def _reserved_at(self, name: str) -> int:
        return sum(u for h in self.holds for where, u in h if where == name)

    @rule(name=NAMES, qty=st.integers(1, 6))
    def restock(self, name: str, qty: int) -> None:
        self.s = loc.restock(self.s, name, qty)
        self.expected_on_hand[name] += qty

    @rule(name=NAMES, on_hand=st.integers(0, 8))
    def count(self, name: str, on_hand: int) -> None:
        before = loc.find(self.s, name) or LocationStock(name)
        self.s, short = loc.count(self.s, name, on_hand)
        assert short == max(0, before.reserved - on_hand)
        self.expected_on_hand[name] = on_hand

    @rule(
        qty=st.integers(1, 8),
        at=st.one_of(st.just(""), NAMES),
        priority=st.permutations([A, B, C]),
        split=st.booleans(),
    )
    def reserve(self, qty: int, at: str, priority: list[str], split: bool) -> None:
        before = {x.location: x.available for x in self.s}
        plan = loc.plan_hold(self.s, qty, at=at, priority=priority, split=split)
        if plan is None:
            assert loc.grantable(self.s, at=at, split=split) < qty
            return
        assert sum(u for _, u in plan) == qty
        assert len({w for w, _ in plan}) == len(plan)
        for where, units in plan:
            assert units <= before.get(where, 0), (plan, before)  # never oversold
            if at:
                assert where == at
        if not split:
            assert len(plan) == 1
        self.s = loc.hold(self.s, plan)
        self.holds.append(plan)

    @precondition(lambda self: self.holds)
    @rule(i=st.integers(0, 100), sell=st.booleans())
    def close(self, i: int, sell: bool) -> None:
        plan = self.holds.pop(i % len(self.holds))
        if sell:
            self.s = loc.commit(self.s, plan)
            for where, units in plan:
                self.expected_on_hand[where] -= units
        else:
            self.s = loc.release(self.s, plan)

    @rule(src=NAMES, dst=NAMES, qty=st.integers(1, 6))
    def ship(self, src: str, dst: str, qty: int) -> None:
        self.n += 1
        t = Transfer(f"t-{self.n}", src, dst, qty)
        have = (loc.find(self.s, src) or LocationStock(src)).available
        got = loc.ship(self.s, t)
        if isinstance(got, str):
            assert src == dst or have < qty
            return
        assert src != dst and have >= qty
        self.s = got
        self.transfers.append(t)
        self.expected_on_hand[src] -= qty
        self.expected_inbound[dst] += qty

    @precondition(lambda self: self.transfers)
    @rule(i=st.integers(0, 100), part=st.integers(0, 6), cancel=st.booleans())
    def arrive(self, i: int, part: int, cancel: bool) -> None:
        t = self.transfers.pop(i % len(self.transfers))
        self.expected_inbound[t.destination] -= t.qty
        if cancel:
            self.s = loc.cancel_transfer(self.s, t)
            self.expected_on_hand[t.source] += t.qty
            return
        got = loc.receive(self.s, t, min(part, t.qty))
        assert not isinstance(got, str)
        self.s, lost = got
        assert lost == t.qty - min(part, t.qty)
        self.expected_on_hand[t.destination] += t.qty - lost

    @invariant()
    def conserved(self) -> None:
        assert loc.consistent(self.s) == "", self.s
        for name in (A, B, C):
            x = loc.find(self.s, name) or LocationStock(name)
            assert x.on_hand == self.expected_on_hand[name], (name, self.s)
            assert x.inbound == self.expected_inbound[name], (name, self.s)
            assert x.reserved == self._reserved_at(name), (name, self.s, self.holds)
        assert [x.location for x in self.s] == sorted(x.location for x in self.s)


LocationModel.TestCase.settings = settings(max_examples=120, stateful_step_count=30, deadline=None)
TestLocationModel = LocationModel.TestCase
