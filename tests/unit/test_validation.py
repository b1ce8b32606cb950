"""Input rules that dead-letter, one reason per test."""

from __future__ import annotations

import pytest

from config.settings import Settings
from pipeline.domain import core
from schemas.validation import Invalid, to_command

S = Settings(max_qty=100, max_sku_len=8, default_ttl_ms=5000)
T0 = 1_700_000_000_000


def restock(**over):
    return {
        "event_id": "e",
        "sku": "A",
        "qty": 1,
        "occurred_at": T0,
        "channel": "warehouse",
        **over,
    }


def reserve(**over):
    return {
        "event_id": "e",
        "order_id": "o",
        "sku": "A",
        "qty": 1,
        "occurred_at": T0,
        "channel": "web",
        "ttl_ms": 0,
        "allow_partial": False,
        **over,
    }


def reason(topic, key, name, rec) -> str:
    with pytest.raises(Invalid) as info:
        to_command(topic, key, name, rec, S)
    return info.value.reason


def test_valid_restock_builds_the_core_command():
    cmd = to_command(S.restocks_topic, b"A", "RestockReceived", restock(qty=3), S)
    assert cmd == core.RestockReceived("e", "A", 3, T0, "warehouse")


def test_reserve_without_ttl_gets_the_configured_default():
    cmd = to_command(S.orders_topic, b"A", "ReserveStock", reserve(), S)
    assert cmd.ttl_ms == 5000


@pytest.mark.parametrize(
    ("topic", "key", "name", "rec", "expected"),
    [
        (S.orders_topic, b"A", "RestockReceived", restock(), "wrong_topic"),
        (S.restocks_topic, b"A", "RestockReceived", restock(qty=0), "qty_not_positive"),
        (S.restocks_topic, b"A", "RestockReceived", restock(qty=-2), "qty_not_positive"),
        (S.restocks_topic, b"A", "RestockReceived", restock(qty=101), "qty_too_large"),
        (S.restocks_topic, b"", "RestockReceived", restock(sku=""), "empty_sku"),
        (
            S.restocks_topic,
            b"ABCDEFGHI",
            "RestockReceived",
            restock(sku="ABCDEFGHI"),
            "sku_too_long",
        ),
        (S.restocks_topic, b"A\x00", "RestockReceived", restock(sku="A\x00"), "invalid_sku"),
        (S.restocks_topic, b"B", "RestockReceived", restock(), "key_mismatch"),
        (S.restocks_topic, b"A", "RestockReceived", restock(event_id=""), "missing_event_id"),
        (S.restocks_topic, b"A", "RestockReceived", restock(occurred_at=0), "invalid_occurred_at"),
        (S.orders_topic, b"A", "ReserveStock", reserve(order_id=""), "missing_order_id"),
        (S.orders_topic, b"A", "ReserveStock", reserve(ttl_ms=-1), "invalid_ttl"),
        (S.restocks_topic, b"A", "StockCounted", restock(), "missing_field"),
    ],
)
def test_bad_records_are_refused_with_a_stable_reason(topic, key, name, rec, expected):
    assert reason(topic, key, name, rec) == expected


def test_zero_is_a_valid_count_and_safety_stock():
    count = to_command(
        S.restocks_topic,
        b"A",
        "StockCounted",
        {"event_id": "e", "sku": "A", "on_hand": 0, "occurred_at": T0},
        S,
    )
    safety = to_command(
        S.restocks_topic,
        b"A",
        "SafetyStockSet",
        {"event_id": "e", "sku": "A", "qty": 0, "occurred_at": T0},
        S,
    )
    assert count.on_hand == 0 and safety.qty == 0


def resolve(**over):
    return {
        "event_id": "e",
        "sku": "A",
        "qty": 2,
        "action": "RESTOCK",
        "reason": "passed inspection",
        "occurred_at": T0,
        "channel": "warehouse",
        **over,
    }


