"""The batch fold equals the one-at-a-time fold of the core, for any split into batches.

Hypothesis draws a stream of commands on two SKUs of one partition, spread over
the three input topics (with producer re-sends of earlier commands among them),
and a split of that stream into batches. Some batch is then cut by a crash: its
result is computed and thrown away (its transaction never committed), and the
input is re-read from an earlier point, as Kafka redelivers after a restart.
The final state, every answer and every StockChanged (in order, versions
gapless) must equal applying the commands one at a time with
:func:`pipeline.domain.core.decide`, skipping only the offsets applied already.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import batch
from pipeline.domain import core
from tables.stock import StoredReservation, StoredStock, effect_of, reservation_key, stock_key

T0 = 1_700_000_000_000
NOW = T0 + 999
ORDERS, RESTOCKS, RETURNS = "p.orders", "p.restocks", "p.returns"
SKUS = ("A", "B")


@dataclass(frozen=True)
class Arrival:
    topic: str
    offset: int
    command: core.Command


def _command(kind: str, sku: str, order: int, qty: int, t: int, n: int) -> tuple[str, core.Command]:
    eid, oid = f"e{n}", f"o{order}"
    if kind == "reserve":
        return ORDERS, core.ReserveStock(eid, oid, sku, qty, t, ttl_ms=5_000)
    if kind == "commit":
        return ORDERS, core.CommitReservation(eid, oid, sku, t)
    if kind == "release":
        return ORDERS, core.ReleaseReservation(eid, oid, sku, t)
    if kind == "expire":
        return ORDERS, core.ExpireReservation(eid, oid, sku, t)
    if kind == "restock":
        return RESTOCKS, core.RestockReceived(eid, sku, qty, t)
    if kind == "count":
        return RESTOCKS, core.StockCounted(eid, sku, qty, t)
    if kind == "safety":
        return RESTOCKS, core.SafetyStockSet(eid, sku, qty % 3, t)
    if kind == "alloc":
        return RESTOCKS, core.ChannelAllocationSet(eid, sku, "store", qty % 4, t)
    if kind == "resolve":  # a damaged-unit resolution: some refused (qty above damaged)
        action = core.DamagedAction.RESTOCK if qty % 2 else core.DamagedAction.WRITE_OFF
        return RETURNS, core.DamagedStockResolved(eid, sku, 1 + qty // 3, action, t)
    if kind == "restock_at":  # at one of two locations: the SKU then has locations
        return RESTOCKS, core.RestockReceived(eid, sku, qty, t, location=PLACES[qty % 2])
    if kind == "reserve_at":  # by priority, split or not, or at a named location
        at = ("", "", PLACES[0])[qty % 3]
        cmd = core.ReserveStock(eid, oid, sku, qty, t, ttl_ms=5_000, location=at, split=qty > 3)
        return ORDERS, cmd
    if kind == "ship":
        src, dst = PLACES[qty % 2], PLACES[(qty + 1) % 2]
        return RESTOCKS, core.TransferShipped(eid, f"t{order}", sku, qty, src, dst, t)
    if kind == "receive":
        return RESTOCKS, core.TransferReceived(eid, f"t{order}", sku, qty // 2, t)
    if kind == "cancel":
        return RESTOCKS, core.TransferCancelled(eid, f"t{order}", sku, t)
    # purchase orders and backorders: two POs per SKU, conversions and releases that
    # change other orders' reservations in the same decision
    po = f"po{order % 2}"
    if kind == "cap":
        return RESTOCKS, core.BackorderCapSet(eid, sku, 10 * qty, t)
    if kind == "expect":
        return RESTOCKS, core.IncomingStock(eid, sku, po, 4 * qty + 8, t + qty * 1000, t)
    if kind == "backorder":  # more than the stock usually holds; its own order ids
        cmd = core.ReserveStock(
            eid, f"b{order}", sku, qty + 4, t, ttl_ms=5_000, allow_backorder=True
        )
        return ORDERS, cmd
    if kind == "release_backorder":
        return ORDERS, core.ReleaseReservation(eid, f"b{order}", sku, t)
    if kind == "arrive":
        return RESTOCKS, core.RestockReceived(eid, sku, 2 * qty, t, po_id=po, final=qty == 6)
    if kind == "close":
        return RESTOCKS, core.PurchaseOrderClosed(eid, sku, po, t, cancelled=qty % 2 == 0)
    return RETURNS, core.ReturnReceived(eid, oid, sku, qty, qty % 2 == 0, t)


PLACES = ("wh-a", "wh-b")
KINDS = (
    "reserve",
    "commit",
    "release",
    "expire",
    "restock",
    "count",
    "safety",
    "alloc",
    "return",
    "resolve",
    "restock_at",
    "reserve_at",
    "ship",
    "receive",
    "cancel",
    "cap",
    "expect",
    "backorder",
    "backorder",
    "backorder",
    "arrive",
    "arrive",
    "close",
    "release_backorder",
)

steps = st.lists(
    st.tuples(
        st.sampled_from(KINDS + ("resend",)),
        st.sampled_from(SKUS),
        st.integers(0, 5),  # order
        st.integers(1, 6),  # qty
        st.integers(0, 3_000),  # time step
    ),
    min_size=1,
    max_size=60,
)


def arrivals(drawn: list[tuple[str, str, int, int, int]]) -> list[Arrival]:
    """Commands with the offsets their topics give them; a re-send repeats an earlier one."""
    out: list[Arrival] = []
    next_offset = {ORDERS: 0, RESTOCKS: 0, RETURNS: 0}
    t = T0
    if any(kind == "backorder" for kind, *_ in drawn):
        # both SKUs take backorders from the start (a "cap" step may change it)
        for sku in SKUS:
            out.append(
                Arrival(RESTOCKS, next_offset[RESTOCKS], core.BackorderCapSet(sku, sku, 30, t))
            )
            next_offset[RESTOCKS] += 1
    for n, (kind, sku, order, qty, dt) in enumerate(drawn):
        t += dt
        if kind == "resend":
            if not out:
                continue
            earlier = out[(order * 7 + qty) % len(out)]
            topic, command = earlier.topic, earlier.command
        else:
            topic, command = _command(kind, sku, order, qty, t, n)
        out.append(Arrival(topic, next_offset[topic], command))
        next_offset[topic] += 1
    return out


def one_at_a_time(
    items: list[Arrival], window: int = core.DEFAULT_DEDUPE_WINDOW, ids: bool = False
) -> tuple[dict, dict, dict]:
    """The reference: core.decide per command, state in plain dicts (``ids``: with a
    store of every applied stock command's event id, as the ledger keeps them)."""
    records: dict[str, core.StockRecord] = {}
    holds: dict[tuple[str, str], core.Reservation] = {}
    effects: dict[str, list[tuple[str, dict]]] = {}
    applied: set[tuple[str, str]] = set()
    for a in items:
        cmd = a.command
        order = isinstance(cmd, core.ORDER_COMMANDS)
        res = holds.get((cmd.sku, cmd.order_id)) if order else None
        names = core.settling(records.get(cmd.sku), cmd, res)
        others = {o: holds[(cmd.sku, o)] for o in names if (cmd.sku, o) in holds}
        d = core.decide(
            records.get(cmd.sku),
            cmd,
            NOW,
            res,
            low_stock_threshold=2,
            dedupe_window=window,
            applied_before=ids and (cmd.sku, cmd.event_id) in applied,
            others=others,
        )
        if ids and not order and d.outcome is not core.Outcome.DUPLICATE:
            applied.add((cmd.sku, cmd.event_id))
        records[cmd.sku] = d.record
        if d.reservation is not None:
            holds[(cmd.sku, d.reservation.order_id)] = d.reservation
        for other in d.others:
            holds[(cmd.sku, other.order_id)] = other
        for e in d.events:
            named = effect_of(e)
            if named is not None:
                effects.setdefault(cmd.sku, []).append(named)
    return records, holds, effects


class Store:
    """What the changelog holds after each committed batch (values round-trip as bytes)."""

    def __init__(self, window: int = core.DEFAULT_DEDUPE_WINDOW, ids: bool = False) -> None:
        self.data: dict[bytes, bytes] = {}
        self.effects: dict[str, dict[str, list[dict]]] = {}
        self.window = window
        self.ids = ids

    def event(self, key: bytes) -> int | None:
        raw = self.data.get(key)
        return orjson.loads(raw)["at"] if raw is not None else None

    def stock(self, sku: str) -> StoredStock | None:
        raw = self.data.get(stock_key(sku))
        return StoredStock.from_bytes(raw) if raw is not None else None

    def reservation(self, key: bytes) -> StoredReservation | None:
        raw = self.data.get(key)
        return StoredReservation.from_bytes(raw) if raw is not None else None

    def run(self, items: list[Arrival]) -> batch.BatchResult:
        inputs = [batch.Input(a.topic, a.offset, a.command) for a in items]
        return batch.fold(
            inputs,
            self.stock,
            self.reservation,
            NOW,
            low_stock_threshold=2,
            dedupe_window=self.window,
            load_event=self.event if self.ids else None,
            event_retention_ms=10**12,
        )

    def commit(self, result: batch.BatchResult) -> None:
        """What a committed transaction leaves; ``effects`` is what the relay publishes."""
        for key, value in batch.stock_writes(result):
            self.data[key] = value.to_bytes()
            for name, items in value.effects.items():
                self.effects.setdefault(value.record.sku, {}).setdefault(name, []).extend(items)
        for key, res in result.reservations.items():
            self.data[key] = res.to_bytes()
        for key, at in result.events.items():
            self.data[key] = orjson.dumps({"at": at})


def _grouped(effects: dict[str, list[tuple[str, dict]]]) -> dict[str, dict[str, list[dict]]]:
    out: dict[str, dict[str, list[dict]]] = {}
    for sku, named in effects.items():
        for name, d in named:
            out.setdefault(sku, {}).setdefault(name, []).append(d)
    return out


def _cuts(n: int, data: st.DataObject) -> list[int]:
    points = sorted(set(data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=8))))
    return [0, *[p for p in points if 0 < p < n], n]


