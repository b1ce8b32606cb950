"""The audit CLI against a real worker, forged gaps and conflicts, and the worker's JSON logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Producer

from harness import REPO, Namespace, Worker, wait_for, wait_stock
from pipeline.clients import confluent_config
from pipeline.kafka.partitioning import partition_for
from pipeline.produce import CommandProducer
from schemas.codec import codec_from_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ns() -> Namespace:
    # the sinks have their own tests; here they would only add Redis/OpenSearch to the setup
    return Namespace.fresh(
        "audit", partitions=4, INVENTORY_SINK_ENABLED="0", INVENTORY_LOW_STOCK_THRESHOLD="5"
    )


@pytest.fixture(scope="module")
def worker(ns, kafka):
    w = Worker(ns).start()
    yield w
    w.stop()


@pytest.fixture()
def producer(ns):
    with CommandProducer(ns.settings) as p:
        yield p


def run_audit(ns: Namespace, worker: Worker, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.audit", *args],
        cwd=REPO,
        env=ns.env(worker.port, worker.data_dir),
        capture_output=True,
        text=True,
        timeout=90,
    )


def audit_json(ns: Namespace, worker: Worker, sku: str, *args: str) -> tuple[int, dict[str, Any]]:
    proc = run_audit(ns, worker, sku, "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def wait_published(ns: Namespace, worker: Worker, sku: str, version: int) -> dict[str, Any]:
    """The audit document once the relay has published ``version`` (it lags the table)."""
    doc: dict[str, Any] = {}

    def published() -> bool:
        nonlocal doc
        proc = run_audit(ns, worker, sku, "--json")
        if proc.returncode == 2:  # nothing published yet
            return False
        doc = json.loads(proc.stdout)
        return doc["last_version"] is not None and doc["last_version"] >= version

    wait_for(published, 60, f"{sku} version {version} on the stock-changes topic", interval=0.5)
    return doc


def test_audit_shows_the_full_history_of_a_sku(ns, worker, producer):
    sku = "AUD-1"
    eids = [producer.send("RestockReceived", {"sku": sku, "qty": 10, "channel": "erp"})]
    producer.flush()
    wait_stock(worker, sku, on_hand=10)
    eids.append(
        producer.send("ReserveStock", {"order_id": "aud-a", "sku": sku, "qty": 3, "channel": "web"})
    )
    eids.append(
        producer.send(
            "ReserveStock", {"order_id": "aud-b", "sku": sku, "qty": 2, "channel": "mobile"}
        )
    )
    eids.append(
        producer.send("CommitReservation", {"order_id": "aud-a", "sku": sku, "channel": "web"})
    )
    eids.append(
        producer.send(
            "ReleaseReservation",
            {"order_id": "aud-b", "sku": sku, "reason": "payment_failed", "channel": "mobile"},
        )
    )
    eids.append(
        producer.send(
            "ReserveStock", {"order_id": "aud-c", "sku": sku, "qty": 4, "channel": "store"}
        )
    )
    producer.flush()
    wait_stock(worker, sku, version=6, reserved=4)
    eids.append(producer.send("StockCounted", {"sku": sku, "on_hand": 2}))  # below reserved
    producer.flush()
    wait_stock(worker, sku, version=7)

    doc = wait_published(ns, worker, sku, 7)
    assert doc["ok"] is True
    assert (doc["sku"], doc["first_version"], doc["last_version"]) == (sku, 1, 7)
    assert doc["partition"] == partition_for(sku.encode(), ns.partitions)
    assert (doc["gaps"], doc["conflicts"], doc["start_truncated"]) == ([], [], False)
    changes = [r for r in doc["records"] if r["type"] == "StockChanged"]
    assert [c["version"] for c in changes] == list(range(1, 8))
    assert [c["cause_type"] for c in changes] == [
        "RestockReceived",
        "ReserveStock",
        "ReserveStock",
        "CommitReservation",
        "ReleaseReservation",
        "ReserveStock",
        "StockCounted",
    ]
    assert [c["cause_event_id"] for c in changes] == eids
    assert [c["order_id"] for c in changes] == ["", "aud-a", "aud-b", "aud-a", "aud-b", "aud-c", ""]
    assert [c["channel"] for c in changes] == [
        "erp",
        "web",
        "mobile",
        "web",
        "mobile",
        "store",
        "warehouse",
    ]
    assert [(c["on_hand"], c["reserved"], c["safety_stock"], c["available"]) for c in changes] == [
        (10, 0, 0, 10),
        (10, 3, 0, 7),
        (10, 5, 0, 5),
        (7, 2, 0, 5),
        (7, 0, 0, 7),
        (7, 4, 0, 3),
        (2, 4, 0, 0),
    ]
    assert all(c["time"].endswith("Z") and c["processed_at"] > 0 for c in changes)
    # the shortfall sits right after the count that caused it
    assert [r["type"] for r in doc["records"]][-2:] == ["StockChanged", "StockShortfall"]
    short = doc["records"][-1]
    assert (short["counted"], short["reserved"], short["shortfall"], short["version"]) == (
        2,
        4,
        2,
        7,
    )
    assert short["cause_event_id"] == eids[-1]
    assert doc["shortfalls"] == 1
    # available (0), 10, 7, 5, 5, 7, 3, 0 crosses the threshold 5 at versions 1, 3, 5 and 6
    crossings = [
        (r["version"], r["direction"], r["available"])
        for r in doc["records"]
        if r["type"] == "LowStockCrossed"
    ]
    assert crossings == [(1, "up", 10), (3, "down", 5), (5, "up", 7), (6, "down", 3)]
    assert doc["anomalies"] == []

    # the human table says the same
    proc = run_audit(ns, worker, sku)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"SKU {sku} - topic {ns.settings.stock_changes_topic} partition")
    assert any("aud-c" in line and "store" in line and "ReserveStock" in line for line in lines)
    assert any("! shortfall: counted 2, reserved 4, short by 2" in line for line in lines)
    assert any("~ low stock up: available 7, threshold 5" in line for line in lines)
    assert lines[-1].startswith(f"summary: {sku}: 7 versions (1..7), ")
    assert "1 shortfall, 4 low-stock crossings, 0 gaps, 0 conflicts" in lines[-1]
    assert lines[-1].endswith("-> chain OK")

    # --since shows the later records only
    since = str(changes[4]["processed_at"])
    _, later = audit_json(ns, worker, sku, "--since", since)
    assert [r.get("version") for r in later["records"] if r["type"] == "StockChanged"][0] <= 5
    assert later["records"][-1]["type"] == "StockShortfall"
    assert later["first_version"] == 1 and later["ok"] is True


def forge(ns: Namespace, sku: str, versions: list[dict[str, Any]]) -> None:
    """Publish StockChanged records for ``sku`` as the relay would (same key, same partition)."""
    codec = codec_from_settings(ns.settings)
    topic = ns.settings.stock_changes_topic
    partition = partition_for(sku.encode(), ns.partitions)
    p = Producer(confluent_config(ns.settings, acks="all"))
    for v in versions:
        p.produce(
            topic, key=sku.encode(), value=codec.encode("StockChanged", v), partition=partition
        )
    assert p.flush(30) == 0


def change(sku: str, version: int, **fields: Any) -> dict[str, Any]:
    now = int(time.time() * 1000)
    value = {
        "sku": sku,
        "version": version,
        "on_hand": 10,
        "reserved": 0,
        "safety_stock": 0,
        "available": 10,
        "cause_type": "RestockReceived",
        "cause_event_id": f"forged-{sku}-{version}",
        "order_id": "",
        "channel": "test",
        "occurred_at": now,
        "processed_at": now,
    }
    value.update(fields)
    return value


def test_forged_gap_exits_1_and_names_the_missing_version(ns, worker):
    sku = f"AUD-GAP-{uuid.uuid4().hex[:6]}"
    v1, v2 = change(sku, 1), change(sku, 2, on_hand=12, available=12)
    forge(ns, sku, [v1, v2, v2, change(sku, 4, on_hand=15, available=15)])  # N=2, then N+2
    rc, doc = audit_json(ns, worker, sku)
    assert rc == 1
    assert doc["ok"] is False
    assert doc["gaps"] == [{"from": 3, "to": 3, "count": 1}]
    assert (doc["duplicates"], doc["conflicts"]) == (1, [])
    assert (doc["first_version"], doc["last_version"]) == (1, 4)
    assert [(r["version"], r["resent"]) for r in doc["records"]] == [(1, 0), (2, 1), (4, 0)]
    proc = run_audit(ns, worker, sku)
    assert proc.returncode == 1
    assert "-- gap: version 3 missing --" in proc.stdout
    assert proc.stdout.splitlines()[-1].endswith("-> chain BROKEN")
    assert "1 gap (missing 3)" in proc.stdout


def test_forged_conflict_exits_1(ns, worker):
    sku = f"AUD-CONFLICT-{uuid.uuid4().hex[:6]}"
    forge(ns, sku, [change(sku, 1), change(sku, 2), change(sku, 2, on_hand=99, available=99)])
    rc, doc = audit_json(ns, worker, sku)
    assert rc == 1
    assert doc["gaps"] == []
    assert [(c["version"], c["fields"]) for c in doc["conflicts"]] == [
        (2, ["available", "on_hand"])
    ]


def test_unknown_sku_exits_2(ns, worker):
    proc = run_audit(ns, worker, "AUD-NEVER-SEEN")
    assert proc.returncode == 2
    assert "no record of SKU 'AUD-NEVER-SEEN'" in proc.stderr
    assert run_audit(ns, worker, "").returncode == 2


def test_start_cut_by_retention_is_not_a_gap(kafka):
    """Kafka's DeleteRecords moves the log start offset as retention does."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    ns = Namespace.fresh("audit-trunc", partitions=2)
    with CommandProducer(ns.settings):  # creates the namespace's topics
        pass
    sku = "AUD-TRUNC"
    forge(ns, sku, [change(sku, v) for v in (1, 2, 3, 4)])
    topic = ns.settings.stock_changes_topic
    partition = partition_for(sku.encode(), ns.partitions)
    admin = AdminClient(confluent_config(ns.settings))
    futures = admin.delete_records([TopicPartition(topic, partition, 2)])  # versions 1 and 2
    for fut in futures.values():
        fut.result(30)
    env = ns.env(0, REPO / "test-output" / ns.name)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.audit", sku, "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(proc.stdout)
    assert (doc["log_start_offset"], doc["first_version"], doc["last_version"]) == (2, 3, 4)
    assert (doc["start_truncated"], doc["gaps"], doc["ok"]) == (True, [], True)
    text = subprocess.run(
        [sys.executable, "-m", "pipeline.audit", sku],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    ).stdout
    assert "-- versions before 3 removed by retention (log start offset 2) --" in text


