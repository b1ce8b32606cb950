"""Locations through the decision core (issue 16 item 1): examples, then a Hypothesis model.

The per-location rules are pipeline.domain.locations'; these tests check that
``core.decide`` applies them to a SKU's record (totals = sums over locations), that a
SKU which never names a location takes the old path unchanged, and, over random
command sequences through ``decide`` (restocks, counts, returns, damaged units,
safety stock, reserves at a named location, by priority or split, commits, releases,
expiries, transfers shipped, received in part or cancelled, purchase orders expected,
cut, closed and arriving at a location, backorders placed and released, and re-sends):
no location is oversold, units are conserved per location and in total (staged units
too), backorders never pass their cap and are converted first placed, first served.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from hypothesis import event
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pipeline.domain import core
from pipeline.domain import incoming as inc
from pipeline.domain import locations as loc
from pipeline.domain.core import DEFAULT_LOCATION, Outcome
from pipeline.domain.locations import LocationStock
from tables.stock import StoredReservation, StoredStock

T0 = 1_700_000_000_000
TTL = 10_000
A, B, C = "wh-a", "wh-b", "store-c"


class Ledger:
    """One SKU's state, driven through core.decide."""

    def __init__(self, priority: tuple[str, ...] = ()) -> None:
        self.record: core.StockRecord | None = None
        self.reservations: dict[str, core.Reservation] = {}
        self.priority = priority
        self.n = 0

    def eid(self) -> str:
        self.n += 1
        return f"e{self.n}"

    def apply(self, cmd: core.Command, now: int = T0) -> core.Decision:
        res = self.reservations.get(cmd.order_id) if isinstance(cmd, core.ORDER_COMMANDS) else None
        # the backorders the command may settle: their reservations, as pipeline.batch does
        names = core.settling(self.record, cmd, res)
        d = core.decide(
            self.record,
            cmd,
            now,
            res,
            dedupe_window=10_000,
            location_priority=self.priority,
            others={o: self.reservations[o] for o in names if o in self.reservations},
        )
        self.record = d.record
        for r in (d.reservation, *d.others):
            if r is not None:
                self.reservations[r.order_id] = r
        return d

    def restock(self, qty: int, at: str = "") -> core.Decision:
        return self.apply(core.RestockReceived(self.eid(), "S", qty, T0, location=at))

    def reserve(self, order: str, qty: int, at: str = "", split: bool = False) -> core.Decision:
        return self.apply(
            core.ReserveStock(self.eid(), order, "S", qty, T0, ttl_ms=TTL, location=at, split=split)
        )

    def at(self, name: str) -> LocationStock:
        assert self.record is not None
        found = loc.find(self.record.locations, name)
        assert found is not None, (name, self.record.locations)
        return found


def result(d: core.Decision) -> core.ReservationResult:
    return next(e for e in d.events if isinstance(e, core.ReservationResult))


def changed(d: core.Decision) -> core.StockChanged:
    return next(e for e in d.events if isinstance(e, core.StockChanged))


def test_a_sku_that_names_no_location_keeps_the_totals_only_path() -> None:
    led = Ledger()
    led.restock(5)
    d = led.reserve("o1", 2)
    assert led.record is not None and led.record.locations == ()
    assert d.reservation is not None and d.reservation.held == ()
    assert changed(d).locations == ()
    # naming the default location explicitly changes nothing either
    led.restock(1, at=DEFAULT_LOCATION)
    assert led.record.locations == () and led.record.on_hand == 6


def test_naming_a_location_carries_the_totals_into_the_default_one() -> None:
    led = Ledger()
    led.restock(5)
    led.reserve("o1", 2)  # held before the SKU had locations
    d = led.restock(3, at=A)
    assert led.record is not None
    assert led.record.locations == (  # by name
        LocationStock(DEFAULT_LOCATION, on_hand=5, reserved=2),
        LocationStock(A, on_hand=3),
    )
    assert (led.record.on_hand, led.record.reserved, led.record.available) == (8, 2, 6)
    figures = changed(d).locations
    assert [(x.location, x.on_hand, x.available) for x in figures] == [
        (DEFAULT_LOCATION, 5, 3),
        (A, 3, 3),
    ]
    # the old hold gives its units back where the totals put them
    led.apply(core.ReleaseReservation(led.eid(), "o1", "S", T0))
    assert led.at(DEFAULT_LOCATION) == LocationStock(DEFAULT_LOCATION, on_hand=5)


