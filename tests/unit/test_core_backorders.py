"""Incoming stock, preorders and backorders through the decision core (issue 16 item 2).

The rules are pipeline.domain.incoming's (tests/unit/test_incoming.py); these tests
check how ``core.decide`` wires them into a SKU's record and its orders' reservations:
a reserve that allows a backorder is BACKORDERED against a purchase order, an arrival
(a RestockReceived naming it), a close or a cut settles many orders in one decision
(each answered), a released backorder gives its promise back, staged units are not
available, customers' caps count backorders, purchase orders are delivered to one
location, and the table layout round-trips all of it (older records read as "expects
nothing, takes no backorders").
"""

from __future__ import annotations

import pytest

from pipeline import batch
from pipeline.domain import core
from pipeline.domain import incoming as inc
from pipeline.domain.core import DEFAULT_LOCATION, Outcome, ReservationStatus
from pipeline.domain.locations import LocationStock
from tables.stock import StoredReservation, StoredStock, StoredUsage, usage_key

T0 = 1_700_000_000_000
DAY = 86_400_000
TTL = 60_000
SKU = "S"


class Ledger:
    """One SKU's state driven through core.decide, the way pipeline.batch does it: the
    reservations (and usages) of the orders ``core.settling`` names are passed in, and the
    ones the decision changed are stored."""

    def __init__(self) -> None:
        self.record: core.StockRecord | None = None
        self.reservations: dict[str, core.Reservation] = {}
        self.usages: dict[tuple[str, str], core.CustomerUsage] = {}
        self.n = 0

    def eid(self) -> str:
        self.n += 1
        return f"e{self.n}"

    def apply(self, cmd: core.Command, now: int = T0) -> core.Decision:
        res = self.reservations.get(cmd.order_id) if isinstance(cmd, core.ORDER_COMMANDS) else None
        names = core.settling(self.record, cmd, res)
        others = {o: self.reservations[o] for o in names if o in self.reservations}
        other_usages = {
            (r.sale_id, r.customer_id): self.usages[(r.sale_id, r.customer_id)]
            for r in others.values()
            if r.counted and (r.sale_id, r.customer_id) in self.usages
        }
        key = core.usage_key(self.record, cmd, res)
        d = core.decide(
            self.record,
            cmd,
            now,
            res,
            dedupe_window=10_000,
            usage=self.usages.get(key) if key else None,
            others=others,
            other_usages=other_usages,
        )
        self.record = d.record
        for r in (d.reservation, *d.others):
            if r is not None:
                self.reservations[r.order_id] = r
        for u in (d.usage, *d.other_usages):
            if u is not None:
                self.usages[(u.sale_id, u.customer_id)] = u
        return d

    # commands
    def restock(self, qty: int, po: str = "", final: bool = False, at: str = "") -> core.Decision:
        cmd = core.RestockReceived(self.eid(), SKU, qty, T0, location=at, po_id=po, final=final)
        return self.apply(cmd)

    def expect(self, po: str, qty: int, at: int = T0 + DAY, where: str = "") -> core.Decision:
        return self.apply(core.IncomingStock(self.eid(), SKU, po, qty, at, T0, location=where))

    def cap(self, units: int) -> core.Decision:
        return self.apply(core.BackorderCapSet(self.eid(), SKU, units, T0))

    def close(self, po: str, cancelled: bool = False) -> core.Decision:
        return self.apply(core.PurchaseOrderClosed(self.eid(), SKU, po, T0, cancelled=cancelled))

    def reserve(
        self, order: str, qty: int, backorder: bool = True, customer: str = "", t: int = T0
    ) -> core.Decision:
        cmd = core.ReserveStock(
            self.eid(),
            order,
            SKU,
            qty,
            t,
            ttl_ms=TTL,
            allow_backorder=backorder,
            customer_id=customer,
        )
        return self.apply(cmd, t)

    def release(self, order: str) -> core.Decision:
        return self.apply(core.ReleaseReservation(self.eid(), order, SKU, T0))

    def status(self, order: str) -> ReservationStatus:
        return self.reservations[order].status


