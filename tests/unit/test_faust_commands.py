"""Faust's own commands on this app: ``faust -A pipeline.app agents`` and ``tables``.

Run as the real program with Kafka pointed at a closed port: listing needs no broker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FAUST = Path(sys.executable).parent / "faust"


def faust(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    env.update(
        PYTHONPATH=str(REPO),
        INVENTORY_KAFKA_BOOTSTRAP="127.0.0.1:1",
        INVENTORY_TOPIC_PREFIX="t.",
    )
    return subprocess.run(
        [str(FAUST), "-A", "pipeline.app", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_agents_lists_both_agents_with_every_topic_they_read(tmp_path):
    proc = faust(tmp_path, "--json", "agents")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert set(rows) == {"@agents.orders.order_saga", "@agents.stock.ledger"}
    saga, ledger = rows["@agents.orders.order_saga"], rows["@agents.stock.ledger"]
    assert saga["topic"] == "t.checkouts, t.order-line-results"
    assert ledger["topic"] == "t.orders, t.returns, t.restocks"
    assert saga["help"] and saga["help"] != "<N/A>"
    assert ledger["help"] and ledger["help"] != "<N/A>"


@pytest.mark.parametrize("args", [("agents",), ("agents", "--local")])
def test_agents_as_a_table_for_people(tmp_path, args):
    proc = faust(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "@agents.orders.order_saga" in proc.stdout and "@agents.stock.ledger" in proc.stdout


def test_tables_describes_every_table(tmp_path):
    proc = faust(tmp_path, "--json", "tables")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [r["name"] for r in rows] == ["orders"]  # the ledger keeps its own RocksDB store
    for row in rows:
        assert row["help"] and "Missing description" not in row["help"]
    text = faust(tmp_path, "tables")
    assert text.returncode == 0 and "Missing description" not in text.stdout
