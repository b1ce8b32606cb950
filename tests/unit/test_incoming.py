"""Incoming stock and backorders (pipeline.domain.incoming): examples, then a Hypothesis
model.

The model runs random purchase orders (expected, changed, received in parts, closed
short or cancelled, arrivals naming unknown ones), backorders of random sizes, cap
changes and cancelled backorders, and checks after every step: promises stay within
the cap and within each purchase order's open incoming plus its staged units, every
conversion is first-placed-first-served, units are conserved (each settlement and in
total), and every backorder ends exactly once (converted, released with its purchase
order's reason, or cancelled), before its purchase order ends.
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pipeline.domain import incoming as inc
from pipeline.domain.incoming import Backorder, Incoming, POStatus, PurchaseOrder, Settlement

T0 = 1_700_000_000_000
DAY = 86_400_000


def ok(got: Settlement | str) -> Settlement:
    assert not isinstance(got, str), got
    return got


def placed(state: Incoming, order_id: str, qty: int, at: int = T0) -> tuple[Incoming, Backorder]:
    got = inc.backorder(state, order_id, qty, at)
    assert not isinstance(got, str), got
    return got


def with_po(*pos: tuple[str, int, int], cap: int = 100) -> Incoming:
    state = Incoming(cap=cap)
    for po_id, qty, at in pos:
        state = ok(inc.expect(state, po_id, qty, at)).incoming
    return state


def po_of(state: Incoming, po_id: str) -> PurchaseOrder:
    po = inc.find_po(state, po_id)
    assert po is not None, po_id
    return po


def names(bs: tuple[Backorder, ...]) -> list[str]:
    return [b.order_id for b in bs]


def balanced(s: Settlement) -> None:
    assert s.received == s.held + s.staged_change + s.free, s
    assert s.held == sum(b.qty for b in s.converted)


# -- expect ------------------------------------------------------------------


def test_expect_adds_and_updates_a_purchase_order_idempotently() -> None:
    s = with_po(("po-1", 10, T0 + DAY))
    assert inc.find_po(s, "po-1") == PurchaseOrder("po-1", 10, T0 + DAY)
    assert inc.open_incoming(s) == 10
    again = ok(inc.expect(s, "po-1", 10, T0 + DAY))
    assert again.incoming == s and again.converted == () and again.released == ()
    later = ok(inc.expect(s, "po-1", 12, T0 + 2 * DAY)).incoming
    assert inc.find_po(later, "po-1") == PurchaseOrder("po-1", 12, T0 + 2 * DAY)


def test_expect_refuses_what_makes_no_purchase_order() -> None:
    s = with_po(("po-1", 10, T0))
    assert isinstance(inc.expect(s, "", 5, T0), str)
    assert isinstance(inc.expect(s, "po-2", -1, T0), str)
    assert isinstance(inc.expect(s, "po-2", 0, T0), str)
    ended = ok(inc.close(s, "po-1", cancelled=True)).incoming
    assert "CANCELLED" in str(inc.expect(ended, "po-1", 10, T0))  # an id is not used again


def test_a_sku_keeps_a_bounded_number_of_purchase_orders() -> None:
    s = Incoming()
    for i in range(inc.MAX_PURCHASE_ORDERS_PER_SKU):
        s = ok(inc.expect(s, f"po-{i}", 1, T0 + i)).incoming
    assert isinstance(inc.expect(s, "one-more", 1, T0), str)  # all open: refused
    s = ok(inc.close(s, "po-3")).incoming
    s = ok(inc.expect(s, "one-more", 1, T0)).incoming  # the oldest ended one makes room
    ids = [po.po_id for po in s.orders]
    assert "po-3" not in ids and ids[-1] == "one-more"
    assert len(ids) == inc.MAX_PURCHASE_ORDERS_PER_SKU and inc.consistent(s) == ""


# -- backorder ------------------------------------------------------------------


def test_a_backorder_is_refused_with_a_reason() -> None:
    assert inc.backorder(with_po(("po-1", 10, T0), cap=0), "o", 1, T0) == inc.BACKORDERS_OFF
    assert inc.backorder(Incoming(cap=5), "o", 1, T0) == inc.NO_INCOMING
    s = with_po(("po-1", 10, T0), ("po-2", 4, T0), cap=12)
    assert inc.backorder(s, "o", 13, T0) == inc.BACKORDER_CAP
    assert inc.backorder(s, "o", 11, T0) == inc.INCOMING_SHORT  # never split over two POs
    s, _ = placed(s, "o", 3)
    assert inc.backorder(s, "o", 1, T0) == inc.ALREADY_BACKORDERED
    assert isinstance(inc.backorder(s, "p", 0, T0), str)
    assert inc.backorderable(s) == 7  # po-1's room (the cap leaves 9)
    assert inc.backorder(s, "p", 8, T0) == inc.INCOMING_SHORT
    assert inc.backorder(s, "p", 10, T0) == inc.BACKORDER_CAP


def test_a_backorder_waits_on_the_purchase_order_expected_first_with_room() -> None:
    s = with_po(("late", 10, T0 + 9 * DAY), ("soon", 3, T0 + DAY), ("tie", 3, T0 + DAY))
    s, a = placed(s, "a", 3)
    assert a.po_id == "soon" and a.seq == 0
    s, b = placed(s, "b", 2)
    assert b.po_id == "tie" and b.seq == 1  # "soon" has no room left
    s, c = placed(s, "c", 4)
    assert c.po_id == "late"
    assert s.promised == 9 and inc.open_incoming(s) == 16 and inc.backorderable(s) == 6
    assert inc.consistent(s) == ""


def test_a_lower_cap_keeps_the_promises_made() -> None:
    s, _ = placed(with_po(("po-1", 10, T0), cap=8), "a", 6)
    lower = inc.set_cap(s, 2)
    assert not isinstance(lower, str)
    assert lower.promised == 6 and inc.backorderable(lower) == 0
    assert inc.backorder(lower, "b", 1, T0) == inc.BACKORDER_CAP
    assert isinstance(inc.set_cap(s, -1), str)


def test_backorders_are_bounded_per_sku() -> None:
    n = inc.MAX_BACKORDERS_PER_SKU
    s = with_po(("po-1", n + 1, T0), cap=n + 1)
    for i in range(n):
        s, _ = placed(s, f"o-{i}", 1)
    assert inc.backorderable(s) == 0
    assert inc.backorder(s, "one-more", 1, T0) == inc.BACKORDER_LIMIT


# -- arrive ------------------------------------------------------------------


def test_arrivals_convert_whole_backorders_in_the_order_placed() -> None:
    s = with_po(("po-1", 10, T0))
    s, _ = placed(s, "a", 6)
    s, _ = placed(s, "b", 3)
    first = ok(inc.arrive(s, "po-1", 4))
    balanced(first)
    # 4 units cannot cover a's 6: none converts, b (which they would cover) waits behind
    # a, and the 4 are set aside for a, not sellable
    assert first.converted == () and first.staged_change == 4 and first.free == 0
    po = po_of(first.incoming, "po-1")
    assert po.staged == 4 and names(po.backorders) == ["a", "b"]
    second = ok(inc.arrive(first.incoming, "po-1", 5))
    balanced(second)
    assert names(second.converted) == ["a", "b"] and second.held == 9
    assert second.staged_change == -4 and second.free == 0
    po = po_of(second.incoming, "po-1")
    assert po.status is POStatus.OPEN and po.open == 1
    last = ok(inc.arrive(second.incoming, "po-1", 1))
    balanced(last)
    assert last.free == 1 and last.converted == ()
    assert inc.find_po(last.incoming, "po-1") == PurchaseOrder(
        "po-1", 10, T0, received=10, status=POStatus.RECEIVED
    )


def test_units_beyond_the_promises_are_free_on_hand() -> None:
    s, _ = placed(with_po(("po-1", 10, T0)), "a", 2)
    got = ok(inc.arrive(s, "po-1", 12))  # over-delivered
    balanced(got)
    assert names(got.converted) == ["a"] and got.free == 10
    po = po_of(got.incoming, "po-1")
    assert po.status is POStatus.RECEIVED and po.open == 0


def test_an_arrival_no_purchase_order_expects_is_all_free_on_hand() -> None:
    s = with_po(("po-1", 10, T0))
    got = ok(inc.arrive(s, "po-9", 5))
    assert (got.incoming, got.free, got.note) == (s, 5, inc.UNKNOWN_PO)
    ended = ok(inc.close(s, "po-1")).incoming
    late = ok(inc.arrive(ended, "po-1", 3))
    assert (late.incoming, late.free, late.note) == (ended, 3, inc.PO_ENDED)
    assert isinstance(inc.arrive(s, "po-1", -1), str)


def test_a_final_arrival_closes_short() -> None:
    s = with_po(("po-1", 10, T0))
    s, _ = placed(s, "a", 3)
    s, _ = placed(s, "b", 5)
    s, _ = placed(s, "c", 2)
    got = ok(inc.arrive(s, "po-1", 6, final=True))
    balanced(got)
    # 6 units: a (3) fits, b (5) does not, c (2) fits in what b leaves
    assert names(got.converted) == ["a", "c"] and got.free == 1
    assert [(r.backorder.order_id, r.reason) for r in got.released] == [("b", inc.PO_SHORT)]
    po = po_of(got.incoming, "po-1")
    assert po.status is POStatus.RECEIVED and po.backorders == ()


# -- close, cut, cancel ---------------------------------------------------------


def test_a_short_close_gives_staged_units_to_the_backorders_that_fit() -> None:
    s = with_po(("po-1", 10, T0))
    s, _ = placed(s, "a", 6)
    s, _ = placed(s, "b", 4)
    s = ok(inc.arrive(s, "po-1", 5)).incoming  # 5 staged for a
    got = ok(inc.close(s, "po-1"))
    balanced(got)
    assert [(r.backorder.order_id, r.reason) for r in got.released] == [("a", inc.PO_SHORT)]
    assert names(got.converted) == ["b"] and got.staged_change == -5 and got.free == 1
    assert inc.consistent(got.incoming) == ""
    assert isinstance(inc.close(got.incoming, "po-1"), str)
    assert inc.close(got.incoming, "po-9") == inc.UNKNOWN_PO


def test_a_cancelled_purchase_order_releases_every_backorder_it_cannot_cover() -> None:
    s = with_po(("po-1", 10, T0), ("po-2", 10, T0 + DAY))
    s, _ = placed(s, "a", 6)
    s, _ = placed(s, "b", 4)
    s, _ = placed(s, "other", 4)  # on po-2: untouched
    s = ok(inc.arrive(s, "po-1", 2)).incoming
    got = ok(inc.close(s, "po-1", cancelled=True))
    balanced(got)
    assert [(r.backorder.order_id, r.reason) for r in got.released] == [
        ("a", inc.PO_CANCELLED),
        ("b", inc.PO_CANCELLED),
    ]
    assert got.converted == () and got.free == 2
    po = po_of(got.incoming, "po-1")
    assert po.status is POStatus.CANCELLED and po.received == 2
    assert names(po_of(got.incoming, "po-2").backorders) == ["other"]


def test_a_cut_releases_in_the_order_placed_keeping_those_that_fit() -> None:
    s = with_po(("po-1", 11, T0))
    s, _ = placed(s, "a", 6)
    s, _ = placed(s, "b", 4)
    s, _ = placed(s, "c", 1)
    got = ok(inc.expect(s, "po-1", 7, T0 + DAY))
    balanced(got)
    assert [(r.backorder.order_id, r.reason) for r in got.released] == [("b", inc.PO_SHORT)]
    po = po_of(got.incoming, "po-1")
    assert names(po.backorders) == ["a", "c"] and po.status is POStatus.OPEN
    # cut to what was received: the purchase order is complete
    done = ok(inc.arrive(got.incoming, "po-1", 2)).incoming
    end = ok(inc.expect(done, "po-1", 2, T0 + DAY))
    balanced(end)
    # the 2 units received cannot cover a (6): released; c (1) is covered; 1 is free
    assert [r.backorder.order_id for r in end.released] == ["a"]
    assert names(end.converted) == ["c"] and end.free == 1
    assert po_of(end.incoming, "po-1").status is POStatus.RECEIVED


def test_cancelling_a_backorder_gives_its_promise_back() -> None:
    s = with_po(("po-1", 10, T0), cap=10)
    s, _ = placed(s, "a", 6)
    s, _ = placed(s, "b", 4)
    assert inc.backorderable(s) == 0
    s = ok(inc.arrive(s, "po-1", 5)).incoming  # 5 staged for a
    got = ok(inc.cancel(s, "a"))
    balanced(got)
    # b (4) is now first and the 5 staged units cover it; 1 is free
    assert names(got.converted) == ["b"] and got.staged_change == -5 and got.free == 1
    assert inc.find_backorder(got.incoming, "a") is None
    assert inc.backorderable(got.incoming) == 5
    assert isinstance(inc.cancel(got.incoming, "a"), str)


def test_cancelling_a_later_backorder_leaves_the_staged_units_to_the_first() -> None:
    s = with_po(("po-1", 10, T0))
    s, _ = placed(s, "a", 6)
    s, _ = placed(s, "b", 4)
    s = ok(inc.arrive(s, "po-1", 3)).incoming
    got = ok(inc.cancel(s, "b"))
    balanced(got)
    assert got.converted == () and got.staged_change == 0 and got.free == 0
    po = po_of(got.incoming, "po-1")
    assert po.staged == 3 and names(po.backorders) == ["a"]


def test_consistent_names_what_is_wrong() -> None:
    b = Backorder("a", 4, "po-1", 0, T0)
    good = Incoming((PurchaseOrder("po-1", 10, T0, backorders=(b,)),), cap=10, placed=1)
    assert inc.consistent(good) == ""
    po = good.orders[0]
    assert "twice" in inc.consistent(Incoming((po, po), placed=1))
    assert "promised" in inc.consistent(
        Incoming((PurchaseOrder("po-1", 3, T0, backorders=(b,)),), placed=1)
    )
    staged = PurchaseOrder("po-1", 10, T0, received=4, staged=4, backorders=(b,))
    assert "cover" in inc.consistent(Incoming((staged,), placed=1))
    ended = PurchaseOrder("po-1", 10, T0, status=POStatus.RECEIVED, backorders=(b,))
    assert "RECEIVED" in inc.consistent(Incoming((ended,), placed=1))
    assert "staged for no" in inc.consistent(Incoming((PurchaseOrder("p", 9, T0, staged=1),)))
    assert "order placed" in inc.consistent(Incoming((po,), placed=0))


# -- the model -------------------------------------------------------------------

WHICH = st.sampled_from(("open",) * 8 + ("ended", "unknown"))
"""Which purchase order a step names: mostly an open one."""


class IncomingModel(RuleBasedStateMachine):
    """Random operations against the rules, with every backorder's fate and every
    unit's whereabouts kept by the model from the settlements alone."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Incoming()
        self.n = 0
        self.pos = 0  # purchase orders made up so far
        self.granted = 0  # backorders placed (each one's seq)
        self.cap_floor = 0  # promises made before the last cap change (may pass a lower cap)
        self.waiting: dict[str, Backorder] = {}
        self.fate: dict[str, str] = {}  # order_id -> converted / released:<reason> / cancelled
        self.arrived = 0  # every unit that arrived
        self.held = 0  # units converted backorders hold
        self.free = 0  # units that became free on hand
        self.received: dict[str, int] = {}  # per purchase order the rules accepted

    def _end(self, order_id: str, fate: str) -> None:
        assert order_id in self.waiting, (order_id, self.fate.get(order_id))
        assert order_id not in self.fate
        del self.waiting[order_id]
        self.fate[order_id] = fate

    def _apply(self, got: Settlement) -> None:
        balanced(got)
        before = self.waiting.copy()
        for r in got.released:
            po = inc.find_po(got.incoming, r.backorder.po_id)
            assert po is not None
            want = inc.PO_CANCELLED if po.status is POStatus.CANCELLED else inc.PO_SHORT
            assert r.reason == want
            self._end(r.backorder.order_id, f"released:{r.reason}")
        for b in got.converted:
            assert before[b.order_id] == b
            self._end(b.order_id, "converted")
        # first placed, first served: nothing placed before a converted backorder on its
        # purchase order is still waiting
        for b in got.converted:
            assert not any(w.po_id == b.po_id and w.seq < b.seq for w in self.waiting.values())
        self.s = got.incoming
        self.arrived += got.received
        self.held += got.held
        self.free += got.free

    @initialize(
        cap=st.integers(5, 30),
        expected=st.lists(st.integers(4, 20), min_size=1, max_size=2),
    )
    def start(self, cap: int, expected: list[int]) -> None:
        # most runs take backorders against a purchase order or two from the start
        self.set_cap(cap)
        for i, qty in enumerate(expected):
            self.expect(True, "open", 0, qty, i)

    def _pick(self, which: str, pick: int) -> str:
        """One of the SKU's open or ended purchase orders, or one it never heard of."""
        ids = [po.po_id for po in self.s.orders if po.status.is_open == (which == "open")]
        return ids[pick % len(ids)] if ids and which != "unknown" else "po-x"

    @rule(qtys=st.lists(st.integers(1, 5), min_size=1, max_size=3))
    def backorder(self, qtys: list[int]) -> None:
        """A few orders in a row ask for backorders (a queue builds up behind the first)."""
        for qty in qtys:
            self._backorder(qty)

    def _backorder(self, qty: int) -> None:
        self.n += 1
        order_id = f"o-{self.n}"
        could = inc.backorderable(self.s)
        before = self.s.orders
        got = inc.backorder(self.s, order_id, qty, T0 + self.n, customer_id="c")
        if isinstance(got, str):
            assert qty > could, (got, qty, could)
            return
        assert qty <= could
        self.s, b = got
        assert (b.order_id, b.qty, b.seq) == (order_id, qty, self.granted)
        self.granted += 1
        # the purchase order expected first among those with room for all of it
        fits = [po for po in before if po.room >= qty]
        first = min(fits, key=lambda p: (p.expected_at, p.po_id))
        assert b.po_id == first.po_id
        assert self.s.promised <= self.s.cap  # a new promise never passes the cap
        self.waiting[order_id] = b

    @rule(
        which=WHICH,
        pick=st.integers(0, 99),
        qty=st.integers(0, 4),
        end=st.sampled_from(("",) * 7 + ("final", "short", "cancel")),
    )
    def deliver(self, which: str, pick: int, qty: int, end: str) -> None:
        """An arrival (the last one when ``final``), or the purchase order closed short or
        cancelled."""
        po_id = self._pick(which, pick)
        po = inc.find_po(self.s, po_id)
        if end in ("short", "cancel"):
            got = inc.close(self.s, po_id, cancelled=end == "cancel")
            if isinstance(got, str):
                assert po is None or not po.status.is_open
                return
            assert got.received == 0
        else:
            got = inc.arrive(self.s, po_id, qty, final=end == "final")
            assert not isinstance(got, str)
            if po is None or not po.status.is_open:
                assert got.note and got.free == qty and got.incoming == self.s
            else:
                self.received[po_id] += qty
        self._apply(got)
        after = inc.find_po(self.s, po_id)
        if end and po is not None and po.status.is_open:
            assert after is not None and after.status is (
                POStatus.CANCELLED if end == "cancel" else POStatus.RECEIVED
            )

    @precondition(lambda self: self.waiting)
    @rule(i=st.integers(0, 100))
    def cancel(self, i: int) -> None:
        order_id = sorted(self.waiting)[i % len(self.waiting)]
        got = inc.cancel(self.s, order_id)
        assert not isinstance(got, str)
        self._end(order_id, "cancelled")
        self._apply(got)
        assert isinstance(inc.cancel(self.s, order_id), str)

    @rule(
        new=st.booleans(),
        which=WHICH,
        pick=st.integers(0, 99),
        qty=st.integers(0, 20),
        at=st.integers(0, 4),
    )
    def expect(self, new: bool, which: str, pick: int, qty: int, at: int) -> None:
        if new:
            self.pos += 1
            po_id = f"po-{self.pos}"
        else:
            po_id = self._pick(which, pick)
        po = inc.find_po(self.s, po_id)
        got = inc.expect(self.s, po_id, qty, T0 + at * DAY)
        if isinstance(got, str):
            full = len(self.s.orders) == inc.MAX_PURCHASE_ORDERS_PER_SKU and all(
                x.status.is_open for x in self.s.orders
            )
            assert (po is None and (qty == 0 or full)) or (po is not None and not po.status.is_open)
            return
        if po is not None and po.expected <= qty:
            assert got.released == ()  # only a cut can release
        self._apply(got)
        self.received.setdefault(po_id, 0)

    @rule(cap=st.integers(0, 30))
    def set_cap(self, cap: int) -> None:
        got = inc.set_cap(self.s, cap)
        assert not isinstance(got, str)
        self.s = got
        self.cap_floor = got.promised

    @invariant()
    def holds(self) -> None:
        s = self.s
        assert inc.consistent(s) == "", s
        assert s.promised <= max(s.cap, self.cap_floor), (s.promised, s.cap, self.cap_floor)
        # the rules' waiting backorders are the model's, each once
        theirs = {b.order_id: b for po in s.orders for b in po.backorders}
        assert theirs == self.waiting
        for po in s.orders:
            assert po.received == self.received[po.po_id]
            if po.status.is_open:
                assert po.promised <= po.open + po.staged
            else:  # ended: every backorder on it ended too
                assert po.backorders == () and po.staged == 0
        # conservation: every unit that arrived is held, free, or staged
        assert self.arrived == self.held + self.free + s.staged
        assert set(self.fate).isdisjoint(self.waiting)


IncomingModel.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestIncomingModel = IncomingModel.TestCase