def answers(d: core.Decision) -> list[core.ReservationResult]:
    return [e for e in d.events if isinstance(e, core.ReservationResult)]


def answer(d: core.Decision) -> core.ReservationResult:
    (only,) = answers(d)
    return only


def changed(d: core.Decision) -> core.StockChanged:
    return next(e for e in d.events if isinstance(e, core.StockChanged))


def preorder_sku(cap: int = 10, expected: int = 10, on_hand: int = 0) -> Ledger:
    led = Ledger()
    if on_hand:
        led.restock(on_hand)
    led.cap(cap)
    led.expect("po-1", expected)
    return led


def test_a_reserve_allowing_a_backorder_waits_on_a_purchase_order_and_says_which() -> None:
    led = preorder_sku(on_hand=2)
    d = led.reserve("o1", 3)  # 2 on hand: stock cannot cover it
    r = answer(d)
    assert (r.outcome, r.qty, r.po_id, r.expected_at) == (Outcome.BACKORDERED, 3, "po-1", T0 + DAY)
    assert d.outcome is Outcome.BACKORDERED
    res = led.reservations["o1"]
    assert (res.status, res.po_id, res.qty, res.expires_at) == (
        ReservationStatus.BACKORDERED,
        "po-1",
        3,
        0,
    )
    assert led.record is not None
    assert (led.record.on_hand, led.record.reserved, led.record.available) == (2, 0, 2)
    sc = changed(d)  # the promise is a change: its figures are published
    assert (sc.incoming, sc.promised, sc.backorderable, sc.staged) == (10, 3, 7, 0)
    # stock that covers a reserve is held as ever, allow_backorder or not
    assert answer(led.reserve("o2", 2)).outcome is Outcome.RESERVED


def test_a_backorder_refused_says_why_with_what_one_could_get() -> None:
    led = Ledger()
    led.restock(1)
    r = answer(led.reserve("o1", 3))
    assert (r.outcome, r.reason, r.available) == (Outcome.REJECTED, inc.BACKORDERS_OFF, 0)
    led.cap(4)
    assert answer(led.reserve("o2", 3)).reason == inc.NO_INCOMING
    led.expect("po-1", 10)
    assert answer(led.reserve("o3", 3)).outcome is Outcome.BACKORDERED
    r = answer(led.reserve("o4", 2))
    assert (r.outcome, r.reason, r.available) == (Outcome.REJECTED, inc.BACKORDER_CAP, 1)
    # without allow_backorder nothing changes: today's answer
    r = answer(led.reserve("o5", 3, backorder=False))
    assert (r.outcome, r.reason, r.available) == (Outcome.REJECTED, "insufficient_stock", 1)


def test_a_backorder_never_expires_and_cannot_be_committed() -> None:
    led = preorder_sku()
    led.reserve("o1", 5)
    later = T0 + 10 * TTL
    d = led.apply(core.ExpireReservation(led.eid(), "o1", SKU, later), later)
    assert d.outcome is Outcome.NOT_EXPIRED and led.status("o1") is ReservationStatus.BACKORDERED
    d = led.apply(core.CommitReservation(led.eid(), "o1", SKU, T0))
    assert answer(d).outcome is Outcome.INVALID_STATE
    assert led.status("o1") is ReservationStatus.BACKORDERED
    # and the retention never prunes it
    stored = StoredReservation.new(led.reservations["o1"], "t", 1)
    assert not stored.closed_before(later * 2)


