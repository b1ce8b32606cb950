"""The stored layout's crash rules (tables/stock.py), without a broker.

These model what a crash can leave in the changelog: a prefix of the writes,
where a reservation written by a command may have landed without that
command's SKU record.
"""

from __future__ import annotations

from pipeline.domain import core
from tables.stock import (
    OpenReservations,
    StoredReservation,
    StoredStock,
    effects_of,
    is_stock_key,
    reservation_key,
    stock_key,
)

T0 = 1_700_000_000_000
ORDERS = "inventory.orders"


def res(status: core.ReservationStatus, qty: int = 2) -> core.Reservation:
    return core.Reservation("o1", "A", qty, status, T0 + 1000, "web", "e1", T0)


def stock_at(offset: int) -> StoredStock:
    return StoredStock(core.StockRecord("A", on_hand=5, reserved=2, version=2), {ORDERS: offset})


def test_keys_separate_skus_from_reservations():
    assert is_stock_key(stock_key("A"))
    assert not is_stock_key(reservation_key("A", "o1"))
    assert reservation_key("A", "o1").startswith(stock_key("A"))


def test_stored_stock_round_trips_with_watermarks_and_effects():
    rec = core.StockRecord("A", 5, 2, 1, 3, 7, ("x", "y"))
    d = core.decide(rec, core.RestockReceived("z", "A", 1, T0), T0)
    s = StoredStock(d.record, {ORDERS: 4, "inventory.restocks": 9}, effects_of(d.events))
    back = StoredStock.from_bytes(s.to_bytes())
    assert back == s
    assert back.effects["StockChanged"][0]["version"] == 8


def test_offset_guard_covers_offsets_up_to_the_watermark_only():
    s = stock_at(10)
    assert s.applied(ORDERS, 10) and s.applied(ORDERS, 3)
    assert not s.applied(ORDERS, 11)
    assert not s.applied("inventory.restocks", 0)


def test_reservation_is_valid_when_its_command_landed():
    stored = StoredReservation.new(res(core.ReservationStatus.RESERVED), ORDERS, 7)
    assert stored.valid(stock_at(7)).status is core.ReservationStatus.RESERVED


def test_reservation_written_without_its_sku_record_falls_back_to_previous():
    opened = StoredReservation.new(res(core.ReservationStatus.RESERVED), ORDERS, 7)
    committed = opened.updated(res(core.ReservationStatus.COMMITTED), ORDERS, 12, stock_at(7))
    # crash: the commit's reservation write landed, its SKU record (watermark 12) did not
    back = StoredReservation.from_bytes(committed.to_bytes())
    assert back.valid(stock_at(7)).status is core.ReservationStatus.RESERVED
    assert back.valid(stock_at(12)).status is core.ReservationStatus.COMMITTED


def test_first_reservation_without_its_sku_record_is_no_reservation():
    stored = StoredReservation.new(res(core.ReservationStatus.RESERVED), ORDERS, 7)
    assert stored.valid(stock_at(6)) is None
    assert stored.valid(None) is None


def test_rewriting_after_a_lost_write_keeps_the_last_valid_version():
    opened = StoredReservation.new(res(core.ReservationStatus.RESERVED), ORDERS, 7)
    lost = opened.updated(res(core.ReservationStatus.COMMITTED), ORDERS, 12, stock_at(7))
    # redelivered commit re-decided at offset 12 over the recovered state (watermark 7)
    again = lost.updated(res(core.ReservationStatus.RELEASED), ORDERS, 12, stock_at(7))
    assert again.previous["status"] == "RESERVED"
    assert again.valid(stock_at(12)).status is core.ReservationStatus.RELEASED


def test_effects_hold_only_what_the_relay_publishes():
    rec = core.StockRecord("A", on_hand=3)
    d = core.decide(rec, core.ReserveStock("e", "o", "A", 2, T0), T0)
    fx = effects_of(d.events)
    assert set(fx) == {"StockChanged", "ReservationResult"}
    assert fx["ReservationResult"][0]["outcome"] == "RESERVED"


def _held(order: str, sku: str, expires_at: int, status: core.ReservationStatus) -> bytes:
    r = core.Reservation(order, sku, 1, status, expires_at, "web", f"e-{order}", T0)
    return StoredReservation.new(r, ORDERS, 1).to_bytes()


