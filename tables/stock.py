"""How the stock table stores state, and why the layout makes effects exactly-once.

One Faust table (RocksDB, changelog in Kafka) holds two key spaces, both
written to the changelog partition of the SKU being processed:

* ``<sku>`` -> :class:`StoredStock`: the core's :class:`StockRecord`, the
  highest input offset applied per source topic (``watermarks``) and the
  effects of the last command (``effects``: StockChanged, ReservationResult,
  StockShortfall as plain dicts). One changelog record therefore carries the
  new state, the proof that the input was applied and the outputs it caused.
  The relay derives the output topics from these records, so an output can
  never be lost when the state landed, nor emitted when it did not.
* ``<sku>\\0r\\0<order_id>`` -> :class:`StoredReservation`: the order's
  reservation (``current``) and the version it replaced (``previous``). It is
  written *before* the SKU record of the same command, on the same changelog
  partition, so after a crash the changelog holds a prefix of the writes: a
  reservation whose ``offset`` is above the SKU record's watermark belongs to a
  command whose SKU record never landed, and the reader falls back to
  ``previous``.

* ``<sku>\\0c\\0<json [sale_id, customer_id]>`` -> :class:`StoredUsage`: the units one
  customer holds plus bought of the SKU in one sale (per-customer caps,
  ``CustomerLimitSet``). Each customer is its own key, so the SKU record stays
  small however many customers a flash sale has; written (on the reservations
  changelog) with the same current/previous rule as reservations.

Values are JSON (orjson): small, fast and readable with any Kafka tool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.domain import core
from pipeline.domain import incoming as inc
from pipeline.domain.locations import LocationStock, Transfer
from tables.index import LiveIndex

RESERVATION_SEP = b"\x00r\x00"
EVENT_PREFIX = b"\x00e\x00"
"""``\\0e\\0<sku>\\0<event_id>`` -> ``{"at": ms}``: a stock command applied at ``at``.
The ledger keeps these (in the reservations changelog) for the event-id retention, so
a producer's re-send is recognised long after the SKU record's window of recent ids
forgot it. They sort before every SKU and reservation key (SKUs hold no control bytes)."""

Entry = tuple[int, str, str]  # an open reservation: expires_at, sku, order_id


def stock_key(sku: str) -> bytes:
    return sku.encode("utf-8")


def reservation_key(sku: str, order_id: str) -> bytes:
    return stock_key(sku) + RESERVATION_SEP + order_id.encode("utf-8")


USAGE_SEP = b"\x00c\x00"


def usage_key(sku: str, sale_id: str, customer_id: str) -> bytes:
    """The key of a customer's usage; JSON holds no NUL, so it never contains
    :data:`RESERVATION_SEP` whatever the ids are."""
    return stock_key(sku) + USAGE_SEP + orjson.dumps([sale_id, customer_id])


def event_key(sku: str, event_id: str) -> bytes:
    return EVENT_PREFIX + stock_key(sku) + b"\x00" + event_id.encode("utf-8")


def is_stock_key(key: bytes) -> bool:
    return b"\x00" not in key


@dataclass(frozen=True)
class StoredStock:
    record: core.StockRecord
    watermarks: dict[str, int] = field(default_factory=dict)
    effects: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    version_at: int = 0  # occurred_at of the command that made the current version

    def as_change(self) -> dict[str, Any]:
        """The current state as a StockChanged dict (for rebuilding projections)."""
        r = self.record
        return {
            "sku": r.sku,
            "version": r.version,
            "on_hand": r.on_hand,
            "reserved": r.reserved,
            "safety_stock": r.safety_stock,
            "available": r.available,
            "cause_type": "Rebuild",
            "cause_event_id": "",
            "order_id": "",
            "channel": "system",
            "occurred_at": self.version_at,
            "processed_at": self.version_at,
            "channels": [c.__dict__.copy() for c in core.channel_stock(r)],
            "damaged": r.damaged,
            "locations": [x.__dict__.copy() for x in core.location_figures(r)],
            **incoming_figures(r),
        }

    def latest_change(self) -> dict[str, Any]:
        """The StockChanged dict of the current version: the record's own last change
        (with its cause) when this record made it, else :meth:`as_change`."""
        changes = self.effects.get("StockChanged")
        if changes and changes[-1]["version"] == self.record.version:
            if "damaged" not in changes[-1]:
                # written before StockChanged carried it: the record's count is the one of
                # this version (a damaged return changed no version then); one written
                # before it carried ``locations`` lacks them, and the codec gives the
                # default [] (a SKU had no locations then)
                return {**changes[-1], "damaged": self.record.damaged}
            return changes[-1]
        return self.as_change()

    def applied(self, topic: str, offset: int) -> bool:
        """True when the input at ``topic``/``offset`` (of this SKU's partition) is applied."""
        return self.watermarks.get(topic, -1) >= offset

    def to_bytes(self) -> bytes:
        r = self.record
        return orjson.dumps(
            {
                "sku": r.sku,
                "on_hand": r.on_hand,
                "reserved": r.reserved,
                "safety_stock": r.safety_stock,
                "damaged": r.damaged,
                "version": r.version,
                "ids": list(r.recent_event_ids),
                "w": self.watermarks,
                "fx": self.effects,
                "vt": self.version_at,
                "ch": [[a.channel, a.allocated, a.reserved, a.use_shared] for a in r.channels],
                **({"cl": [r.customer_limit, r.sale_id]} if r.customer_limit or r.sale_id else {}),
                **({"loc": _locations_out(r)} if r.locations else {}),
                **({"tr": _transfers_out(r)} if r.transfers else {}),
                **({"inc": _incoming_out(r.incoming)} if _has_incoming(r.incoming) else {}),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> StoredStock:
        d = orjson.loads(data)
        record = core.StockRecord(
            sku=d["sku"],
            on_hand=d["on_hand"],
            reserved=d["reserved"],
            safety_stock=d["safety_stock"],
            damaged=d.get("damaged", 0),
            version=d["version"],
            recent_event_ids=tuple(d.get("ids", ())),
            channels=tuple(
                core.ChannelAllocation(c, alloc, res, bool(shared))
                for c, alloc, res, shared in d.get("ch", ())
            ),
            customer_limit=d.get("cl", (0, ""))[0],
            sale_id=d.get("cl", (0, ""))[1],
            locations=tuple(LocationStock(*x) for x in d.get("loc", ())),
            transfers=tuple(Transfer(*t) for t in d.get("tr", ())),
            # a record written before purchase orders: expects nothing, cap 0
            incoming=_incoming_in(d["inc"]) if "inc" in d else inc.Incoming(),
        )
        return cls(
            record=record,
            watermarks=d.get("w", {}),
            effects=d.get("fx", {}),
            version_at=d.get("vt", 0),
        )

    def view(self) -> dict[str, Any]:
        """The public JSON of ``GET /stock/{sku}``."""
        r = self.record
        return {
            "sku": r.sku,
            "on_hand": r.on_hand,
            "reserved": r.reserved,
            "safety_stock": r.safety_stock,
            "available": r.available,
            "damaged": r.damaged,
            "version": r.version,
            "shared_available": r.shared_available,
            "channels": {
                c.channel: {
                    "allocated": c.allocated,
                    "reserved": c.reserved,
                    "available": c.available,
                    "use_shared": c.use_shared,
                }
                for c in core.channel_stock(r)
            },
            "locations": {
                x.location: {
                    "on_hand": x.on_hand,
                    "reserved": x.reserved,
                    "damaged": x.damaged,
                    "available": x.available,
                    "inbound": x.inbound,
                }
                for x in core.location_figures(r)
            },
            "incoming": incoming_view(r.incoming),
        }


def incoming_figures(r: core.StockRecord) -> dict[str, int]:
    """The StockChanged (and Redis, search) figures of the SKU's purchase orders."""
    return core.incoming_figures(r.incoming)


def incoming_view(i: inc.Incoming) -> dict[str, Any]:
    """``GET /stock/{sku}``'s ``incoming``: the open units, what is promised to waiting
    backorders, what one more backorder could get, the cap, and each purchase order."""
    return {
        "open": inc.open_incoming(i),
        "promised": i.promised,
        "backorderable": inc.backorderable(i),
        "cap": i.cap,
        "staged": i.staged,
        "waiting": i.waiting,
        "purchase_orders": {
            po.po_id: {
                "status": po.status.value,
                "expected": po.expected,
                "expected_at": po.expected_at,
                "received": po.received,
                "open": po.open,
                "promised": po.promised,
                "staged": po.staged,
                "backorders": len(po.backorders),
                "location": po.location,
            }
            for po in i.orders
        },
    }


def _has_incoming(i: inc.Incoming) -> bool:
    return bool(i.orders or i.cap or i.placed)


def _incoming_out(i: inc.Incoming) -> dict[str, Any]:
    """Positional lists: a SKU record carries up to 16 purchase orders and 256 backorders."""
    return {
        "cap": i.cap,
        "n": i.placed,
        "po": [
            [
                po.po_id,
                po.expected,
                po.expected_at,
                po.received,
                po.status.value,
                po.staged,
                po.location,
                [
                    [b.order_id, b.qty, b.seq, b.placed_at, b.channel, b.customer_id, b.ttl_ms]
                    for b in po.backorders
                ],
            ]
            for po in i.orders
        ],
    }


def _incoming_in(d: dict[str, Any]) -> inc.Incoming:
    orders = []
    for po_id, expected, at, received, status, staged, where, waiting in d.get("po", ()):
        backorders = tuple(
            inc.Backorder(order, qty, po_id, seq, placed, channel, customer, ttl)
            for order, qty, seq, placed, channel, customer, ttl in waiting
        )
        orders.append(
            inc.PurchaseOrder(
                po_id, expected, at, received, inc.POStatus(status), staged, backorders, where
            )
        )
    return inc.Incoming(tuple(orders), int(d.get("cap", 0)), int(d.get("n", 0)))


def _res_to_dict(res: core.Reservation, topic: str, offset: int) -> dict[str, Any]:
    return {
        "order_id": res.order_id,
        "sku": res.sku,
        "qty": res.qty,
        "status": res.status.value,
        "expires_at": res.expires_at,
        "channel": res.channel,
        "event_id": res.event_id,
        "decided_at": res.decided_at,
        "reason": res.reason,
        "available_at_decision": res.available_at_decision,
        "closed_by": res.closed_by,
        "from_allocation": res.from_allocation,
        **({"cust": [res.customer_id, res.counted, res.sale_id]} if res.customer_id else {}),
        **({"held": [list(h) for h in res.held]} if res.held else {}),
        **({"po": res.po_id} if res.po_id else {}),
        "topic": topic,
        "offset": offset,
    }


def _res_from_dict(d: dict[str, Any]) -> core.Reservation:
    return core.Reservation(
        order_id=d["order_id"],
        sku=d["sku"],
        qty=d["qty"],
        status=core.ReservationStatus(d["status"]),
        expires_at=d["expires_at"],
        channel=d["channel"],
        event_id=d["event_id"],
        decided_at=d["decided_at"],
        reason=d.get("reason", ""),
        available_at_decision=d.get("available_at_decision", 0),
        closed_by=d.get("closed_by", ""),
        from_allocation=d.get("from_allocation", 0),
        customer_id=d.get("cust", ("", False, ""))[0],
        counted=bool(d.get("cust", ("", False, ""))[1]),
        sale_id=d.get("cust", ("", False, ""))[2],
        held=tuple((str(at), int(units)) for at, units in d.get("held", ())),
        po_id=d.get("po", ""),
    )


@dataclass(frozen=True)
class StoredReservation:
    current: dict[str, Any]
    previous: dict[str, Any] | None = None

    def valid(self, stock: StoredStock | None) -> core.Reservation | None:
        """The reservation as of the SKU record ``stock`` (see module docstring)."""
        for candidate in (self.current, self.previous):
            if candidate is None:
                continue
            if stock is not None and stock.applied(candidate["topic"], candidate["offset"]):
                return _res_from_dict(candidate)
        return None

    def updated(
        self, res: core.Reservation, topic: str, offset: int, stock: StoredStock | None
    ) -> StoredReservation:
        """The value to write for ``res``, keeping the currently valid version as fallback."""
        valid = None
        for candidate in (self.current, self.previous):
            if (
                candidate is not None
                and stock is not None
                and stock.applied(candidate["topic"], candidate["offset"])
            ):
                valid = candidate
                break
        return StoredReservation(current=_res_to_dict(res, topic, offset), previous=valid)

    @classmethod
    def new(cls, res: core.Reservation, topic: str, offset: int) -> StoredReservation:
        return cls(current=_res_to_dict(res, topic, offset))

    def closed_before(self, before: int) -> bool:
        """Closed (committed, released, expired or rejected), and both its expiry and
        its last decision earlier than ``before`` (ms): safe to forget after a retention
        (a retry of the order is then a new order). A waiting backorder is never closed
        (it has no expiry: it waits for its purchase order)."""
        cur = self.current
        if core.ReservationStatus(cur["status"]).is_live:
            return False
        return max(int(cur["expires_at"]), int(cur["decided_at"])) < before

    def to_bytes(self) -> bytes:
        return orjson.dumps({"c": self.current, "p": self.previous})

    @classmethod
    def from_bytes(cls, data: bytes) -> StoredReservation:
        d = orjson.loads(data)
        return cls(current=d["c"], previous=d.get("p"))


@dataclass(frozen=True)
class StoredUsage:
    """A customer's usage (``{"units", "topic", "offset"}``) and the version it replaced:
    as with reservations, a version whose offset is above the SKU record's watermark
    belongs to a command whose SKU record never landed."""

    sale_id: str
    customer_id: str
    current: dict[str, int]
    previous: dict[str, int] | None = None

    def _valid(self, stock: StoredStock | None) -> dict[str, int] | None:
        for candidate in (self.current, self.previous):
            if (
                candidate is not None
                and stock is not None
                and stock.applied(str(candidate["topic"]), int(candidate["offset"]))
            ):
                return candidate
        return None

    def valid(self, stock: StoredStock | None) -> core.CustomerUsage | None:
        found = self._valid(stock)
        if found is None:
            return None
        return core.CustomerUsage(self.sale_id, self.customer_id, int(found["units"]))

    @classmethod
    def new(cls, usage: core.CustomerUsage, topic: str, offset: int) -> StoredUsage:
        current: Any = {"units": usage.units, "topic": topic, "offset": offset}
        return cls(usage.sale_id, usage.customer_id, current)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {"s": self.sale_id, "u": self.customer_id, "c": self.current, "p": self.previous}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> StoredUsage:
        d = orjson.loads(data)
        return cls(d["s"], d["u"], d["c"], d.get("p"))


def _stock_changed(e: Any) -> tuple[str, dict[str, Any]]:
    d = e.__dict__.copy()
    d["channels"] = [c.__dict__.copy() for c in e.channels]
    d["locations"] = [x.__dict__.copy() for x in e.locations]
    return "StockChanged", d


def _locations_out(r: core.StockRecord) -> list[list[Any]]:
    """Positional, in LocationStock's field order (location, on_hand, reserved, damaged,
    safety_stock, inbound, and staged when not 0: older records have six): a SKU record
    carries up to 64 of them."""
    return [
        [x.location, x.on_hand, x.reserved, x.damaged, x.safety_stock, x.inbound]
        + ([x.staged] if x.staged else [])
        for x in r.locations
    ]


def _transfers_out(r: core.StockRecord) -> list[list[Any]]:
    return [[t.transfer_id, t.source, t.destination, t.qty] for t in r.transfers]


def _result(e: Any) -> tuple[str, dict[str, Any]]:
    d = e.__dict__.copy()
    d["outcome"] = e.outcome.value
    return "ReservationResult", d


_EFFECTS: dict[type, Any] = {
    core.StockChanged: _stock_changed,
    core.ReservationResult: _result,
    core.StockShortfall: lambda e: ("StockShortfall", e.__dict__.copy()),
    core.LowStockCrossed: lambda e: ("LowStockCrossed", e.__dict__.copy()),
}


def effect_of(e: core.Event) -> tuple[str, dict[str, Any]] | None:
    """The Avro record name and Avro-ready dict of an event the relay publishes, else None
    (CommandApplied: counted in metrics, never published)."""
    make = _EFFECTS.get(type(e))
    return make(e) if make is not None else None


def effects_of(events: tuple[core.Event, ...]) -> dict[str, list[dict[str, Any]]]:
    """The events the relay publishes, as Avro-ready dicts keyed by record name."""
    out: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        named = effect_of(e)
        if named is not None:
            out.setdefault(named[0], []).append(named[1])
    return out


class OpenReservations(LiveIndex[Entry]):
    """The open (RESERVED) reservations of a worker's partitions, by table key, for the
    expiry sweeper (see :mod:`tables.index` for how it stays current)."""

    @staticmethod
    def entry(current: dict[str, Any]) -> Entry | None:
        """(expires_at, sku, order_id) of an open reservation version, None if closed."""
        if current["status"] == core.ReservationStatus.RESERVED.value:
            return (current["expires_at"], current["sku"], current["order_id"])
        return None

    @classmethod
    def entry_of(cls, key: bytes, value: bytes) -> Entry | None:
        """The entry of a table item, None unless it is an open reservation."""
        if RESERVATION_SEP not in key or key.startswith(EVENT_PREFIX):
            return None
        return cls.entry(StoredReservation.from_bytes(value).current)

    def note(self, key: bytes, current: dict[str, Any]) -> None:
        """Record the reservation just written under ``key`` (its ``current`` version)."""
        self.put(key, self.entry(current))

    def overdue(self, now: int) -> list[tuple[str, str]]:
        """(sku, order_id) of the open reservations whose expiry is at or before ``now``."""
        return [(sku, order) for _, (at, sku, order) in self.items() if at <= now]