def test_a_reserve_at_a_named_location_takes_only_from_it() -> None:
    led = Ledger()
    led.restock(5, at=A)
    led.restock(1, at=B)
    d = led.reserve("o1", 2, at=B)
    r = result(d)
    assert (r.outcome, r.reason, r.available) == (Outcome.REJECTED, core.LOCATION_REASON, 1)
    d = led.reserve("o2", 1, at=B)
    assert result(d).outcome is Outcome.RESERVED
    assert d.reservation is not None and d.reservation.held == ((B, 1),)
    assert led.at(B).reserved == 1 and led.at(A).reserved == 0
    # a commit sells exactly those units
    led.apply(core.CommitReservation(led.eid(), "o2", "S", T0 + 1))
    assert led.at(B) == LocationStock(B, on_hand=0) and led.record is not None
    assert (led.record.on_hand, led.record.reserved) == (5, 0)


def test_a_reserve_without_a_location_follows_the_priority_and_splits_only_when_asked() -> None:
    led = Ledger(priority=(B, A))
    led.restock(3, at=A)
    led.restock(2, at=B)
    d = led.reserve("o1", 2)
    assert d.reservation is not None and d.reservation.held == ((B, 2),)
    d = led.reserve("o2", 3)
    assert d.reservation is not None and d.reservation.held == ((A, 3),)
    led.restock(2, at=B)
    led.restock(1, at=A)
    d = led.reserve("o3", 3)  # 2 at B, 1 at A: only a split covers it
    assert result(d).reason == core.LOCATION_REASON
    d = led.reserve("o4", 3, split=True)
    assert d.reservation is not None and d.reservation.held == ((B, 2), (A, 1))
    # an expiry gives back to each location what it held
    led.apply(core.ExpireReservation(led.eid(), "o4", "S", T0 + TTL), now=T0 + TTL)
    assert (led.at(A).reserved, led.at(B).reserved) == (3, 2)


def test_a_partial_reserve_at_locations_takes_what_one_location_can_give() -> None:
    led = Ledger()
    led.restock(2, at=A)
    led.restock(3, at=B)
    d = led.apply(core.ReserveStock(led.eid(), "o1", "S", 9, T0, ttl_ms=TTL, allow_partial=True))
    r = result(d)
    assert (r.outcome, r.qty, r.reason) == (Outcome.RESERVED, 3, "partial")
    assert d.reservation is not None and d.reservation.held == ((B, 3),)


def test_counts_returns_damaged_units_and_safety_stock_act_on_one_location() -> None:
    led = Ledger()
    led.restock(5, at=A)
    led.restock(4, at=B)
    led.reserve("o1", 3, at=A)
    d = led.apply(core.StockCounted(led.eid(), "S", 1, T0, location=A))
    assert d.outcome is Outcome.SHORTFALL
    short = next(e for e in d.events if isinstance(e, core.StockShortfall))
    assert (short.counted, short.reserved, short.shortfall, short.location) == (1, 3, 2, A)
    assert led.at(B).on_hand == 4 and led.at(A).available == 0
    assert led.record is not None and led.record.available == 4  # A's holds lend nothing
    led.apply(core.ReturnReceived(led.eid(), "r", "S", 2, False, T0, location=B))
    assert led.at(B).damaged == 2 and led.record.damaged == 2
    d = led.apply(
        core.DamagedStockResolved(led.eid(), "S", 2, core.DamagedAction.RESTOCK, T0, location=A)
    )
    assert d.outcome is Outcome.INSUFFICIENT_DAMAGED  # they are at B
    led.apply(
        core.DamagedStockResolved(led.eid(), "S", 2, core.DamagedAction.RESTOCK, T0, location=B)
    )
    assert led.at(B) == LocationStock(B, on_hand=6)
    led.apply(core.SafetyStockSet(led.eid(), "S", 5, T0, location=B))
    assert led.at(B).available == 1 and led.record.safety_stock == 5
    assert led.record.available == 1