@settings(max_examples=300, deadline=None)
@given(drawn=steps, data=st.data(), ids=st.booleans())
def test_any_split_with_a_crash_and_a_replay_equals_one_at_a_time(drawn, data, ids):
    """``ids``: with the store of applied event ids and a window of 2 recent ids, so
    that re-sends older than the window are caught by the store only."""
    items = arrivals(drawn)
    if not items:
        return
    window = 2 if ids else core.DEFAULT_DEDUPE_WINDOW
    records, holds, effects = one_at_a_time(items, window, ids)

    store = Store(window, ids)
    cuts = _cuts(len(items), data)
    crash_at = data.draw(st.integers(0, len(cuts) - 2))
    pos = 0
    crashed = False
    while pos < len(items):
        # the next batch boundary after pos
        end = next(c for c in cuts if c > pos)
        result = store.run(items[pos:end])
        if not crashed and cuts.index(end) - 1 == crash_at:
            crashed = True  # computed, never committed; re-read from an earlier point
            pos = data.draw(st.integers(0, pos))
            continue
        store.commit(result)
        pos += result.applied

    for sku, record in records.items():
        stored = store.stock(sku)
        assert stored is not None
        assert stored.record == record
    for (sku, order), res in holds.items():
        got = store.reservation(reservation_key(sku, order))
        assert got is not None and got.valid(store.stock(sku)) == res
    assert store.effects == _grouped(effects)
    for by_name in store.effects.values():
        versions = [d["version"] for d in by_name.get("StockChanged", [])]
        assert versions == list(range(1, len(versions) + 1))


