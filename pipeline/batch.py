"""The batch fold: many commands of one partition applied in one step.

:func:`fold` applies a list of :class:`Input` (commands of one ledger partition,
in input order) to the stored state, exactly as applying them one at a time with
:func:`pipeline.domain.core.decide` would, and returns what to write:

* one :class:`tables.stock.StoredStock` per touched SKU: its final record, its
  watermarks (the highest input offset applied per topic, for every input of
  the batch) and *the batch's effects* for that SKU (every StockChanged, in
  version order, every ReservationResult, shortfall and low-stock crossing);
* one :class:`tables.stock.StoredReservation` per (SKU, order) the batch
  changed, in its final state (the order's own, and the backorders an arrival, a
  purchase order's close or cut, or a released backorder converted or released:
  :func:`pipeline.domain.core.settling` names them, and their stored reservations and
  usages are loaded before the decision);
* one :class:`tables.stock.StoredUsage` per (SKU, sale, customer) whose usage
  under a per-customer cap the batch changed, in its final state.

The engine writes all of them in one Kafka transaction, so a crash leaves
either the whole batch in the changelog or none of it; the watermark rule
(an input at or below its SKU's watermark was applied already) still holds
for every record, so a batch re-read after a crash changes nothing twice.

Pure: no Kafka, Faust, RocksDB or clock. State comes from two loader
functions; time from the commands (and ``now`` for ``processed_at``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.domain import core
from pipeline.domain.locations import MAX_LOCATIONS_PER_SKU
from tables.stock import (
    StoredReservation,
    StoredStock,
    StoredUsage,
    effect_of,
    event_key,
    reservation_key,
    stock_key,
    usage_key,
)

# a SKU record carries every effect of the batch for that SKU; this bounds its size
DEFAULT_MAX_COMMANDS_PER_SKU = 500


_NOT_APPLIED = (core.Outcome.DUPLICATE, core.Outcome.LIMIT_EXCEEDED)


@dataclass(frozen=True, slots=True)
class Input:
    """One validated command of the partition, with where it came from."""

    topic: str
    offset: int
    command: core.Command
    reply_to: str = ""  # "" = the public results topic; else an internal reply topic's tag


@dataclass(slots=True)
class _Sku:
    record: core.StockRecord | None
    watermarks: dict[str, int]
    version_at: int
    effects: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    commands: int = 0
    stored: StoredStock | None = None  # as loaded (for reservation validity)

    def applied(self, topic: str, offset: int) -> bool:
        return self.watermarks.get(topic, -1) >= offset


@dataclass(frozen=True)
class BatchResult:
    """What a batch writes, and each input's decision (None: a redelivery, skipped)."""

    stocks: dict[str, StoredStock]
    reservations: dict[bytes, StoredReservation]
    decisions: list[core.Decision | None]
    applied: int  # inputs consumed, a prefix of the batch (the rest waits for the next one)
    # event key -> when: the stock commands this batch applied (kept for the retention)
    events: dict[bytes, int] = field(default_factory=dict)
    usages: dict[bytes, StoredUsage] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.stocks or self.reservations)


StockLoader = Callable[[str], StoredStock | None]
ReservationLoader = Callable[[bytes], StoredReservation | None]
EventLoader = Callable[[bytes], int | None]  # event key -> when it was applied, or None
UsageLoader = Callable[[bytes], StoredUsage | None]


def _no_usage(key: bytes) -> StoredUsage | None:
    return None


