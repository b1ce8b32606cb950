"""The local 3-node Kafka cluster (``scripts/stack.sh cluster-up``) for tests.

:func:`cluster_settings` are the settings of a namespace on it, with the production
durability values: replication factor 3, min.insync.replicas 2 (acks=all: every write
is on at least two brokers before it is acknowledged), one standby replica of Faust's
tables. :func:`partition_leaders` tells which broker leads a partition of each topic,
:func:`kill_node` / :func:`start_node` crash a broker (SIGKILL) and bring it back.

The cluster lives beside the shared single broker (ports 19092-19094, controllers
19192-19194, files in ``$STACK_DIR/cluster``), so it never disturbs 9092.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import replace

from confluent_kafka.admin import AdminClient

from config.settings import Settings
from config.settings import settings as base_settings
from harness import REPO

STACK = REPO / "scripts" / "stack.sh"
NODES = (1, 2, 3)
# the production values: 3 replicas, 2 in sync for an acks=all write, 1 standby
REPLICATION_FACTOR = 3
MIN_INSYNC_REPLICAS = 2
STANDBY_REPLICAS = 1


def stack(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """``scripts/stack.sh ARGS`` (with the caller's STACK_DIR / KAFKA_LIBS); raises on
    failure with its output."""
    proc = subprocess.run(
        [str(STACK), *args], capture_output=True, text=True, timeout=timeout, env=os.environ
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"scripts/stack.sh {' '.join(args)} failed rc={proc.returncode}:\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def bootstrap() -> str:
    return stack("cluster-bootstrap").stdout.strip()


def cluster_running() -> bool:
    return (
        subprocess.run(
            [str(STACK), "cluster-status"], capture_output=True, timeout=60, env=os.environ
        ).returncode
        == 0
    )


def cluster_settings(servers: str | None = None) -> Settings:
    """The settings of a namespace on the cluster (production durability values)."""
    return replace(
        base_settings,
        kafka_bootstrap=servers or bootstrap(),
        kafka_security_protocol="PLAINTEXT",
        replication_factor=REPLICATION_FACTOR,
        min_insync_replicas=MIN_INSYNC_REPLICAS,
        table_standby_replicas=STANDBY_REPLICAS,
    )


def kill_node(node: int) -> None:
    """SIGKILL one broker (no shutdown: a crash)."""
    stack("cluster-kill", str(node), timeout=60)


def start_node(node: int) -> float:
    """Start a node that is down and wait until it answers; returns the seconds it took."""
    t0 = time.monotonic()
    stack("cluster-up", str(node), timeout=300)
    return time.monotonic() - t0


def _admin(s: Settings) -> AdminClient:
    # log_level 2: not the "connection refused" of the broker a test just killed
    return AdminClient({"bootstrap.servers": s.kafka_bootstrap, "log_level": 2})


def partition_leaders(s: Settings, topics: list[str], partition: int) -> dict[str, int]:
    """The broker id (= node number) leading ``partition`` of each topic (-1: none)."""
    meta = _admin(s).list_topics(timeout=20)
    out: dict[str, int] = {}
    for t in topics:
        tm = meta.topics.get(t)
        if tm is None or tm.error is not None or partition not in tm.partitions:
            continue
        out[t] = tm.partitions[partition].leader
    return out


def under_replicated(s: Settings, prefixes: tuple[str, ...]) -> list[str]:
    """``topic[p]`` of every partition (of the topics starting with a prefix, and
    Kafka's internal offsets and transaction topics) whose ISR lacks a replica."""
    meta = _admin(s).list_topics(timeout=20)
    out = []
    for name, tm in meta.topics.items():
        if not (name.startswith(prefixes) or name.startswith("__")):
            continue
        for p, pm in tm.partitions.items():
            if len(pm.isrs) < len(pm.replicas):
                out.append(f"{name}[{p}]")
    return sorted(out)


def wait_in_sync(s: Settings, prefixes: tuple[str, ...], timeout: float = 120.0) -> float:
    """Until every replica of those topics is back in sync; returns the seconds it took."""
    t0 = time.monotonic()
    lagging: list[str] = []
    while time.monotonic() - t0 < timeout:
        try:
            lagging = under_replicated(s, prefixes)
        except Exception as exc:  # noqa: BLE001 - metadata during a leader change: retry
            lagging = [f"(metadata: {exc})"]
        if not lagging:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise AssertionError(f"replicas not back in sync after {timeout:.0f}s: {lagging[:10]}")
