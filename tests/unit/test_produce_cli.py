"""The producer's command line checks its input before it asks Kafka anything.

Kafka is pointed at a closed port: before, a bad record waited 30 s behind the
client's connection errors; now it fails at once with the missing field named.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.produce import INPUT_TYPES, fields_help, read_command_file

REPO = Path(__file__).resolve().parents[2]
FAST_S = 10.0  # the old path took the producer's 30 s flush timeout (plus the topic check)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def produce(*args: str, cwd: Path = REPO) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    env.update(PYTHONPATH=str(REPO), INVENTORY_KAFKA_BOOTSTRAP=f"127.0.0.1:{closed_port()}")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.produce", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    return proc, time.monotonic() - started


def test_a_record_missing_a_field_fails_fast_naming_it_with_kafka_down():
    proc, took = produce("send", "RestockReceived", '{"sku": "A"}')
    assert proc.returncode == 2, proc.stderr
    assert took < FAST_S, took
    assert proc.stderr.strip() == (
        "error: missing_field: RestockReceived: missing required field qty"
    )
    assert "kafka" not in proc.stderr.lower()  # no client errors in front of the answer


def test_a_record_of_the_wrong_type_or_with_an_unknown_field_fails_fast_too():
    proc, took = produce("send", "RestockReceived", '{"sku": "A", "qty": "ten"}')
    assert (proc.returncode, took < FAST_S) == (2, True), (proc.stderr, took)
    assert "RestockReceived" in proc.stderr and "qty" in proc.stderr
    proc, took = produce("send", "ReserveStock", '{"order_id": "o", "sku": "A", "qty": 1, "x": 1}')
    assert (proc.returncode, took < FAST_S) == (2, True), (proc.stderr, took)
    assert "unknown field x" in proc.stderr


def test_a_file_of_bad_lines_is_reported_without_waiting_for_kafka(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"type": "RestockReceived", "sku": "A"}\n{"type": "Nope"}\n')
    proc, took = produce("send-file", str(path))
    assert proc.returncode == 2, proc.stderr
    assert took < FAST_S, took
    assert proc.stderr.splitlines()[0] == (
        "line 1: missing_field: RestockReceived: missing required field qty"
    )
    assert proc.stdout.strip() == f"{path}: 0 commands sent, 2 bad lines skipped"


def test_a_csv_of_bad_rows_is_reported_without_waiting_for_kafka(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("A,0\nB,x\n")
    proc, took = produce("import-csv", str(path), "--mode", "restock")
    assert (proc.returncode, took < FAST_S) == (2, True), (proc.stderr, took)
    assert "line 1: qty 0 below minimum 1" in proc.stderr


def test_send_help_lists_every_record_with_its_fields_and_defaults():
    proc, took = produce("send", "--help")
    assert proc.returncode == 0, proc.stderr
    assert took < FAST_S
    out = proc.stdout
    for name in INPUT_TYPES:
        assert f"  {name}  (topic " in out
    assert "      qty: int" in out
    assert '      channel: string = "warehouse"' in out
    assert "      event_id: string = a new uuid4" in out
    assert "      location: null or string = null" in out
    assert "      lines: array of {sku: string, qty: int}" in out


@pytest.mark.parametrize("name", INPUT_TYPES)
def test_the_help_of_each_record_names_every_schema_field(name):
    import json

    from schemas.codec import SCHEMA_DIR

    text = fields_help([name])
    schema = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
    for f in schema["fields"]:
        assert f"      {f['name']}: " in text


def test_read_command_file_fills_defaults_once_so_the_checked_record_is_the_sent_one(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"type": "RestockReceived", "sku": "A", "qty": 2}\n')
    commands, bad = read_command_file(path)
    assert bad == []
    [(type_name, record)] = commands
    assert type_name == "RestockReceived" and record["event_id"] and record["occurred_at"] > 0