def test_a_transfer_leaves_the_source_travels_and_arrives_once() -> None:
    led = Ledger()
    led.restock(5, at=A)
    ship = core.TransferShipped(led.eid(), "t1", "S", 4, A, C, T0)
    d = led.apply(ship)
    assert d.outcome is Outcome.TRANSFER_SHIPPED
    assert led.record is not None and led.record.on_hand == 1
    assert led.at(C) == LocationStock(C, inbound=4)
    assert [(x.location, x.inbound) for x in changed(d).locations] == [(C, 4), (A, 0)]
    assert led.apply(ship).outcome is Outcome.DUPLICATE
    again = core.TransferShipped(led.eid(), "t1", "S", 1, A, C, T0)
    assert led.apply(again).outcome is Outcome.TRANSFER_REFUSED  # t1 is on the way
    received = core.TransferReceived(led.eid(), "t1", "S", 3, T0)
    d = led.apply(received)
    assert (d.outcome, d.record.on_hand) == (Outcome.TRANSFER_RECEIVED, 4)
    applied = next(e for e in d.events if isinstance(e, core.CommandApplied))
    assert "1 of 4 units lost" in applied.reason and applied.units_lost == 1
    assert led.at(C) == LocationStock(C, on_hand=3) and led.record.transfers == ()
    assert led.apply(received).outcome is Outcome.DUPLICATE
    resent = core.TransferReceived(led.eid(), "t1", "S", 3, T0)  # a new id, same transfer
    d = led.apply(resent)
    assert d.outcome is Outcome.TRANSFER_REFUSED and d.record.on_hand == 4


def test_a_cancelled_transfer_puts_its_units_back_at_the_source() -> None:
    led = Ledger()
    led.restock(5)  # at the default location
    led.apply(core.TransferShipped(led.eid(), "t1", "S", 5, "", B, T0))
    assert led.record is not None and led.record.available == 0
    d = led.apply(core.TransferCancelled(led.eid(), "t1", "S", T0))
    assert d.outcome is Outcome.TRANSFER_CANCELLED
    assert led.at(DEFAULT_LOCATION).on_hand == 5 and led.at(B).inbound == 0
    assert led.record.transfers == ()


@pytest.mark.parametrize(
    ("ship", "why"),
    [
        (core.TransferShipped("x", "t", "S", 6, A, B, T0), "wh-a has 5 available, 6 to ship"),
        (core.TransferShipped("x", "t", "S", 1, A, A, T0), "two different locations"),
    ],
)
def test_a_transfer_ships_only_available_units_between_two_places(
    ship: core.TransferShipped, why: str
) -> None:
    led = Ledger()
    led.restock(5, at=A)
    d = led.apply(ship)
    assert d.outcome is Outcome.TRANSFER_REFUSED
    assert why in next(e.reason for e in d.events if isinstance(e, core.CommandApplied))
    assert led.apply(ship).outcome is Outcome.DUPLICATE  # refused for good


def test_a_receipt_of_more_than_was_shipped_or_of_no_transfer_is_refused() -> None:
    led = Ledger()
    led.restock(5, at=A)
    assert led.apply(core.TransferReceived("r0", "t1", "S", 1, T0)).outcome is (
        Outcome.TRANSFER_REFUSED
    )
    led.apply(core.TransferShipped(led.eid(), "t1", "S", 2, A, B, T0))
    d = led.apply(core.TransferReceived(led.eid(), "t1", "S", 3, T0))
    assert d.outcome is Outcome.TRANSFER_REFUSED and led.at(B).inbound == 2


def test_a_sku_holds_at_most_max_locations() -> None:
    led = Ledger()
    for i in range(loc.MAX_LOCATIONS_PER_SKU):
        led.restock(1, at=f"l{i:02}")
    d = led.restock(1, at="one-too-many")
    assert d.outcome is Outcome.LIMIT_EXCEEDED
    assert led.restock(1, at="l00").outcome is Outcome.RESTOCKED


