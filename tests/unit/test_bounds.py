"""No input can make a record larger than the broker takes, or a count the contract
cannot carry (issue 14 items 2, 4 and 5).

* free-text fields are bounded at validation (``text_too_long``);
* a dead letter of a record at the broker's limit keeps its metadata and a truncated
  copy, and says so;
* counts above Avro's int and channel lists above the cap are refused by the core;
* a batch's SKU record stays under the record size however many commands it holds
  (:class:`pipeline.batch.RecordBudget`), measured on the worst case the rules allow;
* a saga's holds for an order with the longest ttl are accepted by the ledger.
"""

from __future__ import annotations

import pytest

from config.settings import Settings
from pipeline import batch
from pipeline.dead_letters import dead_letter
from pipeline.domain import core, saga
from pipeline.domain.locations import MAX_LOCATIONS_PER_SKU, LocationStock, Transfer
from schemas import validation
from schemas.codec import AvroCodec
from schemas.validation import MAX_ID_LEN, MAX_TEXT_LEN, MAX_TTL_MS, Invalid, to_command
from tables.stock import StoredStock

S = Settings()
T0 = 1_700_000_000_000


def _reason(topic: str, name: str, rec: dict) -> str:
    with pytest.raises(Invalid) as info:
        to_command(topic, b"A", name, rec, S)
    return info.value.reason


@pytest.mark.parametrize(
    ("topic", "name", "rec"),
    [
        (
            S.orders_topic,
            "ReserveStock",
            {"event_id": "e", "order_id": "o", "sku": "A", "qty": 1, "occurred_at": T0},
        ),
        (
            S.orders_topic,
            "ReleaseReservation",
            {"event_id": "e", "order_id": "o", "sku": "A", "occurred_at": T0},
        ),
        (
            S.restocks_topic,
            "RestockReceived",
            {"event_id": "e", "sku": "A", "qty": 1, "occurred_at": T0},
        ),
    ],
)
@pytest.mark.parametrize("field", sorted(MAX_TEXT_LEN))
def test_every_free_text_field_is_bounded(topic, name, rec, field):
    limit = MAX_TEXT_LEN[field]
    ok = {**rec, field: "x" * limit}
    if field != "channel" or name != "ChannelAllocationSet":
        to_command(topic, b"A", name, ok, S)  # at the limit: accepted
    assert _reason(topic, name, {**rec, field: "x" * 170_000}) == "text_too_long"


def test_a_checkout_with_an_oversized_channel_is_refused():
    rec = {
        "event_id": "e",
        "order_id": "o",
        "channel": "c" * 170_000,
        "lines": [{"sku": "A", "qty": 1}],
        "occurred_at": T0,
    }
    with pytest.raises(Invalid) as info:
        validation.to_order_command(b"o", "PlaceOrder", rec, validation.Limits.of(S))
    assert info.value.reason == "text_too_long"


def test_the_ledger_takes_the_holds_of_an_order_with_the_longest_ttl():
    order = validation.to_order_command(
        b"o",
        "PlaceOrder",
        {
            "event_id": "e",
            "order_id": "o",
            "lines": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 2}],
            "occurred_at": T0,
            "ttl_ms": MAX_TTL_MS,
        },
        validation.Limits.of(S),
    )
    decision = saga.decide(None, order, grace_ms=S.order_grace_ms)
    holds = [c for c in decision.sends if isinstance(c, core.ReserveStock)]
    assert holds and all(h.ttl_ms > MAX_TTL_MS for h in holds)
    for hold in holds:
        rec = {
            "event_id": hold.event_id,
            "order_id": hold.order_id,
            "sku": hold.sku,
            "qty": hold.qty,
            "occurred_at": hold.occurred_at,
            "ttl_ms": hold.ttl_ms,
        }
        assert to_command(S.orders_topic, hold.sku.encode(), "ReserveStock", rec, S).ttl_ms == (
            MAX_TTL_MS + S.order_grace_ms
        )
    too_long = {"event_id": "e", "order_id": "o", "sku": "A", "qty": 1, "occurred_at": T0}
    too_long["ttl_ms"] = MAX_TTL_MS + S.order_grace_ms + 1
    assert _reason(S.orders_topic, "ReserveStock", too_long) == "invalid_ttl"


def test_a_dead_letter_of_a_record_at_the_broker_limit_fits_and_says_it_was_cut():
    codec = AvroCodec()
    limit = 1_000_000
    key, rec = dead_letter(
        reason="undecodable",
        detail="d" * 5000,
        topic="inventory.orders",
        partition=3,
        offset=42,
        key=b"k" * 50_000,
        value=b"v" * 1_048_000,
        dead_at=T0,
        max_bytes=limit,
    )
    encoded = codec.encode("DeadLetter", rec)
    assert len(encoded) + len(key or b"") < limit
    assert rec["source_offset"] == 42 and rec["source_partition"] == 3
    assert rec["value"] == b"v" * len(rec["value"]) and len(rec["value"]) > 900_000
    assert "value truncated from 1048000" in rec["detail"]
    assert "key truncated from 50000" in rec["detail"]
    # a small record is copied whole, detail untouched
    _, small = dead_letter(
        reason="r",
        detail="why",
        topic="t",
        partition=0,
        offset=1,
        key=b"A",
        value=b"abc",
        dead_at=T0,
        max_bytes=limit,
    )
    assert small["value"] == b"abc" and small["detail"] == "why" and small["key"] == b"A"


