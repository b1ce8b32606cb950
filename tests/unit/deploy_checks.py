"""Helpers shared by the Docker and Kubernetes tests: the Dockerfile's instructions and
its command, and checks of a worker command line through Faust's own command-line
parser and through the real ``faust`` program with ``--help`` (parses everything,
starts nothing)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
FAUST = Path(sys.executable).parent / "faust"
DOCKERFILE = REPO / "docker" / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)  # exec form: a JSON array (shell form would need /bin/sh -c)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), args
    return value


def image_command() -> list[str]:
    instructions = dockerfile_instructions()
    assert not [a for i, a in instructions if i == "ENTRYPOINT"], "CMD is the whole command"
    cmds = [a for i, a in instructions if i == "CMD"]
    assert cmds, "the image has no CMD"
    return exec_form(cmds[-1])  # the last CMD is the one in force


def parse_worker_command(argv: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``faust ... worker ...`` parsed by Faust's click CLI: (global params, worker params).

    Raises click's ``NoSuchOption`` for an option on the wrong side of ``worker``.
    """
    from faust.cli.faust import cli

    assert argv[0] == "faust", argv  # the console script faust-streaming installs
    root = cli.make_context("faust", argv[1:])  # parses, invokes nothing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # click 8.2: protected_args
        rest = [*root.protected_args, *root.args]
    name, command, sub_args = cli.resolve_command(root, rest)
    assert name == "worker", argv
    worker = command.make_context(name, sub_args, parent=root)  # NoSuchOption if misplaced
    return dict(root.params), dict(worker.params)


def run_faust_help(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real ``faust`` program with ``argv`` and ``--help`` appended, in ``cwd``, with no
    INVENTORY_* setting but an unreachable broker; asserts it parsed the line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    env.update(PYTHONPATH=str(REPO), INVENTORY_KAFKA_BOOTSTRAP="127.0.0.1:1")
    # --help at the end: faust parses the whole line, prints the worker's help, starts nothing
    proc = subprocess.run(
        [str(FAUST), *argv[1:], "--help"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, shlex.join(argv) + "\n" + proc.stderr[-2000:]
    assert "No such option" not in proc.stderr
    assert "--web-port" in proc.stdout
    return proc