def test_a_resent_reserve_re_answers_backordered_with_its_purchase_order() -> None:
    led = preorder_sku()
    d1 = led.reserve("o1", 5)
    again = led.apply(d1_cmd := core.ReserveStock("e-x", "o1", SKU, 5, T0, allow_backorder=True))
    assert d1_cmd.order_id == "o1"
    r = answer(again)
    assert (r.outcome, r.duplicate, r.po_id, r.expected_at) == (
        Outcome.BACKORDERED,
        True,
        "po-1",
        T0 + DAY,
    )
    assert again.record.version == d1.record.version


def test_an_arrival_converts_whole_backorders_first_placed_first_served() -> None:
    led = preorder_sku(cap=10, expected=10, on_hand=2)
    for order, qty in (("o1", 3), ("o2", 4), ("o3", 3)):
        led.reserve(order, qty, t=T0 + len(order))
    t = T0 + 5_000
    cmd = core.RestockReceived(led.eid(), SKU, 5, t, po_id="po-1")
    d = led.apply(cmd, t)
    assert d.outcome is Outcome.RESTOCKED
    # o1 (3) converted; 2 left short of o2 (4): staged for it, not available; o3 waits behind
    got = {a.order_id: (a.outcome, a.reason) for a in answers(d)}
    assert got == {"o1": (Outcome.RESERVED, core.BACKORDER_FILLED)}
    held = led.reservations["o1"]
    assert (held.status, held.expires_at, held.reason) == (
        ReservationStatus.RESERVED,
        t + TTL,
        core.BACKORDER_FILLED,
    )
    assert led.record is not None
    assert (led.record.on_hand, led.record.reserved, led.record.staged) == (7, 3, 2)
    assert led.record.available == 2  # the 2 plain units on hand only
    assert changed(d).staged == 2
    assert led.status("o2") is led.status("o3") is ReservationStatus.BACKORDERED
    # the rest arrives: o2 then o3, in the order placed, in one decision
    d = led.restock(5, po="po-1")
    assert [(a.order_id, a.outcome) for a in answers(d)] == [
        ("o2", Outcome.RESERVED),
        ("o3", Outcome.RESERVED),
    ]
    assert (led.record.on_hand, led.record.reserved, led.record.staged) == (12, 10, 0)
    assert led.record.available == 2  # the 2 plain units: the 10 arrived are all promised
    # a converted backorder is an ordinary hold: the checkout commits it
    d = led.apply(core.CommitReservation(led.eid(), "o2", SKU, T0 + 6_000))
    assert answer(d).outcome is Outcome.COMMITTED
    assert (led.record.on_hand, led.record.reserved) == (8, 6)


def test_a_converted_backorder_expires_ttl_after_the_arrival() -> None:
    led = preorder_sku()
    led.reserve("o1", 3)
    t = T0 + 10 * DAY
    led.apply(core.RestockReceived(led.eid(), SKU, 10, t, po_id="po-1"), t)
    assert led.reservations["o1"].expires_at == t + TTL
    d = led.apply(core.ExpireReservation(led.eid(), "o1", SKU, t + TTL), t + TTL)
    assert answer(d).outcome is Outcome.EXPIRED
    assert led.record is not None and led.record.reserved == 0


def test_a_short_final_arrival_releases_the_rest_po_short_and_each_is_told() -> None:
    led = preorder_sku(cap=10, expected=10)
    for order, qty in (("o1", 2), ("o2", 5), ("o3", 1)):
        led.reserve(order, qty)
    d = led.restock(3, po="po-1", final=True)  # the supplier sends 3 and no more
    got = [(a.order_id, a.outcome, a.reason, a.po_id) for a in answers(d)]
    # o1 fits; o2 (5) cannot be served from the 1 left, so it is released and o3 (1),
    # which fits in the same step, is converted: none served while an earlier one waits
    assert got == [
        ("o1", Outcome.RESERVED, core.BACKORDER_FILLED, "po-1"),
        ("o3", Outcome.RESERVED, core.BACKORDER_FILLED, "po-1"),
        ("o2", Outcome.RELEASED, inc.PO_SHORT, "po-1"),
    ]
    assert led.status("o2") is ReservationStatus.RELEASED
    assert led.reservations["o2"].closed_by == d.events[-1].event_id
    po = inc.find_po(led.record.incoming, "po-1")
    assert po is not None and po.status is inc.POStatus.RECEIVED
    assert (led.record.on_hand, led.record.reserved, led.record.staged) == (3, 3, 0)