def test_a_damaged_stock_resolution_is_read_from_the_returns_topic():
    cmd = to_command(S.returns_topic, b"A", "DamagedStockResolved", resolve(), S)
    assert cmd == core.DamagedStockResolved(
        "e", "A", 2, core.DamagedAction.RESTOCK, T0, "passed inspection", "warehouse"
    )
    off = to_command(S.returns_topic, b"A", "DamagedStockResolved", resolve(action="WRITE_OFF"), S)
    assert off.action is core.DamagedAction.WRITE_OFF


@pytest.mark.parametrize(
    ("topic", "rec", "expected"),
    [
        (S.restocks_topic, resolve(), "wrong_topic"),
        (S.returns_topic, resolve(qty=0), "qty_not_positive"),
        (S.returns_topic, resolve(qty=-1), "qty_not_positive"),
        (S.returns_topic, resolve(qty=101), "qty_too_large"),
        (S.returns_topic, resolve(action="SELL"), "invalid_action"),
        (S.returns_topic, resolve(action=""), "invalid_action"),
        (S.returns_topic, resolve(event_id=""), "missing_event_id"),
        (S.returns_topic, resolve(reason="x" * 257), "text_too_long"),
    ],
)
def test_bad_damaged_stock_resolutions_are_dead_lettered(topic, rec, expected):
    assert reason(topic, b"A", "DamagedStockResolved", rec) == expected


def test_locations_are_read_from_every_command_that_names_one():
    cmd = to_command(S.restocks_topic, b"A", "RestockReceived", restock(location="DC-1"), S)
    assert cmd == core.RestockReceived("e", "A", 1, T0, "warehouse", location="DC-1")
    # null (the RestockReceived/StockCounted default) is the default location, as "" is
    cmd = to_command(S.restocks_topic, b"A", "RestockReceived", restock(location=None), S)
    assert cmd.location == ""
    count = {**restock(on_hand=2, location="store-7")}
    del count["qty"]
    assert to_command(S.restocks_topic, b"A", "StockCounted", count, S).location == "store-7"
    got = to_command(S.orders_topic, b"A", "ReserveStock", reserve(location="S1", split=True), S)
    assert (got.location, got.split) == ("S1", True)
    plain = to_command(S.orders_topic, b"A", "ReserveStock", reserve(), S)
    assert (plain.location, plain.split) == ("", False)


def transfer(name: str, **over):
    base = {"event_id": "e", "transfer_id": "t1", "sku": "A", "occurred_at": T0, **over}
    if name == "TransferShipped":
        return {"qty": 2, "source": "DC-1", "destination": "S1", **base}
    if name == "TransferReceived":
        return {"qty": 2, **base}
    return base


def test_transfers_are_read_from_the_restocks_topic():
    ship = to_command(S.restocks_topic, b"A", "TransferShipped", transfer("TransferShipped"), S)
    assert ship == core.TransferShipped("e", "t1", "A", 2, "DC-1", "S1", T0)
    got = to_command(
        S.restocks_topic, b"A", "TransferReceived", transfer("TransferReceived", qty=0), S
    )
    assert got == core.TransferReceived("e", "t1", "A", 0, T0)  # all lost is a receipt
    back = to_command(S.restocks_topic, b"A", "TransferCancelled", transfer("TransferCancelled"), S)
    assert back == core.TransferCancelled("e", "t1", "A", T0)


@pytest.mark.parametrize(
    ("name", "rec", "expected"),
    [
        ("TransferShipped", transfer("TransferShipped", qty=0), "qty_not_positive"),
        ("TransferShipped", transfer("TransferShipped", source="x" * 129), "text_too_long"),
        ("TransferShipped", transfer("TransferShipped", destination="a\nb"), "invalid_location"),
        ("TransferShipped", transfer("TransferShipped", transfer_id=""), "missing_transfer_id"),
        (
            "TransferReceived",
            transfer("TransferReceived", transfer_id="t" * 129),
            "invalid_transfer_id",
        ),
        ("TransferReceived", transfer("TransferReceived", qty=101), "qty_too_large"),
        (
            "TransferCancelled",
            transfer("TransferCancelled", transfer_id="a\x00"),
            "invalid_transfer_id",
        ),
        ("RestockReceived", restock(location="x" * 129), "text_too_long"),
        ("RestockReceived", restock(location="a\x00b"), "invalid_location"),
    ],
)
def test_bad_transfers_and_locations_are_dead_lettered(name, rec, expected):
    assert reason(S.restocks_topic, b"A", name, rec) == expected


