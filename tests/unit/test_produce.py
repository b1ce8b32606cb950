"""The producer's pure parts: topics, defaults, CSV and JSON-lines parsing, the commands.

The commands run against a recording stand-in for CommandProducer that encodes
with the real codec, so every record they would send is checked against its
schema; the Kafka side is covered by the integration tests.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings
from pipeline.clock import now_ms
from pipeline.produce import (
    INPUT_TYPES,
    TOPIC_FOR_TYPE,
    BadRow,
    fill_defaults,
    parse_command_line,
    parse_stock_csv,
    producer_config,
    run_import_csv,
    run_send_file,
    stock_command,
    topic_for_type,
)
from schemas.codec import AvroCodec

CFG = replace(Settings(), max_qty=1000, max_sku_len=8, topic_prefix="t.")


class RecordingProducer:
    """Encodes like CommandProducer.send and keeps (type, record) instead of sending."""

    def __init__(self) -> None:
        self.codec = AvroCodec()
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.flushed = False

    def send(
        self,
        type_name: str,
        fields: Mapping[str, Any],
        *,
        partition: int | None = None,
        key: bytes | None = None,
    ) -> str:
        topic_for_type(CFG, type_name)
        record = fill_defaults(fields)
        self.codec.encode(type_name, record)
        self.sent.append((type_name, record))
        return str(record["event_id"])

    def flush(self, timeout: float = 30) -> None:
        self.flushed = True


def csv_of(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


# --- topics and defaults -------------------------------------------------------------------


def test_each_input_type_goes_to_its_topic() -> None:
    assert {n: topic_for_type(CFG, n) for n in INPUT_TYPES} == {
        "ReserveStock": "t.orders",
        "CommitReservation": "t.orders",
        "ReleaseReservation": "t.orders",
        "RestockReceived": "t.restocks",
        "StockCounted": "t.restocks",
        "SafetyStockSet": "t.restocks",
        "CustomerLimitSet": "t.restocks",
        "ChannelAllocationSet": "t.restocks",
        "TransferShipped": "t.restocks",
        "TransferReceived": "t.restocks",
        "TransferCancelled": "t.restocks",
        "IncomingStock": "t.restocks",
        "PurchaseOrderClosed": "t.restocks",
        "BackorderCapSet": "t.restocks",
        "ReturnReceived": "t.returns",
        "DamagedStockResolved": "t.returns",
        "PlaceOrder": "t.checkouts",
        "CommitOrder": "t.checkouts",
        "CancelOrder": "t.checkouts",
    }


def test_topic_for_type_map_follows_the_global_settings() -> None:
    assert set(TOPIC_FOR_TYPE) == set(INPUT_TYPES)
    assert TOPIC_FOR_TYPE["ReturnReceived"].endswith("returns")


@pytest.mark.parametrize("name", ["ExpireReservation", "StockChanged", "Nope"])
def test_internal_and_output_types_cannot_be_produced(name: str) -> None:
    with pytest.raises(ValueError, match="not an input record type"):
        topic_for_type(CFG, name)


def test_missing_event_id_and_occurred_at_are_filled() -> None:
    fields = {"sku": "A", "qty": 1}
    before = now_ms()
    out = fill_defaults(fields)
    assert uuid.UUID(out["event_id"]).version == 4
    assert before <= out["occurred_at"] <= now_ms()
    assert fields == {"sku": "A", "qty": 1}  # the input is not modified


def test_given_event_id_and_occurred_at_are_kept() -> None:
    out = fill_defaults({"event_id": "e-1", "occurred_at": 5, "sku": "A"}, now=99)
    assert (out["event_id"], out["occurred_at"]) == ("e-1", 5)
    assert fill_defaults({"event_id": None}, now=99)["occurred_at"] == 99


def test_each_default_event_id_is_new() -> None:
    assert fill_defaults({})["event_id"] != fill_defaults({})["event_id"]


def test_producer_uses_the_java_compatible_murmur2_partitioner() -> None:
    conf = producer_config(CFG)
    assert conf["partitioner"] == "murmur2_random"
    assert (conf["enable.idempotence"], conf["acks"], conf["linger.ms"]) == (True, "all", 5)
    assert conf["bootstrap.servers"] == CFG.kafka_bootstrap


# --- CSV parsing ---------------------------------------------------------------------------


def test_good_rows_become_stock_rows_with_their_line_numbers() -> None:
    rows, bad = parse_stock_csv(csv_of("A,5", " B , 7 ", "C,+3"), "restock", CFG)
    assert bad == []
    assert [(r.line, r.sku, r.qty) for r in rows] == [(1, "A", 5), (2, "B", 7), (3, "C", 3)]


def test_a_header_row_is_skipped_when_present() -> None:
    rows, bad = parse_stock_csv(csv_of("SKU,Qty", "A,5"), "restock", CFG)
    assert ([(r.line, r.sku) for r in rows], bad) == ([(2, "A")], [])
    rows, bad = parse_stock_csv(csv_of("sku,on_hand", "A,0"), "count", CFG)
    assert ([(r.line, r.qty) for r in rows], bad) == ([(2, 0)], [])


def test_only_the_first_row_can_be_a_header() -> None:
    rows, bad = parse_stock_csv(csv_of("A,5", "sku,qty"), "restock", CFG)
    assert [r.sku for r in rows] == ["A"]
    assert bad == [BadRow(2, "qty 'qty' is not an integer")]


def test_blank_lines_are_ignored_but_counted() -> None:
    rows, bad = parse_stock_csv(b"\n  \nA,5\r\n\r\nB,6", "restock", CFG)
    assert ([(r.line, r.sku) for r in rows], bad) == ([(3, "A"), (5, "B")], [])


def test_a_utf8_bom_does_not_hide_the_header() -> None:
    rows, bad = parse_stock_csv(b"\xef\xbb\xbfsku,qty\nA,1\n", "restock", CFG)
    assert ([r.sku for r in rows], bad) == (["A"], [])


def test_every_bad_row_is_reported_with_its_line_and_reason() -> None:
    data = csv_of(
        "sku,qty",  # 1 header
        "GOOD,1",  # 2
        "A",  # 3
        "A,1,2",  # 4
        ",5",  # 5
        "TOOLONGSKU,5",  # 6 (max_sku_len 8)
        "A,five",  # 7
        "A,1.5",  # 8
        "A,0",  # 9
        "A,-2",  # 10
        "A,1001",  # 11 (max_qty 1000)
        "A,1_000",  # 12
        "LAST,1000",  # 13
    )
    rows, bad = parse_stock_csv(data, "restock", CFG)
    assert [(r.line, r.sku) for r in rows] == [(2, "GOOD"), (13, "LAST")]
    assert [str(b) for b in bad] == [
        "line 3: expected 2 columns (sku,qty), got 1",
        "line 4: expected 2 columns (sku,qty), got 3",
        "line 5: sku is empty",
        "line 6: sku longer than 8 bytes",
        "line 7: qty 'five' is not an integer",
        "line 8: qty '1.5' is not an integer",
        "line 9: qty 0 below minimum 1",
        "line 10: qty -2 below minimum 1",
        "line 11: qty 1001 above maximum 1000",
        "line 12: qty '1_000' is not an integer",
    ]


def test_count_mode_accepts_zero_but_not_negative() -> None:
    rows, bad = parse_stock_csv(csv_of("A,0", "B,-1", "C,1001"), "count", CFG)
    assert [(r.sku, r.qty) for r in rows] == [("A", 0)]
    assert [str(b) for b in bad] == [
        "line 2: on_hand -1 below minimum 0",
        "line 3: on_hand 1001 above maximum 1000",
    ]


def test_a_quoted_multiline_field_reports_the_line_it_starts_on() -> None:
    rows, bad = parse_stock_csv(b'A,1\n"B\nC",2\nD,3\n', "restock", CFG)
    assert [(r.line, r.sku) for r in rows] == [(1, "A"), (4, "D")]
    assert bad == [BadRow(2, "sku contains control characters")]


def test_event_ids_depend_only_on_content_mode_and_line() -> None:
    data = csv_of("A,5", "B,6")
    ids = [r.event_id for r in parse_stock_csv(data, "restock", CFG)[0]]
    assert ids == [r.event_id for r in parse_stock_csv(data, "restock", CFG)[0]]
    assert len(set(ids)) == 2 and all(i.startswith("csv-restock-") for i in ids)
    other_file = [r.event_id for r in parse_stock_csv(csv_of("A,5", "B,7"), "restock", CFG)[0]]
    assert set(other_file).isdisjoint(ids)
    as_count = [r.event_id for r in parse_stock_csv(data, "count", CFG)[0]]
    assert set(as_count).isdisjoint(ids)


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="mode"):
        parse_stock_csv(b"A,1\n", "adjust", CFG)


def test_rows_become_restocks_or_counts() -> None:
    row = parse_stock_csv(b"A,5\n", "restock", CFG)[0][0]
    assert stock_command(row, "restock", "in.csv", 7) == (
        "RestockReceived",
        {"event_id": row.event_id, "sku": "A", "qty": 5, "occurred_at": 7, "reference": "in.csv:1"},
    )
    assert stock_command(row, "count", "in.csv", 7) == (
        "StockCounted",
        {"event_id": row.event_id, "sku": "A", "on_hand": 5, "occurred_at": 7},
    )


# --- JSON lines ----------------------------------------------------------------------------


def test_a_json_line_gives_its_type_and_fields() -> None:
    assert parse_command_line('{"type": "RestockReceived", "sku": "A", "qty": 2}\n') == (
        "RestockReceived",
        {"sku": "A", "qty": 2},
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"sku": "A"}', "type must be one of"),
        ('{"type": "ExpireReservation", "sku": "A"}', "type must be one of"),
    ],
)
def test_bad_json_lines_are_value_errors(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_command_line(line)


# --- the commands --------------------------------------------------------------------------


def test_import_csv_sends_good_rows_reports_bad_ones_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "stock.csv"
    path.write_bytes(csv_of("sku,qty", "A,5", "B,0", "C,2"))
    producer, out, err = RecordingProducer(), io.StringIO(), io.StringIO()
    code = run_import_csv(path, "restock", producer, CFG, out=out, err=err)
    assert code == 2
    assert err.getvalue() == "line 3: qty 0 below minimum 1\n"
    assert [(t, r["sku"], r["qty"]) for t, r in producer.sent] == [
        ("RestockReceived", "A", 5),
        ("RestockReceived", "C", 2),
    ]
    assert producer.flushed
    assert out.getvalue() == f"{path}: 2 RestockReceived sent, 1 bad rows skipped\n"


def test_import_csv_of_a_clean_count_file_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "count.csv"
    path.write_bytes(csv_of("A,0", "B,3"))
    producer = RecordingProducer()
    code = run_import_csv(path, "count", producer, CFG, out=io.StringIO(), err=io.StringIO())
    assert code == 0
    assert [(t, r["on_hand"]) for t, r in producer.sent] == [
        ("StockCounted", 0),
        ("StockCounted", 3),
    ]


def test_reimporting_a_file_sends_the_same_event_ids(tmp_path: Path) -> None:
    path = tmp_path / "stock.csv"
    path.write_bytes(csv_of("A,5", "B,6"))
    first, second = RecordingProducer(), RecordingProducer()
    for producer in (first, second):
        run_import_csv(path, "restock", producer, CFG, out=io.StringIO(), err=io.StringIO())
    assert [r["event_id"] for _, r in first.sent] == [r["event_id"] for _, r in second.sent]


def test_import_csv_rejects_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("caf\xe9,1\n".encode("latin-1"))
    producer, err = RecordingProducer(), io.StringIO()
    code = run_import_csv(path, "restock", producer, CFG, out=io.StringIO(), err=err)
    assert (code, producer.sent) == (2, [])
    assert "unreadable CSV" in err.getvalue()


def test_send_file_sends_good_lines_with_defaults_and_reports_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "commands.jsonl"
    path.write_text(
        '{"type": "RestockReceived", "sku": "A", "qty": 5}\n'
        "\n"
        '{"type": "ReserveStock", "sku": "A", "qty": 1}\n'
        '{"type": "ReserveStock", "order_id": "o1", "sku": "A", "qty": 1, "event_id": "e1"}\n'
        "oops\n"
    )
    producer, out, err = RecordingProducer(), io.StringIO(), io.StringIO()
    code = run_send_file(path, producer, out=out, err=err)
    assert code == 2
    assert err.getvalue().splitlines() == [
        "line 3: missing_field: ReserveStock: missing required field order_id",
        "line 5: not JSON: Expecting value: line 1 column 1 (char 0)",
    ]
    assert [t for t, _ in producer.sent] == ["RestockReceived", "ReserveStock"]
    restock, reserve = (r for _, r in producer.sent)
    assert uuid.UUID(restock["event_id"]) and restock["occurred_at"] > 0
    assert reserve["event_id"] == "e1"
    assert out.getvalue() == f"{path}: 2 commands sent, 2 bad lines skipped\n"
