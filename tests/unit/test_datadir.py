"""The worker's data dir: ``faust --datadir`` wins over INVENTORY_DATA_DIR, and is created.

The probe runs the real ``faust`` command line (``tables`` needs no broker) in a fresh
directory, then the app's first-start hook with the topic check stubbed out (no Kafka
here): that is where the worker creates its directories before it opens any table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import Settings

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import asyncio, sys
sys.argv = ["faust", "-A", "pipeline.app", *sys.argv[1:], "tables"]
from faust.cli.faust import cli  # imports faust first, like the faust command
try:
    cli.main(standalone_mode=False)
except SystemExit as exc:
    assert not exc.code, exc.code
import pipeline.app as m
import pipeline.runtime
pipeline.runtime.ensure_topics = lambda cfg: None  # no Kafka in unit tests
asyncio.run(m.app.on_first_start())
print("DATADIR=" + str(m.app.conf.datadir))
print("TABLEDIR=" + str(m.app.conf.tabledir))
"""


def _probe(cwd: Path, *args: str, **env: str) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("INVENTORY_") and k not in ("FAUST_DATADIR", "F_DATADIR")
    }
    base.update(
        PYTHONPATH=str(REPO),
        INVENTORY_KAFKA_BOOTSTRAP="127.0.0.1:1",  # nothing may need it
        **env,
    )
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=cwd,
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(
        line.split("=", 1)
        for line in proc.stdout.splitlines()
        if line.startswith(("DATADIR=", "TABLEDIR="))
    )


def test_the_cli_datadir_wins_and_is_created_with_its_parents(tmp_path):
    out = _probe(tmp_path, "--datadir", "nested/w1", INVENTORY_DATA_DIR="from-env")
    assert out["DATADIR"] == "nested/w1"
    assert (tmp_path / "nested" / "w1").is_dir()
    assert (tmp_path / out["TABLEDIR"]).is_dir()  # Faust's own directories under it
    assert not (tmp_path / "from-env").exists()
    assert not (tmp_path / ".data").exists()


def test_the_cli_datadir_in_equals_form_and_with_the_app_id_expanded(tmp_path):
    out = _probe(tmp_path, "--datadir=d/{conf.id}", INVENTORY_APP_ID="inv-x")
    assert out["DATADIR"] == "d/inv-x"
    assert (tmp_path / "d" / "inv-x").is_dir()


def test_without_the_option_the_environment_then_the_default_apply_on_a_fresh_clone(tmp_path):
    assert _probe(tmp_path, INVENTORY_DATA_DIR="env/dir")["DATADIR"] == "env/dir"
    assert (tmp_path / "env" / "dir").is_dir()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert _probe(fresh)["DATADIR"] == ".data/worker"  # used to be FileNotFoundError
    assert (fresh / ".data" / "worker").is_dir()


@pytest.mark.parametrize("name", ["FAUST_DATADIR", "F_DATADIR"])
def test_settings_take_fausts_datadir_over_inventory_data_dir(name):
    env = {name: "/cli/dir", "INVENTORY_DATA_DIR": "/env/dir"}
    assert Settings.from_env(env).data_dir == Path("/cli/dir")
    assert Settings.from_env({"INVENTORY_DATA_DIR": "/env/dir"}).data_dir == Path("/env/dir")
    assert Settings.from_env({}).data_dir == Path(".data/worker")