def test_a_transfer_is_not_accepted_on_the_returns_topic():
    rec = transfer("TransferCancelled")
    assert reason(S.returns_topic, b"A", "TransferCancelled", rec) == "wrong_topic"


def incoming(name: str, **over):
    base = {"event_id": "e", "sku": "A", "occurred_at": T0, **over}
    if name == "IncomingStock":
        return {"po_id": "po-1", "qty": 10, "expected_at": T0 + 1, "location": "", **base}
    if name == "PurchaseOrderClosed":
        return {"po_id": "po-1", "cancelled": True, **base}
    return {"max_units": 5, **base}


def test_incoming_records_build_their_core_commands_from_the_restocks_topic():
    got = to_command(S.restocks_topic, b"A", "IncomingStock", incoming("IncomingStock"), S)
    assert got == core.IncomingStock("e", "A", "po-1", 10, T0 + 1, T0)
    got = to_command(
        S.restocks_topic, b"A", "PurchaseOrderClosed", incoming("PurchaseOrderClosed"), S
    )
    assert got == core.PurchaseOrderClosed("e", "A", "po-1", T0, cancelled=True)
    got = to_command(S.restocks_topic, b"A", "BackorderCapSet", incoming("BackorderCapSet"), S)
    assert got == core.BackorderCapSet("e", "A", 5, T0)
    for name in ("IncomingStock", "PurchaseOrderClosed", "BackorderCapSet"):
        assert reason(S.orders_topic, b"A", name, incoming(name)) == "wrong_topic"


def test_a_restock_naming_a_purchase_order_and_a_reserve_allowing_a_backorder():
    cmd = to_command(
        S.restocks_topic, b"A", "RestockReceived", restock(po_id="po-1", final=True), S
    )
    assert (cmd.po_id, cmd.final) == ("po-1", True)
    plain = to_command(S.restocks_topic, b"A", "RestockReceived", restock(final=True), S)
    assert (plain.po_id, plain.final) == ("", False)  # final means nothing without a PO
    cmd = to_command(S.orders_topic, b"A", "ReserveStock", reserve(allow_backorder=True), S)
    assert cmd.allow_backorder is True


@pytest.mark.parametrize(
    ("name", "over", "expected"),
    [
        ("IncomingStock", {"po_id": ""}, "missing_po_id"),
        ("IncomingStock", {"po_id": "p" * 129}, "invalid_po_id"),
        ("IncomingStock", {"po_id": "a\x00"}, "invalid_po_id"),
        ("IncomingStock", {"qty": -1}, "qty_not_positive"),
        ("IncomingStock", {"qty": 101}, "qty_too_large"),
        ("IncomingStock", {"expected_at": -5}, "invalid_expected_at"),
        ("IncomingStock", {"location": "a\x01"}, "invalid_location"),
        ("PurchaseOrderClosed", {"po_id": ""}, "missing_po_id"),
        ("BackorderCapSet", {"max_units": -1}, "qty_not_positive"),
    ],
)
def test_bad_incoming_records_are_dead_letters(name, over, expected):
    assert reason(S.restocks_topic, b"A", name, incoming(name, **over)) == expected


def test_a_restock_with_a_bad_po_id_is_a_dead_letter():
    rec = restock(po_id="x\x02")
    assert reason(S.restocks_topic, b"A", "RestockReceived", rec) == "invalid_po_id"
