"""Rules of the pure decision core, one behaviour per test."""

from __future__ import annotations

from pipeline.domain import core
from pipeline.domain.core import Outcome, ReservationStatus

T0 = 1_700_000_000_000


def restock(sku: str = "A", qty: int = 10, eid: str = "r1") -> core.RestockReceived:
    return core.RestockReceived(eid, sku, qty, T0)


def reserve(
    order: str = "o1",
    qty: int = 3,
    eid: str | None = None,
    t: int = T0,
    ttl: int = 60_000,
    partial: bool = False,
    sku: str = "A",
) -> core.ReserveStock:
    return core.ReserveStock(eid or f"res-{order}", order, sku, qty, t, "web", ttl, partial)


def stocked(qty: int = 10) -> core.StockRecord:
    return core.decide(None, restock(qty=qty), T0).record


def reserved(order: str = "o1", qty: int = 3, on_hand: int = 10):
    rec = stocked(on_hand)
    d = core.decide(rec, reserve(order, qty), T0)
    return d.record, d.reservation


def result_of(d: core.Decision) -> core.ReservationResult:
    return next(e for e in d.events if isinstance(e, core.ReservationResult))


def changes_of(d: core.Decision) -> list[core.StockChanged]:
    return [e for e in d.events if isinstance(e, core.StockChanged)]


def test_restock_of_new_sku_creates_record_at_version_1():
    d = core.decide(None, restock(qty=5), T0)
    assert (d.record.on_hand, d.record.version, d.outcome) == (5, 1, Outcome.RESTOCKED)
    [chg] = changes_of(d)
    assert (chg.version, chg.available, chg.cause_type) == (1, 5, "RestockReceived")


def test_reserve_within_available_holds_units_and_answers_reserved():
    rec = stocked(10)
    d = core.decide(rec, reserve(qty=4), T0)
    assert (d.record.reserved, d.record.on_hand, d.record.available) == (4, 10, 6)
    assert result_of(d).outcome is Outcome.RESERVED
    assert d.reservation.status is ReservationStatus.RESERVED
    assert d.reservation.expires_at == T0 + 60_000
    assert d.record.version == rec.version + 1


def test_reserve_beyond_available_is_rejected_with_available_count_and_no_change():
    rec = stocked(2)
    d = core.decide(rec, reserve(qty=3), T0)
    r = result_of(d)
    assert (r.outcome, r.available, r.qty) == (Outcome.REJECTED, 2, 3)
    assert d.record == rec
    assert changes_of(d) == []
    assert d.reservation.status is ReservationStatus.REJECTED


def test_partial_reserve_only_when_asked():
    rec = stocked(2)
    d = core.decide(rec, reserve(qty=5, partial=True), T0)
    assert result_of(d).outcome is Outcome.RESERVED
    assert d.reservation.qty == 2 and d.record.available == 0


def test_safety_stock_is_never_offered():
    rec = stocked(10)
    rec = core.decide(rec, core.SafetyStockSet("s1", "A", 8, T0), T0).record
    assert rec.available == 2
    assert result_of(core.decide(rec, reserve(qty=3), T0)).outcome is Outcome.REJECTED


def test_available_is_shown_as_zero_when_negative():
    rec = core.StockRecord("A", on_hand=1, reserved=0, safety_stock=5)
    assert rec.available == 0


def test_commit_removes_units_from_on_hand_and_reserved():
    rec, res = reserved(qty=3)
    d = core.decide(rec, core.CommitReservation("c1", "o1", "A", T0 + 1), T0, res)
    assert (d.record.on_hand, d.record.reserved) == (7, 0)
    assert result_of(d).outcome is Outcome.COMMITTED
    assert d.reservation.status is ReservationStatus.COMMITTED


def test_release_returns_units_to_available():
    rec, res = reserved(qty=3)
    d = core.decide(
        rec, core.ReleaseReservation("x1", "o1", "A", T0 + 1, "payment_failed"), T0, res
    )
    assert (d.record.on_hand, d.record.reserved, d.record.available) == (10, 0, 10)
    assert result_of(d).reason == "payment_failed"


def test_expire_after_expiry_releases_with_reason_expired():
    rec, res = reserved(qty=3)
    at = res.expires_at
    d = core.decide(rec, core.ExpireReservation("e1", "o1", "A", at), at, res)
    assert d.record.reserved == 0
    r = result_of(d)
    assert (r.outcome, r.reason) == (Outcome.EXPIRED, "expired")


