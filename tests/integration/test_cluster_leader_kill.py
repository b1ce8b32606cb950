"""A real Kafka cluster: the leader of the hot SKU's partition dies mid-sale.

On the local 3-node KRaft cluster (``scripts/stack.sh cluster-up``; the fixture starts
it when it is down) with the production durability settings, replication factor 3,
``min.insync.replicas`` 2 (every producer writes with acks=all) and 1 standby replica,
two workers run the chaos flash sale (tests/chaos/chaos.py and chaos_workload.py: concurrent shoppers,
reserves, checkouts, abandoned carts that must expire, producer re-sends, client
retries). Mid-sale the broker that leads the hot SKU's partition of the ledger's
changelog (the ledger commits that SKU's state there in transactions; the node usually
leads that partition of inputs and results too) is killed with SIGKILL, kept down
until that leadership has moved to another in-sync replica (past the cluster's 6 s
broker session timeout) and at least 7-10 s, then started again.

Then, over every SKU: I1..I6 of DESIGN.md section 4 (no oversell, conservation, every
command applied exactly once: 0 lost, 0 double-applied, versions 1..V without a gap,
projections converged, every order answered and closed) and the committed changelog's
own version chain (crashload.audit_changelog). No worker may die or hang on the way.

Marked ``cluster`` (not in plain ``make test``): ``make cluster-test``, about 2 minutes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "chaos"))

import chaos  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


def test_leader_of_hot_partition_killed_mid_sale(kafka_cluster, redis_service, opensearch):
    seed = int(os.environ.get("CHAOS_SEED", "14"))
    cfg = chaos.ChaosConfig(
        rounds=2,
        seed=seed,
        plan=[["leader_kill"], ["leader_kill", "dupes"]],
        traffic_s=14.0,
        # the kill lands 3-5 s into the 14 s sale; the sale goes on against the new leaders
        fault_window=(0.2, 0.35),
        cluster=True,
        audit_changelog=True,
    )
    run = chaos.ChaosRun(cfg)
    try:
        results = run.run()
    finally:
        print(chaos.format_table(run.results))
    assert len(results) == cfg.rounds
    bad = [r for r in results if not r.ok]
    assert not bad, "invariant violations:\n" + chaos.violation_report(results)
    kills = [f for r in results for f in r.faults if f.kind == "leader_kill"]
    assert len(kills) == 2 and all(f.error is None for f in kills), [f.error for f in kills]
    for r in results:
        sale_start, sale_end = r.stats["traffic"]
        for f in r.faults:
            if f.kind == "leader_kill":
                assert sale_start < f.start < sale_end, "the leader was not killed mid-sale"
    # a worker that died or hung because one broker of three went away is a failure too
    assert not run.incidents, "incidents:\n" + "\n".join(run.incidents)
    assert all(r.stats.get("changelog_skus", 0) > 0 for r in results), [r.stats for r in results]
    assert sum(r.commands for r in results) > 500, "too little traffic to prove anything"
