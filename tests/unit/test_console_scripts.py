"""Every tool has a console script (setup.cfg) and a ``--help`` that starts nothing.

Kafka, Redis and OpenSearch all point at one listening socket of this test: a tool
that connected anywhere while printing its help would show up as a connection.
"""

from __future__ import annotations

import configparser
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# modules with a __main__ block that are not tools (a manual demo of the JSON log format)
NOT_TOOLS = {"pipeline.logs"}


def console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(
        (name.strip(), target.strip()) for name, target in (ln.split("=", 1) for ln in lines)
    )


SCRIPTS = console_scripts()


def tool_modules() -> set[str]:
    found = set()
    for path in (REPO / "pipeline").rglob("*.py"):
        if re.search(r"^if __name__ == .__main__.:", path.read_text(), re.M):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            found.add(module.removesuffix(".__main__"))
    return found - NOT_TOOLS


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        s.setblocking(False)
        yield s


def run_help(argv: list[str], listener: socket.socket) -> subprocess.CompletedProcess[str]:
    port = listener.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    env.update(
        PYTHONPATH=str(REPO),
        INVENTORY_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}",
        INVENTORY_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        INVENTORY_OPENSEARCH_URL=f"http://127.0.0.1:{port}",
        INVENTORY_SCHEMA_REGISTRY_URL=f"http://127.0.0.1:{port}",
        INVENTORY_METRICS_PORT=str(port),  # a tool that served /metrics would fail to bind
        INVENTORY_AUDITOR_METRICS_PORT=str(port),
    )
    proc = subprocess.run(
        [*argv, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30
    )
    try:
        conn, peer = listener.accept()
    except BlockingIOError:
        pass
    else:
        conn.close()
        raise AssertionError(f"{argv} connected to {peer} while printing its help")
    return proc


def test_every_tool_has_a_console_script():
    modules = {target.split(":")[0].removesuffix(".__main__") for target in SCRIPTS.values()}
    assert tool_modules() <= modules, tool_modules() - modules
    assert {"produce", "audit", "rebuild", "relay", "sinks"} <= {
        n.removeprefix("inventory-") for n in SCRIPTS
    }
    assert all(n.startswith("inventory-") for n in SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_console_script_helps_and_starts_nothing(name, listener):
    script = BIN / name
    assert script.exists(), f"{script} missing: pip install -e '.[test]' after editing setup.cfg"
    proc = run_help([str(script)], listener)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {name} "), proc.stdout[:200]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_python_dash_m_works_the_same(name, listener):
    module = SCRIPTS[name].split(":")[0].removesuffix(".__main__")
    proc = run_help([sys.executable, "-m", module], listener)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: python -m {module} "), proc.stdout[:200]


def test_the_listener_does_see_a_tool_that_connects(listener):
    # guards the check above: a process that connects is caught
    code = "import os, socket; socket.create_connection(('127.0.0.1', %d)).close()"
    argv = [sys.executable, "-c", code % listener.getsockname()[1]]
    with pytest.raises(AssertionError, match="connected"):
        run_help(argv, listener)
