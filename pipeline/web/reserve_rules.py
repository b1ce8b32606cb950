"""The synchronous reserve API's pure rules: request bodies to commands, answers to HTTP.

No Faust, Kafka or aiohttp here (the views and the answer waiter are
:mod:`pipeline.web.reserve_api`). Every request is checked exactly like the Kafka path
checks the command it becomes (the Avro schema, then :func:`schemas.validation.to_command`
or :func:`pipeline.domain.validation.to_order_command`), so a bad request is answered at once and
never becomes a dead letter.

Idempotency without state of its own: the command's ``event_id`` is derived from the
``Idempotency-Key`` header and what the command is about (its record type, order id and,
for stock commands, SKU), see :func:`derive_event_id`. A retry with the same key sends the
same command again; the ledger (by order and SKU) and the saga (by order) answer it with
the original outcome and ``duplicate: true``. A key reused with a *different body* for the
same order is caught where the answer shows it: a duplicate answer whose quantity (or
order lines) differ from the request is answered 422. A key reused for another order or
SKU derives another event id and is a new request: that cannot be told without state.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from config.settings import Settings
from schemas import validation
from schemas.codec import AvroCodec, EncodeError
from schemas.validation import Invalid, to_command

MAX_KEY_LEN = 255
"""Characters an Idempotency-Key may have."""
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # visible ASCII, no spaces (the draft's sf-string)

IDEMPOTENCY_HEADER = "Idempotency-Key"


class ApiError(Exception):
    """A request answered with an error at once: ``status`` and a JSON body."""

    def __init__(self, status: int, error: str, detail: str, **extra: Any) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "detail": self.detail, **self.extra}


def check_key(value: str | None) -> str:
    """The Idempotency-Key header's value; :class:`ApiError` 400 when missing or malformed."""
    if value is None or not value.strip():
        raise ApiError(400, "missing_idempotency_key", f"send an {IDEMPOTENCY_HEADER} header")
    key = value.strip()
    # the draft sends it as a structured-field string: accept it quoted or bare
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key or len(key) > MAX_KEY_LEN or not _KEY_CHARS.fullmatch(key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"{IDEMPOTENCY_HEADER} must be 1..{MAX_KEY_LEN} visible ASCII characters",
        )
    return key


def derive_event_id(type_name: str, key: str, order_id: str, sku: str = "") -> str:
    """The command's event_id: the same for every retry of one request, different for
    another record type, order or SKU (so that one key on several commands never makes
    them one)."""
    text = "\x00".join((type_name, order_id, sku, key))
    return "http-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]


def parse_object(body: bytes) -> dict[str, Any]:
    """The request's JSON object (an empty body is ``{}``); :class:`ApiError` 400 if not one."""
    if not body.strip():
        return {}
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"body is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "invalid_json", "body must be a JSON object")
    return obj


