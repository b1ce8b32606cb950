"""The stock ledger's pure decision core.

Everything here is plain data and plain functions: no Faust, Kafka, Redis or
fastavro. :func:`decide` takes the current state of one SKU (its
:class:`StockRecord` and, for order commands, the :class:`Reservation` of the
command's order), one command and the processing time, and returns a
:class:`Decision`: the new record, the reservation to store (if any) and the
events the decision causes. A business "no" (out of stock, unknown order) is an
emitted event, never an exception; only a bug raises.

Determinism: every rule reads time from the command's ``occurred_at`` (expiry
included: expiry is itself a command carrying the time it was observed), so
replaying the same commands over the same state gives the same decisions.
``now`` only stamps ``processed_at`` on emitted events.

Idempotency rules that live here (the agent adds the Kafka-offset guard):

* order commands are idempotent by ``order_id``: the order's reservation
  remembers its status, so a second ReserveStock for an order that already has
  one, or a second Commit of a committed order, is answered with the original
  outcome and ``duplicate=True`` and changes nothing;
* other commands are idempotent by ``event_id`` within the record's
  ``recent_event_ids`` window (:data:`DEFAULT_DEDUPE_WINDOW` ids per SKU).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from pipeline.domain import incoming as inc
from pipeline.domain import locations as loc
from pipeline.domain.incoming import Incoming, Settlement
from pipeline.domain.locations import Hold, LocationStock, Transfer

DEFAULT_DEDUPE_WINDOW = 256
CUSTOMER_LIMIT_REASON = "customer_limit"
"""The reason of a ReserveStock refused by the SKU's per-customer cap (CustomerLimitSet)."""
MAX_COUNT = 2**31 - 1
"""The largest on_hand, damaged or allocation a SKU may hold: StockChanged's counts are
Avro ints (32-bit). A command that would pass it is refused (``LIMIT_EXCEEDED``)."""
MAX_CHANNELS_PER_SKU = 32
"""Channel allocations one SKU may hold: every StockChanged carries them all, and a
batch's changelog record carries every StockChanged, so their number bounds its size."""

DEFAULT_LOCATION = "default"
"""Where a SKU that never named a location keeps everything, and where a command whose
``location`` is "" puts its units once the SKU has locations."""
MAX_OPEN_TRANSFERS = 64
"""Transfers one SKU may have on the way at once: the SKU record carries them all."""
BACKORDER_FILLED = "backorder_filled"
"""The reason of the RESERVED answer a backorder gets when its purchase order arrived."""
LOCATION_REASON = "insufficient_at_location"
"""The reason of a ReserveStock the SKU could cover in total but no location (or not the
named one, or not without a split the command did not ask for) can."""

_T = TypeVar("_T")


def _evolve(obj: _T, **changes: Any) -> _T:
    """``dataclasses.replace`` for this module's plain frozen dataclasses, without its
    per-call field introspection (about 5 us a call, the largest cost of a decision):
    a new instance whose attributes are a copy of ``obj``'s with ``changes`` applied.
    Only field names may be passed (no ``__post_init__`` here to re-run)."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__, **changes)
    return new


class Outcome(str, Enum):
    """What a command did. Order outcomes are sent back on reservation-results."""

    RESERVED = "RESERVED"
    REJECTED = "REJECTED"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"
    NOT_EXPIRED = "NOT_EXPIRED"  # an expire check that came too early: no-op
    UNKNOWN_RESERVATION = "UNKNOWN_RESERVATION"
    INVALID_STATE = "INVALID_STATE"  # e.g. commit of a released reservation
    DUPLICATE = "DUPLICATE"
    RESTOCKED = "RESTOCKED"
    COUNTED = "COUNTED"
    SHORTFALL = "SHORTFALL"
    RETURNED = "RETURNED"
    RETURN_DAMAGED = "RETURN_DAMAGED"
    SAFETY_STOCK_SET = "SAFETY_STOCK_SET"
    ALLOCATION_SET = "ALLOCATION_SET"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"  # refused: a count or the channel list would overflow
    DAMAGED_RESTOCKED = "DAMAGED_RESTOCKED"  # damaged units judged sellable: back on hand
    DAMAGED_WRITTEN_OFF = "DAMAGED_WRITTEN_OFF"  # damaged units removed from stock
    INSUFFICIENT_DAMAGED = "INSUFFICIENT_DAMAGED"  # refused: fewer damaged units than asked
    CUSTOMER_LIMIT_SET = "CUSTOMER_LIMIT_SET"
    TRANSFER_SHIPPED = "TRANSFER_SHIPPED"
    TRANSFER_RECEIVED = "TRANSFER_RECEIVED"  # units lost on the way: in the reason
    TRANSFER_CANCELLED = "TRANSFER_CANCELLED"
    TRANSFER_REFUSED = "TRANSFER_REFUSED"  # unknown or already open transfer, too few units
    BACKORDERED = "BACKORDERED"  # promised against a purchase order (ReserveStock.allow_backorder)
    INCOMING_EXPECTED = "INCOMING_EXPECTED"  # IncomingStock applied (a new or updated PO)
    PO_CLOSED = "PO_CLOSED"  # PurchaseOrderClosed applied (short or cancelled)
    BACKORDER_CAP_SET = "BACKORDER_CAP_SET"
    INCOMING_REFUSED = "INCOMING_REFUSED"  # an ended or unknown PO, too many POs...


class ReservationStatus(str, Enum):
    RESERVED = "RESERVED"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"
    REJECTED = "REJECTED"
    BACKORDERED = "BACKORDERED"  # waiting on a purchase order (the SKU record's Incoming)

    @property
    def is_open(self) -> bool:
        """Holds units (RESERVED): it may be committed, released, expired."""
        return self is ReservationStatus.RESERVED

    @property
    def is_live(self) -> bool:
        """Not ended: RESERVED, or BACKORDERED (it never expires, and is never pruned)."""
        return self is ReservationStatus.RESERVED or self is ReservationStatus.BACKORDERED


# --------------------------------------------------------------------------
# state


def in_stock(available: int) -> bool:
    """Whether a SKU shows as in stock (the Redis hash, the search document, the live
    pages): at least one unit can be sold."""
    return available > 0


def free_units(allocated: int, reserved: int) -> int:
    """Units of a channel's allocation that its open reservations do not hold."""
    return max(0, allocated - reserved)


def shared_pool(available: int, free: int) -> int:
    """What a channel without an allocation can reserve: ``available`` less the
    allocations' ``free`` units (their sum)."""
    return max(0, available - free)


@dataclass(frozen=True)
class ChannelAllocation:
    """Units of a SKU set aside for one sales channel (``ChannelAllocationSet``).

    ``allocated`` units are ring-fenced for the channel: no other channel can
    reserve them, and the channel can reserve at most them unless
    ``use_shared`` lets it go on into the shared pool. ``reserved`` of them are
    held by the channel's open reservations; a commit takes its units out of
    both, a release or expiry gives them back to the allocation.
    """

    channel: str
    allocated: int
    reserved: int = 0
    use_shared: bool = False

    @property
    def free(self) -> int:
        return free_units(self.allocated, self.reserved)


