"""Incoming stock, preorders and backorders: the pure rules of issue 16 item 2 (wired
into the ledger by :mod:`pipeline.domain.core`: IncomingStock, PurchaseOrderClosed,
BackorderCapSet, a RestockReceived naming a ``po_id`` and a ReserveStock with
``allow_backorder``).

A SKU's :class:`Incoming` holds the purchase orders it expects (:class:`PurchaseOrder`:
an expected quantity and date, the units received so far, OPEN / RECEIVED / CANCELLED)
and the backorder cap: how many units may be promised against them in total. A reserve
that on-hand stock cannot cover, and whose command allows it, becomes a
:class:`Backorder` waiting on one open purchase order. Everything is plain data and
plain functions (standard library only), like :mod:`pipeline.domain.core` and
:mod:`pipeline.domain.locations`: a function returns the new state (with what it did),
or a refusal reason, and never raises for a business "no". Time is only ever read
from the arguments (the command's ``occurred_at``), never from a clock.

The rules:

* :func:`expect` (IncomingStock) adds a purchase order or updates its expected quantity
  and date, idempotent by ``po_id`` (the quantity is absolute, not a delta). An update
  that lowers the quantity below what is promised against it releases the backorders
  that no longer fit (``po_short``); lowering it to what was received completes it.
* :func:`backorder` promises ``qty`` units of one open purchase order to one order, in
  full: the one expected first (then by ``po_id``) that still has ``qty`` units
  neither received nor promised. Refused (a reason) when the SKU takes no backorders
  (cap 0), expects nothing, the cap would be passed, or no single purchase order has
  room for all of it. One backorder waits on one purchase order, never split across
  two, so the customer's answer names one purchase order and one expected date, and
  it converts in one piece.
* :func:`arrive` (a restock naming a purchase order) adds the received units; they
  cover the purchase order's waiting backorders strictly in the order they were
  placed, each in full: a covered backorder becomes an ordinary hold
  (:attr:`Settlement.converted`). A backorder is never partly covered: an order holds
  one thing per SKU (a reservation or a backorder, as :class:`core.Reservation` keeps
  one ``qty`` and one status), and a partial hold would have to be split, expired and
  answered twice. Units that arrive short of the first waiting backorder are *staged*:
  on hand, set aside for it (not sellable) until the rest arrives. The rest is free,
  sellable on hand. A purchase order whose received units reach its expected quantity,
  or an arrival marked ``final``, is RECEIVED.
* :func:`close` ends a purchase order short (RECEIVED) or cancels it (CANCELLED): its
  staged units go to its waiting backorders in the order they were placed, each one
  that fits in full (a larger earlier one is released in the same step, so none is
  ever served while an earlier one still waits); the others are released with the
  reason ``po_short`` / ``po_cancelled`` (:attr:`Settlement.released`, each named so
  its customer's answer can say so); what is left is free on hand.
* :func:`cancel` takes a waiting backorder back (its order was cancelled): its promise
  is given back, and the staged units may now cover the next one.
* :func:`set_cap` sets the cap; a lower cap keeps the promises already made (as a lower
  channel allocation keeps its open reservations) and refuses new ones above it.

Why one cap per SKU, in units, over all purchase orders: the cap is the merchant's risk
(how many units it will sell before it holds them) and customers order the SKU, not a
purchase order; purchase orders come, change and go, and a per-PO cap would have to be
set again with each. Each purchase order is bounded by itself anyway: what is promised
against it never passes what it still brings. A cap of 0 (every SKU until told
otherwise, and every record written before this change) takes no backorders.

Invariants (checked by the property tests), per purchase order and in total:

* promised units (waiting backorders) never pass the cap (unless it was lowered below
  the promises already made) nor, per open purchase order, its open incoming plus its
  staged units (``promised <= expected - received + staged``);
* conversion is first-placed-first-served: no backorder is converted while an earlier
  one of the same purchase order still waits;
* units are conserved: every settlement's ``received = held + staged_change + free``
  (over a purchase order's life, staged ends at 0: received = converted holds + units
  added free on hand);
* a backorder ends once: converted, released with a reason, or cancelled, never two
  of them; a purchase order that ended has no waiting backorder and no staged unit.

What the wiring needs (the next step, in :mod:`pipeline.domain.core`, the schemas, the
tables and the sinks):

* ``StockRecord.incoming: Incoming = Incoming()`` (old records read as "expects
  nothing, takes no backorders"). The waiting backorders live in the SKU's record, not
  only in each order's reservation key, because an arrival settles many of them at
  once, in order, and ``decide`` sees the SKU's record and one reservation; the SKU
  stays the key, so they are decided serially by its one partition. ``available`` also subtracts
  :attr:`Incoming.staged` (staged units are on hand but not sellable; or keep them in
  a new field, never in ``reserved``, which stays the sum of open holds);
  :data:`MAX_PURCHASE_ORDERS_PER_SKU` and :data:`MAX_BACKORDERS_PER_SKU` join
  ``_over_limit`` and the record-size bound test (a backorder is at most ~470 bytes:
  order_id, po_id, channel and customer_id at their maximum lengths, so 256 of them
  ~120 KB; ``po_id`` is bounded like the other ids, ``MAX_ID_LEN``).
* an ``IncomingStock`` command and schema (``po_id``, ``qty``, ``expected_at``;
  ``cancelled`` or a separate ``PurchaseOrderClosed`` with ``cancelled`` for
  :func:`close`), a ``BackorderCapSet`` command (``max_units``) for :func:`set_cap`;
  ``RestockReceived`` gains ``po_id`` ("" = a plain restock, as today) and ``final``;
  ``ReserveStock`` gains ``allow_backorder`` (default false: today's behaviour).
* ``_reserve``: when ``available_for`` cannot cover ``qty`` and ``allow_backorder``,
  call :func:`backorder` instead of refusing; the order's Reservation gets a
  BACKORDERED status (and ``po_id``), its answer a new Outcome BACKORDERED with the
  purchase order's ``expected_at``; a refusal answers REJECTED with the reason
  (:data:`NO_INCOMING`, :data:`BACKORDER_CAP`, ...) and :func:`backorderable` as its
  available. A BACKORDERED reservation does not expire; ReleaseReservation of one
  calls :func:`cancel`.
* an arrival, close or expected-quantity cut changes many orders in one decision:
  ``Decision`` needs a tuple of reservations (and usages) to store, and one
  ReservationResult per converted backorder (RESERVED, reason ``backorder_filled``;
  the hold expires ``ttl_ms`` after the arrival's ``occurred_at``) and per released
  one (RELEASED, reason ``po_short`` / ``po_cancelled``), so each customer's answer
  says what happened to its order. Whether a converted preorder is committed at once
  (paid when placed) or held for ``ttl_ms`` is the lead's call; the rule gives both.
* with locations (item 1, now in main): a purchase order is delivered to one location
  (``PurchaseOrder`` gains ``location: str = ""``, the SKU's default location;
  IncomingStock carries it, RestockReceived already names one); converted backorders
  are held there (``Hold = ((location, qty),)``) and its staged units count against
  that location's available (``LocationStock`` needs them beside ``reserved``, and
  ``located_available`` must leave them out). The rules here need no change for it.
* a plain restock (no ``po_id``), a return or a count does not convert backorders:
  they wait on their purchase order, and on-hand units stay first come, first served.
  If the lead wants plain restocks to serve waiting backorders first, that is one more
  function over the same settling rule (the restocked units as its ``pool``).
* StockChanged, ``GET /stock/{sku}``, the Redis hash and the search document can carry
  ``incoming`` (:func:`open_incoming`), ``promised`` and ``backorderable``; the audit
  the settlements.
* per-customer limits: a backorder with a ``customer_id`` counts in the customer's
  usage like a hold; a release gives it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

MAX_PURCHASE_ORDERS_PER_SKU = 16
"""Purchase orders one SKU keeps (open ones, then the latest ended ones): each is in the
SKU's record. An ended one is dropped, oldest first, to make room for a new one (its
id is then forgotten: an IncomingStock naming it again opens a new purchase order, so
the wiring keeps the event-id guard in front of it)."""
MAX_BACKORDERS_PER_SKU = 256
"""Backorders one SKU may have waiting (they live in the SKU's record, which one
changelog record carries)."""
DEFAULT_TTL_MS = 15 * 60 * 1000
"""How long a converted backorder holds its units (ReserveStock's default ``ttl_ms``)."""

# why a backorder was released (in its customer's answer)
PO_CANCELLED = "po_cancelled"
PO_SHORT = "po_short"
# why a backorder was refused
BACKORDERS_OFF = "backorders_disabled"  # the SKU's cap is 0
NO_INCOMING = "no_incoming"  # no open purchase order
BACKORDER_CAP = "backorder_cap"  # the cap would be passed
INCOMING_SHORT = "incoming_insufficient"  # no one purchase order has room for all of it
BACKORDER_LIMIT = "backorder_limit"  # MAX_BACKORDERS_PER_SKU are waiting
ALREADY_BACKORDERED = "already_backordered"
# notes on an arrival that names no purchase order this SKU expects (all its units free)
UNKNOWN_PO = "unknown_po"
PO_ENDED = "po_ended"

_T = TypeVar("_T")


def _evolve(obj: _T, **changes: Any) -> _T:
    """A copy of frozen dataclass ``obj`` with ``changes``, without the per-call field
    introspection of ``dataclasses.replace`` (see :func:`pipeline.domain.core._evolve`:
    these types will sit in the SKU's record, on the reserve path; core is not imported
    here, since core is the one that will import this module)."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__, **changes)
    return new


class POStatus(str, Enum):
    OPEN = "OPEN"  # expected; may receive
    RECEIVED = "RECEIVED"  # received in full, or closed short
    CANCELLED = "CANCELLED"

    @property
    def is_open(self) -> bool:
        return self is POStatus.OPEN


@dataclass(frozen=True)
class Backorder:
    """``qty`` units promised to ``order_id`` against purchase order ``po_id``."""

    order_id: str
    qty: int
    po_id: str
    seq: int  # the SKU's backorders placed before it: the order they were placed in
    placed_at: int  # the command's occurred_at
    channel: str = "web"
    customer_id: str = ""
    ttl_ms: int = DEFAULT_TTL_MS  # how long the hold lasts once converted


@dataclass(frozen=True)
class PurchaseOrder:
    """One expected delivery of a SKU, and the backorders waiting on it (in the order
    they were placed)."""

    po_id: str
    expected: int  # units ordered from the supplier (IncomingStock's quantity)
    # when they are due (epoch ms): picks the purchase order a backorder waits on and is
    # shown to its customer; nothing acts on its passing (a late one is closed by a command)
    expected_at: int
    received: int = 0
    status: POStatus = POStatus.OPEN
    staged: int = 0  # received units set aside for the first waiting backorder
    backorders: tuple[Backorder, ...] = ()
    location: str = ""  # where it is delivered ("" = the SKU's default location)

    @property
    def open(self) -> int:
        """Units still to come."""
        return max(0, self.expected - self.received) if self.status.is_open else 0

    @property
    def promised(self) -> int:
        return sum(b.qty for b in self.backorders)

    @property
    def room(self) -> int:
        """Units a new backorder could still be promised against it."""
        return max(0, self.open + self.staged - self.promised) if self.status.is_open else 0


@dataclass(frozen=True)
class Incoming:
    """One SKU's expected purchase orders and its backorder cap."""

    orders: tuple[PurchaseOrder, ...] = ()  # in the order first expected
    cap: int = 0  # units that may be promised over all purchase orders (0 = no backorders)
    placed: int = 0  # backorders placed so far: the next one's ``seq``

    @property
    def promised(self) -> int:
        return sum(po.promised for po in self.orders)

    @property
    def staged(self) -> int:
        """On-hand units set aside for waiting backorders (not sellable)."""
        return sum(po.staged for po in self.orders)

    @property
    def waiting(self) -> int:
        return sum(len(po.backorders) for po in self.orders)


@dataclass(frozen=True)
class ReleasedBackorder:
    backorder: Backorder
    reason: str  # PO_SHORT or PO_CANCELLED


@dataclass(frozen=True)
class Settlement:
    """What an arrival, a close, an expected-quantity change or a cancelled backorder
    did. Units: ``received = held + staged_change + free``."""

    incoming: Incoming
    converted: tuple[Backorder, ...] = ()  # now ordinary holds, in the order placed
    released: tuple[ReleasedBackorder, ...] = ()
    received: int = 0  # units that came on hand (an arrival)
    held: int = 0  # units the converted backorders now hold (reserved)
    staged_change: int = 0  # change of the staged (set aside) units
    free: int = 0  # units that became sellable on hand
    note: str = ""  # UNKNOWN_PO / PO_ENDED: an arrival no purchase order expected


# --------------------------------------------------------------------------
# reading


def find_po(incoming: Incoming, po_id: str) -> PurchaseOrder | None:
    for po in incoming.orders:
        if po.po_id == po_id:
            return po
    return None


def find_backorder(incoming: Incoming, order_id: str) -> Backorder | None:
    for po in incoming.orders:
        for b in po.backorders:
            if b.order_id == order_id:
                return b
    return None


def open_incoming(incoming: Incoming) -> int:
    """Units the open purchase orders still bring (what a shop shows as "incoming")."""
    return sum(po.open for po in incoming.orders)


def backorderable(incoming: Incoming) -> int:
    """The most units one backorder could be promised now (a refusal's ``available``)."""
    if incoming.waiting >= MAX_BACKORDERS_PER_SKU:
        return 0
    room = max((po.room for po in incoming.orders), default=0)
    return max(0, min(room, incoming.cap - incoming.promised))


# --------------------------------------------------------------------------
# rules


def set_cap(incoming: Incoming, cap: int) -> Incoming | str:
    """Sets the units that may be promised in total (0 = take no more backorders); the
    promises already made stay."""
    if cap < 0:
        return f"a backorder cap of {cap}"
    return _evolve(incoming, cap=cap)


def expect(
    incoming: Incoming, po_id: str, qty: int, expected_at: int, location: str = ""
) -> Settlement | str:
    """IncomingStock: purchase order ``po_id`` brings ``qty`` units in total by
    ``expected_at`` to ``location``. A new one is added (open); an open one is updated
    (the same values again change nothing). A lower quantity releases the backorders
    that no longer fit (``po_short``); one at or below what was received completes it.
    An ended one is refused (a purchase order id is not used again), and so is an update
    naming another location (its staged units and holds are there)."""
    if not po_id:
        return "a purchase order needs a po_id"
    if qty < 0:
        return f"an expected quantity of {qty}"
    po = find_po(incoming, po_id)
    if po is None:
        if qty == 0:
            return "a new purchase order expects at least one unit"
        orders = _room_for_one_more(incoming.orders)
        if orders is None:
            return f"{MAX_PURCHASE_ORDERS_PER_SKU} purchase orders are open"
        new = PurchaseOrder(po_id, qty, expected_at, location=location)
        return Settlement(_evolve(incoming, orders=(*orders, new)))
    if not po.status.is_open:
        return f"purchase order {po_id} is {po.status.value}"
    if po.location != location:
        return f"purchase order {po_id} is delivered to {po.location or 'the default location'}"
    if (po.expected, po.expected_at) == (qty, expected_at):
        return Settlement(incoming)
    changed = _evolve(po, expected=qty, expected_at=expected_at)
    return _settled(incoming, changed, pool=po.staged, received=0, close_as=None)


def backorder(
    incoming: Incoming,
    order_id: str,
    qty: int,
    placed_at: int,
    *,
    channel: str = "web",
    customer_id: str = "",
    ttl_ms: int = DEFAULT_TTL_MS,
) -> tuple[Incoming, Backorder] | str:
    """Promise ``qty`` units of incoming stock to ``order_id`` (on-hand stock could not
    cover them and the command allows a backorder): against the open purchase order
    expected first that has room for all of them, within the cap. Returns the new state
    and the backorder, or why not."""
    if qty <= 0:
        return f"a backorder of {qty} units"
    if find_backorder(incoming, order_id) is not None:
        return ALREADY_BACKORDERED
    if incoming.cap <= 0:
        return BACKORDERS_OFF
    if not any(po.status.is_open for po in incoming.orders):
        return NO_INCOMING
    if incoming.promised + qty > incoming.cap:
        return BACKORDER_CAP
    if incoming.waiting >= MAX_BACKORDERS_PER_SKU:
        return BACKORDER_LIMIT
    fits = [po for po in incoming.orders if po.room >= qty]
    if not fits:
        return INCOMING_SHORT
    po = min(fits, key=lambda p: (p.expected_at, p.po_id))
    b = Backorder(
        order_id=order_id,
        qty=qty,
        po_id=po.po_id,
        seq=incoming.placed,
        placed_at=placed_at,
        channel=channel,
        customer_id=customer_id,
        ttl_ms=ttl_ms,
    )
    # a new backorder waits behind the others: staged units stay with the first one
    new = _replace_po(incoming, _evolve(po, backorders=(*po.backorders, b)))
    return _evolve(new, placed=incoming.placed + 1), b


def arrive(incoming: Incoming, po_id: str, qty: int, *, final: bool = False) -> Settlement | str:
    """A restock of ``qty`` units naming purchase order ``po_id`` (``final``: the
    supplier sends no more). They cover its waiting backorders in the order placed, each
    in full; units short of the next one are staged for it; the rest are free on hand.
    Goods that arrived are never refused: for a purchase order this SKU does not expect
    (or one that ended) all of them are free on hand, with a note."""
    if qty < 0:
        return f"an arrival of {qty} units"
    po = find_po(incoming, po_id)
    if po is None or not po.status.is_open:
        note = UNKNOWN_PO if po is None else PO_ENDED
        return Settlement(incoming, received=qty, free=qty, note=note)
    got = _evolve(po, received=po.received + qty)
    close_as = POStatus.RECEIVED if final else None
    return _settled(incoming, got, pool=po.staged + qty, received=qty, close_as=close_as)


def close(incoming: Incoming, po_id: str, *, cancelled: bool = False) -> Settlement | str:
    """Purchase order ``po_id`` ends short (RECEIVED) or is cancelled (CANCELLED): its
    staged units cover the waiting backorders that fit, in the order placed; the others
    are released (``po_short`` / ``po_cancelled``); the units left are free on hand."""
    po = find_po(incoming, po_id)
    if po is None:
        return UNKNOWN_PO
    if not po.status.is_open:
        return f"purchase order {po_id} is {po.status.value}"
    close_as = POStatus.CANCELLED if cancelled else POStatus.RECEIVED
    return _settled(incoming, po, pool=po.staged, received=0, close_as=close_as)


def cancel(incoming: Incoming, order_id: str) -> Settlement | str:
    """The order of a waiting backorder was cancelled: its promise is given back (and
    the staged units may now cover the backorder behind it)."""
    b = find_backorder(incoming, order_id)
    if b is None:
        return "no backorder for this order"
    po = find_po(incoming, b.po_id)
    assert po is not None  # a backorder waits on a purchase order of the same state
    left = tuple(x for x in po.backorders if x.order_id != order_id)
    return _settled(
        incoming, _evolve(po, backorders=left), pool=po.staged, received=0, close_as=None
    )


# --------------------------------------------------------------------------
# the one settling rule


def _settled(
    incoming: Incoming,
    po: PurchaseOrder,
    *,
    pool: int,
    received: int,
    close_as: POStatus | None,
) -> Settlement:
    """Settle ``po`` (its expected and received units already updated, ``staged`` not
    yet): ``pool`` is the on-hand units it has for its backorders (what was staged plus
    what just arrived).

    1. The status: ``close_as``, else RECEIVED once the received units reach the
       expected ones, else OPEN.
    2. The backorders it can still honour, in the order placed: each that fits in what
       it has and still brings (``pool`` + open incoming, 0 once ended); the others are
       released (a cut, a short close, a cancel).
    3. Of those, the first ones are converted in full, strictly in order, while ``pool``
       covers the next one.
    4. What ``pool`` has left is staged for the next waiting one (up to what is still
       promised), the rest is free.
    """
    if close_as is None:
        close_as = POStatus.RECEIVED if po.received >= po.expected else POStatus.OPEN
    po = _evolve(po, status=close_as)
    reason = PO_CANCELLED if close_as is POStatus.CANCELLED else PO_SHORT
    room = pool + po.open
    kept: list[Backorder] = []
    released: list[ReleasedBackorder] = []
    for b in po.backorders:
        if b.qty <= room:
            kept.append(b)
            room -= b.qty
        else:
            released.append(ReleasedBackorder(b, reason))
    n = 0
    while n < len(kept) and kept[n].qty <= pool:
        pool -= kept[n].qty
        n += 1
    converted, waiting = tuple(kept[:n]), tuple(kept[n:])
    staged = min(pool, sum(b.qty for b in waiting))
    settled = _evolve(po, staged=staged, backorders=waiting)
    return Settlement(
        incoming=_replace_po(incoming, settled),
        converted=converted,
        released=tuple(released),
        received=received,
        held=sum(b.qty for b in converted),
        staged_change=staged - _staged_before(incoming, po.po_id),
        free=pool - staged,
    )


def _staged_before(incoming: Incoming, po_id: str) -> int:
    po = find_po(incoming, po_id)
    return po.staged if po is not None else 0


def _replace_po(incoming: Incoming, po: PurchaseOrder) -> Incoming:
    orders = tuple(po if x.po_id == po.po_id else x for x in incoming.orders)
    return _evolve(incoming, orders=orders)


def _room_for_one_more(orders: tuple[PurchaseOrder, ...]) -> tuple[PurchaseOrder, ...] | None:
    """``orders`` with room for a new one: the oldest ended one dropped when they are at
    :data:`MAX_PURCHASE_ORDERS_PER_SKU`; None when they are all open."""
    if len(orders) < MAX_PURCHASE_ORDERS_PER_SKU:
        return orders
    for i, po in enumerate(orders):
        if not po.status.is_open:
            return orders[:i] + orders[i + 1 :]
    return None


# --------------------------------------------------------------------------
# checks


def consistent(incoming: Incoming) -> str:
    """Why ``incoming`` breaks an invariant, or "" (each purchase order and order once,
    no negative count, promises within each open purchase order, staged units only for
    a waiting backorder they do not cover yet, nothing waiting on an ended one)."""
    ids = [po.po_id for po in incoming.orders]
    if len(set(ids)) != len(ids):
        return f"a purchase order listed twice: {ids}"
    if len(ids) > MAX_PURCHASE_ORDERS_PER_SKU:
        return f"{len(ids)} purchase orders, above {MAX_PURCHASE_ORDERS_PER_SKU}"
    if incoming.cap < 0:
        return f"a cap of {incoming.cap}"
    orders = [b.order_id for po in incoming.orders for b in po.backorders]
    if len(set(orders)) != len(orders):
        return f"an order backordered twice: {orders}"
    if len(orders) > MAX_BACKORDERS_PER_SKU:
        return f"{len(orders)} backorders, above {MAX_BACKORDERS_PER_SKU}"
    for po in incoming.orders:
        if min(po.expected, po.received, po.staged) < 0:
            return f"{po.po_id}: a negative count"
        if any(b.qty <= 0 or b.po_id != po.po_id for b in po.backorders):
            return f"{po.po_id}: a backorder of no units or of another purchase order"
        seqs = [b.seq for b in po.backorders]
        if seqs != sorted(seqs) or any(s >= incoming.placed for s in seqs):
            return f"{po.po_id}: backorders out of the order placed {seqs}"
        if not po.status.is_open and (po.backorders or po.staged):
            return f"{po.po_id} is {po.status.value} with backorders or staged units"
        if po.promised > po.open + po.staged:
            return f"{po.po_id}: {po.promised} promised, {po.open} to come, {po.staged} staged"
        if po.backorders and po.staged >= po.backorders[0].qty:
            return f"{po.po_id}: {po.staged} staged would cover its first backorder"
        if not po.backorders and po.staged:
            return f"{po.po_id}: {po.staged} staged for no backorder"
    return ""
