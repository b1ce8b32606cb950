"""Stock per location: the pure rules of issue 16 item 1 (:mod:`pipeline.domain.core`
applies them to a SKU's record once the SKU names a location).

A SKU's units live at locations (warehouses, stores). Each :class:`LocationStock`
holds its own ``on_hand``, ``reserved``, ``damaged`` and ``safety_stock``; units
shipped by a transfer are at neither end until they arrive: they leave the source's
``on_hand`` when shipped and are counted in the destination's ``inbound`` until
received. The SKU stays the key, so all of a SKU's locations are decided serially by
its one partition, and these functions only ever see one SKU.

Everything is plain data and plain functions (standard library only), like
:mod:`pipeline.domain.core`: a function returns the new tuple of locations, or a refusal
reason, never raises for a business "no".

Conservation, per location and in total (checked by the property tests):
``on_hand + damaged`` changes only by restocks, counts, returns, write-offs, sales
(commits) and transfers; a transfer moves ``qty`` out of the source's ``on_hand``
into the destination's ``inbound`` and, on arrival, from ``inbound`` into its
``on_hand`` (what did not arrive is reported as lost, never silently dropped);
a hold is granted only from a location's ``available``, so ``reserved <= on_hand``
at every location unless a count found fewer units than are held there (a shortfall,
reported as the core reports it for the SKU).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MAX_LOCATIONS_PER_SKU = 64
"""Locations one SKU may hold: every StockChanged would carry them all."""


@dataclass(frozen=True)
class LocationStock:
    """One SKU's stock at one location."""

    location: str
    on_hand: int = 0
    reserved: int = 0
    damaged: int = 0
    safety_stock: int = 0
    inbound: int = 0  # shipped here by open transfers, not received yet
    # on hand, set aside for the first waiting backorder of a purchase order delivered
    # here (pipeline.domain.incoming): not sellable, never in ``reserved``
    staged: int = 0

    @property
    def available(self) -> int:
        return max(0, self.on_hand - self.reserved - self.safety_stock - self.staged)


Hold = tuple[tuple[str, int], ...]
"""Where a reservation's units are held: ``((location, units), ...)``, in the order
they were taken, each location once."""


@dataclass(frozen=True)
class Transfer:
    """Units on their way from one location to another."""

    transfer_id: str
    source: str
    destination: str
    qty: int


def totals(locations: Iterable[LocationStock]) -> tuple[int, int, int]:
    """(on_hand, reserved, damaged) over all locations."""
    on_hand = reserved = damaged = 0
    for loc in locations:
        on_hand += loc.on_hand
        reserved += loc.reserved
        damaged += loc.damaged
    return on_hand, reserved, damaged


def available(locations: Iterable[LocationStock]) -> int:
    """What can be sold over all locations (each location's own available, summed: a
    location's safety stock or reservations never lend units to another)."""
    return sum(loc.available for loc in locations)


def find(locations: Sequence[LocationStock], location: str) -> LocationStock | None:
    for loc in locations:
        if loc.location == location:
            return loc
    return None


def _put(
    locations: Sequence[LocationStock], location: str, **changes: int
) -> tuple[LocationStock, ...]:
    """The locations with ``location``'s fields moved by ``changes`` (added, not set);
    a location seen for the first time is created. Sorted by name."""
    out = list(locations)
    names = [x.location for x in out]
    if location not in names:
        out.append(LocationStock(location))
        out.sort(key=lambda x: x.location)
        names = [x.location for x in out]
    i = names.index(location)
    loc = out[i]
    # a new instance from a copy of the fields (``dataclasses.replace`` introspects the
    # fields on every call: most of a hold's cost on the ledger's hot path)
    moved = object.__new__(LocationStock)
    moved.__dict__.update(loc.__dict__)
    for k, v in changes.items():
        moved.__dict__[k] += v
    out[i] = moved
    return tuple(out)


def order_of(
    locations: Sequence[LocationStock], priority: Sequence[str] = ()
) -> list[LocationStock]:
    """The locations in picking order: the configured ``priority`` first (in its
    order), then every other location by name."""
    rank = {name: i for i, name in enumerate(priority)}
    return sorted(locations, key=lambda loc: (rank.get(loc.location, len(rank)), loc.location))


def plan_hold(
    locations: Sequence[LocationStock],
    qty: int,
    *,
    at: str = "",
    priority: Sequence[str] = (),
    split: bool = False,
) -> Hold | None:
    """Where ``qty`` units would be held, or None when they cannot be.

    ``at`` names the one location to take them from. Otherwise the first location in
    :func:`order_of` that has all ``qty`` available is chosen; with ``split`` and no
    such location, units are taken from each location in that order until ``qty`` is
    covered. Nothing is held when ``qty`` cannot be covered in full (a partial grant
    asks again with the smaller quantity).
    """
    if qty <= 0:
        return None
    if at:
        loc = find(locations, at)
        return ((at, qty),) if loc is not None and loc.available >= qty else None
    ordered = order_of(locations, priority)
    for loc in ordered:
        if loc.available >= qty:
            return ((loc.location, qty),)
    if not split:
        return None
    taken: list[tuple[str, int]] = []
    left = qty
    for loc in ordered:
        if left == 0:
            break
        units = min(left, loc.available)
        if units > 0:
            taken.append((loc.location, units))
            left -= units
    return tuple(taken) if left == 0 else None


def grantable(
    locations: Sequence[LocationStock],
    *,
    at: str = "",
    split: bool = False,
) -> int:
    """The most units one hold could take now (what a partial grant may ask for)."""
    if at:
        loc = find(locations, at)
        return loc.available if loc is not None else 0
    if split:
        return available(locations)
    return max((loc.available for loc in locations), default=0)