@dataclass(frozen=True)
class StockRecord:
    """The authoritative stock of one SKU.

    ``available = on_hand - reserved - safety_stock``, shown as 0 when negative:
    what can still be sold over all channels. ``channels`` are the per-channel
    allocations (sorted by name); the shared pool is ``available`` minus the
    allocations' free units, and :meth:`available_for` is what one channel can
    reserve. ``damaged`` counts returned units that cannot be sold (never on
    hand) until a ``DamagedStockResolved`` puts them back on hand or writes them
    off. ``version`` rises by exactly one for every change of the published
    numbers (:func:`_published`: the sellable ones, ``damaged``, the allocations and
    the locations).

    ``locations`` is empty for a SKU that never named a location: everything is then at
    the implicit :data:`DEFAULT_LOCATION` and the totals are the only figures (the
    cheap path every existing SKU takes). Once a command names another location the
    totals are carried into a :data:`DEFAULT_LOCATION` entry, and from then on every
    change goes through :mod:`pipeline.domain.locations` and the totals are the sums
    over ``locations`` (``available`` too: each location's own, summed). ``transfers``
    are the ones shipped and not yet received or cancelled.

    ``incoming`` holds the SKU's purchase orders, the backorders waiting on them and
    the backorder cap (:mod:`pipeline.domain.incoming`; a record written before it reads
    as "expects nothing, takes no backorders"). Their *staged* units (received, set
    aside for a waiting backorder) are on hand but not available: ``staged`` keeps their
    sum beside ``incoming`` (set here and by :func:`_with_incoming`), and once the SKU
    has locations each location's ``staged`` holds those delivered there.
    """

    sku: str
    on_hand: int = 0
    reserved: int = 0
    safety_stock: int = 0
    damaged: int = 0
    version: int = 0
    recent_event_ids: tuple[str, ...] = ()
    channels: tuple[ChannelAllocation, ...] = ()
    customer_limit: int = 0  # units one customer may hold + buy in the current sale (0 = none)
    sale_id: str = ""  # the current sale ("" = the SKU's standing limit); see CustomerLimitSet
    locations: tuple[LocationStock, ...] = ()  # sorted by name; () = all at DEFAULT_LOCATION
    transfers: tuple[Transfer, ...] = ()  # open: shipped, not yet received or cancelled
    # the sum of the locations' own available, kept beside them (read several times per
    # decision); set from ``locations`` here and by :func:`_with_locations`, the only
    # place that changes them
    located_available: int = field(default=0, repr=False, compare=False)
    incoming: Incoming = Incoming()
    staged: int = field(default=0, repr=False, compare=False)  # incoming.staged

    def __post_init__(self) -> None:
        if self.locations:
            object.__setattr__(self, "located_available", loc.available(self.locations))
        if self.incoming.orders:
            object.__setattr__(self, "staged", self.incoming.staged)

    @property
    def available(self) -> int:
        if self.locations:
            return self.located_available
        return max(0, self.on_hand - self.reserved - self.safety_stock - self.staged)

    @property
    def shared_available(self) -> int:
        """What a channel without an allocation can reserve."""
        return shared_pool(self.available, sum(a.free for a in self.channels))

    def allocation(self, channel: str) -> ChannelAllocation | None:
        for a in self.channels:
            if a.channel == channel:
                return a
        return None

    def available_for(self, channel: str) -> int:
        """Units ``channel`` can reserve now: its allocation first, then the shared pool."""
        a = self.allocation(channel)
        if a is None:
            return self.shared_available
        return min(self.available, a.free + (self.shared_available if a.use_shared else 0))

    def with_allocation(self, channel: str, change: int, allocated_change: int = 0) -> StockRecord:
        """The record with ``channel``'s reserved (and allocated) units moved by the changes."""
        if not (change or allocated_change):
            return self
        out = []
        for a in self.channels:
            if a.channel == channel:
                a = _evolve(
                    a,
                    reserved=max(0, a.reserved + change),
                    allocated=max(0, a.allocated + allocated_change),
                )
            out.append(a)
        return _evolve(self, channels=tuple(out))


@dataclass(frozen=True)
class Reservation:
    """One order's hold on one SKU, kept after it closes so retries re-answer."""

    order_id: str
    sku: str
    qty: int
    status: ReservationStatus
    expires_at: int
    channel: str
    event_id: str  # the ReserveStock that opened (or was refused) it
    decided_at: int  # occurred_at of the command that last changed it
    reason: str = ""
    available_at_decision: int = 0
    closed_by: str = ""  # event_id of the command that closed it: its retry gets the same answer
    from_allocation: int = 0  # of ``qty``, units taken from the channel's allocation
    customer_id: str = ""
    counted: bool = False  # ``qty`` counts against (sku, sale_id, customer_id)'s usage
    sale_id: str = ""  # the sale it was counted in (when ``counted``)
    held: Hold = ()  # where its units are held; () = all at DEFAULT_LOCATION
    po_id: str = ""  # the purchase order a backorder waits (or waited) on

    def status_outcome(self) -> Outcome:
        return Outcome(self.status.value)


# --------------------------------------------------------------------------
# commands (times are epoch milliseconds)


@dataclass(frozen=True)
class ReserveStock:
    event_id: str
    order_id: str
    sku: str
    qty: int
    occurred_at: int
    channel: str = "web"
    ttl_ms: int = 15 * 60 * 1000
    allow_partial: bool = False
    customer_id: str = ""  # "" = not capped by a per-customer limit
    location: str = ""  # "" = pick by the configured priority
    split: bool = False  # may take the units from more than one location
    allow_backorder: bool = False  # when stock cannot cover qty: promise incoming units


@dataclass(frozen=True)
class CommitReservation:
    event_id: str
    order_id: str
    sku: str
    occurred_at: int
    channel: str = "web"


@dataclass(frozen=True)
class ReleaseReservation:
    event_id: str
    order_id: str
    sku: str
    occurred_at: int
    reason: str = "cancelled"
    channel: str = "web"


@dataclass(frozen=True)
class ExpireReservation:
    """Internal: the expiry sweeper saw ``order_id`` past its expiry at ``occurred_at``."""

    event_id: str
    order_id: str
    sku: str
    occurred_at: int
    channel: str = "system"


@dataclass(frozen=True)
class RestockReceived:
    """``qty`` units arrived. Naming an open purchase order (``po_id``) they settle its
    waiting backorders first (``final``: the supplier sends no more, it ends)."""

    event_id: str
    sku: str
    qty: int
    occurred_at: int
    channel: str = "warehouse"
    location: str = ""  # "" = the SKU's default location (or the purchase order's)
    po_id: str = ""  # "" = a plain restock: converts no backorder
    final: bool = False


@dataclass(frozen=True)
class StockCounted:
    event_id: str
    sku: str
    on_hand: int
    occurred_at: int
    channel: str = "warehouse"
    location: str = ""  # "" = the SKU's default location


@dataclass(frozen=True)
class ReturnReceived:
    event_id: str
    order_id: str
    sku: str
    qty: int
    resellable: bool
    occurred_at: int
    channel: str = "web"
    location: str = ""  # "" = the SKU's default location


class DamagedAction(str, Enum):
    """What a :class:`DamagedStockResolved` does with the damaged units."""

    RESTOCK = "RESTOCK"  # inspected and sellable after all: damaged -> on_hand
    WRITE_OFF = "WRITE_OFF"  # scrapped or sent back to the vendor: they leave damaged


@dataclass(frozen=True)
class DamagedStockResolved:
    """``qty`` damaged (quality-control) units of ``sku`` resolved by ``action``.

    Refused (``INSUFFICIENT_DAMAGED``, nothing changes) when the SKU holds fewer than
    ``qty`` damaged units (at ``location``, once the SKU has locations)."""

    event_id: str
    sku: str
    qty: int
    action: DamagedAction
    occurred_at: int
    reason: str = ""
    channel: str = "warehouse"
    location: str = ""  # "" = the SKU's default location


@dataclass(frozen=True)
class SafetyStockSet:
    event_id: str
    sku: str
    qty: int
    occurred_at: int
    channel: str = "erp"
    location: str = ""  # "" = the SKU's default location


@dataclass(frozen=True)
class ChannelAllocationSet:
    """Sets (absolute) the units allocated to ``channel``; 0 removes the allocation."""

    event_id: str
    sku: str
    channel: str
    qty: int
    occurred_at: int
    use_shared: bool = False


@dataclass(frozen=True)
class CustomerLimitSet:
    """Caps the units one customer may hold (RESERVED) plus buy (COMMITTED) of ``sku``
    in sale ``sale_id`` ("" = the SKU's standing limit); ``max_units`` 0 = no cap.
    A ``sale_id`` other than the current one starts a new sale: the counts of the
    previous sale no longer apply."""

    event_id: str
    sku: str
    max_units: int
    occurred_at: int
    sale_id: str = ""
    channel: str = "erp"


@dataclass(frozen=True)
class TransferShipped:
    """``qty`` units leave ``source``'s on_hand (only available ones) and are inbound at
    ``destination`` until a TransferReceived or TransferCancelled of ``transfer_id``."""

    event_id: str
    transfer_id: str
    sku: str
    qty: int
    source: str
    destination: str
    occurred_at: int
    channel: str = "warehouse"


@dataclass(frozen=True)
class TransferReceived:
    """Transfer ``transfer_id`` arrived with ``qty`` units (at most those shipped; the
    difference is lost on the way and reported in the outcome's reason)."""

    event_id: str
    transfer_id: str
    sku: str
    qty: int
    occurred_at: int
    channel: str = "warehouse"


@dataclass(frozen=True)
class TransferCancelled:
    """Transfer ``transfer_id`` called back before it arrived: its units go back to the
    source's on_hand."""

    event_id: str
    transfer_id: str
    sku: str
    occurred_at: int
    channel: str = "warehouse"


