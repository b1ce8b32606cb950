"""The audit's pure part: the version chain check, the history view, --since and exit codes."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from pipeline import audit
from pipeline.audit import AuditRecord, Gap, check_chain, history, parse_since, report


def change(version: int, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sku": "A",
        "version": version,
        "on_hand": 10,
        "reserved": version,
        "safety_stock": 0,
        "available": 10 - version,
        "cause_type": "ReserveStock",
        "cause_event_id": f"e-{version}",
        "order_id": f"o-{version}",
        "channel": "web",
        "occurred_at": 1_700_000_000_000 + version,
        "processed_at": 1_700_000_000_100 + version,
    }
    base.update(fields)
    return base


def shortfall(cause_event_id: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sku": "A",
        "counted": 1,
        "reserved": 3,
        "shortfall": 2,
        "cause_event_id": cause_event_id,
        "occurred_at": 1_700_000_000_000,
    }
    base.update(fields)
    return base


def records(*values: tuple[str, dict[str, Any]]) -> list[AuditRecord]:
    return [AuditRecord(offset, name, value) for offset, (name, value) in enumerate(values)]


# ---------------------------------------------------------------- check_chain


def test_whole_chain_is_ok():
    r = check_chain([change(v) for v in (1, 2, 3)])
    assert r.ok
    assert (r.first_version, r.last_version, r.versions) == (1, 3, (1, 2, 3))
    assert (r.duplicates, r.gaps, r.conflicts, r.start_truncated) == (0, (), (), False)


def test_empty_history_has_no_versions():
    r = check_chain([])
    assert (r.first_version, r.last_version, r.ok, r.gaps) == (None, None, True, ())


def test_identical_resends_are_counted_not_errors():
    # a relay restart re-publishes 2 and 3 after 3 was already out
    r = check_chain([change(v) for v in (1, 2, 3, 2, 3, 4, 4)])
    assert r.ok
    assert r.duplicates == 3
    assert r.versions == (1, 2, 3, 4)


def test_same_version_with_other_content_is_a_conflict():
    r = check_chain([change(1), change(2), change(2, on_hand=9, available=7), change(3)])
    assert not r.ok
    assert r.duplicates == 0
    assert len(r.conflicts) == 1
    c = r.conflicts[0]
    assert c.version == 2
    assert c.fields == ("available", "on_hand")
    assert [v["on_hand"] for v in c.variants] == [10, 9]
    assert c.to_json()["version"] == 2


def test_conflict_and_identical_copy_of_each_variant():
    r = check_chain([change(1), change(1, channel="erp"), change(1), change(1, channel="erp")])
    assert r.duplicates == 2
    assert len(r.conflicts) == 1 and len(r.conflicts[0].variants) == 2
    assert r.conflicts[0].fields == ("channel",)


def test_missing_versions_are_gaps():
    r = check_chain([change(v) for v in (1, 2, 4, 5, 9)])
    assert not r.ok
    assert r.gaps == (Gap(3, 3), Gap(6, 8))
    assert [g.to_json() for g in r.gaps] == [
        {"from": 3, "to": 3, "count": 1},
        {"from": 6, "to": 8, "count": 3},
    ]
    assert [str(g) for g in r.gaps] == ["3", "6..8"]


def test_gap_found_whatever_the_topic_order():
    r = check_chain([change(v) for v in (3, 1, 5)])
    assert r.gaps == (Gap(2, 2), Gap(4, 4))


def test_late_start_with_the_log_start_at_zero_is_a_gap():
    r = check_chain([change(v) for v in (3, 4)], log_start_offset=0)
    assert not r.ok
    assert r.gaps == (Gap(1, 2),)
    assert not r.start_truncated


def test_late_start_after_retention_is_a_truncated_start_not_a_gap():
    r = check_chain([change(v) for v in (3, 4)], log_start_offset=120)
    assert r.ok
    assert r.gaps == ()
    assert r.start_truncated
    assert r.first_version == 3


def test_truncated_start_still_reports_later_gaps():
    r = check_chain([change(v) for v in (7, 9)], log_start_offset=5)
    assert r.start_truncated and r.gaps == (Gap(8, 8),) and not r.ok


def test_a_start_at_version_one_is_never_truncated():
    assert not check_chain([change(1)], log_start_offset=50).start_truncated


# ---------------------------------------------------------------- history / report


def test_history_dedupes_and_places_shortfalls_after_their_change():
    recs = records(
        ("StockChanged", change(1)),
        ("StockChanged", change(2, cause_type="StockCounted", cause_event_id="count-1")),
        ("StockShortfall", shortfall("count-1")),
        ("StockChanged", change(1)),  # re-sent
        ("StockChanged", change(2, cause_type="StockCounted", cause_event_id="count-1")),
        ("StockShortfall", shortfall("count-1")),  # re-sent
        ("StockChanged", change(3)),
    )
    items = history(recs)
    assert [(i["type"], i["version"], i["resent"]) for i in items] == [
        ("StockChanged", 1, 1),
        ("StockChanged", 2, 1),
        ("StockShortfall", 2, 1),
        ("StockChanged", 3, 0),
    ]
    assert items[0]["offset"] == 0 and items[0]["order_id"] == "o-1"
    assert items[0]["time"] == "2023-11-14T22:13:20.101Z"
    assert items[2]["time"] == items[1]["time"]  # a shortfall shows its change's time


def low_stock(version: int, direction: str = "down", available: int = 4) -> dict[str, Any]:
    return {
        "sku": "A",
        "available": available,
        "threshold": 5,
        "direction": direction,
        "version": version,
        "occurred_at": 1_700_000_000_000 + version,
    }


def test_low_stock_crossings_follow_their_version_and_other_records_are_kept():
    recs = records(
        ("StockChanged", change(1)),
        ("StockChanged", change(2)),
        ("LowStockCrossed", low_stock(2)),
        ("LowStockCrossed", low_stock(1, "up", 9)),  # published late, still under version 1
        ("LowStockCrossed", low_stock(2)),  # re-sent
        ("SomethingNew", {"sku": "A", "note": "x"}),
    )
    items = history(recs)
    assert [(i["type"], i["version"], i["resent"]) for i in items] == [
        ("StockChanged", 1, 0),
        ("LowStockCrossed", 1, 0),
        ("StockChanged", 2, 0),
        ("LowStockCrossed", 2, 1),
        ("SomethingNew", 2, 0),
    ]
    assert items[3]["time"] == items[2]["time"] and items[3]["time_ms"] == 1_700_000_000_102
    doc = doc_for(recs)
    assert doc["low_stock_crossings"] == 2 and doc["ok"]
    text = audit.render_table(doc)
    assert "~ low stock down: available 4, threshold 5 [re-sent x1]" in text
    assert "~ low stock up: available 9, threshold 5" in text
    assert '* SomethingNew: {"note": "x", "sku": "A", "version": 2}' in text
    assert "2 low-stock crossings" in text.splitlines()[-1]


def test_history_orders_by_version_and_shows_a_conflict_once():
    recs = records(
        ("StockChanged", change(2)),
        ("StockChanged", change(1)),
        ("StockChanged", change(2, on_hand=1)),
    )
    items = history(recs)
    assert [(i["version"], i["on_hand"]) for i in items] == [(1, 10), (2, 10)]


def test_orphan_shortfall_stays_after_the_change_before_it():
    recs = records(
        ("StockChanged", change(1)),
        ("StockShortfall", shortfall("unknown")),
        ("StockChanged", change(2)),
    )
    assert [(i["type"], i["version"]) for i in history(recs)] == [
        ("StockChanged", 1),
        ("StockShortfall", 1),
        ("StockChanged", 2),
    ]


def doc_for(recs: list[AuditRecord], **kw: Any) -> dict[str, Any]:
    return report("A", "t.stock-changes", 2, kw.pop("low", 0), len(recs), recs, **kw)


def test_report_document_fields():
    recs = records(
        ("StockChanged", change(1)),
        ("StockChanged", change(1)),
        ("StockChanged", change(3, cause_event_id="c", cause_type="StockCounted")),
        ("StockShortfall", shortfall("c")),
    )
    doc = doc_for(recs)
    assert {
        "sku",
        "partition",
        "records",
        "duplicates",
        "gaps",
        "conflicts",
        "first_version",
        "last_version",
        "ok",
    } <= doc.keys()
    assert (doc["sku"], doc["partition"], doc["first_version"], doc["last_version"]) == (
        "A",
        2,
        1,
        3,
    )
    assert doc["duplicates"] == 1 and doc["shortfalls"] == 1 and doc["changes"] == 2
    assert doc["gaps"] == [{"from": 2, "to": 2, "count": 1}]
    assert doc["ok"] is False
    json.dumps(doc)  # JSON-ready
    assert [r["time_ms"] for r in doc["records"]] == [
        1_700_000_000_101,
        1_700_000_000_103,
        1_700_000_000_103,
    ]


def test_since_limits_the_records_not_the_check():
    recs = records(*(("StockChanged", change(v)) for v in (1, 2, 4)))
    doc = doc_for(recs, since_ms=1_700_000_000_100 + 2)
    assert [r["version"] for r in doc["records"]] == [2, 4]
    assert doc["gaps"] == [{"from": 3, "to": 3, "count": 1}] and doc["first_version"] == 1


def test_table_and_summary_for_a_broken_chain():
    recs = records(
        ("StockChanged", change(1)),
        ("StockChanged", change(1)),
        ("StockChanged", change(2, cause_event_id="c", cause_type="StockCounted", order_id="")),
        ("StockShortfall", shortfall("c")),
        ("StockChanged", change(2, cause_event_id="c", on_hand=3)),
        ("StockChanged", change(5)),
    )
    text = audit.render_table(doc_for(recs))
    lines = text.splitlines()
    assert lines[0].startswith("SKU A - topic t.stock-changes partition 2")
    assert lines[1].split()[:3] == ["ver", "processed", "(UTC)"]
    assert "re-sent x1" in lines[2]
    assert "CONFLICT" in lines[3] and "StockCounted" in lines[3]
    assert "shortfall: counted 1, reserved 3, short by 2" in lines[4]
    assert "gap: version 3..4 missing" in lines[5]
    assert lines[-1] == (
        "summary: A: 3 versions (1..5), 1 identical re-send, 1 shortfall, "
        "0 low-stock crossings, 1 gap (missing 3..4), 1 conflict (version 2) -> chain BROKEN"
    )
    assert any(
        line.startswith("conflict at version 2: fields differ: cause_type, on_hand, order_id")
        for line in lines
    )


def test_summary_names_a_truncated_start():
    recs = records(*(("StockChanged", change(v)) for v in (4, 5)))
    text = audit.render_table(doc_for(recs, low=30))
    assert "removed by retention (log start offset 30)" in text
    assert text.splitlines()[-1].endswith("-> chain OK")


# ---------------------------------------------------------------- --since and exit codes


def test_parse_since():
    assert parse_since("1700000000000") == 1_700_000_000_000
    assert parse_since("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_since("2023-11-14T22:13:20.5") == 1_700_000_000_500  # naive = UTC
    assert parse_since("2023-11-15T00:13:20+02:00") == 1_700_000_000_000
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday")


@pytest.mark.parametrize(
    "argv", [[], ["--json"], [""], ["A", "--since", "soon"], ["A", "--timeout", "0"], ["\x01"]]
)
def test_usage_errors_exit_2_without_kafka(argv, monkeypatch):
    def no_kafka(*_a: Any, **_k: Any) -> None:
        raise AssertionError("must not read Kafka")

    monkeypatch.setattr(audit, "read_partition", no_kafka)
    err = io.StringIO()
    assert audit.main(argv, out=io.StringIO(), err=err) == 2


def fake_read(recs: list[AuditRecord], low: int = 0):
    def read(cfg, sku, timeout, codec=None):
        return audit.PartitionRead("t.stock-changes", 1, low, low + len(recs), list(recs))

    return read


def test_exit_codes_follow_the_chain(monkeypatch):
    whole = records(*(("StockChanged", change(v)) for v in (1, 2)))
    gapped = records(*(("StockChanged", change(v)) for v in (1, 3)))
    out = io.StringIO()
    monkeypatch.setattr(audit, "read_partition", fake_read(whole))
    assert audit.main(["A", "--json"], out=out, err=io.StringIO()) == 0
    assert json.loads(out.getvalue())["ok"] is True
    monkeypatch.setattr(audit, "read_partition", fake_read(gapped))
    out = io.StringIO()
    assert audit.main(["A"], out=out, err=io.StringIO()) == 1
    assert "chain BROKEN" in out.getvalue()
    monkeypatch.setattr(audit, "read_partition", fake_read([]))
    err = io.StringIO()
    assert audit.main(["A"], out=io.StringIO(), err=err) == 2
    assert "no record of SKU 'A'" in err.getvalue()


def test_kafka_failure_exits_3(monkeypatch):
    def down(*_a: Any, **_k: Any) -> None:
        raise audit.AuditError(audit.EXIT_KAFKA, "Kafka at x: timed out")

    monkeypatch.setattr(audit, "read_partition", down)
    err = io.StringIO()
    assert audit.main(["A"], out=io.StringIO(), err=err) == 3
    assert "timed out" in err.getvalue()


def test_the_table_shows_damaged_units_and_resolutions():
    recs = records(
        ("StockChanged", change(1, damaged=4, cause_type="ReturnReceived")),
        ("StockChanged", change(2, on_hand=13, damaged=1, cause_type="DamagedStockResolved")),
    )
    lines = audit.render_table(doc_for(recs)).splitlines()
    header = lines[1].split()
    assert header[-1] == "damaged"
    assert lines[2].split()[-1] == "4" and "ReturnReceived" in lines[2]
    assert lines[3].split()[-1] == "1" and "DamagedStockResolved" in lines[3]


def test_table_shows_each_location_of_a_located_change():
    at = [
        {
            "location": "store-1",
            "on_hand": 2,
            "reserved": 1,
            "damaged": 1,
            "available": 1,
            "inbound": 0,
        },
        {
            "location": "wh-1",
            "on_hand": 8,
            "reserved": 1,
            "damaged": 0,
            "available": 7,
            "inbound": 3,
        },
    ]
    recs = records(("StockChanged", change(1)), ("StockChanged", change(2, locations=at)))
    lines = audit.render_table(doc_for(recs)).splitlines()
    assert not lines[2].startswith("      at ")  # no locations: the totals only
    assert lines[4] == "      at store-1: on_hand 2, reserved 1, available 1, damaged 1"
    assert lines[5] == "      at wh-1: on_hand 8, reserved 1, available 7, damaged 0, inbound 3"


def test_a_shortfall_at_a_location_names_it():
    recs = records(
        ("StockChanged", change(1, cause_event_id="c", cause_type="StockCounted")),
        ("StockShortfall", shortfall("c", location="store-7")),
    )
    lines = audit.render_table(doc_for(recs)).splitlines()
    assert "shortfall: counted 1, reserved 3, short by 2 at store-7 (event c)" in lines[3]
