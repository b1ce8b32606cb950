"""``make chaos``: N rounds of flash sales under random faults, invariants I1..I6 checked.

    .venv/bin/python tests/chaos/run_chaos.py --rounds 10 [--seed 7] [--faults kill9,dupes]
    .venv/bin/python -m tests.chaos.run_chaos --rounds 3        (from the repository root)
    .venv/bin/python tests/chaos/run_chaos.py --cluster --rounds 5   (the 3-node cluster)

--cluster runs against the local 3-node Kafka cluster (scripts/stack.sh cluster-up; started
here if it is down) with replication factor 3, min.insync.replicas 2 and 1 standby
replica: its broker fault is ``leader_kill`` (SIGKILL the leader of the hot SKU's
partition, restart it) instead of ``broker`` (a restart of the single broker), and each
round also audits the changelog's version chain.

Environment: CHAOS_ROUNDS and CHAOS_SEED give the defaults of --rounds and --seed,
CHAOS_CLUSTER=1 the default of --cluster.
Exit status 0 when every round had 0 violations, 1 otherwise (details printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent, HERE.parent.parent):  # chaos.py, harness/faults, the repo
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import chaos  # noqa: E402
import cluster  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("CHAOS_ROUNDS", "10")))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED") or time.time()))
    ap.add_argument("--traffic-s", type=float, default=chaos.ChaosConfig.traffic_s)
    ap.add_argument("--rate", type=float, default=chaos.ChaosConfig.rate)
    ap.add_argument("--broker-restarts", type=int, default=chaos.ChaosConfig.broker_restarts)
    ap.add_argument(
        "--broker-down-s",
        type=float,
        default=float(os.environ.get("CHAOS_BROKER_DOWN_S") or 0),
        help="keep the stopped broker down this many seconds (default 0.5-2 s, random)",
    )
    ap.add_argument(
        "--cluster",
        action="store_true",
        default=os.environ.get("CHAOS_CLUSTER", "") not in ("", "0"),
        help="run on the local 3-node Kafka cluster (RF 3, min ISR 2); fault leader_kill",
    )
    ap.add_argument(
        "--faults",
        default="",
        help="comma-separated faults for every round instead of a random choice "
        f"(from {', '.join(chaos.FAULT_KINDS)}); '+' separates rounds: kill9,redis+broker",
    )
    args = ap.parse_args(argv)
    plan = None
    if args.faults:
        plan = [[k for k in r.split(",") if k] for r in args.faults.split("+")]
        bad = {k for r in plan for k in r} - set(chaos.FAULT_KINDS)
        if bad:
            ap.error(f"unknown faults {sorted(bad)}")
        asked = {k for r in plan for k in r}
        if args.cluster and asked & set(chaos.SINGLE_BROKER_ONLY):
            ap.error("fault broker restarts the single broker: not with --cluster (leader_kill)")
        if not args.cluster and asked & set(chaos.CLUSTER_ONLY):
            ap.error("fault leader_kill kills a node of the 3-node cluster: needs --cluster")
    if args.cluster and not cluster.cluster_running():
        print("chaos: starting the 3-node cluster (scripts/stack.sh cluster-up)", flush=True)
        cluster.stack("cluster-up", timeout=600)
    cfg = chaos.ChaosConfig(
        rounds=args.rounds,
        seed=args.seed,
        traffic_s=args.traffic_s,
        rate=args.rate,
        broker_restarts=args.broker_restarts,
        **({"broker_down_s": (args.broker_down_s,) * 2} if args.broker_down_s else {}),
        plan=plan,
        cluster=args.cluster,
        audit_changelog=args.cluster,
    )
    print(f"chaos: {cfg.rounds} rounds, seed {cfg.seed}, plan {chaos.round_plan(cfg)}", flush=True)
    results = chaos.run_chaos(cfg, log=lambda m: print(m, flush=True))
    bad = [r for r in results if not r.ok]
    if bad:
        print("\nVIOLATIONS\n" + chaos.violation_report(results), flush=True)
        return 1
    print(f"\nchaos: {len(results)} rounds, 0 violations (seed {cfg.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