def test_an_expire_from_the_future_cannot_end_a_hold_early():
    """Any producer of the public orders topic can send ExpireReservation: the ledger's
    clock caps its time, so a forged occurred_at past the expiry changes nothing."""
    rec, res = reserved(qty=3)
    forged = core.ExpireReservation("e1", "o1", "A", res.expires_at + 10**9)
    d = core.decide(rec, forged, res.expires_at - 1, res)
    assert d.record == rec and d.reservation is None
    assert d.outcome is Outcome.NOT_EXPIRED
    # once the ledger's clock is past the expiry, the same command expires it
    d = core.decide(rec, forged, res.expires_at, res)
    assert (d.outcome, d.record.reserved) == (Outcome.EXPIRED, 0)
    assert d.reservation is not None and d.reservation.decided_at == res.expires_at


def test_expire_before_expiry_changes_nothing_and_is_silent():
    rec, res = reserved(qty=3)
    d = core.decide(rec, core.ExpireReservation("e1", "o1", "A", res.expires_at - 1), T0, res)
    assert d.record == rec and d.reservation is None
    assert d.outcome is Outcome.NOT_EXPIRED
    assert not [e for e in d.events if isinstance(e, core.ReservationResult)]


def test_commit_after_expiry_expires_instead():
    rec, res = reserved(qty=3)
    d = core.decide(rec, core.CommitReservation("c1", "o1", "A", res.expires_at + 5), T0, res)
    assert result_of(d).outcome is Outcome.EXPIRED
    assert (d.record.on_hand, d.record.reserved) == (10, 0)


def test_commit_of_unknown_order_is_answered_unknown_reservation():
    d = core.decide(stocked(), core.CommitReservation("c1", "nope", "A", T0), T0, None)
    assert result_of(d).outcome is Outcome.UNKNOWN_RESERVATION
    assert d.reservation is None


def test_commit_of_released_order_is_invalid_state():
    rec, res = reserved()
    d = core.decide(rec, core.ReleaseReservation("x1", "o1", "A", T0 + 1), T0, res)
    d2 = core.decide(d.record, core.CommitReservation("c1", "o1", "A", T0 + 2), T0, d.reservation)
    assert result_of(d2).outcome is Outcome.INVALID_STATE
    assert d2.record == d.record


def test_retried_reserve_gets_original_outcome_flagged_duplicate():
    rec, res = reserved(qty=3)
    d = core.decide(rec, reserve(qty=3), T0, res)
    r = result_of(d)
    assert (r.outcome, r.duplicate) == (Outcome.RESERVED, True)
    assert d.record == rec and d.reservation is None


def test_retried_rejected_reserve_stays_rejected_after_restock():
    rec = stocked(1)
    d = core.decide(rec, reserve(qty=5), T0)
    rec2 = core.decide(d.record, restock(qty=10, eid="r2"), T0).record
    again = core.decide(rec2, reserve(qty=5), T0, d.reservation)
    assert result_of(again).outcome is Outcome.REJECTED and result_of(again).duplicate


def test_duplicate_commit_is_answered_committed_and_changes_nothing():
    rec, res = reserved(qty=3)
    d = core.decide(rec, core.CommitReservation("c1", "o1", "A", T0 + 1), T0, res)
    d2 = core.decide(d.record, core.CommitReservation("c1", "o1", "A", T0 + 1), T0, d.reservation)
    assert result_of(d2).outcome is Outcome.COMMITTED and result_of(d2).duplicate
    assert d2.record == d.record


def test_duplicate_restock_event_id_is_not_applied_twice():
    rec = stocked(10)
    d = core.decide(rec, restock(qty=10), T0)  # same event id "r1"
    assert d.outcome is Outcome.DUPLICATE and d.record == rec


def test_dedupe_window_forgets_oldest_event_ids():
    rec = core.StockRecord("A")
    for i in range(5):
        rec = core.decide(rec, restock(qty=1, eid=f"e{i}"), T0, dedupe_window=3).record
    assert rec.recent_event_ids == ("e2", "e3", "e4")


def test_count_sets_absolute_on_hand():
    d = core.decide(stocked(10), core.StockCounted("k1", "A", 7, T0), T0)
    assert d.record.on_hand == 7 and d.outcome is Outcome.COUNTED