@dataclass(frozen=True)
class IncomingStock:
    """Purchase order ``po_id`` brings ``qty`` units (absolute) by ``expected_at`` to
    ``location``: a new one, or an update of an open one (a cut releases the backorders
    that no longer fit, ``po_short``)."""

    event_id: str
    sku: str
    po_id: str
    qty: int
    expected_at: int
    occurred_at: int
    channel: str = "erp"
    location: str = ""  # "" = the SKU's default location


@dataclass(frozen=True)
class PurchaseOrderClosed:
    """Purchase order ``po_id`` ends short, or is ``cancelled``: its staged units go to
    the waiting backorders that fit, in the order placed; the others are released."""

    event_id: str
    sku: str
    po_id: str
    occurred_at: int
    cancelled: bool = False
    channel: str = "erp"


@dataclass(frozen=True)
class BackorderCapSet:
    """The units that may be promised against the SKU's purchase orders in total
    (absolute; 0 = take no more backorders, the promises made stay)."""

    event_id: str
    sku: str
    max_units: int
    occurred_at: int
    channel: str = "erp"


@dataclass(frozen=True)
class CustomerUsage:
    """Units of one SKU one customer holds plus bought in one sale (its own table key)."""

    sale_id: str
    customer_id: str
    units: int = 0


OrderCommand = ReserveStock | CommitReservation | ReleaseReservation | ExpireReservation
StockCommand = (
    RestockReceived
    | StockCounted
    | ReturnReceived
    | SafetyStockSet
    | ChannelAllocationSet
    | DamagedStockResolved
    | CustomerLimitSet
    | TransferShipped
    | TransferReceived
    | TransferCancelled
    | IncomingStock
    | PurchaseOrderClosed
    | BackorderCapSet
)
Command = OrderCommand | StockCommand
ORDER_COMMANDS = (ReserveStock, CommitReservation, ReleaseReservation, ExpireReservation)
TRANSFER_COMMANDS = (TransferShipped, TransferReceived, TransferCancelled)
INCOMING_COMMANDS = (IncomingStock, PurchaseOrderClosed, BackorderCapSet)


# --------------------------------------------------------------------------
# events


@dataclass(frozen=True)
class StockChanged:
    sku: str
    version: int
    on_hand: int
    reserved: int
    safety_stock: int
    available: int
    cause_type: str
    cause_event_id: str
    order_id: str
    channel: str
    occurred_at: int
    processed_at: int
    channels: tuple[ChannelStock, ...] = ()
    damaged: int = 0
    locations: tuple[LocationFigures, ...] = ()
    incoming: int = 0  # units the open purchase orders still bring
    promised: int = 0  # units promised to waiting backorders
    backorderable: int = 0  # the most units one new backorder could be promised now
    staged: int = 0  # of on_hand, set aside for waiting backorders (not available)


@dataclass(frozen=True)
class LocationFigures:
    """One location's numbers in a StockChanged (and in ``GET /stock/{sku}``)."""

    location: str
    on_hand: int
    reserved: int
    damaged: int
    available: int
    inbound: int


def location_figures(record: StockRecord) -> tuple[LocationFigures, ...]:
    return tuple(
        LocationFigures(x.location, x.on_hand, x.reserved, x.damaged, x.available, x.inbound)
        for x in record.locations
    )


@dataclass(frozen=True)
class ChannelStock:
    """One channel's numbers in a StockChanged (and in ``GET /stock/{sku}``)."""

    channel: str
    allocated: int
    reserved: int
    available: int
    use_shared: bool


def channel_stock(record: StockRecord) -> tuple[ChannelStock, ...]:
    return tuple(
        ChannelStock(
            a.channel, a.allocated, a.reserved, record.available_for(a.channel), a.use_shared
        )
        for a in record.channels
    )


@dataclass(frozen=True)
class ReservationResult:
    event_id: str
    order_id: str
    sku: str
    outcome: Outcome
    qty: int
    available: int
    reason: str = ""
    duplicate: bool = False
    po_id: str = ""  # a backorder's (BACKORDERED, or its later RESERVED / RELEASED answer)
    expected_at: int = 0  # when that purchase order is expected (epoch ms; 0 = none)


@dataclass(frozen=True)
class StockShortfall:
    sku: str
    counted: int
    reserved: int
    shortfall: int
    cause_event_id: str
    occurred_at: int
    location: str = ""  # where the count found too few; "" = a SKU without locations


@dataclass(frozen=True)
class LowStockCrossed:
    """``available`` crossed the low-stock threshold: ``down`` to it or below, ``up`` above it."""

    sku: str
    available: int
    threshold: int
    direction: str
    version: int
    occurred_at: int


@dataclass(frozen=True)
class CommandApplied:
    """Every command's outcome, order or not: the agent counts these in metrics."""

    event_id: str
    sku: str
    command_type: str
    outcome: Outcome
    channel: str
    reason: str = ""
    units_lost: int = 0  # a transfer received short: units that did not arrive


Event = StockChanged | ReservationResult | StockShortfall | LowStockCrossed | CommandApplied


@dataclass(frozen=True)
class Decision:
    record: StockRecord
    events: tuple[Event, ...]
    reservation: Reservation | None = None  # the order's reservation to store, if it changed
    usage: CustomerUsage | None = None  # the customer's usage to store, if it changed
    # other orders' reservations (and their customers' usages) the decision changed: the
    # backorders an arrival, a close or a cut converted or released, in the order placed
    others: tuple[Reservation, ...] = ()
    other_usages: tuple[CustomerUsage, ...] = ()

    @property
    def outcome(self) -> Outcome:
        for event in self.events:
            if isinstance(event, CommandApplied):
                return event.outcome
        raise AssertionError("every decision carries a CommandApplied")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class _Applied:
    """What one stock rule did: the new record (``record`` itself for a refusal that only
    remembers the event id), the outcome, why, and any events beside StockChanged."""

    record: StockRecord
    outcome: Outcome
    reason: str = ""
    extra: tuple[Event, ...] = ()
    settled: Settlement | None = None  # backorders converted or released (incoming rules)
    units_lost: int = 0  # units a transfer lost on the way (reported, never dropped)


# --------------------------------------------------------------------------
# the function


def decide(
    record: StockRecord | None,
    command: Command,
    now: int,
    reservation: Reservation | None = None,
    *,
    dedupe_window: int = DEFAULT_DEDUPE_WINDOW,
    low_stock_threshold: int = -1,
    applied_before: bool = False,
    usage: CustomerUsage | None = None,
    location_priority: tuple[str, ...] = (),
    others: Mapping[str, Reservation] | None = None,
    other_usages: Mapping[tuple[str, str], CustomerUsage] | None = None,
) -> Decision:
    """Apply one command to one SKU's state.

    ``record`` is None for a SKU never seen. ``reservation`` must be the stored
    reservation of ``command.order_id`` on this SKU for order commands (None if
    there is none) and is ignored otherwise. Returns the new state and the
    events; the caller stores ``decision.record`` (and ``decision.reservation``
    when not None) and publishes the events. ``applied_before`` says that the caller's
    store of applied event ids (kept longer than the record's window of the last
    ``dedupe_window`` ids) holds this stock command's event id: it is a duplicate.
    ``usage`` is the stored :class:`CustomerUsage` of the key :func:`usage_key` names
    for this command (None when there is none yet; ignored when it names none).
    ``location_priority`` is the order in which a reserve that names no location looks
    at the SKU's locations (:func:`pipeline.domain.locations.plan_hold`).
    ``others`` are the stored reservations of the orders :func:`settling` names (by
    order id; a missing one is rebuilt from its backorder) and ``other_usages`` the
    stored usages of those of them counted under a per-customer cap, by (sale_id,
    customer_id): the decision returns the ones it changed in ``Decision.others`` and
    ``Decision.other_usages``.
    """
    ctx = _Others(others or {}, dict(other_usages or {}))
    if record is None:
        record = StockRecord(sku=command.sku)
    if record.sku != command.sku:
        raise ValueError(f"command for {command.sku!r} applied to record of {record.sku!r}")
    if isinstance(command, ORDER_COMMANDS):
        if reservation is not None and reservation.order_id != command.order_id:
            raise ValueError("reservation of another order passed to decide()")
        wanted = usage_key(record, command, reservation)
        if wanted is None:
            usage = None
        elif usage is None:
            usage = CustomerUsage(*wanted)
        elif (usage.sale_id, usage.customer_id) != wanted:
            raise ValueError("usage of another customer or sale passed to decide()")
        decision = _decide_order(record, command, now, reservation, usage, location_priority, ctx)
    else:
        decision = _decide_stock(record, command, now, dedupe_window, applied_before, ctx)
    return _with_low_stock(record, decision, command, low_stock_threshold)