def _fields(
    obj: Mapping[str, Any], required: Mapping[str, type], optional: Mapping[str, type]
) -> dict[str, Any]:
    """The known fields of ``obj`` with their JSON types checked (422 otherwise)."""
    unknown = set(obj) - set(required) - set(optional)
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown field {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for name, kind in {**required, **optional}.items():
        if name not in obj or obj[name] is None:
            if name in required:
                raise ApiError(422, "missing_field", f"{name} is required")
            continue
        value = obj[name]
        # JSON true is no quantity: bool is an int subclass in Python
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ApiError(422, "invalid_field", f"{name} must be a {_KIND[kind]}")
        out[name] = value
    return out


_KIND = {str: "string", int: "integer", bool: "boolean", list: "list"}


@dataclass(frozen=True)
class Request:
    """One checked request: the Avro record to send, where, and what to wait for."""

    type_name: str
    record: dict[str, Any]
    topic: str
    key: bytes
    answer_topic: str
    value: bytes = b""
    # what the request asked for, to tell a retry from a reused key with another body
    qty: int = 0
    allow_partial: bool = False
    lines: tuple[tuple[str, int], ...] = field(default=())
    saga: bool = False  # a checkout order command (answered on order-results)

    @property
    def order_id(self) -> str:
        order_id: str = self.record["order_id"]
        return order_id

    @property
    def event_id(self) -> str:
        event_id: str = self.record["event_id"]
        return event_id

    @property
    def sku(self) -> str:
        sku: str = self.record.get("sku", "")
        return sku

    def status_url(self) -> str:
        """Where the state is read after a 202 (routed to the owner by any worker)."""
        if self.saga:
            return f"/orders/{quote(self.order_id, safe='')}"
        return f"/reservations/{quote(self.order_id, safe='')}?sku={quote(self.sku, safe='')}"


def _checked(type_name: str, record: dict[str, Any], codec: AvroCodec) -> bytes:
    try:
        return codec.encode(type_name, record)
    except EncodeError as exc:
        raise ApiError(422, exc.reason, exc.detail) from None


_STOCK_OPTIONAL: dict[str, dict[str, type]] = {
    "ReserveStock": {
        "channel": str,
        "ttl_ms": int,
        "allow_partial": bool,
        "customer_id": str,
        "location": str,
        "split": bool,
        "allow_backorder": bool,
    },
    "CommitReservation": {"channel": str},
    "ReleaseReservation": {"channel": str, "reason": str},
}


def stock_request(
    type_name: str,
    obj: Mapping[str, Any],
    key: str,
    now: int,
    cfg: Settings,
    codec: AvroCodec,
    *,
    order_id: str | None = None,
) -> Request:
    """A checked ReserveStock (``order_id`` in the body) or CommitReservation /
    ReleaseReservation (``order_id`` from the path)."""
    required: dict[str, type] = {"sku": str}
    if type_name == "ReserveStock":
        required.update(order_id=str, qty=int)
    fields = _fields(obj, required, _STOCK_OPTIONAL[type_name])
    if order_id is not None:
        fields["order_id"] = order_id
    record = {
        **fields,
        "event_id": derive_event_id(type_name, key, fields["order_id"], fields["sku"]),
        "occurred_at": now,
    }
    value = _checked(type_name, record, codec)
    try:
        to_command(cfg.orders_topic, record["sku"].encode("utf-8"), type_name, record, cfg)
    except Invalid as exc:
        raise ApiError(422, exc.reason, exc.detail) from None
    return Request(
        type_name,
        record,
        cfg.orders_topic,
        record["sku"].encode("utf-8"),
        cfg.results_topic,
        value,
        qty=int(record.get("qty", 0)),
        allow_partial=bool(record.get("allow_partial", False)),
    )


_ORDER_OPTIONAL: dict[str, dict[str, type]] = {
    "PlaceOrder": {
        "channel": str,
        "ttl_ms": int,
        "customer_id": str,
        "location": str,
        "split": bool,
    },
    "CommitOrder": {"channel": str},
    "CancelOrder": {"channel": str, "reason": str},
}


def order_request(
    type_name: str,
    obj: Mapping[str, Any],
    key: str,
    now: int,
    cfg: Settings,
    codec: AvroCodec,
    *,
    order_id: str | None = None,
) -> Request:
    """A checked PlaceOrder (``order_id`` and ``lines`` in the body) or CommitOrder /
    CancelOrder (``order_id`` from the path)."""
    required: dict[str, type] = {}
    if type_name == "PlaceOrder":
        required.update(order_id=str, lines=list)
    fields = _fields(obj, required, _ORDER_OPTIONAL[type_name])
    if order_id is not None:
        fields["order_id"] = order_id
    lines: list[tuple[str, int]] = []
    if type_name == "PlaceOrder":
        limits = validation.Limits.of(cfg)
        if len(fields["lines"]) > limits.max_lines:  # before looking at any line
            raise ApiError(
                422, "too_many_lines", f"{len(fields['lines'])} lines, maximum {limits.max_lines}"
            )
        clean = []
        for i, line in enumerate(fields["lines"]):
            if not isinstance(line, dict):
                raise ApiError(422, "invalid_field", f"lines[{i}] must be an object")
            try:
                one = _fields(line, {"sku": str, "qty": int}, {})
            except ApiError as exc:
                raise ApiError(exc.status, exc.error, f"lines[{i}]: {exc.detail}") from None
            clean.append(one)
            lines.append((one["sku"], one["qty"]))
        fields["lines"] = clean
    record = {
        **fields,
        "event_id": derive_event_id(type_name, key, fields["order_id"]),
        "occurred_at": now,
    }
    value = _checked(type_name, record, codec)
    order_key = record["order_id"].encode("utf-8")
    try:
        validation.to_order_command(order_key, type_name, record, validation.Limits.of(cfg))
    except Invalid as exc:
        raise ApiError(422, exc.reason, exc.detail) from None
    return Request(
        type_name,
        record,
        cfg.checkouts_topic,
        order_key,
        cfg.order_results_topic,
        value,
        lines=summed_lines(lines),
        saga=True,
    )


def summed_lines(lines: list[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """Lines with one entry per SKU (quantities summed, as the saga does), sorted."""
    totals: dict[str, int] = {}
    for sku, qty in lines:
        totals[sku] = totals.get(sku, 0) + qty
    return tuple(sorted(totals.items()))


# --------------------------------------------------------------------------
# answers to HTTP

_RESERVATION_STATUS = {
    "RESERVED": 200,
    "BACKORDERED": 200,  # accepted: promised against a purchase order (po_id, expected_at)
    "COMMITTED": 200,
    "RELEASED": 200,
    "REJECTED": 409,
    "EXPIRED": 409,
    "INVALID_STATE": 409,
    "UNKNOWN_RESERVATION": 404,
}
_ORDER_STATUS = {
    "ORDER_RESERVED": 200,
    "ORDER_COMMITTED": 200,
    "ORDER_CANCELLED": 200,
    "ORDER_REJECTED": 409,
    "ORDER_EXPIRED": 409,
    "ORDER_COMMIT_FAILED": 409,
    "ORDER_INVALID_STATE": 409,
    "ORDER_UNKNOWN": 404,
}


def _mismatch(req: Request) -> ApiError:
    return ApiError(
        422,
        "idempotency_key_mismatch",
        f"order {req.order_id} already holds a different request "
        f"(an {IDEMPOTENCY_HEADER} reused with another body, or another request for it)",
    )


def reservation_response(req: Request, answer: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """HTTP status and body of a ReservationResult answering ``req``."""
    outcome = str(answer["outcome"])
    qty = int(answer["qty"])
    if answer.get("duplicate") and req.type_name == "ReserveStock":
        # the ledger answered the order's first ReserveStock on this SKU: same request?
        if qty > req.qty or (qty < req.qty and not req.allow_partial):
            err = _mismatch(req)
            return err.status, err.body()
    body = {
        "order_id": answer["order_id"],
        "sku": answer["sku"],
        "outcome": outcome,
        "qty": qty,
        "available": int(answer["available"]),
        "reason": answer.get("reason", ""),
        # a backorder's purchase order and when it is expected ("" and 0 for the others)
        "po_id": answer.get("po_id", ""),
        "expected_at": int(answer.get("expected_at", 0)),
        "event_id": req.event_id,
    }
    return _RESERVATION_STATUS.get(outcome, 409), body


def order_response(req: Request, answer: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    """HTTP status and body of an OrderResult answering ``req``."""
    outcome = str(answer["outcome"])
    lines = [
        {
            "sku": x["sku"],
            "qty": int(x["qty"]),
            "outcome": x["outcome"],
            "available": int(x.get("available", -1)),
        }
        for x in answer.get("lines", [])
    ]
    if answer.get("duplicate") and req.type_name == "PlaceOrder":
        if summed_lines([(x["sku"], x["qty"]) for x in lines]) != req.lines:
            err = _mismatch(req)
            return err.status, err.body()
    body = {
        "order_id": answer["order_id"],
        "outcome": outcome,
        "status": answer.get("status", ""),
        "lines": lines,
        "reason": answer.get("reason", ""),
        "expires_at": int(answer.get("expires_at", 0)),
        "event_id": req.event_id,
    }
    return _ORDER_STATUS.get(outcome, 409), body


def response_for(req: Request, answer: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    if req.saga:
        return order_response(req, answer)
    return reservation_response(req, answer)


def pending_body(req: Request) -> dict[str, Any]:
    """The 202 body: the command was sent, its answer did not come within the timeout."""
    return {
        "status": "PENDING",
        "order_id": req.order_id,
        **({"sku": req.sku} if req.sku and not req.saga else {}),
        "event_id": req.event_id,
        "status_url": req.status_url(),
        "detail": f"retry with the same {IDEMPOTENCY_HEADER} to get the answer, or GET status_url",
    }
