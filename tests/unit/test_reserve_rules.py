"""The reserve API's pure rules: request checks, derived event ids, answers to HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest

from config.settings import Settings
from pipeline.web import reserve_rules as rr
from schemas.codec import AvroCodec

CFG = Settings()
CODEC = AvroCodec()
NOW = 1_700_000_000_000


def reserve(obj: dict[str, Any], key: str = "k1") -> rr.Request:
    return rr.stock_request("ReserveStock", obj, key, NOW, CFG, CODEC)


def place(obj: dict[str, Any], key: str = "k1") -> rr.Request:
    return rr.order_request("PlaceOrder", obj, key, NOW, CFG, CODEC)


def test_a_reserve_request_becomes_the_command_the_kafka_path_accepts() -> None:
    req = reserve({"order_id": "o1", "sku": "A", "qty": 2, "allow_partial": True})
    assert req.topic == CFG.orders_topic and req.key == b"A"
    assert req.answer_topic == CFG.results_topic
    name, rec = CODEC.decode(req.value)
    assert name == "ReserveStock"
    assert rec["order_id"] == "o1" and rec["qty"] == 2 and rec["occurred_at"] == NOW
    assert rec["event_id"] == req.event_id
    assert req.status_url() == "/reservations/o1?sku=A"


def test_event_ids_are_stable_per_key_and_differ_per_type_order_and_sku() -> None:
    base = rr.derive_event_id("ReserveStock", "k", "o1", "A")
    assert base == rr.derive_event_id("ReserveStock", "k", "o1", "A")
    others = {
        rr.derive_event_id("CommitReservation", "k", "o1", "A"),
        rr.derive_event_id("ReserveStock", "k2", "o1", "A"),
        rr.derive_event_id("ReserveStock", "k", "o2", "A"),
        rr.derive_event_id("ReserveStock", "k", "o1", "B"),
    }
    assert base not in others and len(others) == 4
    # a retry at another time is the same command
    assert reserve({"order_id": "o1", "sku": "A", "qty": 1}).event_id == (
        rr.stock_request(
            "ReserveStock", {"order_id": "o1", "sku": "A", "qty": 1}, "k1", NOW + 5, CFG, CODEC
        ).event_id
    )


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (None, "missing_idempotency_key"),
        ("  ", "missing_idempotency_key"),
        ("a b", "invalid_idempotency_key"),
        ("x" * 256, "invalid_idempotency_key"),
        ('""', "invalid_idempotency_key"),
    ],
)
def test_bad_idempotency_keys_are_400(header: str | None, error: str) -> None:
    with pytest.raises(rr.ApiError) as exc:
        rr.check_key(header)
    assert (exc.value.status, exc.value.error) == (400, error)


def test_a_quoted_key_is_the_same_key() -> None:
    assert rr.check_key('"abc"') == rr.check_key("abc") == "abc"


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        ({"sku": "A", "qty": 1}, "missing_field"),
        ({"order_id": "o", "sku": "A", "qty": "1"}, "invalid_field"),
        ({"order_id": "o", "sku": "A", "qty": True}, "invalid_field"),
        ({"order_id": "o", "sku": "A", "qty": 0}, "qty_not_positive"),
        ({"order_id": "o", "sku": "A", "qty": 2**40}, "invalid_record"),  # not an Avro int
        ({"order_id": "o", "sku": "A", "qty": CFG.max_qty + 1}, "qty_too_large"),
        ({"order_id": "o", "sku": "A\x00", "qty": 1}, "invalid_sku"),
        ({"order_id": "o" * 129, "sku": "A", "qty": 1}, "invalid_order_id"),
        ({"order_id": "o", "sku": "A", "qty": 1, "ttl_ms": -5}, "invalid_ttl"),
        ({"order_id": "o", "sku": "A", "qty": 1, "channel": "c" * 65}, "text_too_long"),
        ({"order_id": "o", "sku": "A", "qty": 1, "occurred_at": 5}, "unknown_field"),
    ],
)
def test_what_the_kafka_path_would_dead_letter_is_422(obj: dict[str, Any], error: str) -> None:
    with pytest.raises(rr.ApiError) as exc:
        reserve(obj)
    assert (exc.value.status, exc.value.error) == (422, error)


@pytest.mark.parametrize("body", [b"{", b"[]", b'"x"', b"\xff\xfe"])
def test_a_body_that_is_no_json_object_is_400(body: bytes) -> None:
    with pytest.raises(rr.ApiError) as exc:
        rr.parse_object(body)
    assert exc.value.status == 400


def test_an_empty_body_is_an_empty_object() -> None:
    assert rr.parse_object(b"") == {}
    req = rr.order_request("CommitOrder", {}, "k", NOW, CFG, CODEC, order_id="o9")
    assert req.key == b"o9" and req.topic == CFG.checkouts_topic


def test_orders_are_checked_like_the_saga_checks_them() -> None:
    req = place({"order_id": "o1", "lines": [{"sku": "B", "qty": 1}, {"sku": "A", "qty": 2}]})
    assert req.saga and req.key == b"o1" and req.answer_topic == CFG.order_results_topic
    assert req.status_url() == "/orders/o1"
    req2 = place({"order_id": "o1", "lines": [{"sku": "A", "qty": 1}, {"sku": "A", "qty": 1}]})
    assert req2.lines == (("A", 2),)
    for obj, error in [
        ({"order_id": "o", "lines": []}, "no_lines"),
        ({"order_id": "o", "lines": ["A"]}, "invalid_field"),
        ({"order_id": "o", "lines": [{"sku": "A"}]}, "missing_field"),
        ({"order_id": "o", "lines": [{"sku": "A", "qty": 1}] * (CFG.max_order_lines + 1)},
         "too_many_lines"),
    ]:  # fmt: skip
        with pytest.raises(rr.ApiError) as exc:
            place(obj)
        assert exc.value.error == error


def _result(**kw: Any) -> dict[str, Any]:
    base = {
        "event_id": "e",
        "order_id": "o1",
        "sku": "A",
        "outcome": "RESERVED",
        "qty": 2,
        "available": 3,
        "reason": "",
        "duplicate": False,
    }
    return {**base, **kw}


def test_reservation_answers_map_to_http() -> None:
    req = reserve({"order_id": "o1", "sku": "A", "qty": 2})
    assert rr.reservation_response(req, _result())[0] == 200
    status, body = rr.reservation_response(req, _result(outcome="REJECTED", available=1))
    assert (status, body["available"], body["outcome"]) == (409, 1, "REJECTED")
    assert rr.reservation_response(req, _result(outcome="UNKNOWN_RESERVATION"))[0] == 404
    assert rr.reservation_response(req, _result(outcome="SOMETHING_NEW"))[0] == 409
    # the retry's body is the first answer's body
    assert rr.reservation_response(req, _result(duplicate=True)) == rr.reservation_response(
        req, _result()
    )


def test_a_duplicate_answer_for_another_quantity_is_a_reused_key() -> None:
    req = reserve({"order_id": "o1", "sku": "A", "qty": 1})
    status, body = rr.reservation_response(req, _result(duplicate=True, qty=2))
    assert (status, body["error"]) == (422, "idempotency_key_mismatch")
    # a partial reservation answered again is the same request
    partial = reserve({"order_id": "o1", "sku": "A", "qty": 5, "allow_partial": True})
    assert rr.reservation_response(partial, _result(duplicate=True, qty=2))[0] == 200
    order = place({"order_id": "o1", "lines": [{"sku": "A", "qty": 1}]})
    answer = {
        "event_id": "e",
        "order_id": "o1",
        "outcome": "ORDER_RESERVED",
        "status": "RESERVED",
        "lines": [{"sku": "A", "qty": 2, "outcome": "RESERVED", "available": -1}],
        "duplicate": True,
    }
    assert rr.order_response(order, answer)[0] == 422
    assert rr.order_response(order, {**answer, "duplicate": False})[0] == 200


def test_the_pending_body_names_where_to_look() -> None:
    req = reserve({"order_id": "o/1", "sku": "A B", "qty": 1})
    body = rr.pending_body(req)
    assert body["status_url"] == "/reservations/o%2F1?sku=A%20B"
    json.dumps(body)


def test_customer_id_goes_into_the_reserve_and_the_order_and_is_checked() -> None:
    _, rec = CODEC.decode(
        reserve({"order_id": "o1", "sku": "A", "qty": 1, "customer_id": "c1"}).value
    )
    assert rec["customer_id"] == "c1"
    lines = [{"sku": "A", "qty": 1}]
    _, rec = CODEC.decode(place({"order_id": "o1", "lines": lines, "customer_id": "c1"}).value)
    assert rec["customer_id"] == "c1"
    for make, body in (
        (reserve, {"order_id": "o1", "sku": "A", "qty": 1}),
        (place, {"order_id": "o1", "lines": lines}),
    ):
        with pytest.raises(rr.ApiError) as info:
            make({**body, "customer_id": "c" * 129})
        assert (info.value.status, info.value.error) == (422, "text_too_long")
        with pytest.raises(rr.ApiError) as info:
            make({**body, "customer_id": 7})
        assert (info.value.status, info.value.error) == (422, "invalid_field")


def test_a_customer_limit_refusal_is_409_with_the_allowance() -> None:
    req = reserve({"order_id": "o1", "sku": "A", "qty": 3, "customer_id": "c1"})
    answer = {"order_id": "o1", "sku": "A", "outcome": "REJECTED", "qty": 3, "available": 1}
    status, body = rr.response_for(req, {**answer, "reason": "customer_limit"})
    assert (status, body["reason"], body["available"]) == (409, "customer_limit", 1)


def test_a_reserve_may_name_a_location_and_ask_for_a_split() -> None:
    body = {"order_id": "o1", "sku": "A", "qty": 2, "location": "store-7", "split": True}
    _, rec = CODEC.decode(reserve(body).value)
    assert (rec["location"], rec["split"]) == ("store-7", True)
    _, rec = CODEC.decode(reserve({"order_id": "o1", "sku": "A", "qty": 2}).value)
    assert (rec["location"], rec["split"]) == ("", False)
    with pytest.raises(rr.ApiError) as info:
        reserve({**body, "location": "a\nb"})
    assert (info.value.status, info.value.error) == (422, "invalid_location")
    with pytest.raises(rr.ApiError) as info:
        reserve({**body, "split": "yes"})
    assert (info.value.status, info.value.error) == (422, "invalid_field")


def test_a_reserve_may_allow_a_backorder_and_its_answer_is_200_with_the_purchase_order() -> None:
    body = {"order_id": "o1", "sku": "A", "qty": 2, "allow_backorder": True}
    req = reserve(body)
    _, rec = CODEC.decode(req.value)
    assert rec["allow_backorder"] is True
    _, rec = CODEC.decode(reserve({"order_id": "o1", "sku": "A", "qty": 2}).value)
    assert rec["allow_backorder"] is False
    with pytest.raises(rr.ApiError) as info:
        reserve({**body, "allow_backorder": 1})
    assert (info.value.status, info.value.error) == (422, "invalid_field")
    due = 1_800_000_000_000
    answer = _result(outcome="BACKORDERED", available=0, po_id="po-7", expected_at=due)
    status, got = rr.reservation_response(req, answer)
    assert (status, got["outcome"], got["po_id"], got["expected_at"]) == (
        200,
        "BACKORDERED",
        "po-7",
        due,
    )
    # refused backorders are 409 with the reason, like any refused reserve
    refused = _result(outcome="REJECTED", qty=2, available=1, reason="backorder_cap")
    assert rr.reservation_response(req, refused)[0] == 409
    # answers without the fields (not a backorder) say "" and 0
    plain = rr.reservation_response(req, _result())[1]
    assert (plain["po_id"], plain["expected_at"]) == ("", 0)