def settling(
    record: StockRecord | None, command: Command, reservation: Reservation | None = None
) -> tuple[str, ...]:
    """The orders whose backorders ``command`` may convert or release (their reservations,
    and the usages of those counted under a cap, are :func:`decide`'s ``others`` and
    ``other_usages``): the waiting backorders of the purchase order it names (an
    arrival, a close, an update), or of the one a released backorder waited on."""
    if record is None or not record.incoming.orders:
        return ()
    po_id = ""
    if isinstance(command, (RestockReceived, IncomingStock, PurchaseOrderClosed)):
        po_id = command.po_id
    elif (
        isinstance(command, ReleaseReservation)
        and reservation is not None
        and reservation.status is ReservationStatus.BACKORDERED
    ):
        po_id = reservation.po_id
    po = inc.find_po(record.incoming, po_id) if po_id else None
    if po is None:
        return ()
    return tuple(b.order_id for b in po.backorders)


@dataclass(slots=True)
class _Others:
    """The other orders' state a decision may change (see :func:`decide`)."""

    reservations: Mapping[str, Reservation]
    usages: dict[tuple[str, str], CustomerUsage]


def usage_key(
    record: StockRecord | None, command: Command, reservation: Reservation | None
) -> tuple[str, str] | None:
    """(sale_id, customer_id) of the per-customer usage ``command`` reads or changes,
    None when it touches none: a first ReserveStock with a customer on a SKU with a
    cap counts in the current sale; a command that may close an open counted
    reservation gives its units back to the sale it was counted in."""
    if isinstance(command, ReserveStock):
        if (
            reservation is None
            and command.customer_id
            and record is not None
            and record.customer_limit > 0
        ):
            return (record.sale_id, command.customer_id)
        return None
    if isinstance(command, ORDER_COMMANDS) and reservation is not None:
        # a backorder counts like a hold: its release gives the units back
        if reservation.counted and reservation.status.is_live:
            return (reservation.sale_id, reservation.customer_id)
    return None


def _with_low_stock(
    before: StockRecord, decision: Decision, command: Command, threshold: int
) -> Decision:
    """Adds a LowStockCrossed event when ``available`` crossed ``threshold`` (-1 = off)."""
    if threshold < 0 or decision.record.version == before.version:
        return decision
    old, new = before.available, decision.record.available
    if old > threshold >= new:
        direction = "down"
    elif old <= threshold < new:
        direction = "up"
    else:
        return decision
    crossed = LowStockCrossed(
        command.sku, new, threshold, direction, decision.record.version, command.occurred_at
    )
    return _evolve(decision, events=(*decision.events[:-1], crossed, decision.events[-1]))


# --------------------------------------------------------------------------
# order commands: one function each


def _decide_order(
    record: StockRecord,
    cmd: OrderCommand,
    now: int,
    res: Reservation | None,
    usage: CustomerUsage | None = None,
    priority: tuple[str, ...] = (),
    ctx: _Others | None = None,
) -> Decision:
    if isinstance(cmd, ReserveStock):
        if res is not None:
            # the order already reserved (or was refused) here: answer the original outcome
            return _answer(
                record,
                cmd,
                res.status_outcome(),
                res.qty,
                res.available_at_decision,
                res.reason,
                duplicate=True,
                po_id=res.po_id,
                expected_at=_expected_at(record, res.po_id),
            )
        if record.locations or (cmd.location and cmd.location != DEFAULT_LOCATION):
            return _reserve_at_locations(record, cmd, now, usage, priority)
        return _reserve(record, cmd, now, usage)
    if res is None or res.status is ReservationStatus.REJECTED:
        reason = "no reservation for this order" if res is None else "reservation was rejected"
        return _answer(record, cmd, Outcome.UNKNOWN_RESERVATION, 0, record.available, reason)
    if res.status is ReservationStatus.BACKORDERED and isinstance(cmd, ReleaseReservation):
        return _release_backorder(record, cmd, now, res, usage, ctx or _Others({}, {}))
    if not res.status.is_open:
        return _closed_before(record, cmd, res)
    if isinstance(cmd, CommitReservation):
        return _commit(record, cmd, now, res, usage)
    if isinstance(cmd, ReleaseReservation):
        return _release(record, cmd, now, res, usage)
    return _expire(record, cmd, now, res, usage)


def _reserve(
    record: StockRecord, cmd: ReserveStock, now: int, usage: CustomerUsage | None
) -> Decision:
    """A first ReserveStock of an order on this SKU: hold what the channel (and the
    customer's cap, when ``usage`` is given) allows, all of it or, when the command
    allows partial holds, as much as there is; else refuse and remember the refusal."""
    avail = record.available_for(cmd.channel)
    # the customer's allowance in the current sale (usage is None: not capped)
    allowance = max(0, record.customer_limit - usage.units) if usage is not None else MAX_COUNT
    no_backorder = ""
    if cmd.allow_backorder and avail < cmd.qty <= allowance:
        got = _backorder(record, cmd, now, usage)
        if not isinstance(got, str):
            return got
        no_backorder = got
    qty = cmd.qty
    if cmd.allow_partial and min(avail, allowance) < qty:
        qty = min(avail, allowance)
    if 0 < qty <= min(avail, allowance):
        return _hold(record, cmd, now, qty, usage)
    if allowance < cmd.qty and (allowance == 0 or not cmd.allow_partial):
        # the customer's cap refuses it: the answer's ``available`` is what the
        # customer could still reserve now
        return _refuse(record, cmd, CUSTOMER_LIMIT_REASON, min(avail, allowance))
    if no_backorder:
        return _refuse(record, cmd, no_backorder, inc.backorderable(record.incoming))
    return _refuse(record, cmd, _refusal(record, cmd.channel, cmd.qty), avail)


def _reserve_at_locations(
    record: StockRecord,
    cmd: ReserveStock,
    now: int,
    usage: CustomerUsage | None,
    priority: tuple[str, ...],
) -> Decision:
    """:func:`_reserve` on a SKU with locations (or naming one): the units are held where
    :func:`pipeline.domain.locations.plan_hold` puts them, at ``cmd.location`` ("" = by
    ``priority``), from one location unless ``cmd.split``; the channel and the
    customer's cap bound it as on a SKU without locations."""
    locs = _locations_of(record)
    sku_avail = record.available_for(cmd.channel)
    avail = min(sku_avail, loc.grantable(locs, at=cmd.location, split=cmd.split))
    allowance = max(0, record.customer_limit - usage.units) if usage is not None else MAX_COUNT
    no_backorder = ""
    if cmd.allow_backorder and avail < cmd.qty <= allowance:
        got = _backorder(record, cmd, now, usage)
        if not isinstance(got, str):
            return got
        no_backorder = got
    qty = cmd.qty
    if cmd.allow_partial and min(avail, allowance) < qty:
        qty = min(avail, allowance)
    if 0 < qty <= min(avail, allowance):
        plan = loc.plan_hold(locs, qty, at=cmd.location, priority=priority, split=cmd.split)
        if plan is not None:  # always, within grantable
            return _hold(record, cmd, now, qty, usage, plan, locs)
    if allowance < cmd.qty and (allowance == 0 or not cmd.allow_partial):
        return _refuse(record, cmd, CUSTOMER_LIMIT_REASON, min(avail, allowance))
    if no_backorder:
        return _refuse(record, cmd, no_backorder, inc.backorderable(record.incoming))
    if sku_avail >= cmd.qty:
        return _refuse(record, cmd, LOCATION_REASON, avail)
    return _refuse(record, cmd, _refusal(record, cmd.channel, cmd.qty), avail)


def _hold(
    record: StockRecord,
    cmd: ReserveStock,
    now: int,
    qty: int,
    usage: CustomerUsage | None,
    plan: Hold = (),
    locs: tuple[LocationStock, ...] = (),
) -> Decision:
    """Hold ``qty`` units: at the locations of ``plan`` when given (of ``locs``)."""
    alloc = record.allocation(cmd.channel)
    from_alloc = min(qty, alloc.free) if alloc is not None else 0
    if plan:
        new = _with_locations(record, loc.hold(locs, plan))
    else:
        new = _evolve(record, reserved=record.reserved + qty)
    new = new.with_allocation(cmd.channel, from_alloc)
    held = Reservation(
        order_id=cmd.order_id,
        sku=cmd.sku,
        qty=qty,
        status=ReservationStatus.RESERVED,
        expires_at=cmd.occurred_at + cmd.ttl_ms,
        channel=cmd.channel,
        event_id=cmd.event_id,
        decided_at=cmd.occurred_at,
        reason="partial" if qty < cmd.qty else "",
        available_at_decision=new.available_for(cmd.channel),
        from_allocation=from_alloc,
        customer_id=cmd.customer_id,
        counted=usage is not None,
        sale_id=usage.sale_id if usage is not None else "",
        held=plan,
    )
    used = _evolve(usage, units=usage.units + qty) if usage is not None else None
    return _changed(record, new, cmd, now, Outcome.RESERVED, qty, held, held.reason, used)