@settings(max_examples=200, deadline=None)
@given(drawn=steps)
def test_each_sku_record_carries_exactly_its_batch_effects_in_order(drawn):
    items = arrivals(drawn)
    if not items:
        return
    _, _, effects = one_at_a_time(items)
    result = Store().run(items)
    assert result.applied == len(items)
    for sku, stored in result.stocks.items():
        assert stored.effects == _grouped(effects).get(sku, {})
        assert StoredStock.from_bytes(stored.to_bytes()) == stored


def test_a_sku_record_is_capped_and_the_rest_waits_for_the_next_batch():
    cmds = [
        batch.Input(RESTOCKS, i, core.RestockReceived(f"e{i}", "A", 1, T0 + i)) for i in range(10)
    ]
    result = batch.fold(cmds, lambda s: None, lambda k: None, NOW, max_commands_per_sku=4)
    assert result.applied == 4
    assert result.stocks["A"].record.on_hand == 4
    assert result.stocks["A"].watermarks == {RESTOCKS: 3}


def test_a_redelivered_input_changes_nothing_and_is_reported_as_skipped():
    first = batch.fold(
        [batch.Input(RESTOCKS, 0, core.RestockReceived("e0", "A", 5, T0))],
        lambda s: None,
        lambda k: None,
        NOW,
    )
    stored = first.stocks["A"]
    again = batch.fold(
        [batch.Input(RESTOCKS, 0, core.RestockReceived("e0", "A", 5, T0))],
        lambda s: stored,
        lambda k: None,
        NOW,
    )
    assert again.decisions == [None]
    assert not again.changed