def test_count_below_reserved_emits_shortfall():
    rec, _ = reserved(qty=5)
    d = core.decide(rec, core.StockCounted("k1", "A", 3, T0), T0)
    [sf] = [e for e in d.events if isinstance(e, core.StockShortfall)]
    assert (sf.counted, sf.reserved, sf.shortfall) == (3, 5, 2)
    assert d.outcome is Outcome.SHORTFALL and d.record.available == 0


def test_count_equal_to_on_hand_changes_no_version():
    rec = stocked(10)
    d = core.decide(rec, core.StockCounted("k1", "A", 10, T0), T0)
    assert d.record.version == rec.version and changes_of(d) == []


def test_resellable_return_goes_back_on_hand():
    d = core.decide(stocked(10), core.ReturnReceived("t1", "o9", "A", 2, True, T0), T0)
    assert d.record.on_hand == 12 and d.outcome is Outcome.RETURNED
    assert changes_of(d)[0].order_id == "o9"


def test_damaged_return_is_counted_not_sold_and_published():
    rec = stocked(10)
    d = core.decide(rec, core.ReturnReceived("t1", "o9", "A", 2, False, T0), T0)
    assert (d.record.on_hand, d.record.damaged) == (10, 2)
    assert d.record.available == 10  # never sellable
    assert d.record.version == rec.version + 1 and d.outcome is Outcome.RETURN_DAMAGED
    (change,) = changes_of(d)
    assert (change.damaged, change.on_hand, change.available, change.version) == (2, 10, 10, 2)
    assert change.order_id == "o9" and change.cause_type == "ReturnReceived"


def damaged(n: int = 5, on_hand: int = 10) -> core.StockRecord:
    """A SKU with ``on_hand`` sellable and ``n`` damaged units."""
    return core.decide(
        stocked(on_hand), core.ReturnReceived("d0", "o0", "A", n, False, T0), T0
    ).record


def resolve(qty: int, action: str, eid: str = "q1") -> core.DamagedStockResolved:
    return core.DamagedStockResolved(eid, "A", qty, core.DamagedAction(action), T0, reason="qc")


def test_restocking_damaged_units_makes_them_sellable():
    rec = damaged(5)
    d = core.decide(rec, resolve(3, "RESTOCK"), T0 + 1)
    assert (d.record.on_hand, d.record.damaged, d.record.available) == (13, 2, 13)
    assert d.outcome is Outcome.DAMAGED_RESTOCKED and d.record.version == rec.version + 1
    (change,) = changes_of(d)
    assert (change.on_hand, change.damaged, change.cause_type) == (13, 2, "DamagedStockResolved")
    applied = d.events[-1]
    assert isinstance(applied, core.CommandApplied) and applied.reason == "qc"


def test_writing_off_damaged_units_removes_them_and_leaves_on_hand():
    rec = damaged(5)
    d = core.decide(rec, resolve(5, "WRITE_OFF"), T0)
    assert (d.record.on_hand, d.record.damaged) == (10, 0)
    assert d.outcome is Outcome.DAMAGED_WRITTEN_OFF and d.record.version == rec.version + 1
    assert changes_of(d)[0].damaged == 0


def test_resolving_more_than_damaged_is_refused_and_stays_refused():
    rec = damaged(2)
    d = core.decide(rec, resolve(3, "RESTOCK"), T0)
    assert d.outcome is Outcome.INSUFFICIENT_DAMAGED and changes_of(d) == []
    assert (d.record.on_hand, d.record.damaged, d.record.version) == (10, 2, rec.version)
    assert "3 damaged units asked, 2 held" in d.events[-1].reason
    # more damaged units arrive; the refused command sent again is a duplicate, not applied
    more = core.decide(d.record, core.ReturnReceived("d1", "o1", "A", 5, False, T0), T0).record
    again = core.decide(more, resolve(3, "RESTOCK"), T0)
    assert again.outcome is Outcome.DUPLICATE and again.record == more
    # a SKU never seen has no damaged units
    assert core.decide(None, resolve(1, "WRITE_OFF"), T0).outcome is Outcome.INSUFFICIENT_DAMAGED


def test_a_resolve_redelivered_is_applied_once():
    first = core.decide(damaged(5), resolve(2, "WRITE_OFF", eid="w"), T0)
    second = core.decide(first.record, resolve(2, "WRITE_OFF", eid="w"), T0)
    assert second.outcome is Outcome.DUPLICATE and second.record == first.record
    stored = core.decide(damaged(5), resolve(2, "WRITE_OFF", eid="w"), T0, applied_before=True)
    assert stored.outcome is Outcome.DUPLICATE and stored.record.damaged == 5