def _refuse(record: StockRecord, cmd: ReserveStock, why: str, available: int) -> Decision:
    refused = Reservation(
        order_id=cmd.order_id,
        sku=cmd.sku,
        qty=cmd.qty,
        status=ReservationStatus.REJECTED,
        expires_at=cmd.occurred_at,
        channel=cmd.channel,
        event_id=cmd.event_id,
        decided_at=cmd.occurred_at,
        reason=why,
        available_at_decision=available,
        customer_id=cmd.customer_id,
    )
    return Decision(
        record=record,
        reservation=refused,
        events=(
            ReservationResult(
                cmd.event_id, cmd.order_id, cmd.sku, Outcome.REJECTED, cmd.qty, available, why
            ),
            CommandApplied(
                cmd.event_id, cmd.sku, type(cmd).__name__, Outcome.REJECTED, cmd.channel, why
            ),
        ),
    )


def _closed_before(record: StockRecord, cmd: OrderCommand, res: Reservation) -> Decision:
    """A commit, release or expiry of a reservation that is already closed: a repeat of
    what closed it is a duplicate; anything else came too late for it."""
    same = (
        cmd.event_id == res.closed_by
        or (isinstance(cmd, CommitReservation) and res.status is ReservationStatus.COMMITTED)
        or (isinstance(cmd, ReleaseReservation) and res.status is ReservationStatus.RELEASED)
        or (isinstance(cmd, ExpireReservation) and res.status is ReservationStatus.EXPIRED)
    )
    if same:
        return _answer(
            record, cmd, res.status_outcome(), res.qty, record.available, res.reason, duplicate=True
        )
    why = f"reservation is {res.status.value}"
    if isinstance(cmd, ExpireReservation):
        return _answer(
            record, cmd, Outcome.NOT_EXPIRED, res.qty, record.available, why, silent=True
        )
    return _answer(record, cmd, Outcome.INVALID_STATE, res.qty, record.available, why)


def _commit(
    record: StockRecord,
    cmd: CommitReservation,
    now: int,
    res: Reservation,
    usage: CustomerUsage | None,
) -> Decision:
    if cmd.occurred_at >= res.expires_at:
        # a commit that arrives after the expiry finds the units already due back
        return _expired(record, cmd, now, res, usage, cmd.occurred_at)
    # the sold units leave the locations and the allocation they were taken from
    new = _sell(record, res)
    closed = _evolve(
        res,
        status=ReservationStatus.COMMITTED,
        decided_at=cmd.occurred_at,
        reason="",
        closed_by=cmd.event_id,
    )
    return _changed(record, new, cmd, now, Outcome.COMMITTED, res.qty, closed, "")


def _release(
    record: StockRecord,
    cmd: ReleaseReservation,
    now: int,
    res: Reservation,
    usage: CustomerUsage | None,
) -> Decision:
    new = _unhold(record, res)
    closed = _evolve(
        res,
        status=ReservationStatus.RELEASED,
        decided_at=cmd.occurred_at,
        reason=cmd.reason,
        closed_by=cmd.event_id,
    )
    return _changed(
        record, new, cmd, now, Outcome.RELEASED, res.qty, closed, cmd.reason, _give_back(usage, res)
    )


def _expire(
    record: StockRecord,
    cmd: ExpireReservation,
    now: int,
    res: Reservation,
    usage: CustomerUsage | None,
) -> Decision:
    # the sweeper's ExpireReservation carries the time it saw; the ledger's own clock
    # caps it, so one from any producer of the public orders topic can only expire what
    # is due anyway (a future occurred_at cannot end a hold early)
    at = min(cmd.occurred_at, now)
    if at < res.expires_at:
        return _answer(
            record,
            cmd,
            Outcome.NOT_EXPIRED,
            res.qty,
            record.available,
            "not yet expired",
            silent=True,
        )
    return _expired(record, cmd, now, res, usage, at)


def _expired(
    record: StockRecord,
    cmd: ExpireReservation | CommitReservation,
    now: int,
    res: Reservation,
    usage: CustomerUsage | None,
    at: int,
) -> Decision:
    """The hold ended by its expiry at ``at``: its units (and the customer's) go back."""
    new = _unhold(record, res)
    closed = _evolve(
        res,
        status=ReservationStatus.EXPIRED,
        decided_at=at,
        reason="expired",
        closed_by=cmd.event_id,
    )
    return _changed(
        record, new, cmd, now, Outcome.EXPIRED, res.qty, closed, "expired", _give_back(usage, res)
    )


def _give_back(usage: CustomerUsage | None, res: Reservation) -> CustomerUsage | None:
    """The usage after counted reservation ``res`` closed without a sale."""
    if usage is None:
        return None
    return _evolve(usage, units=max(0, usage.units - res.qty))


# --------------------------------------------------------------------------
# stock commands: one rule each, applied by _decide_stock


def _decide_stock(
    record: StockRecord,
    cmd: StockCommand,
    now: int,
    window: int,
    applied_before: bool = False,
    ctx: _Others | None = None,
) -> Decision:
    ctype = type(cmd).__name__
    if applied_before or cmd.event_id in record.recent_event_ids:
        return Decision(
            record=record,
            events=(
                CommandApplied(
                    cmd.event_id,
                    cmd.sku,
                    ctype,
                    Outcome.DUPLICATE,
                    cmd.channel,
                    "event_id already applied",
                ),
            ),
        )
    remembered = (record.recent_event_ids + (cmd.event_id,))[-window:] if window > 0 else ()
    base = _evolve(record, recent_event_ids=remembered)
    if isinstance(cmd, INCOMING_COMMANDS) or (isinstance(cmd, RestockReceived) and cmd.po_id):
        applied = _incoming_rule(base, cmd)
    elif located_command(record, cmd):
        applied = _at_location(base, cmd)
    else:
        applied = _STOCK_RULES[type(cmd)](base, cmd)
    new = applied.record
    limit = _over_limit(base, new)
    if limit:
        return Decision(
            record=record,
            events=(
                CommandApplied(
                    cmd.event_id, cmd.sku, ctype, Outcome.LIMIT_EXCEEDED, cmd.channel, limit
                ),
            ),
        )
    events: list[Event] = []
    if _published(new) != _published(record):
        new = _evolve(new, version=record.version + 1)
        events.append(_stock_changed(new, cmd, now, order_id=getattr(cmd, "order_id", "")))
    events.extend(applied.extra)
    others: tuple[Reservation, ...] = ()
    usages: tuple[CustomerUsage, ...] = ()
    if applied.settled is not None:
        others, usages, answers = _settle_orders(new, applied.settled, cmd, ctx or _Others({}, {}))
        events.extend(answers)
    events.append(
        CommandApplied(
            cmd.event_id,
            cmd.sku,
            ctype,
            applied.outcome,
            cmd.channel,
            applied.reason,
            applied.units_lost,
        )
    )
    return Decision(record=new, events=tuple(events), others=others, other_usages=usages)


def _restock(r: StockRecord, cmd: RestockReceived) -> _Applied:
    return _Applied(_evolve(r, on_hand=r.on_hand + cmd.qty), Outcome.RESTOCKED)


def _count(r: StockRecord, cmd: StockCounted) -> _Applied:
    new = _evolve(r, on_hand=cmd.on_hand)
    if cmd.on_hand >= r.reserved:
        return _Applied(new, Outcome.COUNTED)
    short = StockShortfall(
        cmd.sku, cmd.on_hand, r.reserved, r.reserved - cmd.on_hand, cmd.event_id, cmd.occurred_at
    )
    why = f"counted {cmd.on_hand} below reserved {r.reserved}"
    return _Applied(new, Outcome.SHORTFALL, why, (short,))


def _return(r: StockRecord, cmd: ReturnReceived) -> _Applied:
    if cmd.resellable:
        return _Applied(_evolve(r, on_hand=r.on_hand + cmd.qty), Outcome.RETURNED)
    return _Applied(_evolve(r, damaged=r.damaged + cmd.qty), Outcome.RETURN_DAMAGED)