def test_answers_to_an_internal_reply_topic_are_tagged():
    result = batch.fold(
        [
            batch.Input(RESTOCKS, 0, core.RestockReceived("e0", "A", 5, T0)),
            batch.Input(ORDERS, 0, core.ReserveStock("e1", "o1", "A", 2, T0), reply_to="saga"),
            batch.Input(ORDERS, 1, core.ReserveStock("e2", "o2", "A", 2, T0)),
        ],
        lambda s: None,
        lambda k: None,
        NOW,
    )
    answers = result.stocks["A"].effects["ReservationResult"]
    assert [a.get("reply_to", "") for a in answers] == ["saga", ""]


def _restocks(n: int, start: int = 0, *, resend_of: range | None = None) -> list[batch.Input]:
    ids = resend_of if resend_of is not None else range(start, start + n)
    return [
        batch.Input(RESTOCKS, start + k, core.RestockReceived(f"e{i}", "A", 1, T0 + i))
        for k, i in enumerate(ids)
    ]


def test_a_restock_resent_after_hundreds_of_others_is_a_duplicate_within_the_retention():
    """The hardening issue's report: 20 restocks re-sent after 300 others of the SKU were
    applied again when only the SKU record's window of 256 ids caught re-sends."""
    store = Store(window=256, ids=True)
    first = store.run(_restocks(300))
    store.commit(first)
    assert len(first.events) == 300
    again = store.run(_restocks(20, 300, resend_of=range(20)))
    assert [d.outcome for d in again.decisions] == [core.Outcome.DUPLICATE] * 20
    store.commit(again)
    assert store.stock("A").record.on_hand == 300
    # past the retention the id is forgotten: the same id is a new command again
    late = batch.fold(
        _restocks(1, 320, resend_of=range(1)),
        store.stock,
        store.reservation,
        NOW + 8 * 24 * 3600 * 1000,
        load_event=store.event,
        event_retention_ms=7 * 24 * 3600 * 1000,
    )
    assert late.decisions[0].outcome is core.Outcome.RESTOCKED
    # without the store, the window alone forgets the first 44 of the 300
    plain = Store(window=256, ids=False)
    plain.commit(plain.run(_restocks(300)))
    resent = plain.run(_restocks(20, 300, resend_of=range(20)))
    assert all(d.outcome is core.Outcome.RESTOCKED for d in resent.decisions)