def test_a_cancelled_purchase_order_releases_its_backorders_po_cancelled() -> None:
    led = preorder_sku()
    led.reserve("o1", 4)
    led.reserve("o2", 1)
    d = led.close("po-1", cancelled=True)
    assert d.outcome is Outcome.PO_CLOSED
    assert [(a.order_id, a.outcome, a.reason) for a in answers(d)] == [
        ("o1", Outcome.RELEASED, inc.PO_CANCELLED),
        ("o2", Outcome.RELEASED, inc.PO_CANCELLED),
    ]
    assert led.record is not None and led.record.incoming.promised == 0
    assert changed(d).incoming == 0
    # closing it again is refused, and final
    assert led.close("po-1").outcome is Outcome.INCOMING_REFUSED


def test_a_cut_of_the_expected_quantity_releases_what_no_longer_fits() -> None:
    led = preorder_sku(cap=10, expected=10)
    led.reserve("o1", 4)
    led.reserve("o2", 4)
    d = led.expect("po-1", 5)
    assert d.outcome is Outcome.INCOMING_EXPECTED
    assert [(a.order_id, a.reason) for a in answers(d)] == [("o2", inc.PO_SHORT)]
    assert led.status("o1") is ReservationStatus.BACKORDERED


def test_releasing_a_backorder_gives_the_promise_back_and_may_convert_the_next() -> None:
    led = preorder_sku(cap=10, expected=10)
    led.reserve("o1", 4)
    led.reserve("o2", 2)
    led.restock(3, po="po-1")  # 3 staged for o1 (4)
    assert led.record is not None and led.record.staged == 3
    d = led.release("o1")  # o1 cancels: the 3 staged units now cover o2
    assert [(a.order_id, a.outcome, a.reason) for a in answers(d)] == [
        ("o1", Outcome.RELEASED, "cancelled"),
        ("o2", Outcome.RESERVED, core.BACKORDER_FILLED),
    ]
    assert (led.record.reserved, led.record.staged, led.record.available) == (2, 0, 1)
    assert led.record.incoming.promised == 0


def test_plain_restocks_returns_and_counts_never_convert_backorders() -> None:
    led = preorder_sku()
    led.reserve("o1", 3)
    for d in (
        led.restock(10),
        led.apply(core.ReturnReceived(led.eid(), "r", SKU, 1, True, T0)),
        led.apply(core.StockCounted(led.eid(), SKU, 20, T0)),
    ):
        assert answers(d) == [] and d.others == ()
    assert led.status("o1") is ReservationStatus.BACKORDERED
    # an arrival naming a purchase order the SKU does not expect is a plain restock
    d = led.restock(4, po="po-unknown")
    assert (d.outcome, d.others) == (Outcome.RESTOCKED, ())
    assert d.events[-1].reason.startswith(inc.UNKNOWN_PO)


def test_a_customers_backorder_counts_in_the_cap_and_its_release_gives_back() -> None:
    led = preorder_sku()
    led.apply(core.CustomerLimitSet(led.eid(), SKU, 3, T0, "sale"))
    assert answer(led.reserve("o1", 2, customer="c")).outcome is Outcome.BACKORDERED
    assert led.usages[("sale", "c")].units == 2
    r = answer(led.reserve("o2", 2, customer="c"))
    assert (r.outcome, r.reason) == (Outcome.REJECTED, core.CUSTOMER_LIMIT_REASON)
    # the purchase order is cancelled: the customer's units come back
    d = led.close("po-1", cancelled=True)
    assert d.other_usages == (core.CustomerUsage("sale", "c", 0),)
    led.expect("po-2", 5)
    assert answer(led.reserve("o3", 2, customer="c")).outcome is Outcome.BACKORDERED
    assert led.usages[("sale", "c")].units == 2
    # a released backorder gives them back too
    led.release("o3")
    assert led.usages[("sale", "c")].units == 0