def _resolve_damaged(r: StockRecord, cmd: DamagedStockResolved) -> _Applied:
    if cmd.qty > r.damaged:
        # refused, and final like a rejected reserve: the id is remembered (``r``), so a
        # re-send is a DUPLICATE and never applies later when units came in since
        why = f"{cmd.qty} damaged units asked, {r.damaged} held"
        return _Applied(r, Outcome.INSUFFICIENT_DAMAGED, why)
    if cmd.action is DamagedAction.RESTOCK:
        new = _evolve(r, damaged=r.damaged - cmd.qty, on_hand=r.on_hand + cmd.qty)
        return _Applied(new, Outcome.DAMAGED_RESTOCKED, cmd.reason)
    return _Applied(
        _evolve(r, damaged=r.damaged - cmd.qty), Outcome.DAMAGED_WRITTEN_OFF, cmd.reason
    )


def _set_safety_stock(r: StockRecord, cmd: SafetyStockSet) -> _Applied:
    return _Applied(_evolve(r, safety_stock=cmd.qty), Outcome.SAFETY_STOCK_SET)


def _set_allocation(r: StockRecord, cmd: ChannelAllocationSet) -> _Applied:
    held = r.allocation(cmd.channel)
    reserved = held.reserved if held is not None else 0
    others = [a for a in r.channels if a.channel != cmd.channel]
    if cmd.qty > 0 or reserved > 0:
        # open reservations keep their units counted against the channel until they close
        others.append(ChannelAllocation(cmd.channel, cmd.qty, reserved, cmd.use_shared))
    new = _evolve(r, channels=tuple(sorted(others, key=lambda a: a.channel)))
    return _Applied(new, Outcome.ALLOCATION_SET)


def _set_customer_limit(r: StockRecord, cmd: CustomerLimitSet) -> _Applied:
    new = _evolve(r, customer_limit=cmd.max_units, sale_id=cmd.sale_id)
    return _Applied(new, Outcome.CUSTOMER_LIMIT_SET)


_STOCK_RULES: dict[type, Callable[[StockRecord, Any], _Applied]] = {
    RestockReceived: _restock,
    StockCounted: _count,
    ReturnReceived: _return,
    DamagedStockResolved: _resolve_damaged,
    SafetyStockSet: _set_safety_stock,
    ChannelAllocationSet: _set_allocation,
    CustomerLimitSet: _set_customer_limit,
}
"""The rule of each stock command on a SKU without locations (the StockCommand union is
closed: a new command adds its rule here, or to :func:`_at_location`, which decides
every command :func:`located_command` names: transfers, and any unit-moving command
once the SKU has locations)."""


# --------------------------------------------------------------------------
# helpers


def _refusal(record: StockRecord, channel: str, qty: int) -> str:
    """Why ``channel`` cannot reserve ``qty`` (a reason code for the answer)."""
    if record.available < qty:
        return "insufficient_stock"
    if record.allocation(channel) is not None:
        return "channel_allocation_exhausted"
    return "reserved_for_other_channels"


def _over_limit(before: StockRecord, new: StockRecord) -> str:
    """Why ``new`` may not be stored ("" when it may): a count above :data:`MAX_COUNT`,
    or more channel allocations than :data:`MAX_CHANNELS_PER_SKU`."""
    if new.on_hand > MAX_COUNT:
        return f"on_hand would be {new.on_hand}, above {MAX_COUNT}"
    if new.damaged > MAX_COUNT:
        return f"damaged would be {new.damaged}, above {MAX_COUNT}"
    if len(new.channels) > MAX_CHANNELS_PER_SKU and len(new.channels) > len(before.channels):
        return f"a SKU holds at most {MAX_CHANNELS_PER_SKU} channel allocations"
    if new.locations:
        if len(new.locations) > loc.MAX_LOCATIONS_PER_SKU and len(new.locations) > len(
            before.locations
        ):
            return f"a SKU holds at most {loc.MAX_LOCATIONS_PER_SKU} locations"
        if max(max(x.on_hand, x.damaged, x.inbound) for x in new.locations) > MAX_COUNT:
            return f"a location's count would pass {MAX_COUNT}"
        if new.safety_stock > MAX_COUNT:
            return f"safety_stock would be {new.safety_stock}, above {MAX_COUNT}"
    if new.incoming is not before.incoming:
        # the incoming rules refuse both already; the SKU record carries them all
        if len(new.incoming.orders) > inc.MAX_PURCHASE_ORDERS_PER_SKU:
            return f"a SKU keeps at most {inc.MAX_PURCHASE_ORDERS_PER_SKU} purchase orders"
        if new.incoming.waiting > inc.MAX_BACKORDERS_PER_SKU:
            return f"a SKU has at most {inc.MAX_BACKORDERS_PER_SKU} backorders waiting"
        if inc.open_incoming(new.incoming) > MAX_COUNT:
            return f"incoming units would pass {MAX_COUNT}"
    return ""


def _published(r: StockRecord) -> tuple[Any, ...]:
    """The numbers a StockChanged publishes: a change of any of them is a new version
    (``incoming``: its purchase orders, backorders and cap, whose figures it carries)."""
    return (
        r.on_hand,
        r.reserved,
        r.safety_stock,
        r.damaged,
        r.channels,
        r.locations,
        r.incoming,
    )


def _stock_changed(new: StockRecord, cmd: Command, now: int, order_id: str = "") -> StockChanged:
    return StockChanged(
        sku=new.sku,
        version=new.version,
        on_hand=new.on_hand,
        reserved=new.reserved,
        safety_stock=new.safety_stock,
        available=new.available,
        cause_type=type(cmd).__name__,
        cause_event_id=cmd.event_id,
        order_id=order_id,
        channel=cmd.channel,
        occurred_at=cmd.occurred_at,
        processed_at=now,
        channels=channel_stock(new),
        damaged=new.damaged,
        locations=location_figures(new) if new.locations else (),
        **(incoming_figures(new.incoming) if new.incoming.orders else {}),
    )


INCOMING_FIELDS = ("incoming", "promised", "backorderable", "staged")
"""The purchase orders' figures of StockChanged v5 (absent, read as 0, in older records),
under these names in the Redis hash and the search document too: :func:`incoming_figures`."""


def incoming_figures(incoming: Incoming) -> dict[str, int]:
    """StockChanged's (and the Redis hash's, the search document's) ``incoming``,
    ``promised``, ``backorderable`` and ``staged``."""
    return {
        "incoming": inc.open_incoming(incoming),
        "promised": incoming.promised,
        "backorderable": inc.backorderable(incoming),
        "staged": incoming.staged,
    }


def _changed(
    old: StockRecord,
    new: StockRecord,
    cmd: OrderCommand,
    now: int,
    outcome: Outcome,
    qty: int,
    res: Reservation,
    reason: str,
    usage: CustomerUsage | None = None,
    *,
    po_id: str = "",
    expected_at: int = 0,
) -> Decision:
    events: list[Event] = []
    if _published(new) != _published(old):
        new = _evolve(new, version=old.version + 1)
        events.append(_stock_changed(new, cmd, now, order_id=cmd.order_id))
    events.append(
        ReservationResult(
            cmd.event_id,
            cmd.order_id,
            cmd.sku,
            outcome,
            qty,
            new.available,
            reason,
            po_id=po_id,
            expected_at=expected_at,
        )
    )
    events.append(
        CommandApplied(cmd.event_id, cmd.sku, type(cmd).__name__, outcome, cmd.channel, reason)
    )
    return Decision(record=new, reservation=res, events=tuple(events), usage=usage)


def _answer(
    record: StockRecord,
    cmd: OrderCommand,
    outcome: Outcome,
    qty: int,
    available: int,
    reason: str,
    *,
    duplicate: bool = False,
    silent: bool = False,
    po_id: str = "",
    expected_at: int = 0,
) -> Decision:
    """A decision that changes nothing but is still answered (unless ``silent``)."""
    applied = CommandApplied(
        cmd.event_id,
        cmd.sku,
        type(cmd).__name__,
        Outcome.DUPLICATE if duplicate else outcome,
        cmd.channel,
        reason,
    )
    if silent:
        return Decision(record=record, events=(applied,))
    result = ReservationResult(
        cmd.event_id,
        cmd.order_id,
        cmd.sku,
        outcome,
        qty,
        available,
        reason,
        duplicate=duplicate,
        po_id=po_id,
        expected_at=expected_at,
    )
    return Decision(record=record, events=(result, applied))


