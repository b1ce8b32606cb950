"""Decoded Avro records to core commands and saga inputs, with every input rule that dead-letters.

The codec guarantees types; this module checks meaning: which topic may carry
which record, quantities, SKUs, ids. A failed check raises :class:`Invalid`
with a stable machine-readable ``reason`` (the dead-letter metric label).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from config.settings import Settings
from pipeline.domain import core
from pipeline.domain.saga import (
    DEFAULT_MAX_LINES,
    MAX_EVENT_ID_LEN,
    MAX_ORDER_ID_LEN,
    PRUNE_REASON,
    CancelOrder,
    CommitOrder,
    ExpireOrder,
    OrderCommand,
    PlaceOrder,
    PruneOrder,
)

MAX_ID_LEN = 128
MAX_TTL_MS = 7 * 24 * 3600 * 1000
"""The longest ttl an order or a reservation may ask for (a saga's holds add the grace)."""
MAX_CHANNEL_LEN = 64
MAX_LOCATION_LEN = 128
MAX_TEXT_LEN = {
    "channel": MAX_CHANNEL_LEN,
    "reason": 256,
    "reference": 256,
    "location": MAX_LOCATION_LEN,
    "customer_id": MAX_ID_LEN,
    "sale_id": MAX_ID_LEN,
}
"""Characters a free-text field may hold: they travel into answers, StockChanged, the
changelog and metric labels, so none may make a record larger than the broker takes."""

ORDER_RECORDS = ("ReserveStock", "CommitReservation", "ReleaseReservation", "ExpireReservation")
RESTOCK_RECORDS = (
    "RestockReceived",
    "StockCounted",
    "SafetyStockSet",
    "ChannelAllocationSet",
    "CustomerLimitSet",
    "TransferShipped",
    "TransferReceived",
    "TransferCancelled",
    "IncomingStock",
    "PurchaseOrderClosed",
    "BackorderCapSet",
)
RETURN_RECORDS = ("ReturnReceived", "DamagedStockResolved")


class Invalid(ValueError):
    """A record that must go to the dead-letter topic."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@functools.cache
def records_for_topic(settings: Settings) -> dict[str, tuple[str, ...]]:
    return {
        settings.orders_topic: ORDER_RECORDS,
        settings.restocks_topic: RESTOCK_RECORDS,
        settings.returns_topic: RETURN_RECORDS,
    }


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def check_sku(sku: str, settings: Settings) -> None:
    if not sku or not sku.strip():
        raise Invalid("empty_sku", "sku is empty")
    if len(sku.encode("utf-8")) > settings.max_sku_len:
        raise Invalid("sku_too_long", f"sku longer than {settings.max_sku_len} bytes")
    if _CONTROL.search(sku):
        # control bytes are never SKUs, and NUL separates the table's key spaces
        raise Invalid("invalid_sku", "sku contains control characters")


def check_text(rec: Mapping[str, Any]) -> None:
    """Every free-text field of ``rec`` within :data:`MAX_TEXT_LEN`."""
    for name, limit in MAX_TEXT_LEN.items():
        value = rec.get(name)
        if isinstance(value, str) and len(value) > limit:
            raise Invalid("text_too_long", f"{name} is {len(value)} characters, at most {limit}")


def _id(rec: Mapping[str, Any], field: str, limit: int = MAX_ID_LEN) -> str:
    value = rec.get(field) or ""
    if not value:
        raise Invalid(f"missing_{field}", f"{field} is empty")
    if len(value) > limit:
        raise Invalid(f"invalid_{field}", f"{field} longer than {limit}")
    return str(value)


def _qty(value: int, settings: Settings, *, allow_zero: bool, field: str = "qty") -> int:
    if value < 0 or (value == 0 and not allow_zero):
        raise Invalid("qty_not_positive", f"{field}={value}")
    if value > settings.max_qty:
        raise Invalid("qty_too_large", f"{field}={value} above maximum {settings.max_qty}")
    return value


def _time(rec: Mapping[str, Any]) -> int:
    t = int(rec.get("occurred_at", 0))
    if t <= 0:
        raise Invalid("invalid_occurred_at", f"occurred_at={t}")
    return t


def _reserve(r: Mapping[str, Any], s: Settings) -> core.Command:
    ttl = int(r.get("ttl_ms") or s.default_ttl_ms)  # 0 (the schema default) = configured
    # the saga holds an order's lines for its ttl plus the grace, so an order with the
    # longest ttl sends holds longer than MAX_TTL_MS
    if ttl < 0 or ttl > MAX_TTL_MS + s.order_grace_ms:
        raise Invalid("invalid_ttl", f"ttl_ms={ttl}")
    return core.ReserveStock(
        event_id=_id(r, "event_id"),
        order_id=_id(r, "order_id"),
        sku=r["sku"],
        qty=_qty(r["qty"], s, allow_zero=False),
        occurred_at=_time(r),
        channel=r.get("channel") or "web",
        ttl_ms=ttl,
        allow_partial=bool(r.get("allow_partial")),
        customer_id=_customer_text(r, "customer_id"),
        location=_location(r),
        split=bool(r.get("split")),
        allow_backorder=bool(r.get("allow_backorder")),
    )


def _commit(r: Mapping[str, Any], s: Settings) -> core.Command:
    return core.CommitReservation(
        _id(r, "event_id"),
        _id(r, "order_id"),
        r["sku"],
        _time(r),
        channel=r.get("channel") or "web",
    )


def _release(r: Mapping[str, Any], s: Settings) -> core.Command:
    return core.ReleaseReservation(
        _id(r, "event_id"),
        _id(r, "order_id"),
        r["sku"],
        _time(r),
        reason=r.get("reason") or "cancelled",
        channel=r.get("channel") or "web",
    )


def _expire(r: Mapping[str, Any], s: Settings) -> core.Command:
    return core.ExpireReservation(
        _id(r, "event_id"),
        _id(r, "order_id"),
        r["sku"],
        _time(r),
        channel=r.get("channel") or "system",
    )


def _location(r: Mapping[str, Any], field: str = "location") -> str:
    """An optional location ("" or null = the SKU's default one): at most
    :data:`MAX_LOCATION_LEN` characters, no control characters."""
    value = str(r.get(field) or "")
    if len(value) > MAX_LOCATION_LEN:
        raise Invalid("text_too_long", f"{field} is {len(value)} characters, at most 128")
    if _CONTROL.search(value):
        raise Invalid("invalid_location", f"{field} contains control characters")
    return value


def _restock(r: Mapping[str, Any], s: Settings) -> core.Command:
    po_id = _po_id(r) if r.get("po_id") else ""
    return core.RestockReceived(
        _id(r, "event_id"),
        r["sku"],
        _qty(r["qty"], s, allow_zero=False),
        _time(r),
        channel=r.get("channel") or "warehouse",
        location=_location(r),
        po_id=po_id,
        final=bool(r.get("final")) and bool(po_id),
    )


def _po_id(r: Mapping[str, Any]) -> str:
    value = _id(r, "po_id")
    if _CONTROL.search(value):
        raise Invalid("invalid_po_id", "po_id contains control characters")
    return value


def _incoming(r: Mapping[str, Any], s: Settings) -> core.Command:
    expected_at = int(r["expected_at"])
    if expected_at < 0:
        raise Invalid("invalid_expected_at", f"expected_at={expected_at}")
    return core.IncomingStock(
        _id(r, "event_id"),
        r["sku"],
        _po_id(r),
        _qty(r["qty"], s, allow_zero=True),  # 0: an update down to nothing more coming
        expected_at,
        _time(r),
        channel=r.get("channel") or "erp",
        location=_location(r),
    )


def _po_closed(r: Mapping[str, Any], s: Settings) -> core.Command:
    return core.PurchaseOrderClosed(
        _id(r, "event_id"),
        r["sku"],
        _po_id(r),
        _time(r),
        cancelled=bool(r.get("cancelled")),
        channel=r.get("channel") or "erp",
    )


def _backorder_cap(r: Mapping[str, Any], s: Settings) -> core.Command:
    return core.BackorderCapSet(
        _id(r, "event_id"),
        r["sku"],
        _qty(r["max_units"], s, allow_zero=True, field="max_units"),
        _time(r),
        channel=r.get("channel") or "erp",
    )


def _count(r: Mapping[str, Any], s: Settings) -> core.Command:
    return core.StockCounted(
        _id(r, "event_id"),
        r["sku"],
        _qty(r["on_hand"], s, allow_zero=True, field="on_hand"),
        _time(r),
        channel=r.get("channel") or "warehouse",
        location=_location(r),
    )


def _safety(r: Mapping[str, Any], s: Settings) -> core.Command:
    return core.SafetyStockSet(
        _id(r, "event_id"),
        r["sku"],
        _qty(r["qty"], s, allow_zero=True),
        _time(r),
        channel=r.get("channel") or "erp",
        location=_location(r),
    )


def _shipped(r: Mapping[str, Any], s: Settings) -> core.Command:
    return core.TransferShipped(
        _id(r, "event_id"),
        _transfer_id(r),
        r["sku"],
        _qty(r["qty"], s, allow_zero=False),
        _location(r, "source"),
        _location(r, "destination"),
        _time(r),
        channel=r.get("channel") or "warehouse",
    )


def _received(r: Mapping[str, Any], s: Settings) -> core.Command:
    return core.TransferReceived(
        _id(r, "event_id"),
        _transfer_id(r),
        r["sku"],
        _qty(r["qty"], s, allow_zero=True),  # 0: nothing arrived (all lost)
        _time(r),
        channel=r.get("channel") or "warehouse",
    )


def _cancelled(r: Mapping[str, Any], s: Settings) -> core.Command:
    return core.TransferCancelled(
        _id(r, "event_id"),
        _transfer_id(r),
        r["sku"],
        _time(r),
        channel=r.get("channel") or "warehouse",
    )


def _transfer_id(r: Mapping[str, Any]) -> str:
    value = _id(r, "transfer_id")
    if _CONTROL.search(value):
        raise Invalid("invalid_transfer_id", "transfer_id contains control characters")
    return value


def _customer_text(r: Mapping[str, Any], field: str) -> str:
    """An optional id of the per-customer caps ("" = none): its length is bounded by
    :func:`check_text`; control characters are refused (they are no ids)."""
    value = str(r.get(field) or "")
    if _CONTROL.search(value):
        raise Invalid(f"invalid_{field}", f"{field} contains control characters")
    return value


def _customer_limit(r: Mapping[str, Any], s: Settings) -> core.Command:
    return core.CustomerLimitSet(
        _id(r, "event_id"),
        r["sku"],
        _qty(r["max_units"], s, allow_zero=True, field="max_units"),
        _time(r),
        sale_id=_customer_text(r, "sale_id"),
        channel=r.get("channel") or "erp",
    )


def _allocation(r: Mapping[str, Any], s: Settings) -> core.Command:
    channel = r["channel"]
    if not channel or len(channel) > MAX_CHANNEL_LEN:
        raise Invalid("invalid_channel", f"channel must be 1..{MAX_CHANNEL_LEN} characters")
    return core.ChannelAllocationSet(
        _id(r, "event_id"),
        r["sku"],
        channel,
        _qty(r["qty"], s, allow_zero=True),
        _time(r),
        use_shared=bool(r.get("use_shared", False)),
    )


def _return(r: Mapping[str, Any], s: Settings) -> core.Command:
    return core.ReturnReceived(
        _id(r, "event_id"),
        _id(r, "order_id"),
        r["sku"],
        _qty(r["qty"], s, allow_zero=False),
        bool(r["resellable"]),
        _time(r),
        channel=r.get("channel") or "web",
        location=_location(r),
    )


def _damaged(r: Mapping[str, Any], s: Settings) -> core.Command:
    try:
        action = core.DamagedAction(r["action"])
    except ValueError:
        choices = ", ".join(a.value for a in core.DamagedAction)
        raise Invalid("invalid_action", f"action {r['action']!r} is not one of {choices}") from None
    return core.DamagedStockResolved(
        _id(r, "event_id"),
        r["sku"],
        _qty(r["qty"], s, allow_zero=False),
        action,
        _time(r),
        reason=r.get("reason") or "",
        channel=r.get("channel") or "warehouse",
        location=_location(r),
    )


_BUILDERS: dict[str, Callable[[Mapping[str, Any], Settings], core.Command]] = {
    "ReserveStock": _reserve,
    "CommitReservation": _commit,
    "ReleaseReservation": _release,
    "ExpireReservation": _expire,
    "RestockReceived": _restock,
    "StockCounted": _count,
    "SafetyStockSet": _safety,
    "ChannelAllocationSet": _allocation,
    "CustomerLimitSet": _customer_limit,
    "ReturnReceived": _return,
    "DamagedStockResolved": _damaged,
    "TransferShipped": _shipped,
    "TransferReceived": _received,
    "TransferCancelled": _cancelled,
    "IncomingStock": _incoming,
    "PurchaseOrderClosed": _po_closed,
    "BackorderCapSet": _backorder_cap,
}


def to_command(
    topic: str, key: bytes | None, name: str, rec: Mapping[str, Any], settings: Settings
) -> core.Command:
    """Validate one decoded record from ``topic`` and build its core command.

    Raises :class:`Invalid` for a record this topic may not carry, a key that
    is not the record's SKU, or any field rule.
    """
    allowed = records_for_topic(settings).get(topic, ())
    if name not in allowed:
        raise Invalid("wrong_topic", f"{name} is not accepted on {topic}")
    check_text(rec)
    try:
        sku = rec["sku"]
        check_sku(sku, settings)
        command = _BUILDERS[name](rec, settings)
    except KeyError as exc:
        raise Invalid("missing_field", f"{name} lacks {exc.args[0]}") from None
    if key != sku.encode("utf-8"):
        raise Invalid("key_mismatch", "message key is not the record's sku")
    return command


def to_record(cmd: core.OrderCommand) -> tuple[str, dict[str, Any]]:
    """(Avro record name, fields) of a ledger command the saga sends: the way back of
    :func:`to_command` for the orders topic."""
    if isinstance(cmd, core.ReserveStock):
        return "ReserveStock", {
            "event_id": cmd.event_id,
            "order_id": cmd.order_id,
            "sku": cmd.sku,
            "qty": cmd.qty,
            "channel": cmd.channel,
            "ttl_ms": cmd.ttl_ms,
            "occurred_at": cmd.occurred_at,
            "allow_partial": False,
            "customer_id": cmd.customer_id,
        }
    if isinstance(cmd, core.CommitReservation):
        return "CommitReservation", {
            "event_id": cmd.event_id,
            "order_id": cmd.order_id,
            "sku": cmd.sku,
            "occurred_at": cmd.occurred_at,
            "channel": cmd.channel,
        }
    assert isinstance(cmd, core.ReleaseReservation)
    return "ReleaseReservation", {
        "event_id": cmd.event_id,
        "order_id": cmd.order_id,
        "sku": cmd.sku,
        "reason": cmd.reason,
        "occurred_at": cmd.occurred_at,
        "channel": cmd.channel,
    }


# --------------------------------------------------------------------------
# checkouts records (decoded Avro record -> saga input; Invalid dead-letters)


def _order_id(rec: Mapping[str, Any]) -> str:
    value = _id(rec, "order_id", MAX_ORDER_ID_LEN)
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise Invalid("invalid_order_id", "order_id contains control characters")
    return str(value)


def _event_id(rec: Mapping[str, Any]) -> str:
    return _id(rec, "event_id", MAX_EVENT_ID_LEN)


@dataclass(frozen=True)
class Limits:
    max_qty: int = 100_000
    max_sku_len: int = 64
    max_lines: int = DEFAULT_MAX_LINES
    default_ttl_ms: int = 15 * 60 * 1000
    settings: Settings | None = field(default=None, compare=False)

    @classmethod
    def of(cls, s: Settings) -> Limits:
        return cls(
            max_qty=s.max_qty,
            max_sku_len=s.max_sku_len,
            max_lines=s.max_order_lines,
            default_ttl_ms=s.default_ttl_ms,
            settings=s,
        )


CHECKOUT_RECORDS = ("PlaceOrder", "CommitOrder", "CancelOrder")


def max_checkout_bytes(limits: Limits) -> int:
    """An upper bound of the framed size of any checkouts record that can pass validation:
    a PlaceOrder of ``limits.max_lines`` lines of the longest SKUs, every text field at its
    longest in 4-byte UTF-8, every number at its longest varint. A larger record is
    dead-lettered before it is decoded, so that its lines are never allocated (a 1 MB
    record could otherwise hold some 300,000 lines)."""

    def text(limit: int) -> int:
        return 5 + limit  # a long varint length, then the bytes

    header = 10  # single-object framing (the Confluent header is 5)
    numbers = 3 * 10  # qty-free longs: ttl_ms, occurred_at, and the array's end marker
    ids = 2 * text(4 * MAX_ID_LEN)  # event_id, order_id
    texts = text(4 * MAX_CHANNEL_LEN) + sum(text(4 * n) for n in MAX_TEXT_LEN.values())
    # each line: sku, qty (int varint), and room for a writer that writes one block per line
    line = text(limits.max_sku_len) + 5 + 2 * 10
    return header + numbers + ids + texts + limits.max_lines * line


def to_order_command(
    key: bytes | None, name: str, rec: Mapping[str, Any], limits: Limits
) -> OrderCommand:
    """Validate one decoded checkouts record; :class:`Invalid` names the dead-letter reason."""
    if name not in CHECKOUT_RECORDS:
        raise Invalid("wrong_topic", f"{name} is not accepted on the checkouts topic")
    check_text(rec)
    try:
        cmd = _build(name, rec, limits)
    except KeyError as exc:
        raise Invalid("missing_field", f"{name} lacks {exc.args[0]}") from None
    if key != cmd.order_id.encode("utf-8"):
        raise Invalid("key_mismatch", "message key is not the record's order_id")
    return cmd


def _customer_id(r: Mapping[str, Any]) -> str:
    value = str(r.get("customer_id") or "")  # its length: check_text
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise Invalid("invalid_customer_id", "customer_id contains control characters")
    return value


def _build(name: str, r: Mapping[str, Any], limits: Limits) -> OrderCommand:
    if name == "PlaceOrder":
        raw_lines = r["lines"]
        if not raw_lines:
            raise Invalid("no_lines", "order has no lines")
        if len(raw_lines) > limits.max_lines:
            raise Invalid("too_many_lines", f"{len(raw_lines)} lines, maximum {limits.max_lines}")
        lines: list[tuple[str, int]] = []
        totals: dict[str, int] = {}
        for i, line in enumerate(raw_lines):
            sku = line["sku"]
            if limits.settings is not None:
                check_sku(sku, limits.settings)
            elif not sku or not sku.strip():
                raise Invalid("empty_sku", f"line {i}: sku is empty")
            qty = int(line["qty"])
            if qty <= 0:
                raise Invalid("qty_not_positive", f"line {i}: qty={qty}")
            totals[sku] = totals.get(sku, 0) + qty
            if totals[sku] > limits.max_qty:
                raise Invalid(
                    "qty_too_large", f"{sku}: qty {totals[sku]} above maximum {limits.max_qty}"
                )
            lines.append((sku, qty))
        ttl = int(r.get("ttl_ms") or limits.default_ttl_ms)
        if ttl <= 0 or ttl > MAX_TTL_MS:
            raise Invalid("invalid_ttl", f"ttl_ms={ttl}")
        return PlaceOrder(
            event_id=_event_id(r),
            order_id=_order_id(r),
            lines=tuple(lines),
            occurred_at=_time(r),
            channel=r.get("channel") or "web",
            ttl_ms=ttl,
            customer_id=_customer_id(r),
            location=_location(r),
            split=bool(r.get("split")),
        )
    if name == "CommitOrder":
        return CommitOrder(_event_id(r), _order_id(r), _time(r), r.get("channel") or "web")
    if r.get("expire"):
        if r.get("reason") == PRUNE_REASON:
            return PruneOrder(_event_id(r), _order_id(r), _time(r))
        return ExpireOrder(_event_id(r), _order_id(r), _time(r))
    return CancelOrder(
        _event_id(r),
        _order_id(r),
        _time(r),
        reason=r.get("reason") or "cancelled",
        channel=r.get("channel") or "web",
    )