def test_counts_above_avro_int_are_refused_and_change_nothing():
    record = core.StockRecord(sku="A", on_hand=core.MAX_COUNT - 5, version=3)
    over = core.decide(record, core.RestockReceived("e1", "A", 6, T0), T0)
    assert over.outcome is core.Outcome.LIMIT_EXCEEDED
    assert over.record == record
    assert "on_hand would be" in over.events[-1].reason
    fits = core.decide(record, core.RestockReceived("e2", "A", 5, T0), T0)
    assert fits.outcome is core.Outcome.RESTOCKED and fits.record.on_hand == core.MAX_COUNT
    damaged = core.StockRecord(sku="A", damaged=core.MAX_COUNT)
    ret = core.decide(damaged, core.ReturnReceived("e3", "o", "A", 1, False, T0), T0)
    assert ret.outcome is core.Outcome.LIMIT_EXCEEDED


def test_a_sku_holds_at_most_the_channel_cap():
    record = core.StockRecord(sku="A", on_hand=100)
    for i in range(core.MAX_CHANNELS_PER_SKU):
        d = core.decide(record, core.ChannelAllocationSet(f"e{i}", "A", f"c{i:02d}", 1, T0), T0)
        assert d.outcome is core.Outcome.ALLOCATION_SET
        record = d.record
    extra = core.decide(record, core.ChannelAllocationSet("ex", "A", "one-more", 1, T0), T0)
    assert extra.outcome is core.Outcome.LIMIT_EXCEEDED and extra.record == record
    # an existing channel can still change, and one can be removed to make room
    change = core.decide(record, core.ChannelAllocationSet("ey", "A", "c00", 5, T0), T0)
    assert change.outcome is core.Outcome.ALLOCATION_SET
    removed = core.decide(record, core.ChannelAllocationSet("ez", "A", "c01", 0, T0), T0)
    assert len(removed.record.channels) == core.MAX_CHANNELS_PER_SKU - 1


def _worst_state(located: bool = False) -> core.StockRecord:
    """A SKU at every bound: the longest SKU, a full dedupe window of the longest ids,
    the most channels with the longest names (``located``: and the most locations and
    open transfers, with the longest names)."""
    sku = "S" * S.max_sku_len
    channels = tuple(
        core.ChannelAllocation(f"{i:02d}".ljust(MAX_TEXT_LEN["channel"], "c"), 10**6, 0, True)
        for i in range(core.MAX_CHANNELS_PER_SKU)
    )
    ids = tuple(f"{i:04d}".ljust(MAX_ID_LEN, "i") for i in range(S.dedupe_window))
    record = core.StockRecord(
        sku=sku, on_hand=10**9, version=7, recent_event_ids=ids, channels=channels
    )
    if not located:
        return record
    width = MAX_TEXT_LEN["location"]
    names = [f"{i:02d}".ljust(width, "l") for i in range(MAX_LOCATIONS_PER_SKU)]
    locs = tuple(LocationStock(n, on_hand=10**7, inbound=10) for n in names)
    transfers = tuple(
        Transfer(f"{i:02d}".ljust(MAX_ID_LEN, "t"), names[i], names[i - 1], 10)
        for i in range(core.MAX_OPEN_TRANSFERS)
    )
    return core._with_locations(record, locs, transfers=transfers)


@pytest.mark.parametrize("located", [False, True])
def test_a_batch_sku_record_stays_under_the_record_size_at_every_bound(located: bool) -> None:
    """Feed the budget the worst commands the rules allow and fold what it admits: the
    SKU record it writes is below the broker's record size."""
    codec = AvroCodec()
    start = StoredStock(_worst_state(located), {S.orders_topic: 10})
    sku = start.record.sku
    # small, so the budget (not the batch maximum) ends the batch; a SKU at 64 locations
    # repeats them in every StockChanged, so a batch of a few dozen fills the broker's 1 MB
    max_bytes = 1_000_000 if located else 200_000
    budget = batch.RecordBudget(max_bytes, lambda s: start if s == sku else None, S.restocks_topic)
    inputs: list[batch.Input] = []
    for n in range(5_000):
        oid = f"{n:06d}".ljust(saga.MAX_ORDER_ID_LEN, "o")
        eid = f"{n:06d}".ljust(MAX_ID_LEN, "e")
        fields = {
            "event_id": eid,
            "order_id": oid,
            "sku": sku,
            "qty": 1,
            "occurred_at": T0 + n,
            "channel": "w" * MAX_TEXT_LEN["channel"],
            "ttl_ms": 60_000,
        }
        value = codec.encode("ReserveStock", fields)
        if not budget.admit(S.orders_topic, sku.encode(), value):
            break
        command = to_command(S.orders_topic, sku.encode(), "ReserveStock", fields, S)
        inputs.append(batch.Input(S.orders_topic, 11 + n, command))
    assert 10 < len(inputs) < 5_000, "the budget ended the batch"
    result = batch.fold(
        inputs,
        lambda s: start if s == sku else None,
        lambda k: None,
        T0 + 10_000,
        max_commands_per_sku=len(inputs),
    )
    written = dict(batch.stock_writes(result))
    record = written[sku.encode()].to_bytes()
    assert len(record) < max_bytes, f"{len(inputs)} commands made {len(record)} bytes"
    # and the estimate is not wildly loose: the record uses a fair share of the budget
    assert len(record) > max_bytes * 0.25


