"""Per-customer caps outside the core: input rules, the saga, the stored layout, old records."""

from __future__ import annotations

import io

import pytest
from fastavro import parse_schema, schemaless_writer

from config.settings import Settings
from pipeline.domain import core
from pipeline.domain import saga as sg
from schemas import validation
from schemas.codec import RELEASED_DIR, SINGLE_OBJECT_MAGIC, AvroCodec, fingerprint
from schemas.validation import Invalid, to_command
from tables.orders import saga_from_dict, saga_to_dict
from tables.stock import (
    RESERVATION_SEP,
    OpenReservations,
    StoredReservation,
    StoredStock,
    StoredUsage,
    usage_key,
)

S = Settings(max_qty=100, max_sku_len=16, default_ttl_ms=5000)
T0 = 1_700_000_000_000


def limit(**over):
    return {"event_id": "e", "sku": "A", "max_units": 2, "sale_id": "bf", "occurred_at": T0, **over}


def reserve(**over):
    rec = {"event_id": "e", "order_id": "o", "sku": "A", "qty": 1, "occurred_at": T0}
    return {**rec, "channel": "web", "ttl_ms": 0, "allow_partial": False, **over}


def reason(topic, name, rec) -> str:
    with pytest.raises(Invalid) as info:
        to_command(topic, b"A", name, rec, S)
    return info.value.reason


def test_customer_limit_set_goes_on_the_stock_topic_and_builds_the_command():
    cmd = to_command(S.restocks_topic, b"A", "CustomerLimitSet", limit(), S)
    assert cmd == core.CustomerLimitSet("e", "A", 2, T0, "bf", "erp")
    assert reason(S.orders_topic, "CustomerLimitSet", limit()) == "wrong_topic"


@pytest.mark.parametrize(
    ("rec", "expected"),
    [
        (limit(max_units=-1), "qty_not_positive"),
        (limit(max_units=101), "qty_too_large"),
        (limit(sale_id="x" * 129), "text_too_long"),
        (limit(sale_id="a\x00b"), "invalid_sale_id"),
        (limit(event_id=""), "missing_event_id"),
    ],
)
def test_bad_customer_limits_dead_letter(rec, expected):
    assert reason(S.restocks_topic, "CustomerLimitSet", rec) == expected


def test_zero_max_units_is_no_cap():
    assert (
        to_command(S.restocks_topic, b"A", "CustomerLimitSet", limit(max_units=0), S).max_units == 0
    )


def test_reserve_customer_id_is_bounded_like_other_text():
    cmd = to_command(S.orders_topic, b"A", "ReserveStock", reserve(customer_id="c-1"), S)
    assert cmd.customer_id == "c-1"
    assert reason(S.orders_topic, "ReserveStock", reserve(customer_id="c" * 129)) == "text_too_long"
    assert (
        reason(S.orders_topic, "ReserveStock", reserve(customer_id="c\n")) == "invalid_customer_id"
    )


def test_a_reserve_written_with_the_first_schema_is_read_without_a_customer():
    v1 = parse_schema(
        __import__("json").loads((RELEASED_DIR / "ReserveStock" / "v1.avsc").read_text())
    )
    buf = io.BytesIO()
    schemaless_writer(buf, v1, reserve())
    frame = SINGLE_OBJECT_MAGIC + fingerprint(v1) + buf.getvalue()
    name, rec = AvroCodec().decode(frame)
    assert (name, rec["customer_id"]) == ("ReserveStock", "")
    assert to_command(S.orders_topic, b"A", name, rec, S).customer_id == ""


def test_place_order_passes_its_customer_to_every_line_reserve():
    cmd = validation.to_order_command(
        b"o1",
        "PlaceOrder",
        {
            "event_id": "p",
            "order_id": "o1",
            "lines": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 2}],
            "ttl_ms": 0,
            "occurred_at": T0,
            "customer_id": "c-9",
        },
        validation.Limits.of(S),
    )
    d = sg.decide(None, cmd, grace_ms=0)
    assert {c.sku: c.customer_id for c in d.sends} == {"A": "c-9", "B": "c-9"}
    assert saga_from_dict(saga_to_dict(d.saga)) == d.saga
    with pytest.raises(Invalid) as info:
        validation.to_order_command(
            b"o1",
            "PlaceOrder",
            {**cmd.__dict__, "lines": [{"sku": "A", "qty": 1}], "customer_id": "x" * 200},
            validation.Limits.of(S),
        )
    assert info.value.reason == "text_too_long"


def test_an_order_line_refused_by_the_cap_rejects_the_order():
    s = sg.decide(
        None, sg.PlaceOrder("p", "o1", (("A", 1), ("B", 3)), T0, customer_id="c"), grace_ms=0
    ).saga
    line = s.line("B")
    res = sg.LineResult(
        sg.line_event_id("o1", "B", "reserve"), "o1", "B", "REJECTED", 3, 1, T0, "customer_limit"
    )
    d = sg.decide(s, res)
    d = sg.decide(
        d.saga,
        sg.LineResult(sg.line_event_id("o1", "A", "reserve"), "o1", "A", "REJECTED", 1, 0, T0, ""),
    )
    assert line is not None and d.result is not None
    assert d.result.outcome is sg.OrderOutcome.ORDER_REJECTED


def test_records_stored_before_the_change_are_read_with_no_cap_and_no_customer():
    old_stock = b'{"sku":"A","on_hand":5,"reserved":1,"safety_stock":0,"version":3,"ids":[],"w":{},"fx":{},"vt":0,"ch":[]}'
    rec = StoredStock.from_bytes(old_stock).record
    assert (rec.customer_limit, rec.sale_id) == (0, "")
    res = core.Reservation("o", "A", 1, core.ReservationStatus.RESERVED, T0, "web", "e", T0)
    stored = StoredReservation.new(res, "t", 1).to_bytes()
    assert b"cust" not in stored  # no customer: the layout is unchanged
    back = StoredReservation.from_bytes(stored).current
    assert StoredReservation(back).valid(StoredStock(rec, {"t": 1})) == res


def test_caps_and_counted_reservations_round_trip():
    rec = core.StockRecord("A", on_hand=3, customer_limit=2, sale_id="bf")
    assert StoredStock.from_bytes(StoredStock(rec).to_bytes()).record == rec
    res = core.Reservation(
        "o",
        "A",
        1,
        core.ReservationStatus.RESERVED,
        T0,
        "web",
        "e",
        T0,
        customer_id="c",
        counted=True,
        sale_id="bf",
    )
    stored = StoredReservation.from_bytes(StoredReservation.new(res, "t", 4).to_bytes())
    assert stored.valid(StoredStock(rec, {"t": 4})) == res
    use = StoredUsage.from_bytes(
        StoredUsage.new(core.CustomerUsage("bf", "c", 2), "t", 4).to_bytes()
    )
    assert use.valid(StoredStock(rec, {"t": 4})) == core.CustomerUsage("bf", "c", 2)
    assert use.valid(StoredStock(rec, {"t": 3})) is None  # its SKU record never landed


@pytest.mark.parametrize("sale", ["", "r", "\x00r\x00"])
def test_usage_keys_are_never_taken_for_reservations(sale):
    key = usage_key("A", sale, "r")
    assert RESERVATION_SEP not in key
    value = StoredUsage.new(core.CustomerUsage(sale, "r", 1), "t", 1).to_bytes()
    assert OpenReservations.entry_of(key, value) is None