# --------------------------------------------------------------------------
# locations: a SKU's stock per location, by the rules of pipeline.domain.locations


def _locations_of(record: StockRecord) -> tuple[LocationStock, ...]:
    """The SKU's locations; for a SKU that has none yet, its totals as the one
    :data:`DEFAULT_LOCATION` (nothing when it holds nothing)."""
    if record.locations:
        return record.locations
    if record.on_hand or record.reserved or record.damaged or record.safety_stock:
        return (
            LocationStock(
                DEFAULT_LOCATION,
                on_hand=record.on_hand,
                reserved=record.reserved,
                damaged=record.damaged,
                safety_stock=record.safety_stock,
                staged=record.staged,  # purchase orders of the default location
            ),
        )
    return ()


def _with_locations(
    record: StockRecord, locs: tuple[LocationStock, ...], **changes: Any
) -> StockRecord:
    """``record`` holding ``locs``, its totals their sums."""
    on_hand, reserved, damaged = loc.totals(locs)
    return _evolve(
        record,
        locations=locs,
        located_available=loc.available(locs),
        on_hand=on_hand,
        reserved=reserved,
        damaged=damaged,
        safety_stock=sum(x.safety_stock for x in locs),
        **changes,
    )


def _held(res: Reservation) -> Hold:
    """Where ``res``'s units are held: a reservation made before its SKU had locations
    holds them all at the default location (where the totals were carried)."""
    return res.held or ((DEFAULT_LOCATION, res.qty),)


def _unhold(record: StockRecord, res: Reservation) -> StockRecord:
    """``record`` after open reservation ``res`` gave its units back (release, expiry):
    to exactly the locations that hold them, and to the channel's allocation."""
    if record.locations:
        new = _with_locations(record, loc.release(record.locations, _held(res)))
    else:
        new = _evolve(record, reserved=record.reserved - res.qty)
    return new.with_allocation(res.channel, -res.from_allocation)


def _sell(record: StockRecord, res: Reservation) -> StockRecord:
    """``record`` after open reservation ``res`` was committed: its units leave
    reserved and on_hand where they are held, and the allocation they came from."""
    if record.locations:
        new = _with_locations(record, loc.commit(record.locations, _held(res)))
    else:
        new = _evolve(record, on_hand=record.on_hand - res.qty, reserved=record.reserved - res.qty)
    return new.with_allocation(res.channel, -res.from_allocation, -res.from_allocation)


def _at_location(base: StockRecord, cmd: StockCommand) -> _Applied:
    """A stock command on a SKU with locations (or naming one), after the event-id check,
    by the rules of :mod:`pipeline.domain.locations`; "" names the default location."""
    locs = _locations_of(base)
    if isinstance(cmd, TRANSFER_COMMANDS):
        return _transfer(base, locs, cmd)
    if isinstance(
        cmd,
        (
            ChannelAllocationSet,
            CustomerLimitSet,
            IncomingStock,
            PurchaseOrderClosed,
            BackorderCapSet,
        ),
    ):  # pragma: no cover
        raise TypeError(f"no location rule for {cmd!r}")  # see located_command
    where = cmd.location or DEFAULT_LOCATION
    if isinstance(cmd, RestockReceived):
        return _Applied(_with_locations(base, loc.restock(locs, where, cmd.qty)), Outcome.RESTOCKED)
    if isinstance(cmd, StockCounted):
        counted, short = loc.count(locs, where, cmd.on_hand)
        new = _with_locations(base, counted)
        if not short:
            return _Applied(new, Outcome.COUNTED)
        held = cmd.on_hand + short
        why = f"counted {cmd.on_hand} below reserved {held} at {where}"
        shortfall = StockShortfall(
            cmd.sku, cmd.on_hand, held, short, cmd.event_id, cmd.occurred_at, where
        )
        return _Applied(new, Outcome.SHORTFALL, why, (shortfall,))
    if isinstance(cmd, ReturnReceived):
        back = loc.return_units(locs, where, cmd.qty, resellable=cmd.resellable)
        outcome = Outcome.RETURNED if cmd.resellable else Outcome.RETURN_DAMAGED
        return _Applied(_with_locations(base, back), outcome)
    if isinstance(cmd, SafetyStockSet):
        safety = loc.set_safety(locs, where, cmd.qty)
        return _Applied(_with_locations(base, safety), Outcome.SAFETY_STOCK_SET)
    restock = cmd.action is DamagedAction.RESTOCK
    got = loc.resolve_damaged(locs, where, cmd.qty, restock=restock)
    if isinstance(got, str):
        # refused and final, as without locations: the id is remembered (``base``)
        return _Applied(base, Outcome.INSUFFICIENT_DAMAGED, got)
    outcome = Outcome.DAMAGED_RESTOCKED if restock else Outcome.DAMAGED_WRITTEN_OFF
    return _Applied(_with_locations(base, got), outcome, cmd.reason)


def located_command(record: StockRecord, cmd: StockCommand) -> bool:
    """True when stock command ``cmd`` takes the per-location path on ``record``."""
    where = getattr(cmd, "location", None)
    if where is None:  # a transfer, or per SKU (an allocation or a cap moves no unit)
        return type(cmd) in _TRANSFERS
    return bool(record.locations) or (bool(where) and where != DEFAULT_LOCATION)


_TRANSFERS = frozenset(TRANSFER_COMMANDS)


def _transfer(
    base: StockRecord,
    locs: tuple[LocationStock, ...],
    cmd: TransferShipped | TransferReceived | TransferCancelled,
) -> _Applied:
    """Transfers; a refused one is final (TRANSFER_REFUSED, the id remembered)."""
    refused = Outcome.TRANSFER_REFUSED
    if isinstance(cmd, TransferShipped):
        if any(t.transfer_id == cmd.transfer_id for t in base.transfers):
            return _Applied(base, refused, f"transfer {cmd.transfer_id} is on the way")
        if len(base.transfers) >= MAX_OPEN_TRANSFERS:
            return _Applied(base, refused, f"{MAX_OPEN_TRANSFERS} transfers are on the way")
        transfer = Transfer(
            cmd.transfer_id,
            cmd.source or DEFAULT_LOCATION,
            cmd.destination or DEFAULT_LOCATION,
            cmd.qty,
        )
        shipped = loc.ship(locs, transfer)
        if isinstance(shipped, str):
            return _Applied(base, refused, shipped)
        new = _with_locations(base, shipped, transfers=(*base.transfers, transfer))
        return _Applied(new, Outcome.TRANSFER_SHIPPED)
    found = [t for t in base.transfers if t.transfer_id == cmd.transfer_id]
    if not found:
        return _Applied(base, refused, f"no transfer {cmd.transfer_id} on the way")
    transfer = found[0]
    rest = tuple(t for t in base.transfers if t.transfer_id != cmd.transfer_id)
    if isinstance(cmd, TransferCancelled):
        back = loc.cancel_transfer(locs, transfer)
        return _Applied(_with_locations(base, back, transfers=rest), Outcome.TRANSFER_CANCELLED)
    got = loc.receive(locs, transfer, cmd.qty)
    if isinstance(got, str):
        return _Applied(base, refused, got)
    arrived, lost = got
    why = f"{lost} of {transfer.qty} units lost in transit" if lost else ""
    return _Applied(
        _with_locations(base, arrived, transfers=rest),
        Outcome.TRANSFER_RECEIVED,
        why,
        units_lost=lost,
    )


# --------------------------------------------------------------------------
# incoming stock and backorders, by the rules of pipeline.domain.incoming


def _expected_at(record: StockRecord, po_id: str) -> int:
    po = inc.find_po(record.incoming, po_id) if po_id else None
    return po.expected_at if po is not None else 0


def _with_incoming(record: StockRecord, incoming: Incoming) -> StockRecord:
    return _evolve(record, incoming=incoming, staged=incoming.staged)


def _po_location(incoming: Incoming, po_id: str) -> str:
    po = inc.find_po(incoming, po_id)
    return (po.location if po is not None else "") or DEFAULT_LOCATION


def _settled_record(record: StockRecord, s: Settlement, where: str) -> StockRecord:
    """``record`` after settlement ``s`` of a purchase order delivered to ``where``: the
    received units on hand, the converted backorders' units held, the staged units moved
    (at ``where`` once the SKU has locations, or when it is not the default one)."""
    if record.locations or where != DEFAULT_LOCATION:
        locs = loc.settle(_locations_of(record), where, s.received, s.held, s.staged_change)
        return _with_locations(record, locs, incoming=s.incoming, staged=s.incoming.staged)
    return _evolve(
        record,
        on_hand=record.on_hand + s.received,
        reserved=record.reserved + s.held,
        incoming=s.incoming,
        staged=s.incoming.staged,
    )


