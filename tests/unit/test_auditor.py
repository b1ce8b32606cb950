"""The auditor's checks on plain records (no Kafka, Redis or OpenSearch)."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest

from pipeline.auditor import Auditor, check_counts, check_transition
from pipeline.domain import core
from pipeline.domain import incoming as inc
from tables.stock import StoredStock


def change(version: int, on_hand: int, reserved: int = 0, safety: int = 0, **kw: Any) -> dict:
    return {
        "sku": kw.pop("sku", "S"),
        "version": version,
        "on_hand": on_hand,
        "reserved": reserved,
        "safety_stock": safety,
        "available": kw.pop("available", max(0, on_hand - reserved - safety)),
        "cause_type": kw.pop("cause", "RestockReceived"),
        "cause_event_id": kw.pop("event", f"e{version}"),
        "order_id": "",
        "channel": "web",
        "occurred_at": 1,
        "processed_at": 2,
        "channels": kw.pop("channels", []),
        "damaged": kw.pop("damaged", 0),
    }


def kinds(a: Auditor) -> list[tuple[str, str]]:
    return [(v.invariant, v.kind) for v in a.violations]


def test_a_whole_chain_with_re_sends_is_clean():
    a = Auditor(grace_s=10, max_skus=10, complete={0})
    chain = [
        change(1, 10),
        change(2, 10, 3, cause="ReserveStock"),
        change(3, 7, 0, cause="CommitReservation"),
        change(4, 2, 0, cause="StockCounted"),
    ]
    for c in chain + chain[1:]:  # the relay re-sent 2..4
        a.observe_change(0, c, 0.0)
    assert a.violations == []


@pytest.mark.parametrize(
    "second,kind",
    [
        (change(3, 20), "gap"),
        (change(1, 10, event="other"), "conflict"),
    ],
)
def test_gap_and_conflict(second, kind):
    a = Auditor(grace_s=10, max_skus=10, complete={0})
    a.observe_change(0, change(1, 10), 0.0)
    a.observe_change(0, second, 0.0)
    assert kinds(a) == [("version_chain", kind)]


def test_an_old_version_rewritten_went_back_and_a_late_first_version_is_a_gap_only_from_offset_0():
    a = Auditor(grace_s=10, max_skus=10, complete={0})
    for v in range(1, 5):
        a.observe_change(0, change(v, 10 + v), 0.0)
    a.observe_change(0, change(2, 12, event="x"), 0.0)
    assert kinds(a) == [("version_chain", "went_back")]
    a.observe_change(0, change(5, 3, sku="T", cause="StockCounted"), 0.0)  # partition 0: gap
    a.observe_change(1, change(5, 3, sku="U", cause="StockCounted"), 0.0)  # retention: start
    assert kinds(a)[1:] == [("version_chain", "gap")]


def test_counts_and_transitions():
    assert check_counts(change(1, 5, 6)) == []  # a shortfall: reserved above on_hand is allowed
    assert check_counts(change(1, -1, available=0))
    assert check_counts(change(1, 5, 1, available=5))
    assert check_counts(
        change(1, 5, 1, channels=[{"channel": "m", "allocated": 2, "reserved": 2, "available": 0}])
    )
    prev = (10, 2, 0, 8, 0)
    assert check_transition(prev, change(2, 10, 3, cause="ReserveStock")) == []
    assert check_transition(prev, change(2, 15, 2, cause="ReserveStock"))  # units from nowhere
    assert check_transition(prev, change(2, 10, 11, cause="ReserveStock"))  # oversell
    assert check_transition(prev, change(2, 8, 0, cause="CommitReservation")) == []
    assert check_transition(prev, change(2, 10, 0, cause="CommitReservation")) == []  # expired
    assert check_transition(prev, change(2, 9, 0, cause="CommitReservation"))
    assert check_transition(prev, change(2, 10, 2, 1, cause="RestockReceived"))
    assert check_transition(prev, change(2, 10, 2, 3, cause="SafetyStockSet")) == []
    assert check_transition(prev, change(2, 99, 5, cause="SomethingNew")) == []  # not judged


def test_damaged_counts_and_transitions():
    assert check_counts(change(1, 5, damaged=-1))
    prev = (10, 2, 0, 8, 4)
    ret = "ReturnReceived"
    assert check_transition(prev, change(2, 10, 2, damaged=6, cause=ret)) == []  # damaged return
    assert check_transition(prev, change(2, 12, 2, damaged=4, cause=ret)) == []  # resellable
    assert check_transition(prev, change(2, 12, 2, damaged=6, cause=ret))  # both at once
    ok = "DamagedStockResolved"
    assert check_transition(prev, change(2, 13, 2, damaged=1, cause=ok)) == []  # RESTOCK 3
    assert check_transition(prev, change(2, 10, 2, damaged=1, cause=ok)) == []  # WRITE_OFF 3
    assert check_transition(prev, change(2, 14, 2, damaged=1, cause=ok))  # a unit from nowhere
    assert check_transition(prev, change(2, 10, 2, damaged=5, cause=ok))  # damaged grew
    assert check_transition(prev, change(2, 10, 3, damaged=1, cause=ok))  # reserved moved
    # nothing else moves damaged units
    assert check_transition(prev, change(2, 11, 2, damaged=3, cause="RestockReceived"))
    assert check_transition(prev, change(2, 10, 3, damaged=0, cause="ReserveStock"))
    assert check_transition(prev, change(2, 3, 2, damaged=0, cause="StockCounted"))


def stored(version: int, on_hand: int, reserved: int = 0) -> StoredStock:
    return StoredStock(core.StockRecord("S", on_hand, reserved, 0, 0, version))


def test_changelog_agreement_counts_at_once_or_after_the_grace_once():
    a = Auditor(grace_s=10, max_skus=10, complete={0})
    a.observe_change(0, change(1, 10), 0.0)
    a.observe_stock(0, stored(1, 9), 0.0)  # same version, other counts
    assert kinds(a) == [("changelog_agreement", "counts")]
    a.observe_stock(0, stored(1, 9), 1.0)
    assert len(a.violations) == 1  # counted once

    b = Auditor(grace_s=10, max_skus=10, complete={0})
    b.observe_change(0, change(1, 10), 0.0)
    b.observe_stock(0, stored(2, 11), 0.0)  # the relay has not published 2 yet
    (sus,) = b.due(10.0)
    b.judge_changelog(sus, 10.0)
    assert kinds(b) == [("changelog_agreement", "behind")]


def test_projection_behind_after_the_grace_and_at_once_for_other_counts():
    a = Auditor(grace_s=10, max_skus=10)  # the history starts at 2 (FROM=LATEST)
    a.observe_change(0, change(2, 10), 0.0)
    a.observe_stock(0, stored(2, 10), 0.0)
    a.compare_projection("redis", "S", (2, (10, 0, 0, 10, 0, 0, 0, 0, 0)), 0.0)
    a.compare_projection("search", "S", (2, (10, 0, 0, 9, 0, 0, 0, 0, 0)), 0.0)
    assert kinds(a) == [("projection_agreement", "counts")]
    a.compare_projection("redis", "S", (1, (10, 0, 0, 10, 0, 0, 0, 0, 0)), 1.0)  # behind: suspected
    (sus,) = a.due(11.0)
    sus.snapshot = {}
    a.compare_projection(
        "redis", "S", (1, (10, 0, 0, 10, 0, 0, 0, 0, 0)), 5.0, judged=True
    )  # not due yet
    assert len(a.violations) == 1
    a.compare_projection("redis", "S", (1, (10, 0, 0, 10, 0, 0, 0, 0, 0)), 11.0, judged=True)
    assert kinds(a)[1:] == [("projection_agreement", "behind")]
    # a projection that caught up is no violation
    a.compare_projection("redis", "S", (0, None), 20.0)
    a.compare_projection("redis", "S", (2, (10, 0, 0, 10, 0, 0, 0, 0, 0)), 31.0)
    assert len(a.violations) == 2


def test_memory_is_bounded_by_max_skus():
    a = Auditor(grace_s=10, max_skus=1000, complete={0})
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(3000):
        sku = f"SKU-{i:06d}"
        for v in range(1, 10):
            a.observe_change(0, change(v, 10 + v, sku=sku), 0.0)
        a.observe_stock(0, StoredStock(core.StockRecord(sku, 19, 0, 0, 0, 9)), 0.0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert len(a.skus) == 1000
    assert grown / 1000 < 1024, f"{grown / 1000:.0f} bytes per SKU"
    # forgetting SKUs means a later first sighting is where a chain starts, not a gap
    a.observe_change(0, change(9, 19, sku="SKU-000000"), 0.0)
    assert a.violations == []


def test_damaged_units_the_ledger_holds_must_be_published_and_projected():
    a = Auditor(grace_s=10, max_skus=10, complete={0})
    a.observe_change(0, change(1, 10, damaged=2), 0.0)
    a.observe_stock(0, StoredStock(core.StockRecord("S", 10, 0, 0, 3, 1)), 0.0)
    assert kinds(a) == [("changelog_agreement", "counts")]
    b = Auditor(grace_s=10, max_skus=10, complete={0})
    b.observe_change(0, change(1, 10, damaged=3), 0.0)
    b.observe_stock(0, StoredStock(core.StockRecord("S", 10, 0, 0, 3, 1)), 0.0)
    b.compare_projection("redis", "S", (1, (10, 0, 0, 10, 3, 0, 0, 0, 0)), 0.0)
    assert b.violations == []
    b.compare_projection(
        "search", "S", (1, (10, 0, 0, 10, 0, 0, 0, 0, 0)), 0.0
    )  # lost the damaged units
    assert kinds(b) == [("projection_agreement", "counts")]


def test_purchase_order_figures_the_ledger_holds_must_be_published_and_projected():
    """incoming / promised / backorderable / staged are counts like the others: a
    StockChanged or a projection that drops them disagrees with the changelog."""
    po = inc.PurchaseOrder("po-1", 10, 1_800_000_000_000)
    record = core.StockRecord("S", 0, 0, 0, 0, 1, incoming=inc.Incoming((po,), cap=8))
    figures = {"incoming": 10, "promised": 0, "backorderable": 8, "staged": 0}
    assert core.incoming_figures(record.incoming) == figures
    a = Auditor(grace_s=10, max_skus=10, complete={0})
    a.observe_change(0, {**change(1, 0, cause="IncomingStock"), **figures}, 0.0)
    a.observe_stock(0, StoredStock(record), 0.0)
    a.compare_projection("redis", "S", (1, (0, 0, 0, 0, 0, 10, 0, 8, 0)), 0.0)
    assert a.violations == []
    a.compare_projection("search", "S", (1, (0, 0, 0, 0, 0, 0, 0, 0, 0)), 0.0)  # dropped
    assert kinds(a) == [("projection_agreement", "counts")]
    b = Auditor(grace_s=10, max_skus=10, complete={0})
    b.observe_change(0, change(1, 0, cause="IncomingStock"), 0.0)  # published without them
    b.observe_stock(0, StoredStock(record), 0.0)
    assert kinds(b) == [("changelog_agreement", "counts")]
    assert check_counts({**change(1, 0), **figures, "backorderable": -1}) == ["backorderable is -1"]


def _located(cause: str, **over: object) -> dict[str, object]:
    base = {
        "sku": "L",
        "version": 2,
        "on_hand": 7,
        "reserved": 3,
        "safety_stock": 0,
        "available": 4,
        "damaged": 0,
        "cause_type": cause,
        "channels": [],
        "locations": [
            {
                "location": "a",
                "on_hand": 0,
                "reserved": 2,
                "damaged": 0,
                "available": 0,
                "inbound": 0,
            },
            {
                "location": "b",
                "on_hand": 7,
                "reserved": 1,
                "damaged": 0,
                "available": 6,
                "inbound": 2,
            },
        ],
    }
    return {**base, **over}


def test_a_sku_with_locations_sums_its_locations_available() -> None:
    from pipeline.auditor import check_counts, check_transition

    # a count left 'a' holding 2 it does not have: the SKU's sum is 6, not 7 - 3
    good = _located("ReserveStock", available=6)
    assert check_counts(good) == []
    assert check_transition((7, 2, 0, 7, 0), good) == []  # a reserve at b, no oversell
    assert check_counts(_located("ReserveStock", available=4)) != []
    assert check_counts(_located("ReserveStock", on_hand=8)) != []  # sums disagree


def test_transfers_move_on_hand_and_nothing_else() -> None:
    from pipeline.auditor import check_transition

    shipped = {"on_hand": 5, "reserved": 1, "safety_stock": 0, "available": 4, "damaged": 0}
    assert check_transition((7, 1, 0, 6, 0), {**shipped, "cause_type": "TransferShipped"}) == []
    assert check_transition((7, 1, 0, 6, 0), {**shipped, "cause_type": "TransferCancelled"})
    back = {**shipped, "on_hand": 9, "available": 8}
    assert check_transition((7, 1, 0, 6, 0), {**back, "cause_type": "TransferReceived"}) == []
    assert check_transition((7, 1, 0, 6, 0), {**back, "cause_type": "TransferShipped"})
    held = {**back, "reserved": 2}
    assert check_transition((7, 1, 0, 6, 0), {**held, "cause_type": "TransferReceived"})
