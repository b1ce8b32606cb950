"""kill -9 while the broker answers slowly: no command lost, none applied twice.

The worker talks to a broker of the test's own through a proxy that holds every
byte the broker sends back for a few hundred milliseconds, so each batch spends
most of its life between "changelog records sent" and "transaction committed".
The worker is killed with SIGKILL at random moments and restarted. A commit of
the input offsets must never overtake the changelog records of the inputs below
them: afterwards every command must have taken effect exactly once (the checks
of :mod:`crashload`, plus a version audit of the committed changelog), and each
restart must have been warm (local RocksDB kept, only the last batches re-read).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
import uuid
from dataclasses import dataclass, replace

import pytest

from config.settings import Settings
from crashload import SKUS, Workload, check_invariants
from faults import TcpProxy
from harness import OUT, REPO, Namespace, Worker, free_port, wait_stock

pytestmark = pytest.mark.integration

DELAY_S = 0.25


@pytest.fixture(scope="module")
def slow_broker(kafka):
    root = OUT / f"slowbroker-{uuid.uuid4().hex[:6]}"
    stack = root / "stack"
    stack.mkdir(parents=True)
    libs = REPO / ".stack" / "kafka-libs"
    if libs.is_dir():  # reuse the jars the main stack fetched
        (stack / "kafka-libs").symlink_to(libs)
    fast, slow, ctl = free_port(), free_port(), free_port()
    proxy = TcpProxy("127.0.0.1", slow, delay_s=DELAY_S).start()
    extra = root / "slow.properties"
    extra.write_text(
        "\n".join(
            [
                f"listeners=PLAINTEXT://127.0.0.1:{fast},CONTROLLER://127.0.0.1:{ctl},"
                f"SLOW://127.0.0.1:{slow}",
                # clients of the SLOW listener are told to connect through the proxy
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{fast},SLOW://127.0.0.1:{proxy.port}",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,"
                "SLOW:PLAINTEXT",
                "",
            ]
        )
    )
    env = dict(
        os.environ,
        STACK_DIR=str(stack),
        STACK_SERVICES="kafka",
        KAFKA_PORT=str(fast),
        KAFKA_CONTROLLER_PORT=str(ctl),
        KAFKA_EXTRA_CONFIG=str(extra),
    )
    up = subprocess.run(
        [str(REPO / "scripts" / "stack.sh"), "up", "kafka"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if up.returncode != 0:
        proxy.close()
        pytest.fail(f"slow broker did not start:\n{up.stdout}\n{up.stderr}", pytrace=False)
    yield {"fast": f"127.0.0.1:{fast}", "slow": f"127.0.0.1:{proxy.port}"}
    proxy.close()
    subprocess.run(
        [str(REPO / "scripts" / "stack.sh"), "down", "kafka"], env=env, timeout=120, check=False
    )


@dataclass
class BrokerNamespace(Namespace):
    """A namespace on another broker: the test's clients use ``fast``, workers ``slow``."""

    fast: str = ""

    @property
    def settings(self) -> Settings:
        return replace(super().settings, kafka_bootstrap=self.fast)


def partition_starts(worker: Worker) -> list[list[tuple[int, int]]]:
    """Per worker start: (changelog offset local RocksDB had, records re-read) of each
    partition taking ownership."""
    text = worker.log_path.read_text(errors="replace")
    return [
        [
            (int(a), int(n))
            for a, n in re.findall(r"ready: changelog @(\d+) -> @\d+ \((\d+) records\)", part)
        ]
        for part in text.split("===== start #")[1:]
    ]


def test_kill_9_while_produce_answers_are_slow_applies_every_command_once(slow_broker):
    ns = BrokerNamespace(
        f"slow-{uuid.uuid4().hex[:8]}",
        4,
        {"INVENTORY_KAFKA_BOOTSTRAP": slow_broker["slow"], "INVENTORY_SINK_ENABLED": "0"},
        fast=slow_broker["fast"],
    )
    worker = Worker(ns).start(timeout=180)
    rng = random.Random(12)
    load = Workload(ns, 200_000, seed=12)
    load.pause = 0.5
    load.start()
    kills = 0
    try:
        for _ in range(3):
            time.sleep(rng.uniform(2.0, 6.0))
            worker.kill()
            kills += 1
            assert load.is_alive(), "the stream ended before the kills: no proof"
            worker.start(timeout=180)
        time.sleep(1.0)
        load.stop.set()
        load.join(600)
        assert load.error is None, load.error
        for sku in SKUS:  # every SKU known (an answer may wait for the slow broker)
            wait_stock(worker, sku, timeout=120)
        stats = check_invariants(ns, worker, load)
        print(f"\nslow-broker kill -9 rounds: kills={kills} {stats}")
        starts = partition_starts(worker)
        assert len(starts) == kills + 1, starts
        # after a kill, each partition resumes from the offset its RocksDB kept: it re-reads
        # only what the killed worker committed but had not stored yet (one batch, at
        # most a batch per SKU record plus its reservations), never the whole changelog
        restarted = [s for start in starts[1:] for s in start]
        assert restarted and any(at > 0 for at, _ in restarted), starts
        batch_records = 2 * 500 + 10
        assert all(n <= batch_records for _, n in restarted), starts
    finally:
        worker.stop()