def _incoming_rule(
    r: StockRecord, cmd: IncomingStock | PurchaseOrderClosed | BackorderCapSet | RestockReceived
) -> _Applied:
    """IncomingStock, PurchaseOrderClosed, BackorderCapSet and a RestockReceived naming a
    purchase order, after the event-id check. A refusal is final (INCOMING_REFUSED, the
    id remembered). An arrival for a purchase order the SKU does not expect (or one that
    ended), or delivered to another location than the order's, is a plain restock (its
    reason says why): goods that arrived are never refused."""
    if isinstance(cmd, BackorderCapSet):
        cap = inc.set_cap(r.incoming, cmd.max_units)
        if isinstance(cap, str):
            return _Applied(r, Outcome.INCOMING_REFUSED, cap)
        return _Applied(_with_incoming(r, cap), Outcome.BACKORDER_CAP_SET)
    if isinstance(cmd, IncomingStock):
        got = inc.expect(r.incoming, cmd.po_id, cmd.qty, cmd.expected_at, cmd.location)
        outcome = Outcome.INCOMING_EXPECTED
    elif isinstance(cmd, PurchaseOrderClosed):
        got = inc.close(r.incoming, cmd.po_id, cancelled=cmd.cancelled)
        outcome = Outcome.PO_CLOSED
    else:
        po = inc.find_po(r.incoming, cmd.po_id)
        why = ""
        if po is None:
            why = f"{inc.UNKNOWN_PO}: {cmd.po_id}"
        elif not po.status.is_open:
            why = f"{inc.PO_ENDED}: {cmd.po_id} is {po.status.value}"
        elif cmd.location and cmd.location != (po.location or DEFAULT_LOCATION):
            where = po.location or DEFAULT_LOCATION
            why = f"purchase order {cmd.po_id} is delivered to {where}, not {cmd.location}"
        if why:
            plain = _at_location(r, cmd) if located_command(r, cmd) else _restock(r, cmd)
            return _Applied(plain.record, plain.outcome, why)
        got = inc.arrive(r.incoming, cmd.po_id, cmd.qty, final=cmd.final)
        outcome = Outcome.RESTOCKED
    if isinstance(got, str):
        return _Applied(r, Outcome.INCOMING_REFUSED, got)
    new = _settled_record(r, got, _po_location(got.incoming, cmd.po_id))
    return _Applied(new, outcome, "", settled=got)


def _backorder(
    record: StockRecord, cmd: ReserveStock, now: int, usage: CustomerUsage | None
) -> Decision | str:
    """``cmd`` promised against a purchase order (:func:`pipeline.domain.incoming.backorder`):
    a BACKORDERED reservation, counted in the customer's usage like a hold; or why not."""
    got = inc.backorder(
        record.incoming,
        cmd.order_id,
        cmd.qty,
        cmd.occurred_at,
        channel=cmd.channel,
        customer_id=cmd.customer_id,
        ttl_ms=cmd.ttl_ms,
    )
    if isinstance(got, str):
        return got
    incoming, b = got
    new = _with_incoming(record, incoming)
    waiting = Reservation(
        order_id=cmd.order_id,
        sku=cmd.sku,
        qty=cmd.qty,
        status=ReservationStatus.BACKORDERED,
        expires_at=0,  # never expires: it ends converted, released or cancelled
        channel=cmd.channel,
        event_id=cmd.event_id,
        decided_at=cmd.occurred_at,
        available_at_decision=new.available_for(cmd.channel),
        customer_id=cmd.customer_id,
        counted=usage is not None,
        sale_id=usage.sale_id if usage is not None else "",
        po_id=b.po_id,
    )
    used = _evolve(usage, units=usage.units + cmd.qty) if usage is not None else None
    return _changed(
        record,
        new,
        cmd,
        now,
        Outcome.BACKORDERED,
        cmd.qty,
        waiting,
        "",
        used,
        po_id=b.po_id,
        expected_at=_expected_at(new, b.po_id),
    )


def _release_backorder(
    record: StockRecord,
    cmd: ReleaseReservation,
    now: int,
    res: Reservation,
    usage: CustomerUsage | None,
    ctx: _Others,
) -> Decision:
    """ReleaseReservation of a waiting backorder: its promise is given back (and the
    customer's units); the purchase order's staged units may now convert the next one."""
    closed = _evolve(
        res,
        status=ReservationStatus.RELEASED,
        decided_at=cmd.occurred_at,
        reason=cmd.reason,
        closed_by=cmd.event_id,
    )
    got = inc.cancel(record.incoming, cmd.order_id)
    if isinstance(got, str):  # pragma: no cover - a BACKORDERED order waits in its SKU
        new = record
    else:
        new = _settled_record(record, got, _po_location(got.incoming, res.po_id))
    decision = _changed(
        record,
        new,
        cmd,
        now,
        Outcome.RELEASED,
        res.qty,
        closed,
        cmd.reason,
        _give_back(usage, res),
        po_id=res.po_id,
        expected_at=_expected_at(record, res.po_id),
    )
    if isinstance(got, str) or not got.converted:  # pragma: no branch
        return decision
    others, usages, answers = _settle_orders(decision.record, got, cmd, ctx)
    events = (*decision.events[:-1], *answers, decision.events[-1])
    return _evolve(decision, events=events, others=others, other_usages=usages)


def _from_backorder(sku: str, b: inc.Backorder) -> Reservation:
    """The reservation of a backorder whose stored reservation was not given (it always
    is, by the batch: see :func:`settling`)."""
    return Reservation(
        order_id=b.order_id,
        sku=sku,
        qty=b.qty,
        status=ReservationStatus.BACKORDERED,
        expires_at=0,
        channel=b.channel,
        event_id="",
        decided_at=b.placed_at,
        customer_id=b.customer_id,
        po_id=b.po_id,
    )


def _settle_orders(
    new: StockRecord, s: Settlement, cmd: Command, ctx: _Others
) -> tuple[tuple[Reservation, ...], tuple[CustomerUsage, ...], list[ReservationResult]]:
    """The reservations, usages and answers of the backorders settlement ``s`` converted
    (now RESERVED: held for their ``ttl_ms`` from ``cmd``'s occurred_at, where the
    purchase order is delivered; committed by the checkout like any hold) and released
    (RELEASED with the reason, their customer's units given back)."""
    out: list[Reservation] = []
    answers: list[ReservationResult] = []
    touched: list[tuple[str, str]] = []
    for b in s.converted:
        old = ctx.reservations.get(b.order_id) or _from_backorder(cmd.sku, b)
        where = _po_location(s.incoming, b.po_id)
        held = _evolve(
            old,
            status=ReservationStatus.RESERVED,
            qty=b.qty,
            expires_at=cmd.occurred_at + b.ttl_ms,
            decided_at=cmd.occurred_at,
            reason=BACKORDER_FILLED,
            available_at_decision=new.available_for(old.channel),
            from_allocation=0,  # arrived for it: never from a channel's allocation
            held=((where, b.qty),) if new.locations else (),
            po_id=b.po_id,
        )
        out.append(held)
        answers.append(
            ReservationResult(
                cmd.event_id,
                b.order_id,
                cmd.sku,
                Outcome.RESERVED,
                b.qty,
                new.available,
                BACKORDER_FILLED,
                po_id=b.po_id,
                expected_at=_expected_at(new, b.po_id),
            )
        )
    for gone in s.released:
        b = gone.backorder
        old = ctx.reservations.get(b.order_id) or _from_backorder(cmd.sku, b)
        out.append(
            _evolve(
                old,
                status=ReservationStatus.RELEASED,
                decided_at=cmd.occurred_at,
                reason=gone.reason,
                closed_by=cmd.event_id,
            )
        )
        if old.counted:
            key = (old.sale_id, old.customer_id)
            had = ctx.usages.get(key) or CustomerUsage(*key)
            ctx.usages[key] = _evolve(had, units=max(0, had.units - old.qty))
            if key not in touched:
                touched.append(key)
        answers.append(
            ReservationResult(
                cmd.event_id,
                b.order_id,
                cmd.sku,
                Outcome.RELEASED,
                b.qty,
                new.available,
                gone.reason,
                po_id=b.po_id,
                expected_at=_expected_at(new, b.po_id),
            )
        )
    return tuple(out), tuple(ctx.usages[k] for k in touched), answers