def test_locations_transfers_and_holds_survive_the_stored_layout() -> None:
    led = Ledger()
    led.restock(5, at=A)
    led.apply(core.TransferShipped(led.eid(), "t1", "S", 2, A, B, T0))
    d = led.reserve("o1", 2, at=A)
    assert led.record is not None and d.reservation is not None
    stored = StoredStock(led.record)
    back = StoredStock.from_bytes(stored.to_bytes())
    assert back.record == led.record
    assert back.record.available == led.record.available == 1  # A's 1; B's are inbound
    assert stored.view()["locations"] == {
        A: {"on_hand": 3, "reserved": 2, "damaged": 0, "available": 1, "inbound": 0},
        B: {"on_hand": 0, "reserved": 0, "damaged": 0, "available": 0, "inbound": 2},
    }
    assert [x["location"] for x in stored.as_change()["locations"]] == [A, B]
    res = StoredReservation.new(d.reservation, "orders", 7)
    got = StoredReservation.from_bytes(res.to_bytes()).valid(StoredStock(led.record, {"orders": 7}))
    assert got == d.reservation and got.held == ((A, 2),)


def test_a_record_without_locations_is_stored_as_before() -> None:
    rec = core.StockRecord("S", on_hand=3)
    raw = StoredStock(rec).to_bytes()
    assert b'"loc"' not in raw and b'"tr"' not in raw
    assert StoredStock(rec).view()["locations"] == {}


# --------------------------------------------------------------------------
# the model: flows per location, checked against the record after every step


@dataclass
class Flows:
    """Units in and out of one location since its last count (its conservation base)."""

    base: int = 0
    into: int = 0  # restocks, resellable returns, damaged put back, transfers in / back
    out: int = 0  # commits, transfers shipped
    counted: bool = False  # a count set its on_hand: holds may exceed it (a shortfall)


@dataclass
class Model:
    flows: dict[str, Flows] = field(default_factory=lambda: defaultdict(Flows))
    damaged: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    inbound: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    transfers: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # open
    lost: int = 0
    cap: int = 0
    promised_when_lowered: int = 0  # a lower cap keeps the promises made
    settled: set[str] = field(default_factory=set)  # backorders converted or released


POS = st.sampled_from(["p1", "p1", "p1", "p2", "p3"])


PLACES = st.sampled_from(["", A, B, C])


class LocationsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.led = Ledger(priority=(C, A))
        self.model = Model()
        self.now = T0
        self.sent: list[core.Command] = []
        self.versions: list[int] = []
        self.orders: list[str] = []

    def _apply(self, cmd: core.Command) -> core.Decision:
        before = self.led.record
        d = self.led.apply(cmd, self.now)
        self.sent.append(cmd)
        for e in d.events:
            if isinstance(e, core.StockChanged):
                self.versions.append(e.version)
                assert e.locations == core.location_figures(d.record)
                # what the projections and the auditor take: the record's own figures
                published = {f: getattr(e, f) for f in core.INCOMING_FIELDS}
                assert published == core.incoming_figures(d.record.incoming)
        if before is not None and d.record.version == before.version:
            # no StockChanged, so nothing a projection shows may have moved
            assert d.record.locations == before.locations
            assert core.incoming_figures(d.record.incoming) == core.incoming_figures(
                before.incoming
            )
        self._settled(before, d)
        return d

    def _settled(self, before: core.StockRecord | None, d: core.Decision) -> None:
        """Every backorder a decision settled is answered once in its life, and none was
        converted while an earlier one of its purchase order still waits."""
        answered = [
            e.order_id
            for e in d.events
            if isinstance(e, core.ReservationResult)
            and not e.duplicate  # a re-sent reserve re-answers the order's state
            and e.reason in (core.BACKORDER_FILLED, inc.PO_SHORT, inc.PO_CANCELLED)
        ]
        assert sorted(answered) == sorted(r.order_id for r in d.others)
        for order in answered:
            assert order not in self.model.settled, f"{order} settled twice"
            self.model.settled.add(order)
        for r in d.others:
            event(f"a backorder {r.status.value}")  # seen in --hypothesis-show-statistics
        if before is None:
            return
        seq = {b.order_id: b.seq for po in before.incoming.orders for b in po.backorders}
        for r in d.others:
            if r.status is not core.ReservationStatus.RESERVED:
                continue
            po = inc.find_po(d.record.incoming, r.po_id)
            assert po is not None
            assert all(seq[r.order_id] < b.seq for b in po.backorders), (r.order_id, po)

    def _where(self, at: str) -> str:
        return at or DEFAULT_LOCATION

    def _stock(self, at: str) -> LocationStock:
        r = self.led.record
        if r is not None and not r.locations and at == DEFAULT_LOCATION:
            # everything is at the implicit default location
            return LocationStock(
                at, r.on_hand, r.reserved, r.damaged, r.safety_stock, staged=r.staged
            )
        found = loc.find(r.locations, at) if r is not None else None
        return found or LocationStock(at)

    def _delivered_to(self, po_id: str, at: str) -> str:
        """Where an arrival naming ``po_id`` puts its units: the open purchase order's
        location (a restock naming another one is a plain restock there)."""
        r = self.led.record
        po = inc.find_po(r.incoming, po_id) if r is not None else None
        if po is None or not po.status.is_open:
            return self._where(at)
        ordered = po.location or DEFAULT_LOCATION
        return ordered if not at or self._where(at) == ordered else self._where(at)

    # -- rules
    @rule(qty=st.integers(1, 9), at=PLACES)
    def restock(self, qty: int, at: str) -> None:
        d = self._apply(core.RestockReceived(self.led.eid(), "S", qty, self.now, location=at))
        assert d.outcome is Outcome.RESTOCKED
        self.model.flows[self._where(at)].into += qty

    @rule(on_hand=st.integers(0, 12), at=PLACES)
    def count(self, on_hand: int, at: str) -> None:
        self._apply(core.StockCounted(self.led.eid(), "S", on_hand, self.now, location=at))
        self.model.flows[self._where(at)] = Flows(base=on_hand, counted=True)

    @rule(qty=st.integers(1, 4), at=PLACES, resellable=st.booleans())
    def return_units(self, qty: int, at: str, resellable: bool) -> None:
        self._apply(
            core.ReturnReceived(self.led.eid(), "r", "S", qty, resellable, self.now, location=at)
        )
        if resellable:
            self.model.flows[self._where(at)].into += qty
        else:
            self.model.damaged[self._where(at)] += qty

    @rule(qty=st.integers(1, 4), at=PLACES, restock=st.booleans())
    def resolve_damaged(self, qty: int, at: str, restock: bool) -> None:
        action = core.DamagedAction.RESTOCK if restock else core.DamagedAction.WRITE_OFF
        cmd = core.DamagedStockResolved(self.led.eid(), "S", qty, action, self.now, location=at)
        d = self._apply(cmd)
        where = self._where(at)
        if qty > self.model.damaged[where]:
            assert d.outcome is Outcome.INSUFFICIENT_DAMAGED
            return
        self.model.damaged[where] -= qty
        if restock:
            self.model.flows[where].into += qty

    @rule(qty=st.integers(0, 3), at=PLACES)
    def safety(self, qty: int, at: str) -> None:
        self._apply(core.SafetyStockSet(self.led.eid(), "S", qty, self.now, location=at))

    @rule(qty=st.integers(1, 8), at=PLACES, split=st.booleans())
    def reserve(self, qty: int, at: str, split: bool) -> None:
        order = f"o{self.led.n}"
        r = self.led.record
        locs = r.locations if r is not None and r.locations else None
        before = {x.location: x.available for x in locs} if locs else None
        d = self._apply(
            core.ReserveStock(
                self.led.eid(), order, "S", qty, self.now, ttl_ms=TTL, location=at, split=split
            )
        )
        self.orders.append(order)
        res = d.reservation
        assert res is not None
        if res.status is not core.ReservationStatus.RESERVED:
            return
        assert sum(units for _, units in res.held or ((DEFAULT_LOCATION, res.qty),)) == qty
        if before is not None:
            # no location gave more than it had available
            for where, units in res.held:
                assert units <= before.get(where, 0), (where, units, before)
            if at:
                assert res.held == ((at, qty),)
            elif not split:
                assert len(res.held) == 1

    @precondition(lambda self: self.orders)
    @rule(data=st.data(), commit=st.booleans())
    def settle(self, data: st.DataObject, commit: bool) -> None:
        order = data.draw(st.sampled_from(self.orders))
        res = self.led.reservations[order]
        kind = core.CommitReservation if commit else core.ReleaseReservation
        d = self._apply(kind(self.led.eid(), order, "S", self.now))
        if d.outcome is Outcome.COMMITTED:
            for where, units in res.held or ((DEFAULT_LOCATION, res.qty),):
                self.model.flows[where].out += units

    @rule(ms=st.integers(1, 2 * TTL))
    def time_passes_and_sweeper_runs(self, ms: int) -> None:
        self.now += ms
        for order, res in list(self.led.reservations.items()):
            if res.status is core.ReservationStatus.RESERVED:
                self._apply(core.ExpireReservation(self.led.eid(), order, "S", self.now))

    @rule(qty=st.integers(1, 6), source=PLACES, destination=PLACES)
    def ship(self, qty: int, source: str, destination: str) -> None:
        tid = f"t{self.led.n}"
        src, dst = self._where(source), self._where(destination)
        have = self._stock(src).available
        d = self._apply(
            core.TransferShipped(self.led.eid(), tid, "S", qty, source, destination, self.now)
        )
        if src == dst or have < qty:
            assert d.outcome is Outcome.TRANSFER_REFUSED
            return
        assert d.outcome is Outcome.TRANSFER_SHIPPED
        self.model.flows[src].out += qty
        self.model.inbound[dst] += qty
        self.model.transfers[tid] = (src, dst, qty)

    @initialize(cap=st.integers(0, 30), qty=st.integers(3, 20), at=st.sampled_from(["", A]))
    def a_purchase_order_is_expected(self, cap: int, qty: int, at: str) -> None:
        """Most runs start taking backorders against an open purchase order (cap 0: none)."""
        self.backorder_cap(cap)
        self.expect("p1", qty, at, 1)

    @rule(units=st.integers(0, 20))
    def backorder_cap(self, units: int) -> None:
        r = self.led.record
        promised = r.incoming.promised if r is not None else 0
        self._apply(core.BackorderCapSet(self.led.eid(), "S", units, self.now))
        self.model.cap = units
        self.model.promised_when_lowered = promised if units < promised else 0

    @rule(po=POS, qty=st.integers(0, 10), at=st.sampled_from(["", A]), days=st.integers(1, 3))
    def expect(self, po: str, qty: int, at: str, days: int) -> None:
        when = T0 + days * 86_400_000
        self._apply(core.IncomingStock(self.led.eid(), "S", po, qty, when, self.now, location=at))

    @rule(qty=st.integers(1, 9), at=PLACES)
    def backorder(self, qty: int, at: str) -> None:
        order = f"b{self.led.n}"
        cmd = core.ReserveStock(
            self.led.eid(), order, "S", qty, self.now, ttl_ms=TTL, location=at, allow_backorder=True
        )
        d = self._apply(cmd)
        self.orders.append(order)
        event(f"backorder {d.outcome.value} {d.events[-1].reason}")
        if d.outcome is Outcome.BACKORDERED:
            assert self.led.record is not None
            assert self.led.record.incoming.promised <= self.model.cap

    @rule(po=POS, qty=st.integers(1, 12), final=st.booleans(), at=st.sampled_from(["", "", A, B]))
    def arrive(self, po: str, qty: int, final: bool, at: str) -> None:
        where = self._delivered_to(po, at)
        cmd = core.RestockReceived(
            self.led.eid(), "S", qty, self.now, location=at, po_id=po, final=final
        )
        d = self._apply(cmd)
        assert d.outcome is Outcome.RESTOCKED
        self.model.flows[where].into += qty

    @rule(po=POS, short=st.integers(0, 3))
    def a_purchase_order_arrives_about_in_full(self, po: str, short: int) -> None:
        r = self.led.record
        found = inc.find_po(r.incoming, po) if r is not None else None
        if found is not None and found.open > short:
            self.arrive(po, found.open - short, False, "")

    @rule(po=POS, cancelled=st.booleans())
    def close(self, po: str, cancelled: bool) -> None:
        self._apply(core.PurchaseOrderClosed(self.led.eid(), "S", po, self.now, cancelled))

    @precondition(lambda self: self.model.transfers)
    @rule(data=st.data(), cancel=st.booleans())
    def transfer_ends(self, data: st.DataObject, cancel: bool) -> None:
        tid = data.draw(st.sampled_from(sorted(self.model.transfers)))
        src, dst, qty = self.model.transfers.pop(tid)
        self.model.inbound[dst] -= qty
        if cancel:
            d = self._apply(core.TransferCancelled(self.led.eid(), tid, "S", self.now))
            assert d.outcome is Outcome.TRANSFER_CANCELLED
            self.model.flows[src].into += qty
            return
        got = data.draw(st.integers(0, qty))
        d = self._apply(core.TransferReceived(self.led.eid(), tid, "S", got, self.now))
        assert d.outcome is Outcome.TRANSFER_RECEIVED
        self.model.flows[dst].into += got
        self.model.lost += qty - got

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def producer_resends_an_earlier_command(self, data: st.DataObject) -> None:
        cmd = data.draw(st.sampled_from(self.sent))
        if isinstance(cmd, core.ExpireReservation):
            return  # an expiry re-sent later may legitimately expire a reservation
        before = self.led.record
        d = self._apply(cmd)
        assert d.record.locations == before.locations and d.record.version == before.version

    # -- invariants
    @invariant()
    def totals_are_the_sums_over_locations(self) -> None:
        r = self.led.record
        if r is None or not r.locations:
            return
        assert loc.consistent(r.locations) == ""
        assert (r.on_hand, r.reserved, r.damaged) == loc.totals(r.locations)
        assert r.safety_stock == sum(x.safety_stock for x in r.locations)
        assert r.available == loc.available(r.locations)

    @invariant()
    def no_oversell_per_location(self) -> None:
        r = self.led.record
        for x in r.locations if r is not None else ():
            if not self.model.flows[x.location].counted:
                assert x.reserved + x.staged <= x.on_hand, x

    @invariant()
    def backorders_stay_within_the_cap_and_wait_in_their_orders(self) -> None:
        r = self.led.record
        if r is None:
            return
        assert inc.consistent(r.incoming) == ""
        assert r.incoming.promised <= max(self.model.cap, self.model.promised_when_lowered)
        waiting = {b.order_id: (b.qty, po.po_id) for po in r.incoming.orders for b in po.backorders}
        backordered = {
            o: (res.qty, res.po_id)
            for o, res in self.led.reservations.items()
            if res.status is core.ReservationStatus.BACKORDERED
        }
        assert waiting == backordered

    @invariant()
    def staged_units_are_at_their_purchase_orders_locations(self) -> None:
        r = self.led.record
        if r is None:
            return
        staged: dict[str, int] = defaultdict(int)
        for po in r.incoming.orders:
            if po.staged:
                staged[po.location or DEFAULT_LOCATION] += po.staged
        if r.locations:
            assert {x.location: x.staged for x in r.locations if x.staged} == dict(staged)
        else:
            assert dict(staged).keys() <= {DEFAULT_LOCATION}
            assert r.staged == staged[DEFAULT_LOCATION]
        assert r.staged == r.incoming.staged

    @invariant()
    def conservation_per_location(self) -> None:
        r = self.led.record
        if r is None:
            return
        names = {x.location for x in r.locations} | set(self.model.flows)
        for name in names:
            f = self.model.flows[name]
            x = self._stock(name)
            if not r.locations and name != DEFAULT_LOCATION:
                assert f.base + f.into - f.out == 0
                continue
            assert x.on_hand == f.base + f.into - f.out, (name, x, f)
            assert x.damaged == self.model.damaged[name]
            assert x.inbound == self.model.inbound[name]

    @invariant()
    def reserved_per_location_equals_open_holds(self) -> None:
        r = self.led.record
        if r is None:
            return
        held: dict[str, int] = defaultdict(int)
        for res in self.led.reservations.values():
            if res.status is core.ReservationStatus.RESERVED:
                for where, units in res.held or ((DEFAULT_LOCATION, res.qty),):
                    held[where] += units
        if r.locations:
            assert {x.location: x.reserved for x in r.locations if x.reserved} == {
                k: v for k, v in held.items() if v
            }
        else:
            assert r.reserved == sum(held.values())

    @invariant()
    def open_transfers_are_the_models(self) -> None:
        r = self.led.record
        got = {t.transfer_id: (t.source, t.destination, t.qty) for t in r.transfers} if r else {}
        assert got == self.model.transfers

    @invariant()
    def versions_are_gapless(self) -> None:
        assert self.versions == list(range(1, len(self.versions) + 1))


LocationsMachine.TestCase.settings = hyp_settings(
    max_examples=300, stateful_step_count=50, deadline=None
)
TestLocationsThroughDecide = LocationsMachine.TestCase
