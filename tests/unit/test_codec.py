"""The Avro codec and the schema registry client, without a broker.

The registry tests run against a tiny in-process fake of the two Confluent
Schema Registry endpoints the client uses.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer
from hypothesis import given
from hypothesis import strategies as st

from schemas.codec import (
    SCHEMA_DIR,
    AvroCodec,
    DecodeError,
    EncodeError,
    fingerprint,
    load_schemas,
    retry_while_registry_down,
)
from schemas.registry import RegistryError, SchemaRegistry

T = 1_732_600_000_000

SAMPLES: dict[str, dict[str, Any]] = {
    "PlaceOrder": {
        "event_id": "e",
        "order_id": "o1",
        "channel": "web",
        "lines": [{"sku": "SKU-1", "qty": 2}, {"sku": "SKU-2", "qty": 1}],
        "ttl_ms": 0,
        "occurred_at": T,
        "customer_id": "cust-1",
        "location": "store-7",
        "split": False,
    },
    "CommitOrder": {"event_id": "e", "order_id": "o1", "channel": "web", "occurred_at": T},
    "CancelOrder": {
        "event_id": "e",
        "order_id": "o1",
        "reason": "cancelled",
        "channel": "web",
        "occurred_at": T,
        "expire": False,
    },
    "OrderResult": {
        "event_id": "e",
        "order_id": "o1",
        "outcome": "ORDER_REJECTED",
        "status": "REJECTED",
        "lines": [{"sku": "SKU-1", "qty": 2, "outcome": "REJECTED", "available": 1}],
        "reason": "insufficient stock",
        "duplicate": False,
        "expires_at": T,
    },
    "ReserveStock": {
        "event_id": "e1",
        "order_id": "o1",
        "sku": "SKU-1",
        "qty": 2,
        "channel": "mobile",
        "ttl_ms": 60_000,
        "occurred_at": T,
        "allow_partial": True,
        "customer_id": "",
        "location": "store-7",
        "split": True,
        "allow_backorder": False,
    },
    "CommitReservation": {
        "event_id": "e2",
        "order_id": "o1",
        "sku": "SKU-1",
        "occurred_at": T,
        "channel": "web",
    },
    "ReleaseReservation": {
        "event_id": "e3",
        "order_id": "o1",
        "sku": "SKU-1",
        "reason": "payment_failed",
        "occurred_at": T,
        "channel": "web",
    },
    "ExpireReservation": {
        "event_id": "e4",
        "order_id": "o1",
        "sku": "SKU-1",
        "occurred_at": T,
        "channel": "system",
    },
    "RestockReceived": {
        "event_id": "e5",
        "sku": "SKU-1",
        "qty": 50,
        "occurred_at": T,
        "channel": "warehouse",
        "location": "DC-1",
        "reference": "PO-9",
        "po_id": "PO-9",
        "final": True,
    },
    "StockCounted": {
        "event_id": "e6",
        "sku": "SKU-1",
        "on_hand": 0,
        "occurred_at": T,
        "channel": "store",
        "location": None,
    },
    "SafetyStockSet": {
        "event_id": "e7",
        "sku": "SKU-1",
        "qty": 3,
        "occurred_at": T,
        "channel": "erp",
        "location": "",
    },
    "ChannelAllocationSet": {
        "event_id": "e7a",
        "sku": "SKU-1",
        "channel": "marketplace",
        "qty": 20,
        "use_shared": False,
        "occurred_at": T,
    },
    "CustomerLimitSet": {
        "event_id": "e7b",
        "sku": "SKU-1",
        "max_units": 2,
        "sale_id": "black-friday",
        "occurred_at": T,
        "channel": "erp",
    },
    "ReturnReceived": {
        "event_id": "e8",
        "order_id": "o1",
        "sku": "SKU-1",
        "qty": 1,
        "resellable": False,
        "occurred_at": T,
        "channel": "web",
        "location": "store-7",
    },
    "DamagedStockResolved": {
        "event_id": "e8a",
        "sku": "SKU-1",
        "qty": 1,
        "action": "WRITE_OFF",
        "reason": "crushed box",
        "occurred_at": T,
        "channel": "warehouse",
        "location": "DC-1",
    },
    "TransferShipped": {
        "event_id": "e9",
        "transfer_id": "t1",
        "sku": "SKU-1",
        "qty": 4,
        "source": "DC-1",
        "destination": "store-7",
        "occurred_at": T,
        "channel": "warehouse",
        "reference": "TO-3",
    },
    "TransferReceived": {
        "event_id": "e10",
        "transfer_id": "t1",
        "sku": "SKU-1",
        "qty": 3,
        "occurred_at": T,
        "channel": "store",
        "reference": None,
    },
    "TransferCancelled": {
        "event_id": "e11",
        "transfer_id": "t1",
        "sku": "SKU-1",
        "occurred_at": T,
        "channel": "warehouse",
        "reference": None,
    },
    "IncomingStock": {
        "event_id": "e12",
        "sku": "SKU-1",
        "po_id": "PO-9",
        "qty": 40,
        "expected_at": T + 86_400_000,
        "occurred_at": T,
        "channel": "erp",
        "location": "DC-1",
    },
    "PurchaseOrderClosed": {
        "event_id": "e13",
        "sku": "SKU-1",
        "po_id": "PO-9",
        "occurred_at": T,
        "cancelled": True,
        "channel": "erp",
    },
    "BackorderCapSet": {
        "event_id": "e14",
        "sku": "SKU-1",
        "max_units": 30,
        "occurred_at": T,
        "channel": "erp",
    },
    "StockChanged": {
        "sku": "SKU-1",
        "version": 7,
        "on_hand": 10,
        "reserved": 4,
        "safety_stock": 1,
        "available": 5,
        "cause_type": "ReserveStock",
        "cause_event_id": "e1",
        "order_id": "o1",
        "channel": "web",
        "occurred_at": T,
        "processed_at": T + 3,
        "channels": [
            {
                "channel": "marketplace",
                "allocated": 20,
                "reserved": 2,
                "available": 18,
                "use_shared": False,
            }
        ],
        "damaged": 3,
        "locations": [
            {
                "location": "DC-1",
                "on_hand": 10,
                "reserved": 4,
                "damaged": 3,
                "available": 5,
                "inbound": 2,
            }
        ],
        "incoming": 40,
        "promised": 6,
        "backorderable": 24,
        "staged": 1,
    },
    "ReservationResult": {
        "event_id": "e1",
        "order_id": "o1",
        "sku": "SKU-1",
        "outcome": "REJECTED",
        "qty": 2,
        "available": 1,
        "reason": "insufficient stock",
        "duplicate": True,
        "po_id": "PO-9",
        "expected_at": T + 86_400_000,
    },
    "LowStockCrossed": {
        "sku": "SKU-1",
        "available": 3,
        "threshold": 5,
        "direction": "down",
        "version": 9,
        "occurred_at": T,
    },
    "StockShortfall": {
        "sku": "SKU-1",
        "counted": 4,
        "reserved": 6,
        "shortfall": 2,
        "cause_event_id": "e6",
        "occurred_at": T,
        "location": "store-7",
    },
    "DeadLetter": {
        "reason": "undecodable",
        "detail": "unknown framing",
        "source_topic": "t",
        "source_partition": 3,
        "source_offset": 2**40,
        "key": b"SKU-1",
        "value": b"\x00\xffraw",
        "dead_at": T,
    },
}

# (field, type, default or NO_DEFAULT) per record: the wire contract other services rely on
NO_DEFAULT = object()
S, L, INT, B = "string", "long", "int", "boolean"
OPT_S, OPT_B = ["null", "string"], ["null", "bytes"]


def _field_type(record: str, field: str) -> Any:
    doc = json.loads((SCHEMA_DIR / f"{record}.avsc").read_text())
    return next(f["type"] for f in doc["fields"] if f["name"] == field)


CHANNEL_STOCK = {
    "type": "array",
    "items": {
        "type": "record",
        "name": "ChannelStock",
        "doc": "One sales channel's allocation of the SKU.",
        "fields": [
            {"name": "channel", "type": "string", "doc": "The sales channel."},
            {
                "name": "allocated",
                "type": "int",
                "doc": "Units set aside for the channel (sold units leave it).",
            },
            {
                "name": "reserved",
                "type": "int",
                "doc": "Of them, units held by the channel's open reservations.",
            },
            {
                "name": "available",
                "type": "int",
                "doc": "Units the channel can reserve now (its free allocation, plus the shared pool when use_shared).",
            },
            {
                "name": "use_shared",
                "type": "boolean",
                "doc": "Whether the channel may reserve from the shared pool.",
            },
        ],
    },
}
CONTRACT: dict[str, list[tuple[str, Any, Any]]] = {
    "PlaceOrder": [
        ("event_id", S, NO_DEFAULT),
        ("order_id", S, NO_DEFAULT),
        ("channel", S, "web"),
        ("lines", _field_type("PlaceOrder", "lines"), NO_DEFAULT),
        ("ttl_ms", L, 0),
        ("occurred_at", L, NO_DEFAULT),
        ("customer_id", S, ""),
        ("location", S, ""),
        ("split", B, False),
    ],
    "CommitOrder": [
        ("event_id", S, NO_DEFAULT),
        ("order_id", S, NO_DEFAULT),
        ("channel", S, "web"),
        ("occurred_at", L, NO_DEFAULT),
    ],
    "CancelOrder": [
        ("event_id", S, NO_DEFAULT),
        ("order_id", S, NO_DEFAULT),
        ("reason", S, "cancelled"),
        ("channel", S, "web"),
        ("occurred_at", L, NO_DEFAULT),
        ("expire", B, False),
    ],
    "OrderResult": [
        ("event_id", S, NO_DEFAULT),
        ("order_id", S, NO_DEFAULT),
        ("outcome", S, NO_DEFAULT),
        ("status", S, NO_DEFAULT),
        ("lines", _field_type("OrderResult", "lines"), []),
        ("reason", S, ""),
        ("duplicate", B, False),
        ("expires_at", L, 0),
    ],
    "ReserveStock": [
        ("event_id", S, NO_DEFAULT),
        ("order_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("qty", INT, NO_DEFAULT),
        ("channel", S, "web"),
        ("ttl_ms", L, 0),
        ("occurred_at", L, NO_DEFAULT),
        ("allow_partial", B, False),
        ("customer_id", S, ""),
        ("location", S, ""),
        ("split", B, False),
        ("allow_backorder", B, False),
    ],
    "CommitReservation": [
        ("event_id", S, NO_DEFAULT),
        ("order_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "web"),
    ],
    "ReleaseReservation": [
        ("event_id", S, NO_DEFAULT),
        ("order_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("reason", S, "cancelled"),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "web"),
    ],
    "ExpireReservation": [
        ("event_id", S, NO_DEFAULT),
        ("order_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "system"),
    ],
    "RestockReceived": [
        ("event_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("qty", INT, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "warehouse"),
        ("location", OPT_S, None),
        ("reference", OPT_S, None),
        ("po_id", S, ""),
        ("final", B, False),
    ],
    "StockCounted": [
        ("event_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("on_hand", INT, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "warehouse"),
        ("location", OPT_S, None),
    ],
    "SafetyStockSet": [
        ("event_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("qty", INT, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "erp"),
        ("location", S, ""),
    ],
    "ChannelAllocationSet": [
        ("event_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("channel", S, NO_DEFAULT),
        ("qty", INT, NO_DEFAULT),
        ("use_shared", "boolean", False),
        ("occurred_at", L, NO_DEFAULT),
    ],
    "CustomerLimitSet": [
        ("event_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("max_units", INT, NO_DEFAULT),
        ("sale_id", S, ""),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "erp"),
    ],
    "ReturnReceived": [
        ("event_id", S, NO_DEFAULT),
        ("order_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("qty", INT, NO_DEFAULT),
        ("resellable", B, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "web"),
        ("location", S, ""),
    ],
    "DamagedStockResolved": [
        ("event_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("qty", INT, NO_DEFAULT),
        ("action", S, NO_DEFAULT),
        ("reason", S, ""),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "warehouse"),
        ("location", S, ""),
    ],
    "TransferShipped": [
        ("event_id", S, NO_DEFAULT),
        ("transfer_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("qty", INT, NO_DEFAULT),
        ("source", S, NO_DEFAULT),
        ("destination", S, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "warehouse"),
        ("reference", OPT_S, None),
    ],
    "TransferReceived": [
        ("event_id", S, NO_DEFAULT),
        ("transfer_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("qty", INT, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "warehouse"),
        ("reference", OPT_S, None),
    ],
    "TransferCancelled": [
        ("event_id", S, NO_DEFAULT),
        ("transfer_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "warehouse"),
        ("reference", OPT_S, None),
    ],
    "IncomingStock": [
        ("event_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("po_id", S, NO_DEFAULT),
        ("qty", INT, NO_DEFAULT),
        ("expected_at", L, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "erp"),
        ("location", S, ""),
    ],
    "PurchaseOrderClosed": [
        ("event_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("po_id", S, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("cancelled", B, False),
        ("channel", S, "erp"),
    ],
    "BackorderCapSet": [
        ("event_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("max_units", INT, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("channel", S, "erp"),
    ],
    "StockChanged": [
        ("sku", S, NO_DEFAULT),
        ("version", L, NO_DEFAULT),
        ("on_hand", INT, NO_DEFAULT),
        ("reserved", INT, NO_DEFAULT),
        ("safety_stock", INT, NO_DEFAULT),
        ("available", INT, NO_DEFAULT),
        ("cause_type", S, NO_DEFAULT),
        ("cause_event_id", S, NO_DEFAULT),
        ("order_id", S, ""),
        ("channel", S, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("processed_at", L, NO_DEFAULT),
        ("channels", CHANNEL_STOCK, []),
        ("damaged", INT, 0),
        ("locations", _field_type("StockChanged", "locations"), []),
        ("incoming", INT, 0),
        ("promised", INT, 0),
        ("backorderable", INT, 0),
        ("staged", INT, 0),
    ],
    "ReservationResult": [
        ("event_id", S, NO_DEFAULT),
        ("order_id", S, NO_DEFAULT),
        ("sku", S, NO_DEFAULT),
        ("outcome", S, NO_DEFAULT),
        ("qty", INT, NO_DEFAULT),
        ("available", INT, NO_DEFAULT),
        ("reason", S, ""),
        ("duplicate", B, False),
        ("po_id", S, ""),
        ("expected_at", L, 0),
    ],
    "LowStockCrossed": [
        ("sku", S, NO_DEFAULT),
        ("available", INT, NO_DEFAULT),
        ("threshold", INT, NO_DEFAULT),
        ("direction", S, NO_DEFAULT),
        ("version", L, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
    ],
    "StockShortfall": [
        ("sku", S, NO_DEFAULT),
        ("counted", INT, NO_DEFAULT),
        ("reserved", INT, NO_DEFAULT),
        ("shortfall", INT, NO_DEFAULT),
        ("cause_event_id", S, NO_DEFAULT),
        ("occurred_at", L, NO_DEFAULT),
        ("location", S, ""),
    ],
    "DeadLetter": [
        ("reason", S, NO_DEFAULT),
        ("detail", S, NO_DEFAULT),
        ("source_topic", S, NO_DEFAULT),
        ("source_partition", INT, NO_DEFAULT),
        ("source_offset", L, NO_DEFAULT),
        ("key", OPT_B, None),
        ("value", "bytes", NO_DEFAULT),
        ("dead_at", L, NO_DEFAULT),
    ],
}


@pytest.fixture(scope="module")
def codec() -> AvroCodec:
    return AvroCodec()


def reserve(**overrides: Any) -> dict[str, Any]:
    return {**SAMPLES["ReserveStock"], **overrides}


def error_of(exc_type: type[Exception], fn: Any, *args: Any) -> Any:
    with pytest.raises(exc_type) as info:
        fn(*args)
    return info.value


# --- schemas -------------------------------------------------------------------------------


def test_every_schema_file_is_one_record_in_the_inventory_v1_namespace() -> None:
    files = sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc"))
    assert files == sorted(CONTRACT)
    for name in files:
        raw = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
        assert (raw["type"], raw["name"], raw["namespace"]) == ("record", name, "inventory.v1")


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_schema_fields_types_and_defaults_match_the_wire_contract(name: str) -> None:
    raw = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
    got = [(f["name"], f["type"], f.get("default", NO_DEFAULT)) for f in raw["fields"]]
    assert got == CONTRACT[name]


def test_load_schemas_parses_each_directory_once() -> None:
    first, second = load_schemas(), load_schemas()
    assert first == second and first is not second
    assert all(first[n] is second[n] for n in first)
    assert first["ReserveStock"]["name"] == "inventory.v1.ReserveStock"


# --- fingerprints (Avro spec test vectors: share/test/data/schema-tests.txt) ---------------


@pytest.mark.parametrize(
    ("schema", "java_fingerprint"),
    [
        ("int", 8247732601305521295),
        ("null", 7195948357588979594),
        ("string", -8142146995180207161),
        ({"fields": [], "type": "record", "name": "foo", "namespace": "x.y"}, 5916914534497305771),
    ],
)
def test_fingerprint_matches_the_avro_test_vectors_little_endian(
    schema: Any, java_fingerprint: int
) -> None:
    # Java's parsingFingerprint64 is a signed long; the single-object header stores it LE
    assert fingerprint(schema) == struct.pack("<q", java_fingerprint)


def test_fingerprint_by_short_name_is_that_of_the_parsed_schema() -> None:
    assert fingerprint("ReserveStock") == fingerprint(load_schemas()["ReserveStock"])
    assert fingerprint("ReserveStock") != fingerprint("CommitReservation")


# --- single-object framing -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_record_type_round_trips(codec: AvroCodec, name: str) -> None:
    assert codec.decode(codec.encode(name, SAMPLES[name])) == (name, SAMPLES[name])


def test_names_lists_every_record_type(codec: AvroCodec) -> None:
    assert codec.names == tuple(sorted(SAMPLES))


def test_single_object_header_is_c301_then_the_schema_fingerprint(codec: AvroCodec) -> None:
    data = codec.encode("ReserveStock", reserve())
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == fingerprint("ReserveStock")


def test_missing_defaulted_fields_take_their_defaults(codec: AvroCodec) -> None:
    rec = {"event_id": "e", "order_id": "o", "sku": "A", "qty": 1, "occurred_at": T}
    _, got = codec.decode(codec.encode("ReserveStock", rec))
    assert got == {
        **rec,
        "channel": "web",
        "ttl_ms": 0,
        "allow_partial": False,
        "customer_id": "",
        "location": "",
        "split": False,
        "allow_backorder": False,
    }
    _, restock = codec.decode(
        codec.encode("RestockReceived", {"event_id": "e", "sku": "A", "qty": 1, "occurred_at": T})
    )
    assert (restock["channel"], restock["location"], restock["reference"]) == (
        "warehouse",
        None,
        None,
    )
    assert (restock["po_id"], restock["final"]) == ("", False)  # a plain restock


reserve_stock = st.fixed_dictionaries(
    {
        "event_id": st.text(max_size=40),
        "order_id": st.text(max_size=40),
        "sku": st.text(max_size=64),
        "qty": st.integers(-(2**31), 2**31 - 1),
        "channel": st.text(max_size=12),
        "ttl_ms": st.integers(-(2**63), 2**63 - 1),
        "occurred_at": st.integers(-(2**63), 2**63 - 1),
        "allow_partial": st.booleans(),
        "customer_id": st.text(max_size=20),
        "location": st.text(max_size=20),
        "split": st.booleans(),
        "allow_backorder": st.booleans(),
    }
)


@given(rec=reserve_stock)
def test_decode_inverts_encode_for_any_reserve_stock(codec: AvroCodec, rec: dict[str, Any]) -> None:
    assert codec.decode(codec.encode("ReserveStock", rec)) == ("ReserveStock", rec)


# --- decode errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not avro at all", "undecodable"),
        (b"", "undecodable"),
        (b'{"sku": "A"}', "undecodable"),
        (b"\xc3\x01\x00\x01", "truncated"),
        (b"\x00\x00\x01", "truncated"),
        (b"\xc3\x01" + b"\x00" * 8 + b"\x02a", "unknown_schema"),
    ],
)
def test_bad_bytes_raise_decode_error_with_reason(
    codec: AvroCodec, data: bytes, reason: str
) -> None:
    assert error_of(DecodeError, codec.decode, data).reason == reason


def test_a_body_cut_short_is_truncated(codec: AvroCodec) -> None:
    data = codec.encode("ReserveStock", reserve())
    for cut in (11, len(data) // 2, len(data) - 1):
        assert error_of(DecodeError, codec.decode, data[:cut]).reason == "truncated"


def test_bytes_after_the_record_are_undecodable(codec: AvroCodec) -> None:
    data = codec.encode("CommitReservation", SAMPLES["CommitReservation"]) + b"\x00"
    err = error_of(DecodeError, codec.decode, data)
    assert err.reason == "undecodable" and "1 bytes left" in err.detail


def test_garbage_body_under_a_known_fingerprint_is_undecodable(codec: AvroCodec) -> None:
    data = b"\xc3\x01" + fingerprint("CommitReservation") + b"\xff" * 40
    assert error_of(DecodeError, codec.decode, data).reason in ("undecodable", "truncated")


def test_confluent_frame_without_registry_is_unknown_schema(codec: AvroCodec) -> None:
    body = codec.encode("ReserveStock", reserve())[10:]
    err = error_of(DecodeError, codec.decode, b"\x00\x00\x00\x00\x07" + body)
    assert err.reason == "unknown_schema"
    assert "no schema registry configured" in err.detail


# --- encode errors -------------------------------------------------------------------------


def test_missing_required_field_is_named(codec: AvroCodec) -> None:
    rec = reserve()
    del rec["sku"]
    err = error_of(EncodeError, codec.encode, "ReserveStock", rec)
    assert err.reason == "missing_field" and "sku" in err.detail


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"qty": "2"}, "qty"),
        ({"qty": 1.5}, "qty"),
        ({"qty": 2**31}, "qty"),
        ({"qty": True}, "qty"),
        ({"sku": None}, "sku"),
        ({"allow_partial": 1}, "allow_partial"),
        ({"qtty": 2}, "qtty"),
    ],
)
def test_wrong_types_ranges_and_unknown_fields_are_invalid(
    codec: AvroCodec, overrides: dict[str, Any], needle: str
) -> None:
    err = error_of(EncodeError, codec.encode, "ReserveStock", reserve(**overrides))
    assert err.reason == "invalid_record" and needle in err.detail


def test_unknown_record_name_is_rejected(codec: AvroCodec) -> None:
    assert error_of(EncodeError, codec.encode, "Nope", {}).reason == "unknown_record"


# --- schema registry -------------------------------------------------------------------------


@dataclass
class FakeRegistry:
    """The two Confluent Schema Registry endpoints the client uses, in memory."""

    url: str = ""
    schemas: dict[int, str] = field(default_factory=dict)
    subjects: dict[str, list[int]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    fail_status: int | None = None
    types: dict[int, str] = field(default_factory=dict)  # id -> schemaType when not AVRO

    def add(self, subject: str, schema: str) -> int:
        sid = next((i for i, known in self.schemas.items() if known == schema), 0)
        if not sid:
            sid = len(self.schemas) + 1
            self.schemas[sid] = schema
        versions = self.subjects.setdefault(subject, [])
        if sid not in versions:
            versions.append(sid)
        return sid


def _handler(state: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> bool:
            state.requests.append((self.command, self.path, self.headers.get("Authorization")))
            if state.fail_status is not None:
                self._answer(state.fail_status, {"error_code": 50001, "message": "boom"})
                return False
            return True

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            if not self._record():
                return
            parts = self.path.split("/")
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ok = (
                len(parts) == 4
                and parts[1] == "subjects"
                and parts[3] == "versions"
                and self.headers["Content-Type"] == "application/vnd.schemaregistry.v1+json"
            )
            if not ok:
                self._answer(404, {"error_code": 404, "message": "no such endpoint"})
                return
            self._answer(200, {"id": state.add(parts[2], body["schema"])})

        def do_GET(self) -> None:  # noqa: N802
            if not self._record():
                return
            prefix = "/schemas/ids/"
            sid = int(self.path[len(prefix) :]) if self.path.startswith(prefix) else -1
            if sid not in state.schemas:
                self._answer(404, {"error_code": 40403, "message": "Schema not found"})
                return
            body = {"schema": state.schemas[sid]}
            if sid in state.types:
                body["schemaType"] = state.types[sid]
            self._answer(200, body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture()
def registry() -> Iterator[FakeRegistry]:
    state = FakeRegistry()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def test_confluent_framing_round_trips_through_the_registry(registry: FakeRegistry) -> None:
    codec = AvroCodec(SchemaRegistry(registry.url))
    data = codec.encode("ReserveStock", reserve())
    sid = registry.subjects["inventory.v1.ReserveStock"][0]
    assert data[:5] == b"\x00" + struct.pack(">I", sid)
    assert codec.decode(data) == ("ReserveStock", reserve())
    codec.encode("ReserveStock", reserve(qty=9))
    assert [r[0] for r in registry.requests] == ["POST"]  # registered once, nothing fetched


def test_a_cold_codec_fetches_the_writer_schema_by_id(registry: FakeRegistry) -> None:
    data = AvroCodec(SchemaRegistry(registry.url)).encode("StockChanged", SAMPLES["StockChanged"])
    assert AvroCodec(SchemaRegistry(registry.url)).decode(data) == (
        "StockChanged",
        SAMPLES["StockChanged"],
    )
    (sid,) = struct.unpack(">I", data[1:5])
    assert registry.requests[-1][:2] == ("GET", f"/schemas/ids/{sid}")


def test_either_codec_reads_either_framing(registry: FakeRegistry) -> None:
    plain, with_registry = AvroCodec(), AvroCodec(SchemaRegistry(registry.url))
    assert with_registry.decode(plain.encode("ReserveStock", reserve()))[0] == "ReserveStock"
    confluent = with_registry.encode("ReserveStock", reserve())
    assert error_of(DecodeError, plain.decode, confluent).reason == "unknown_schema"


def _confluent(registry: FakeRegistry, writer: dict[str, Any], record: dict[str, Any]) -> bytes:
    sid = registry.add(writer["namespace"] + "." + writer["name"], json.dumps(writer))
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(writer), record)
    return b"\x00" + struct.pack(">I", sid) + buf.getvalue()


def _reserve_schema(drop: set[str]) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((SCHEMA_DIR / "ReserveStock.avsc").read_text())
    raw["fields"] = [f for f in raw["fields"] if f["name"] not in drop]
    return raw


def test_an_older_writer_without_defaulted_fields_decodes_with_defaults(
    registry: FakeRegistry,
) -> None:
    old = {k: v for k, v in reserve().items() if k not in ("ttl_ms", "allow_partial")}
    data = _confluent(registry, _reserve_schema({"ttl_ms", "allow_partial"}), old)
    name, rec = AvroCodec(SchemaRegistry(registry.url)).decode(data)
    assert name == "ReserveStock"
    assert rec == {**old, "ttl_ms": 0, "allow_partial": False}


def test_a_writer_lacking_a_required_field_is_unknown_schema(registry: FakeRegistry) -> None:
    old = {k: v for k, v in reserve().items() if k != "qty"}
    data = _confluent(registry, _reserve_schema({"qty"}), old)
    err = error_of(DecodeError, AvroCodec(SchemaRegistry(registry.url)).decode, data)
    assert err.reason == "unknown_schema"


def test_a_registry_schema_of_a_foreign_record_is_unknown_schema(registry: FakeRegistry) -> None:
    foreign = {"type": "record", "name": "Other", "namespace": "x", "fields": []}
    data = _confluent(registry, foreign, {})
    err = error_of(DecodeError, AvroCodec(SchemaRegistry(registry.url)).decode, data)
    assert err.reason == "unknown_schema" and "x.Other" in err.detail


def test_an_id_the_registry_does_not_know_is_unknown_schema(registry: FakeRegistry) -> None:
    err = error_of(
        DecodeError,
        AvroCodec(SchemaRegistry(registry.url)).decode,
        b"\x00\x00\x00\x30\x39" + b"\x02a",
    )
    assert err.reason == "unknown_schema" and "12345" in err.detail


def test_a_failing_registry_raises_registry_error_not_decode_error(
    registry: FakeRegistry,
) -> None:
    registry.fail_status = 500
    codec = AvroCodec(SchemaRegistry(registry.url))
    with pytest.raises(RegistryError):
        codec.decode(b"\x00\x00\x00\x00\x01\x02a")
    with pytest.raises(RegistryError):
        codec.encode("ReserveStock", reserve())


def test_registry_sends_url_credentials_as_basic_auth_and_never_shows_them(
    registry: FakeRegistry,
) -> None:
    url = registry.url.replace("http://", "http://svc:s3cr%40t@")
    client = SchemaRegistry(url)
    client.register("subj", '"string"')
    assert registry.requests[-1][2] == "Basic " + base64.b64encode(b"svc:s3cr@t").decode()
    registry.fail_status = 500
    err = error_of(RegistryError, client.register, "subj2", '"int"')
    assert err.status == 500 and "boom" in str(err)
    assert f"{registry.url}/subjects/subj2/versions" in str(err)
    assert "s3cr" not in str(err) and "svc" not in str(err)


def test_registry_caches_registrations_and_schemas(registry: FakeRegistry) -> None:
    client = SchemaRegistry(registry.url)
    sid = client.register("a.B", '"long"')
    assert client.register("a.B", '"long"') == sid
    assert client.schema_by_id(sid) == '"long"'
    assert len(registry.requests) == 1


def test_unreachable_registry_error_names_the_url_without_credentials() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = SchemaRegistry(f"http://user:pw-secret@127.0.0.1:{port}", timeout=2)
    err = error_of(RegistryError, client.schema_by_id, 1)
    assert f"http://127.0.0.1:{port}/schemas/ids/1" in str(err)
    assert "pw-secret" not in str(err) and err.status is None


def test_a_non_avro_schema_id_is_unknown_schema_and_not_asked_again(
    registry: FakeRegistry,
) -> None:
    # before: a RegistryError, which consumers take for "registry down" and retry for ever
    sid = registry.add("other", '{"type": "object"}')
    registry.types[sid] = "JSON"
    codec = AvroCodec(SchemaRegistry(registry.url))
    frame = b"\x00" + struct.pack(">I", sid) + b"\x02"
    for _ in range(2):
        with pytest.raises(DecodeError) as err:
            codec.decode(frame)
        assert err.value.reason == "unknown_schema"
        assert "JSON schema, not Avro" in err.value.detail
    assert [r[:2] for r in registry.requests] == [("GET", f"/schemas/ids/{sid}")]


def test_prepare_fetches_writer_schemas_off_the_loop_so_decode_does_no_io(
    registry: FakeRegistry,
) -> None:
    data = AvroCodec(SchemaRegistry(registry.url)).encode("ReserveStock", reserve())
    unknown = b"\x00" + struct.pack(">I", 999) + b"\x00"
    codec = AvroCodec(SchemaRegistry(registry.url))
    assert codec.lookup_needed(data) is not None
    assert codec.lookup_needed(AvroCodec().encode("ReserveStock", reserve())) is None
    before = len(registry.requests)
    asyncio.run(codec.prepare([data, unknown, None, data], None))
    assert len(registry.requests) == before + 2  # each id once, the unknown one included
    assert codec.lookup_needed(data) is None and codec.lookup_needed(unknown) is None
    asked = len(registry.requests)
    assert codec.decode(data) == ("ReserveStock", reserve())
    with pytest.raises(DecodeError):
        codec.decode(unknown)
    assert len(registry.requests) == asked


def test_prepare_raises_registry_error_while_the_registry_fails(registry: FakeRegistry) -> None:
    data = AvroCodec(SchemaRegistry(registry.url)).encode("ReserveStock", reserve())
    registry.fail_status = 503
    codec = AvroCodec(SchemaRegistry(registry.url))
    with pytest.raises(RegistryError):
        asyncio.run(codec.prepare([data], None))
    registry.fail_status = None
    asyncio.run(codec.prepare([data], None))  # not cached as unreadable: it reads now
    assert codec.decode(data)[0] == "ReserveStock"


def test_register_all_registers_every_schema_so_encode_does_no_io(registry: FakeRegistry) -> None:
    codec = AvroCodec(SchemaRegistry(registry.url))
    codec.register_all()
    assert set(registry.subjects) == {f"inventory.v1.{n}" for n in codec.names}
    asked = len(registry.requests)
    for name in codec.names:
        codec.encode(name, SAMPLES[name])
    assert len(registry.requests) == asked


def test_retry_while_registry_down_waits_and_reports_each_wait() -> None:
    calls: list[int] = []
    waits: list[float] = []

    async def step() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise RegistryError("down")

    async def main() -> None:
        await retry_while_registry_down(step, lambda exc, delay: waits.append(delay))

    asyncio.run(main())
    assert len(calls) == 3 and waits == [0.5, 1.0]


def test_stock_changed_locations_carry_the_per_location_figures() -> None:
    items = _field_type("StockChanged", "locations")["items"]
    assert items["name"] == "LocationStock"
    assert [(f["name"], f["type"]) for f in items["fields"]] == [
        ("location", S),
        ("on_hand", INT),
        ("reserved", INT),
        ("damaged", INT),
        ("available", INT),
        ("inbound", INT),
    ]