def test_a_purchase_order_delivered_to_a_location_holds_and_stages_there() -> None:
    led = Ledger()
    led.restock(1, at="dc-1")
    led.restock(1, at="store-7")
    led.cap(10)
    led.expect("po-1", 6, where="dc-1")
    led.reserve("o1", 4)
    led.reserve("o2", 2)
    d = led.restock(5, po="po-1")  # "" = the purchase order's location
    assert [a.order_id for a in answers(d)] == ["o1"]
    assert led.reservations["o1"].held == (("dc-1", 4),)
    assert led.record is not None
    dc = next(x for x in led.record.locations if x.location == "dc-1")
    assert (dc.on_hand, dc.reserved, dc.staged, dc.available) == (6, 4, 1, 1)
    assert led.record.available == 2  # 1 at dc-1, 1 at store-7; the staged unit is neither
    # staged units cannot be shipped away either
    ship = core.TransferShipped(led.eid(), "t1", SKU, 2, "dc-1", "store-7", T0)
    assert led.apply(ship).outcome is Outcome.TRANSFER_REFUSED
    # an arrival at another location than the order's is a plain restock there
    d = led.restock(1, po="po-1", at="store-7")
    assert d.others == () and "delivered to dc-1" in d.events[-1].reason
    # an IncomingStock may not move a purchase order to another location
    assert led.expect("po-1", 6, where="store-7").outcome is Outcome.INCOMING_REFUSED


def test_a_sku_with_staged_units_that_takes_a_location_keeps_them_at_the_default() -> None:
    led = preorder_sku(cap=10, expected=10)
    led.reserve("o1", 4)
    led.restock(3, po="po-1")
    led.restock(2, at="dc-1")  # the SKU now has locations: its totals go to default
    assert led.record is not None
    default = next(x for x in led.record.locations if x.location == DEFAULT_LOCATION)
    assert (default.on_hand, default.staged, default.available) == (3, 3, 0)
    d = led.restock(1, po="po-1")
    assert [a.order_id for a in answers(d)] == ["o1"]
    assert led.reservations["o1"].held == ((DEFAULT_LOCATION, 4),)


def test_the_sku_record_round_trips_incoming_and_old_records_expect_nothing() -> None:
    led = preorder_sku(cap=7)
    led.reserve("o1", 3, customer="c")
    led.reserve("o2", 2)
    led.restock(1, po="po-1")
    assert led.record is not None
    back = StoredStock.from_bytes(StoredStock(led.record).to_bytes()).record
    assert back == led.record and back.staged == led.record.staged == 1
    assert back.incoming == led.record.incoming
    old = StoredStock(core.StockRecord(SKU, on_hand=3)).to_bytes()
    assert b'"inc"' not in old
    assert StoredStock.from_bytes(old).record.incoming == inc.Incoming()
    view = StoredStock(led.record).view()["incoming"]
    assert (view["open"], view["promised"], view["cap"], view["staged"]) == (9, 5, 7, 1)
    assert view["purchase_orders"]["po-1"]["backorders"] == 2
    res = led.reservations["o1"]
    again = StoredReservation.new(res, "t", 3).valid(StoredStock(led.record, {"t": 3}))
    assert again == res and again.po_id == "po-1"


def test_a_located_record_with_staged_units_round_trips() -> None:
    led = Ledger()
    led.restock(1, at="dc-1")
    led.cap(10)
    led.expect("po-1", 6, where="dc-1")
    led.reserve("o1", 4)
    led.restock(2, po="po-1")
    assert led.record is not None
    back = StoredStock.from_bytes(StoredStock(led.record).to_bytes()).record
    assert back == led.record
    assert next(x for x in back.locations if x.location == "dc-1").staged == 2