def fold(
    inputs: Sequence[Input],
    load_stock: StockLoader,
    load_reservation: ReservationLoader,
    now: int,
    *,
    dedupe_window: int = core.DEFAULT_DEDUPE_WINDOW,
    low_stock_threshold: int = -1,
    max_commands_per_sku: int = DEFAULT_MAX_COMMANDS_PER_SKU,
    load_event: EventLoader | None = None,
    event_retention_ms: int = 0,
    load_usage: UsageLoader = _no_usage,
    location_priority: tuple[str, ...] = (),
) -> BatchResult:
    """Apply ``inputs`` in order; see the module docstring.

    With ``load_event``, a stock command whose event id was applied less than
    ``event_retention_ms`` before ``now`` (by an earlier batch, per ``load_event``, or
    by this one) is a duplicate however long ago the SKU's window of recent ids
    dropped it; ``events`` of the result holds the ids this batch applied.

    Stops before the input that would make one SKU's record carry more than
    ``max_commands_per_sku`` commands' effects (``applied`` says how many were
    taken; the first input is always taken).

    ``location_priority`` is the order in which a reserve that names no location
    looks at a SKU's locations (see :func:`pipeline.domain.locations.plan_hold`).
    """
    skus: dict[str, _Sku] = {}
    holds: dict[bytes, tuple[core.Reservation, str, int]] = {}  # key -> (res, topic, offset)
    uses: dict[bytes, tuple[core.CustomerUsage, str, int]] = {}  # the same for usages
    decisions: list[core.Decision | None] = []
    events: dict[bytes, int] = {}
    applied = 0
    for inp in inputs:
        cmd = inp.command
        sku = skus.get(cmd.sku)
        if sku is None:
            stored = load_stock(cmd.sku)
            sku = skus[cmd.sku] = (
                _Sku(stored.record, dict(stored.watermarks), stored.version_at, stored=stored)
                if stored is not None
                else _Sku(None, {}, 0)
            )
        if sku.commands >= max_commands_per_sku and applied:
            break
        applied += 1
        if sku.applied(inp.topic, inp.offset):
            decisions.append(None)
            continue
        reservation = None
        rkey = b""
        if isinstance(cmd, core.ORDER_COMMANDS):
            rkey = reservation_key(cmd.sku, cmd.order_id)
            reservation = _load_res(rkey, holds, load_reservation, sku.stored)
        usage = None
        ukey = b""
        wanted = core.usage_key(sku.record, cmd, reservation) if rkey else None
        if wanted is not None:
            ukey = usage_key(cmd.sku, *wanted)
            usage = _load_use(ukey, uses, load_usage, sku.stored)
        others: dict[str, core.Reservation] = {}
        other_uses: dict[tuple[str, str], core.CustomerUsage] = {}
        for order_id in core.settling(sku.record, cmd, reservation):
            okey = reservation_key(cmd.sku, order_id)
            got = _load_res(okey, holds, load_reservation, sku.stored)
            if got is None:
                continue
            others[order_id] = got
            if got.counted:
                pair = (got.sale_id, got.customer_id)
                use = _load_use(usage_key(cmd.sku, *pair), uses, load_usage, sku.stored)
                if use is not None:
                    other_uses[pair] = use
        ekey = b""
        before_at: int | None = None
        if load_event is not None and not rkey:
            ekey = event_key(cmd.sku, cmd.event_id)
            before_at = events.get(ekey)
            if before_at is None:
                before_at = load_event(ekey)
        decision = core.decide(
            sku.record,
            cmd,
            now,
            reservation,
            dedupe_window=dedupe_window,
            low_stock_threshold=low_stock_threshold,
            applied_before=before_at is not None and now - before_at <= event_retention_ms,
            usage=usage,
            location_priority=location_priority,
            others=others,
            other_usages=other_uses,
        )
        decisions.append(decision)
        if ekey and decision.outcome not in _NOT_APPLIED:
            events[ekey] = now
        before = sku.record
        sku.record = decision.record
        sku.watermarks[inp.topic] = inp.offset
        if before is None or decision.record.version != before.version:
            sku.version_at = cmd.occurred_at
        sku.commands += 1
        if decision.reservation is not None:
            holds[rkey] = (decision.reservation, inp.topic, inp.offset)
        if decision.usage is not None:
            uses[ukey] = (decision.usage, inp.topic, inp.offset)
        for other in decision.others:
            holds[reservation_key(cmd.sku, other.order_id)] = (other, inp.topic, inp.offset)
        for use in decision.other_usages:
            key = usage_key(cmd.sku, use.sale_id, use.customer_id)
            uses[key] = (use, inp.topic, inp.offset)
        for event in decision.events:
            named = effect_of(event)
            if named is None:
                continue
            name, effect = named
            if inp.reply_to and name == "ReservationResult":
                effect["reply_to"] = inp.reply_to
            sku.effects.setdefault(name, []).append(effect)
    stocks = {
        name: StoredStock(s.record, s.watermarks, s.effects, s.version_at)
        for name, s in skus.items()
        if s.record is not None and s.commands
    }
    reservations = {
        key: StoredReservation.new(res, topic, offset)
        for key, (res, topic, offset) in holds.items()
    }
    usages = {
        key: StoredUsage.new(use, topic, offset) for key, (use, topic, offset) in uses.items()
    }
    return BatchResult(stocks, reservations, decisions, applied, events, usages)


def _load_res(
    key: bytes,
    holds: dict[bytes, tuple[core.Reservation, str, int]],
    load: ReservationLoader,
    stock: StoredStock | None,
) -> core.Reservation | None:
    """A reservation as this batch left it, else as stored (valid for ``stock``)."""
    held = holds.get(key)
    if held is not None:
        return held[0]
    stored = load(key)
    return stored.valid(stock) if stored is not None else None


def _load_use(
    key: bytes,
    uses: dict[bytes, tuple[core.CustomerUsage, str, int]],
    load: UsageLoader,
    stock: StoredStock | None,
) -> core.CustomerUsage | None:
    """A customer's usage as this batch left it, else as stored (valid for ``stock``)."""
    held = uses.get(key)
    if held is not None:
        return held[0]
    stored = load(key)
    return stored.valid(stock) if stored is not None else None