def hold(locations: Sequence[LocationStock], held: Hold) -> tuple[LocationStock, ...]:
    """Reserve the units of a plan from :func:`plan_hold`."""
    out = tuple(locations)
    for location, units in held:
        out = _put(out, location, reserved=units)
    return out


def release(locations: Sequence[LocationStock], held: Hold) -> tuple[LocationStock, ...]:
    """Give a hold's units back (released or expired reservation)."""
    out = tuple(locations)
    for location, units in held:
        out = _put(out, location, reserved=-units)
    return out


def commit(locations: Sequence[LocationStock], held: Hold) -> tuple[LocationStock, ...]:
    """The held units are sold: they leave ``reserved`` and ``on_hand`` where held."""
    out = tuple(locations)
    for location, units in held:
        out = _put(out, location, reserved=-units, on_hand=-units)
    return out


def settle(
    locations: Sequence[LocationStock], location: str, received: int, held: int, staged: int
) -> tuple[LocationStock, ...]:
    """A purchase order's settlement at ``location`` (see
    :class:`pipeline.domain.incoming.Settlement`): ``received`` units arrive on hand,
    ``held`` of them (or of the staged ones) are now held by converted backorders, and
    the staged units move by ``staged``."""
    return _put(locations, location, on_hand=received, reserved=held, staged=staged)


def restock(
    locations: Sequence[LocationStock], location: str, qty: int
) -> tuple[LocationStock, ...]:
    return _put(locations, location, on_hand=qty)


def count(
    locations: Sequence[LocationStock], location: str, on_hand: int
) -> tuple[tuple[LocationStock, ...], int]:
    """A physical count sets ``on_hand`` at one location; returns the new locations and
    the units counted below what is reserved there (a shortfall to report, as the core
    does for the SKU: the holds stay, the location shows 0 available)."""
    loc = find(locations, location) or LocationStock(location)
    out = _put(locations, location, on_hand=on_hand - loc.on_hand)
    return out, max(0, loc.reserved - on_hand)


def return_units(
    locations: Sequence[LocationStock], location: str, qty: int, *, resellable: bool
) -> tuple[LocationStock, ...]:
    """A return of ``qty`` units at ``location``: back on hand when resellable, else
    counted as damaged there (never sellable until resolved)."""
    if resellable:
        return _put(locations, location, on_hand=qty)
    return _put(locations, location, damaged=qty)


def resolve_damaged(
    locations: Sequence[LocationStock], location: str, qty: int, *, restock: bool
) -> tuple[LocationStock, ...] | str:
    """``qty`` damaged units of ``location`` resolved: back on hand (``restock``) or
    written off. Refused (a reason) when the location holds fewer damaged units."""
    loc = find(locations, location)
    have = loc.damaged if loc is not None else 0
    if have < qty:
        return f"{qty} damaged units asked, {have} held at {location}"
    if restock:
        return _put(locations, location, damaged=-qty, on_hand=qty)
    return _put(locations, location, damaged=-qty)


def set_safety(
    locations: Sequence[LocationStock], location: str, qty: int
) -> tuple[LocationStock, ...]:
    """Sets (absolute) the safety stock kept back at ``location``."""
    loc = find(locations, location) or LocationStock(location)
    return _put(locations, location, safety_stock=qty - loc.safety_stock)


def ship(locations: Sequence[LocationStock], transfer: Transfer) -> tuple[LocationStock, ...] | str:
    """Ship a transfer: its units leave the source's ``on_hand`` (only what is available
    there: reserved and safety units stay) and are ``inbound`` at the destination."""
    if transfer.qty <= 0:
        return "a transfer moves at least one unit"
    if transfer.source == transfer.destination:
        return "a transfer needs two different locations"
    src = find(locations, transfer.source)
    have = src.available if src is not None else 0
    if have < transfer.qty:
        return f"{transfer.source} has {have} available, {transfer.qty} to ship"
    out = _put(locations, transfer.source, on_hand=-transfer.qty)
    return _put(out, transfer.destination, inbound=transfer.qty)


def receive(
    locations: Sequence[LocationStock], transfer: Transfer, received: int
) -> tuple[tuple[LocationStock, ...], int] | str:
    """A shipped transfer arrives with ``received`` units (at most its ``qty``): they
    move from the destination's ``inbound`` into its ``on_hand``. Returns the new
    locations and the units lost on the way (``qty - received``, to be reported)."""
    if not 0 <= received <= transfer.qty:
        return f"received {received} of a transfer of {transfer.qty}"
    out = _put(locations, transfer.destination, inbound=-transfer.qty, on_hand=received)
    return out, transfer.qty - received


def cancel_transfer(
    locations: Sequence[LocationStock], transfer: Transfer
) -> tuple[LocationStock, ...]:
    """A shipped transfer called back before it arrived: the units return to the source."""
    out = _put(locations, transfer.destination, inbound=-transfer.qty)
    return _put(out, transfer.source, on_hand=transfer.qty)


def consistent(locations: Sequence[LocationStock]) -> str:
    """Why the locations break an invariant, or "" (no location twice, no negative
    reserved, damaged, safety, inbound or staged count)."""
    names = [loc.location for loc in locations]
    if len(set(names)) != len(names):
        return f"a location listed twice: {names}"
    if len(locations) > MAX_LOCATIONS_PER_SKU:
        return f"{len(locations)} locations, above {MAX_LOCATIONS_PER_SKU}"
    for loc in locations:
        # on_hand alone may go below 0: units sold after a count found fewer than held
        # (as pipeline.domain.core does for the SKU; the shortfall was reported)
        if min(loc.reserved, loc.damaged, loc.safety_stock, loc.inbound, loc.staged) < 0:
            return f"{loc.location}: a negative count {loc}"
    return ""