def _worst_incoming() -> core.StockRecord:
    """A SKU at every bound of incoming stock: the most purchase orders with the longest
    ids and locations, backorders waiting on them up to the most a SKU may have but a
    few, each with the longest order, channel and customer ids."""
    from pipeline.domain import incoming as inc

    width = MAX_TEXT_LEN["location"]
    orders = []
    per_po = (inc.MAX_BACKORDERS_PER_SKU - 16) // inc.MAX_PURCHASE_ORDERS_PER_SKU
    seq = 0
    for p in range(inc.MAX_PURCHASE_ORDERS_PER_SKU):
        po_id = f"{p:02d}".ljust(MAX_ID_LEN, "p")
        waiting = []
        for _ in range(per_po):
            waiting.append(
                inc.Backorder(
                    f"{seq:05d}".ljust(saga.MAX_ORDER_ID_LEN, "b"),
                    1,
                    po_id,
                    seq,
                    T0,
                    "w" * MAX_TEXT_LEN["channel"],
                    "c" * MAX_TEXT_LEN["customer_id"],
                )
            )
            seq += 1
        location = "" if p else "l" * width  # one delivered to a location, the rest default
        orders.append(
            inc.PurchaseOrder(po_id, 10**6, T0, backorders=tuple(waiting), location=location)
        )
    incoming = inc.Incoming(tuple(orders), cap=10**6, placed=seq)
    return core.StockRecord(
        sku=_worst_state().sku,
        on_hand=10,
        version=7,
        recent_event_ids=_worst_state().recent_event_ids,
        channels=_worst_state().channels,
        incoming=incoming,
    )


def test_a_batch_converting_every_backorder_stays_under_the_record_size() -> None:
    """Backorders placed in the batch, then arrivals that convert every waiting one (each
    an answer in the SKU's record): the budget ends the batch in time."""
    codec = AvroCodec()
    state = _worst_incoming()
    start = StoredStock(state, {S.orders_topic: 10, S.restocks_topic: 10})
    sku = state.sku
    max_bytes = 1_000_000
    budget = batch.RecordBudget(max_bytes, lambda s: start if s == sku else None, S.restocks_topic)
    inputs: list[batch.Input] = []
    po_ids = [po.po_id for po in state.incoming.orders]
    for n in range(5_000):
        if n % 3 == 2:  # an arrival that converts every backorder of one purchase order
            topic, name = S.restocks_topic, "RestockReceived"
            fields: dict = {
                "event_id": f"{n:06d}".ljust(MAX_ID_LEN, "e"),
                "sku": sku,
                "qty": 100_000,
                "occurred_at": T0 + n,
                "po_id": po_ids[(n // 3) % len(po_ids)],
            }
        else:
            topic, name = S.orders_topic, "ReserveStock"
            fields = {
                "event_id": f"{n:06d}".ljust(MAX_ID_LEN, "e"),
                "order_id": f"{n:06d}".ljust(saga.MAX_ORDER_ID_LEN, "o"),
                "sku": sku,
                "qty": 50,
                "occurred_at": T0 + n,
                "channel": "w" * MAX_TEXT_LEN["channel"],
                "customer_id": "c" * MAX_TEXT_LEN["customer_id"],
                "allow_backorder": True,
            }
        value = codec.encode(name, fields)
        if not budget.admit(topic, sku.encode(), value):
            break
        command = to_command(topic, sku.encode(), name, fields, S)
        inputs.append(batch.Input(topic, 11 + n, command))
    assert 10 < len(inputs) < 5_000, "the budget ended the batch"
    result = batch.fold(
        inputs,
        lambda s: start if s == sku else None,
        lambda k: None,
        T0 + 10_000,
        max_commands_per_sku=len(inputs),
    )
    settled = sum(1 for d in result.decisions if d is not None for _ in d.others)
    assert settled > 150, "the arrivals converted most waiting backorders"
    record = dict(batch.stock_writes(result))[sku.encode()].to_bytes()
    assert len(record) < max_bytes, f"{len(inputs)} commands made {len(record)} bytes"
    assert len(record) > max_bytes * 0.25