def test_open_reservations_follow_the_writes_and_report_only_the_overdue():
    idx = OpenReservations()
    k1, k2 = reservation_key("A", "o1"), reservation_key("B", "o2")
    idx.note(k1, StoredReservation.from_bytes(_held("o1", "A", T0 + 10, RESERVED)).current)
    idx.note(k2, StoredReservation.from_bytes(_held("o2", "B", T0 + 50, RESERVED)).current)
    assert len(idx) == 2
    assert idx.overdue(T0 + 9) == []
    assert idx.overdue(T0 + 10) == [("A", "o1")]
    committed = _held("o1", "A", T0 + 10, core.ReservationStatus.COMMITTED)
    idx.note(k1, StoredReservation.from_bytes(committed).current)  # closed: no longer open
    assert idx.overdue(T0 + 100) == [("B", "o2")]
    assert len(idx) == 1


def test_open_reservations_rebuild_from_the_table_skipping_sku_records_and_closed_ones():
    idx = OpenReservations()
    idx.note(
        reservation_key("Z", "gone"),
        {"status": "RESERVED", "expires_at": 0, "sku": "Z", "order_id": "gone"},
    )
    items = [
        (stock_key("A"), stock_at(3).to_bytes()),
        (reservation_key("A", "o1"), _held("o1", "A", T0 + 10, RESERVED)),
        (reservation_key("A", "o2"), _held("o2", "A", T0, core.ReservationStatus.RELEASED)),
    ]
    idx.rebuild(items, OpenReservations.entry_of)
    assert idx.overdue(T0 + 1000) == [("A", "o1")]  # the entry not in the table is gone


RESERVED = core.ReservationStatus.RESERVED


def test_notes_made_while_a_sliced_rebuild_scans_win_over_what_the_scan_found():
    idx = OpenReservations()
    k1, k2, k3 = (reservation_key("A", o) for o in ("o1", "o2", "o3"))
    idx.start_rebuild()
    found: dict[bytes, tuple[int, str, str]] = {}
    # the scan reads o1 still open, then the agent closes o1 and opens o3 mid-scan
    found[k1] = OpenReservations.entry_of(k1, _held("o1", "A", T0 + 10, RESERVED))
    idx.note(k1, StoredReservation.from_bytes(_held("o1", "A", T0 + 10, COMMITTED)).current)
    idx.note(k3, StoredReservation.from_bytes(_held("o3", "A", T0 + 30, RESERVED)).current)
    found[k2] = OpenReservations.entry_of(k2, _held("o2", "A", T0 + 20, RESERVED))
    idx.finish_rebuild(found)
    assert sorted(idx.overdue(T0 + 1000)) == [("A", "o2"), ("A", "o3")]
    # after the rebuild, notes go straight to the set again
    idx.note(k2, StoredReservation.from_bytes(_held("o2", "A", T0 + 20, COMMITTED)).current)
    assert idx.overdue(T0 + 1000) == [("A", "o3")]


def test_an_aborted_rebuild_keeps_the_old_set():
    idx = OpenReservations()
    k1 = reservation_key("A", "o1")
    idx.note(k1, StoredReservation.from_bytes(_held("o1", "A", T0 + 10, RESERVED)).current)
    idx.start_rebuild()
    idx.abort_rebuild()
    assert idx.overdue(T0 + 10) == [("A", "o1")]


COMMITTED = core.ReservationStatus.COMMITTED


def test_damaged_units_are_in_the_view_the_rebuild_and_the_sinks_change():
    rec = core.StockRecord("D", on_hand=4, damaged=3, version=2)
    old_effect = {"sku": "D", "version": 2, "on_hand": 4, "cause_type": "ReturnReceived"}
    stored = StoredStock(rec, effects={"StockChanged": [old_effect]})
    assert stored.view()["damaged"] == 3
    assert stored.as_change()["damaged"] == 3
    # an effect written before StockChanged carried damaged: the record's count fills it
    assert stored.latest_change()["damaged"] == 3
    assert StoredStock.from_bytes(stored.to_bytes()).record.damaged == 3
    new_effect = {**old_effect, "damaged": 3}
    assert StoredStock(rec, effects={"StockChanged": [new_effect]}).latest_change() == new_effect