def _is_banner(line: str) -> bool:
    # the harness's start marker and Faust's startup banner (printed by the CLI, not logged)
    return not line.strip() or line.startswith(("=====", "+", "|", "┌", "│", "└", "├"))


def test_worker_log_lines_are_json_with_the_command_ids(ns, worker, producer):
    """Needs pipeline/app.py to pass pipeline.logs.faust_logging_config to the App."""
    sku = "AUD-LOG"
    producer.send("RestockReceived", {"sku": sku, "qty": 5})
    producer.flush()
    wait_stock(worker, sku, on_hand=5)
    producer.send("ReserveStock", {"order_id": "aud-log", "sku": sku, "qty": 3})
    producer.flush()
    wait_stock(worker, sku, reserved=3)
    count_id = producer.send("StockCounted", {"sku": sku, "on_hand": 1})
    producer.flush()
    wait_stock(worker, sku, on_hand=1)

    def parsed() -> list[dict[str, Any]]:
        lines = worker.log_path.read_text(errors="replace").splitlines()
        other = [line for line in lines if not _is_banner(line) and not line.startswith("{")]
        assert not other, f"non-JSON log lines, e.g. {other[:3]}"
        return [json.loads(line) for line in lines if line.startswith("{")]

    wait_for(
        lambda: any(r.get("event_id") == count_id for r in parsed()), 30, "the shortfall log line"
    )
    records = parsed()
    assert len(records) > 20
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)
    assert {r["level"] for r in records} <= {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
    assert any(r["logger"].startswith("faust.") for r in records)
    shortfall = next(r for r in records if r.get("event_id") == count_id)
    assert (shortfall["level"], shortfall["logger"], shortfall["sku"]) == (
        "WARNING",
        "inventory.agents",
        sku,
    )
    assert "counted 1 below reserved 3" in shortfall["message"]