def stock_writes(result: BatchResult) -> list[tuple[bytes, StoredStock]]:
    """(key, value) of the SKU records, in a stable order."""
    return [(stock_key(name), result.stocks[name]) for name in sorted(result.stocks)]


class RecordBudget:
    """Keeps every SKU record of a batch under the broker's record size.

    A SKU's changelog record carries every effect of the batch for that SKU, and the
    broker refuses a record above ``max.message.bytes``: the transaction would abort and
    the same batch come back for ever. The ledger asks :meth:`admit` for each input
    record before it applies it, and ends the batch at the first record whose SKU would
    pass the budget (that record starts the next batch). The estimate is conservative:
    twice the input record's own bytes (its text fields reappear in the answer and in
    StockChanged), a fixed cost for the effects' other fields, and the SKU's channel
    allocations and locations, which every StockChanged repeats (a command that names
    a location may add one, as an allocation may add a channel). Backorders live in the
    SKU record too, and each gets one more answer when its purchase order settles it (an
    arrival converting 256 of them writes 256 answers into one record): each waiting
    backorder is counted once with its later answer, when the SKU is first seen, and so
    is each order record that may place one (once the SKU takes backorders, or a
    restocks record came for it in the batch); a restocks record may add a purchase
    order. A SKU's first record is always admitted; validation bounds every field, so
    one command's effects are small.
    """

    EFFECT_BYTES = 1200  # an answer, a StockChanged, a shortfall or low-stock crossing
    CHANNEL_BYTES = 160  # one channel allocation inside one StockChanged
    ID_BYTES = 132  # one remembered event id (128 characters, quoted)
    BASE_BYTES = 1000  # the record's own counts, watermarks and keys
    LOCATION_BYTES = 300  # one location in a StockChanged (128-character name) and record
    TRANSFER_BYTES = 420  # one open transfer in the record (three 128-character texts)
    BACKORDER_BYTES = 420  # one waiting backorder in the record (order, channel, customer ids)
    SETTLED_BYTES = 700  # the answer its conversion or release adds (order, event and PO ids)
    PO_BYTES = 360  # one purchase order in the record (its id and location)

    def __init__(
        self,
        max_bytes: int,
        load: Callable[[str], StoredStock | None],
        allocations_topic: str,
        share: float = 0.75,
        located_topics: tuple[str, ...] = (),
    ) -> None:
        self.limit = int(max_bytes * share)
        self._load = load
        self._allocations_topic = allocations_topic
        self._located_topics = located_topics  # other topics whose records may add a location
        self._used: dict[bytes, int] = {}
        self._channels: dict[bytes, int] = {}  # per SKU: channels * CHANNEL_BYTES + locations
        self._backorders: set[bytes] = set()  # SKUs whose order records may place backorders

    def _base(self, key: bytes) -> tuple[int, int]:
        stored = self._load(key.decode("utf-8", "replace"))
        if stored is None:
            return self.BASE_BYTES, 0
        r = stored.record
        repeated = len(r.channels) * self.CHANNEL_BYTES + len(r.locations) * self.LOCATION_BYTES
        size = self.BASE_BYTES + len(r.recent_event_ids) * self.ID_BYTES
        size += len(r.transfers) * self.TRANSFER_BYTES
        incoming = r.incoming
        if incoming.orders or incoming.cap:
            self._backorders.add(key)
            size += len(incoming.orders) * self.PO_BYTES
            size += incoming.waiting * (self.BACKORDER_BYTES + self.SETTLED_BYTES)
        return size + repeated, repeated

    def admit(self, topic: str, key: bytes | None, value: bytes | None) -> bool:
        """True when the record may join the batch (its cost is then counted)."""
        k = key or b""
        used = self._used.get(k)
        first = used is None
        if used is None:
            used, repeated = self._base(k)
        else:
            repeated = self._channels[k]
        most = core.MAX_CHANNELS_PER_SKU * self.CHANNEL_BYTES
        most += MAX_LOCATIONS_PER_SKU * self.LOCATION_BYTES
        if topic == self._allocations_topic:
            # a command of this topic may add a channel or a location (and a transfer, a
            # purchase order, or a backorder cap: order records may then place backorders)
            repeated = min(repeated + self.CHANNEL_BYTES + self.LOCATION_BYTES, most)
            used += self.TRANSFER_BYTES + self.PO_BYTES
            self._backorders.add(k)
        elif topic in self._located_topics:  # e.g. a return may name a new location
            repeated = min(repeated + self.LOCATION_BYTES, most)
        elif k in self._backorders:  # an order record may place a backorder
            used += self.BACKORDER_BYTES + self.SETTLED_BYTES
        cost = 2 * len(value or b"") + self.EFFECT_BYTES + repeated
        if not first and used + cost > self.limit:
            return False
        self._used[k] = used + cost
        self._channels[k] = repeated
        return True
