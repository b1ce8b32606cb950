"""Two workers on one host started the way the README says: only ``--datadir`` and
``--web-port`` (no INVENTORY_DATA_DIR, no INVENTORY_WEB_PORT), in a fresh directory
where neither data dir exists yet. Each must create and use its own directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import FAUST, Namespace, Worker, wait_for, wait_stock
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration


class ReadmeWorker(Worker):
    """``faust -A pipeline.app --datadir D worker --web-port P`` run in ``cwd``, nothing else."""

    def __init__(self, ns: Namespace, name: str, cwd: Path, datadir: str) -> None:
        super().__init__(ns, name, data_dir=cwd / datadir)
        self.cwd = cwd
        self.datadir = datadir

    makes_data_dir = False  # the worker must create it

    def command(self) -> list[str]:
        return [str(FAUST), "-A", "pipeline.app", "--datadir", self.datadir, "worker"] + [
            "--web-port",
            str(self.port),
        ]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        for name in ("INVENTORY_DATA_DIR", "INVENTORY_WEB_PORT", "FAUST_DATADIR", "F_DATADIR"):
            env.pop(name, None)
        return env


def ledger_stores(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "ledger").glob("stock-*.db")}


def test_two_workers_with_only_datadir_and_web_port_use_their_own_directories(kafka, tmp_path):
    ns = Namespace.fresh("datadir", partitions=4)
    w1 = ReadmeWorker(ns, "w1", tmp_path, ".data/worker1")
    w2 = ReadmeWorker(ns, "w2", tmp_path, ".data/worker2")
    assert not (tmp_path / ".data").exists()
    skus = [f"DD-{i}" for i in range(16)]
    try:
        w1.start()
        w2.start()
        with CommandProducer(ns.settings) as p:
            for sku in skus:
                p.send("RestockReceived", {"sku": sku, "qty": 7})
        for w in (w1, w2):
            for sku in skus:
                wait_stock(w, sku, on_hand=7)
        # the partitions are split: each worker wrote ledger stores in its own dir only
        wait_for(lambda: ledger_stores(w2.data_dir) != set(), 60, "w2's ledger stores")
        assert ledger_stores(w1.data_dir), os.listdir(w1.data_dir)
        assert (w1.data_dir / "v1" / "tables").is_dir()
        assert (w2.data_dir / "v1" / "tables").is_dir()
        assert not (tmp_path / ".data" / "worker").exists()  # the old default, ignored before
    finally:
        w2.stop()
        w1.stop()
    # each clean shutdown marked its own directory
    assert (w1.data_dir / "clean-shutdown").exists(), w1.tail()
    assert (w2.data_dir / "clean-shutdown").exists(), w2.tail()
