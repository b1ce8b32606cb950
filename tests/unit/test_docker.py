"""The Docker files, checked without a Docker engine.

* ``docker/compose.yml`` against the Compose Specification's JSON schema (vendored in
  ``tests/unit/data/compose-spec.json`` from compose-spec/compose-spec, Apache-2.0,
  commit 170098ba07d9, 2026-06-23);
* the worker's command (compose ``command`` and the Dockerfile's ``CMD``, the image
  having no ``ENTRYPOINT``) through Faust's own command-line parser, then through the
  real ``faust`` program with ``--help`` (parses everything, starts nothing);
* a stop grace period long enough for a clean shutdown.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from config.settings import Settings
from unit.deploy_checks import (
    dockerfile_instructions,
    image_command,
    parse_worker_command,
    run_faust_help,
)

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker" / "compose.yml"
SPEC = Path(__file__).resolve().parent / "data" / "compose-spec.json"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def duration_s(text: str) -> float:
    """A Compose duration (``1m30s``, ``90s``, ``1h``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_the_compose_file_follows_the_compose_specification():
    schema = json.loads(SPEC.read_text())
    jsonschema.validate(compose(), schema, cls=jsonschema.Draft7Validator)


def test_the_specification_check_catches_a_misplaced_key():
    # the vendored schema really checks services (a typo must not pass)
    bad = compose()
    bad["services"]["worker"]["stop_grace_periode"] = "60s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(SPEC.read_text()), cls=jsonschema.Draft7Validator)


def test_compose_runs_the_image_command():
    assert compose()["services"]["worker"]["command"] == image_command()


def test_the_worker_command_parses_with_fausts_cli():
    root, worker = parse_worker_command(image_command())
    assert root["app"] == "pipeline.app"
    assert root["datadir"] == "/data"
    assert worker["web_port"] == 6066


def test_the_old_order_is_what_fausts_parser_refuses():
    # guards the test above: --datadir after the subcommand is the reported failure
    from click.exceptions import NoSuchOption

    with pytest.raises(NoSuchOption, match="--datadir"):
        parse_worker_command(["faust", "-A", "pipeline.app", "worker", "--datadir", "/data"])


def test_the_real_faust_program_accepts_the_worker_command(tmp_path):
    run_faust_help(image_command(), tmp_path)
    assert not (tmp_path / "data").exists() and not (tmp_path / ".data").exists()


def test_the_worker_gets_a_stop_grace_period_for_a_clean_shutdown():
    worker = compose()["services"]["worker"]
    grace = duration_s(str(worker["stop_grace_period"]))
    # Docker's default is 10 s; a clean stop may wait for a batch's transaction to end
    assert grace >= 30
    assert grace > Settings().transaction_timeout_s


def test_the_image_runs_as_a_user_with_the_data_dir_it_is_told():
    instructions = dockerfile_instructions()
    assert ("USER", "app") in instructions
    env = " ".join(a for i, a in instructions if i == "ENV")
    assert "INVENTORY_DATA_DIR=/data" in env
    argv = image_command()
    assert argv[argv.index("--datadir") + 1] == "/data"