def test_restocking_damaged_units_past_the_count_limit_is_refused():
    rec = core.StockRecord("A", on_hand=core.MAX_COUNT, damaged=1, version=3)
    d = core.decide(rec, resolve(1, "RESTOCK"), T0)
    assert d.outcome is Outcome.LIMIT_EXCEEDED and d.record == rec


def test_versions_rise_by_exactly_one_per_change():
    rec = core.StockRecord("A")
    versions = []
    cmds = [
        restock(qty=5, eid="a"),
        reserve("o1", 2),
        reserve("o2", 9),
        core.SafetyStockSet("s", "A", 1, T0),
        restock(qty=1, eid="b"),
    ]
    res = None
    for c in cmds:
        d = core.decide(rec, c, T0, res if isinstance(c, core.ReserveStock) else None)
        versions += [e.version for e in changes_of(d)]
        rec = d.record
    assert versions == [1, 2, 3, 4]


def test_time_comes_from_the_command_not_from_now():
    rec = stocked(10)
    a = core.decide(rec, reserve(qty=1, t=T0), now=1)
    b = core.decide(rec, reserve(qty=1, t=T0), now=999_999_999)
    assert a.record == b.record and a.reservation == b.reservation


def test_low_stock_crossing_down_and_back_up_is_an_event():
    rec = stocked(10)
    down = core.decide(rec, reserve(qty=6), T0, low_stock_threshold=5)
    [ev] = [e for e in down.events if isinstance(e, core.LowStockCrossed)]
    assert (ev.direction, ev.available, ev.threshold, ev.version) == ("down", 4, 5, 2)
    still_low = core.decide(down.record, reserve("o2", 1), T0, low_stock_threshold=5)
    assert not [e for e in still_low.events if isinstance(e, core.LowStockCrossed)]
    up = core.decide(still_low.record, restock(qty=5, eid="r2"), T0, low_stock_threshold=5)
    [ev] = [e for e in up.events if isinstance(e, core.LowStockCrossed)]
    assert (ev.direction, ev.available) == ("up", 8)


def test_low_stock_is_off_by_default():
    d = core.decide(stocked(10), reserve(qty=9), T0)
    assert not [e for e in d.events if isinstance(e, core.LowStockCrossed)]


def test_retried_late_commit_gets_the_original_expired_answer():
    rec, res = reserved(qty=3)
    late = core.CommitReservation("pay-1", "o1", "A", res.expires_at + 5)
    first = core.decide(rec, late, T0, res)
    again = core.decide(first.record, late, T0, first.reservation)
    r1, r2 = result_of(first), result_of(again)
    assert (r1.outcome, r1.duplicate) == (Outcome.EXPIRED, False)
    assert (r2.outcome, r2.duplicate) == (Outcome.EXPIRED, True)
    assert again.record == first.record


def test_a_different_commit_after_expiry_is_invalid_state():
    rec, res = reserved(qty=3)
    at = res.expires_at
    d = core.decide(rec, core.ExpireReservation("x", "o1", "A", at), at, res)
    late = core.decide(d.record, core.CommitReservation("pay-2", "o1", "A", T0), at, d.reservation)
    assert result_of(late).outcome is Outcome.INVALID_STATE


# --- per-customer caps (CustomerLimitSet) ---------------------------------------------------


def capped(cap: int = 2, sale: str = "s1", on_hand: int = 10) -> core.StockRecord:
    rec = stocked(on_hand)
    d = core.decide(rec, core.CustomerLimitSet("cap", "A", cap, T0, sale), T0)
    assert d.outcome is Outcome.CUSTOMER_LIMIT_SET
    return d.record


def cust_reserve(order: str, qty: int, customer: str = "c1", **kw) -> core.ReserveStock:
    base = reserve(order, qty, **kw)
    return core.ReserveStock(**{**base.__dict__, "customer_id": customer})


def cust_decide(rec, cmd, usage=None, res=None):
    return core.decide(rec, cmd, T0, res, usage=usage)


def test_a_cap_is_no_stock_change_and_lives_in_the_record_without_customers():
    before = stocked()
    rec = capped(2, "s1")
    assert (rec.customer_limit, rec.sale_id, rec.version) == (2, "s1", before.version)


