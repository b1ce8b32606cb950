"""kill -9 a worker mid-stream, again and again, then check the invariants exactly.

A producer thread streams restocks, reserves, commits and releases over a few
SKUs (some commands sent twice, as a retrying producer would) while the worker
is killed with SIGKILL at random moments and restarted. Afterwards:

* conservation: on_hand = restocked - committed units (from the answers);
* no oversell: reserved <= on_hand, and reserved = units of orders still open;
* exactly-once: every order's non-duplicate answers agree, nothing applied twice;
* versions: each SKU's StockChanged versions are 1..V without a gap and the
  table's version is V; a re-sent version carries identical numbers; after every
  kill the committed changelog's own version chain is audited (no gap, no version
  written twice, each SKU record's state at its last effect's version).
"""

from __future__ import annotations

import os
import random
import time

import pytest

from crashload import SKUS, Workload, audit_changelog, check_invariants
from harness import Namespace, Worker, wait_for

pytestmark = pytest.mark.integration


def run_kill_rounds(rounds: int, commands: int, seed: int) -> dict[str, int]:
    ns = Namespace.fresh("crash", partitions=4)
    worker = Worker(ns).start()
    rng = random.Random(seed)
    load = Workload(ns, commands, seed)
    load.start()
    kills = 0
    mid_stream = 0
    try:
        for _ in range(rounds):
            time.sleep(rng.uniform(0.5, 2.5))
            worker.kill()
            kills += 1
            mid_stream += load.is_alive()
            worker.start()
            # what every round left in the changelog: a version chain without gap or fork
            # (after the start: the new owner aborts the killed worker's open transaction)
            audit_changelog(ns.settings)
        time.sleep(0.5)
        load.stop.set()
        load.join(600)
        assert load.error is None, load.error
        assert not load.is_alive(), "workload did not finish"

        def settled() -> bool:
            return all(worker.get_json(f"/stock/{sku}")[0] == 200 for sku in SKUS)

        wait_for(settled, 60, "every SKU to be known")
        stats = check_invariants(ns, worker, load)
        stats["kills"] = kills
        stats["kills_while_producing"] = mid_stream
        print(f"\nkill -9 rounds: {stats}")
        return stats
    finally:
        worker.stop()


def test_kill_9_mid_stream_keeps_every_invariant(kafka):
    stats = run_kill_rounds(rounds=5, commands=200_000, seed=7)
    assert stats["kills"] == 5
    assert stats["kills_while_producing"] == 5, "the stream ended before the kills: no proof"


@pytest.mark.slow
def test_many_rounds(kafka):
    """Not in `make test` (marked slow); run with `make kill-rounds ROUNDS=N`."""
    rounds = int(os.environ.get("KILL_ROUNDS", "50"))
    stats = run_kill_rounds(rounds=rounds, commands=10_000_000, seed=rounds)
    assert stats["kills"] == rounds
    assert stats["kills_while_producing"] == rounds