def test_the_batch_converts_backorders_stored_by_an_earlier_batch() -> None:
    """pipeline.batch loads the reservations (and usages) core.settling names, and
    writes the ones the decision changed."""
    r, o = "p.restocks", "p.orders"
    data: dict[bytes, object] = {}

    def run(inputs: list[batch.Input]) -> batch.BatchResult:
        result = batch.fold(
            inputs,
            lambda sku: data.get(sku.encode()),  # type: ignore[arg-type, return-value]
            lambda key: data.get(key),  # type: ignore[arg-type, return-value]
            T0,
            load_usage=lambda key: data.get(key),  # type: ignore[arg-type, return-value]
        )
        for key, value in batch.stock_writes(result):
            data[key] = StoredStock.from_bytes(value.to_bytes())
        for key, res in result.reservations.items():
            data[key] = StoredReservation.from_bytes(res.to_bytes())
        for key, use in result.usages.items():
            data[key] = StoredUsage.from_bytes(use.to_bytes())
        return result

    run(
        [
            batch.Input(r, 0, core.BackorderCapSet("e1", SKU, 10, T0)),
            batch.Input(r, 1, core.CustomerLimitSet("e2", SKU, 5, T0, "s")),
            batch.Input(r, 2, core.IncomingStock("e3", SKU, "po-1", 6, T0 + DAY, T0)),
        ]
    )
    first = run(
        [
            batch.Input(o, 0, core.ReserveStock("e4", "o1", SKU, 4, T0, allow_backorder=True)),
            batch.Input(
                o,
                1,
                core.ReserveStock("e5", "o2", SKU, 2, T0, allow_backorder=True, customer_id="c"),
            ),
        ]
    )
    assert len(first.reservations) == 2
    result = run([batch.Input(r, 3, core.RestockReceived("e6", SKU, 4, T0 + 9, po_id="po-1"))])
    stored = data[SKU.encode()]
    assert isinstance(stored, StoredStock)
    converted = {
        key: res.valid(stored) for key, res in result.reservations.items()
    }  # o1 converted, o2 still waits
    assert [(x.order_id, x.status) for x in converted.values() if x] == [
        ("o1", ReservationStatus.RESERVED)
    ]
    names = [d["order_id"] for d in stored.effects["ReservationResult"]]
    assert names == ["o1"]
    # the cut releases o2 and gives its customer's units back, in the same transaction
    result = run([batch.Input(r, 4, core.PurchaseOrderClosed("e7", SKU, "po-1", T0 + 10))])
    ukey = usage_key(SKU, "s", "c")
    assert ukey in result.usages
    back = data[ukey]
    assert isinstance(back, StoredUsage)
    assert back.valid(data[SKU.encode()]) == core.CustomerUsage("s", "c", 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("located", [False, True])
def test_a_settlement_conserves_units(located: bool) -> None:
    """received = held + staged change + free, seen in the record's counts."""
    led = Ledger()
    where = "dc-1" if located else ""
    led.restock(1, at=where)
    led.cap(20)
    led.expect("po-1", 20, where=where)
    for i, qty in enumerate((3, 5, 2, 6)):
        led.reserve(f"o{i}", qty)
    assert led.record is not None
    before = (led.record.on_hand, led.record.reserved, led.record.staged)
    led.restock(9, po="po-1")
    after = (led.record.on_hand, led.record.reserved, led.record.staged)
    assert after[0] - before[0] == 9
    held = after[1] - before[1]
    staged = after[2] - before[2]
    assert (held, staged) == (8, 1)  # o0 and o1 converted; 1 staged for o2 (2)
    assert led.record.available == 1 + (9 - held - staged)
    if located:
        (x,) = led.record.locations
        assert x == LocationStock("dc-1", on_hand=10, reserved=8, staged=1)