def test_a_reserve_within_the_cap_is_counted_in_the_current_sale():
    rec = capped(2)
    d = cust_decide(rec, cust_reserve("o1", 2))
    assert d.outcome is Outcome.RESERVED
    assert d.usage == core.CustomerUsage("s1", "c1", 2)
    assert (d.reservation.customer_id, d.reservation.counted, d.reservation.sale_id) == (
        "c1",
        True,
        "s1",
    )


def test_a_reserve_past_the_cap_is_rejected_with_the_allowance_left():
    rec = capped(2)
    d = cust_decide(rec, cust_reserve("o2", 2), usage=core.CustomerUsage("s1", "c1", 1))
    r = result_of(d)
    assert (r.outcome, r.reason, r.available) == (Outcome.REJECTED, "customer_limit", 1)
    assert d.usage is None and d.record == rec
    assert d.reservation.status is ReservationStatus.REJECTED


def test_allow_partial_grants_up_to_the_allowance():
    rec = capped(3)
    d = cust_decide(
        rec, cust_reserve("o2", 5, partial=True), usage=core.CustomerUsage("s1", "c1", 1)
    )
    r = result_of(d)
    assert (r.outcome, r.qty, r.reason) == (Outcome.RESERVED, 2, "partial")
    assert d.usage.units == 3


def test_allow_partial_with_no_allowance_left_is_a_customer_limit_rejection():
    rec = capped(2)
    d = cust_decide(
        rec, cust_reserve("o2", 1, partial=True), usage=core.CustomerUsage("s1", "c1", 2)
    )
    assert (result_of(d).reason, result_of(d).available) == ("customer_limit", 0)


def test_out_of_stock_under_the_cap_keeps_the_stock_reason():
    rec = capped(5, on_hand=1)
    d = cust_decide(rec, cust_reserve("o1", 2))
    assert result_of(d).reason == "insufficient_stock"


def test_reserves_without_a_customer_and_skus_without_a_cap_are_not_capped():
    rec = capped(1)
    d = cust_decide(rec, reserve("o1", 5))
    assert d.outcome is Outcome.RESERVED and d.usage is None
    d = cust_decide(stocked(), cust_reserve("o2", 5))
    assert d.outcome is Outcome.RESERVED and d.usage is None and not d.reservation.counted


def test_release_and_expiry_give_the_allowance_back_commit_does_not():
    rec = capped(2)
    d = cust_decide(rec, cust_reserve("o1", 2))
    used, res = d.usage, d.reservation
    released = cust_decide(d.record, core.ReleaseReservation("rel", "o1", "A", T0 + 1), used, res)
    assert released.usage == core.CustomerUsage("s1", "c1", 0)
    committed = cust_decide(d.record, core.CommitReservation("com", "o1", "A", T0 + 1), used, res)
    assert committed.outcome is Outcome.COMMITTED and committed.usage is None
    expired = core.decide(
        d.record, core.ExpireReservation("x", "o1", "A", T0 + 60_000), T0 + 60_000, res, usage=used
    )
    assert expired.outcome is Outcome.EXPIRED and expired.usage.units == 0


def test_a_duplicate_reserve_changes_no_usage():
    rec = capped(2)
    d = cust_decide(rec, cust_reserve("o1", 2))
    again = cust_decide(d.record, cust_reserve("o1", 2), d.usage, d.reservation)
    assert result_of(again).duplicate and again.usage is None


def test_a_new_sale_counts_from_zero_and_names_its_own_usage_key():
    rec = capped(2, "s1")
    rec = core.decide(rec, core.CustomerLimitSet("cap2", "A", 2, T0, "s2"), T0).record
    assert core.usage_key(rec, cust_reserve("o1", 1), None) == ("s2", "c1")
    d = cust_decide(rec, cust_reserve("o1", 2))
    assert d.outcome is Outcome.RESERVED and d.usage == core.CustomerUsage("s2", "c1", 2)


def test_a_reservation_counted_in_an_old_sale_gives_back_to_that_sale():
    rec = capped(2, "s1")
    d = cust_decide(rec, cust_reserve("o1", 2))
    rec2 = core.decide(d.record, core.CustomerLimitSet("cap2", "A", 2, T0, "s2"), T0).record
    release = core.ReleaseReservation("rel", "o1", "A", T0 + 1)
    assert core.usage_key(rec2, release, d.reservation) == ("s1", "c1")


def test_usage_of_another_customer_is_refused():
    rec = capped(2)
    try:
        cust_decide(rec, cust_reserve("o1", 1), usage=core.CustomerUsage("s1", "other", 0))
    except ValueError:
        return
    raise AssertionError("decide() took another customer's usage")
