"""Chaos rounds: flash sales under random faults, checked against invariants I1..I6.

One run = one namespace (topics, app id), two workers, a private redis-server
(append-only, so a stop/start keeps its data), a TCP proxy in front of the
shared OpenSearch node and an index of its own. Each round:

1. restocks a fresh set of SKUs (a few hot ones with little stock, a few cold
   ones with plenty), then several concurrent "shopper" threads (each with its
   own idempotent producer) run a flash sale: reserves, checkouts (commit or
   release after a think time, some committed blindly right after the
   reserve), abandoned carts with a short TTL that must EXPIRE, late payments
   after the expiry, restocks, immediate producer re-sends of the same
   event_id, and client retries of commands not answered within a few seconds;
2. injects the round's faults at random moments while traffic flows, each in
   its own thread (they may overlap): ``kill9`` (SIGKILL a worker, restart it:
   two rebalances), ``broker`` (``scripts/stack.sh down kafka`` then ``up
   kafka``; a worker that dies or hangs because of it is recorded as an
   incident and restarted), ``leader_kill`` (on the 3-node cluster only,
   ``ChaosConfig.cluster``: SIGKILL the broker that leads the hot SKU's partition,
   restart it once that leadership has moved, wait until every replica is in sync),
   ``redis`` (the private redis-server stopped, then
   started), ``search_refuse`` / ``search_blackhole`` (the OpenSearch proxy
   refuses connections or accepts and never answers), ``dupes`` (a burst of
   verbatim re-sends of commands that were already answered, from any round);
3. once traffic stops: waits until every checkout is closed, every abandoned
   cart expired and every command answered, then checks I1..I6 (DESIGN.md
   section 4) over *every* SKU of the run so far, from the table (``GET
   /stock/{sku}`` on both workers), the stock-changes, reservation-results and
   dead-letters topics (tailed from offset 0 by a consumer of our own), the
   private Redis and the search index, and the projection versions sampled
   while the round ran. See :func:`check_invariants` for the exact rules.

Expiry bound (I6): an abandoned reservation must be EXPIRED by the pipeline
no later than ``expires_at + expiry_slack_s`` (10 s: the 0.5 s sweep interval
of these workers, the sweeper's 5 s re-send delay if its first command is
lost, and processing lag on a loaded 2-core machine; measured without
disruption it stays under about 4 s), plus the length of every disruption
that overlaps the time between its expiry and its EXPIRED change. A
disruption (kill -9, broker restart) lasts from the fault until both workers
are healthy *and* every order command sent since the fault began has been
answered: the backlog it left behind is processed. It must never expire early
(the expiring command's time is at or after ``expires_at``).

Each violation is counted in the round where it first shows (the checks cover
every SKU of the run, so a violation from round 2 would otherwise repeat).
Unanswered commands get a diagnosis: their offsets in the input topic and
whether the table's changelog ever applied them.

CLI: ``tests/chaos/run_chaos.py`` (``make chaos``); tests: ``test_chaos.py``.

This module holds :class:`ChaosRun` (setup, rounds, workers, teardown) and
:func:`run_chaos`, and re-exports the names its users import; the rest lives beside
it: ``chaos_plan.py`` (fault kinds, :class:`ChaosConfig`, the round plan, the records),
``chaos_observe.py`` (ledger of what was sent, topic tail, projections),
``chaos_workload.py`` (the shoppers), ``chaos_faults.py`` (the faults, a mixin of
ChaosRun), ``chaos_settle.py`` (settling and checking a round, a mixin),
``chaos_checks.py`` (the invariants I1..I6) and ``chaos_report.py`` (the table).
"""

from __future__ import annotations

import random
import subprocess
import threading
import time
import uuid
from collections.abc import Callable

from confluent_kafka.admin import AdminClient

import cluster
from chaos_checks import LedgerView, check_invariants
from chaos_faults import FaultsMixin
from chaos_observe import (
    Ledger,
    Projections,
    QuietProducer,
    Sampler,
    TopicTail,
    flush,
)
from chaos_plan import (
    CLUSTER_ONLY,
    FAULT_KINDS,
    ORDER_TYPES,
    SINGLE_BROKER_ONLY,
    STACK,
    ChaosConfig,
    FaultRecord,
    OrderInfo,
    RoundResult,
    round_plan,
)
from chaos_report import format_row, format_table, violation_report
from chaos_settle import SettleMixin
from chaos_workload import RoundCtx, Shopper, pick_skus
from config.settings import settings as base
from crashload import audit_changelog
from faults import PrivateRedis, TcpProxy
from harness import OUT, Namespace, Worker, delete_index
from pipeline.clients import confluent_config
from pipeline.kafka.topics import ensure_topics


class ChaosRun(FaultsMixin, SettleMixin):
    def __init__(self, cfg: ChaosConfig, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.log = log
        self.rng = random.Random(cfg.seed)
        self.ledger = Ledger()
        self.results: list[RoundResult] = []
        self.disruptions: list[tuple[float, float]] = []
        self.incidents: list[str] = []
        self.broker_restarted = False
        self.killed_nodes: set[int] = set()  # cluster nodes a leader_kill left down
        self._rnd: RoundCtx | None = None
        self.t0 = time.monotonic()
        self.worker_locks: dict[str, threading.Lock] = {}
        self.workers: list[Worker] = []
        self._round_notes: list[str] = []
        self._current_round = 0
        self.reported: set[str] = set()
        self.given_up: set[str] = set()  # commands reported unanswered: not awaited again
        self.tail_refills: list[str] = []  # re-reads of the output topics and what they found
        self.tag = uuid.uuid4().hex[:8]
        self.index = f"chaos-{self.tag}"

    def say(self, msg: str) -> None:
        self.log(f"[chaos {time.monotonic() - self.t0:7.1f}s] {msg}")

    # -- setup / teardown --------------------------------------------------
    def setup(self) -> None:
        self.redis = PrivateRedis(OUT / f"chaos-redis-{self.tag}").start()
        host, port = base.opensearch_url.rsplit("//", 1)[1].split(":")
        self.proxy = TcpProxy(host, int(port)).start()
        self.ns = Namespace.fresh(
            "chaos",
            partitions=self.cfg.partitions,
            base=cluster.cluster_settings() if self.cfg.cluster else None,
            INVENTORY_REDIS_URL=self.redis.url,
            INVENTORY_OPENSEARCH_URL=f"http://127.0.0.1:{self.proxy.port}",
            INVENTORY_SEARCH_INDEX=self.index,
            INVENTORY_SINK_MAX_BACKOFF_S="2",
            INVENTORY_EXPIRY_SCAN_INTERVAL_S="0.5",
        )
        ensure_topics(self.ns.settings)
        self.workers = [Worker(self.ns, "w1"), Worker(self.ns, "w2")]
        self.worker_locks = {w.name: threading.Lock() for w in self.workers}
        for w in self.workers:
            w.start(wait=False)
        for w in self.workers:
            w.wait_healthy(120)
        self.tail = TopicTail(self.ns.settings)
        self.tail.start()
        self.proj = Projections(self.ns.settings, self.redis.url, self.index)
        self.sampler = Sampler(self.proj)
        self.sampler.start()
        self.say(
            f"namespace {self.ns.name}, workers {[w.url for w in self.workers]}, "
            f"redis {self.redis.url}, index {self.index} via proxy :{self.proxy.port}"
        )

    def teardown(self, success: bool) -> None:
        for closer in (
            lambda: self.sampler.stop_event.set(),
            lambda: self.tail.stop_event.set(),
            *[(lambda w=w: w.stop()) for w in self.workers],
            lambda: self.proxy.close(),
            lambda: self.redis.stop(),
            lambda: delete_index(self.index),
            lambda: self._broker_up_at_end(),
            lambda: self._delete_topics() if success and self.cfg.delete_topics_on_success else 0,
        ):
            try:
                closer()
            except Exception as exc:  # noqa: BLE001 - clean up the rest anyway
                self.say(f"cleanup step failed: {exc}")

    def _broker_up_at_end(self) -> None:
        if self.broker_restarted:
            subprocess.run([str(STACK), "up", "kafka"], capture_output=True, timeout=600)
        for node in sorted(self.killed_nodes):
            cluster.start_node(node)

    def _delete_topics(self) -> None:
        s = self.ns.settings
        admin = AdminClient(confluent_config(s))
        names = [
            t
            for t in admin.list_topics(timeout=30).topics
            if t.startswith(s.topic_prefix) or t.startswith(s.app_id + "-")
        ]
        if names:
            for fut in admin.delete_topics(names, operation_timeout=30).values():
                fut.result(60)
        self.say(f"deleted {len(names)} topics of {self.ns.name}")

    # -- workers -----------------------------------------------------------
    def worker_healthy(self, w: Worker) -> bool:
        return w.proc is not None and w.proc.poll() is None and w.status("/healthz") == 200

    def restart_worker(self, w: Worker, why: str, timeout: float = 180.0) -> None:
        """Start ``w`` and wait until healthy; a start that dies is logged and retried."""
        for attempt in range(3):
            w.start(wait=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if w.proc is not None and w.proc.poll() is not None:
                    break
                if w.status("/healthz") == 200:
                    return
                time.sleep(0.25)
            rc = w.proc.poll() if w.proc is not None else None
            self.incident(
                f"{w.name} restart #{attempt + 1} after {why} "
                + (f"exited rc={rc}" if rc is not None else f"not healthy in {timeout:.0f}s"),
                w,
            )
            w.kill()
        raise AssertionError(f"{w.name} could not be restarted after {why}")

    def incident(self, text: str, w: Worker | None = None) -> None:
        tail = ""
        if w is not None:
            tail = "\n    " + "\n    ".join(w.tail(25).splitlines())
        self.incidents.append(text + tail)
        self._round_notes.append(text)
        self.say(f"INCIDENT: {text}{tail}")

    def wait_workers(self, why: str, timeout: float = 120.0) -> None:
        """Until both workers are healthy; a dead or hung one is recorded and restarted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.worker_healthy(w) for w in self.workers):
                return
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None:
                    lock = self.worker_locks[w.name]
                    if lock.acquire(blocking=False):
                        try:
                            if w.proc.poll() is not None:
                                self.incident(
                                    f"{w.name} exited rc={w.proc.returncode} ({why}); restarted",
                                    w,
                                )
                                self.restart_worker(w, why)
                        finally:
                            lock.release()
            time.sleep(0.25)
        for w in self.workers:
            if not self.worker_healthy(w):
                with self.worker_locks[w.name]:
                    self.incident(f"{w.name} not healthy {timeout:.0f}s after {why}; killed", w)
                    w.kill()
                    self.restart_worker(w, f"hang after {why}")

    def wait_backlog(self, start: float, since: float, timeout: float = 60.0) -> None:
        """Until every order command sent between ``start`` (a disruption began) and
        ``since`` (the workers were healthy again) is answered: the backlog the
        disruption left behind is processed, which ends the disruption's window."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.ledger.lock:
                due = [
                    eid
                    for eid, at in self.ledger.sent_at.items()
                    if start - 5 <= at < since
                    and self.ledger.commands[eid][0] in ORDER_TYPES
                    and eid not in self.given_up
                ]
            if all(self.tail.answers(eid) for eid in due):
                return
            time.sleep(0.5)
        self.say(f"backlog of commands sent before the recovery not answered in {timeout:.0f}s")

    # -- rounds ------------------------------------------------------------
    def run(self) -> list[RoundResult]:
        plan = round_plan(self.cfg)
        ok = False
        try:
            self.setup()
            for n, kinds in enumerate(plan, start=1):
                res = self.round(n, kinds)
                self.results.append(res)
                self.say(format_row(res))
                self.say(f"round {n} stats: {res.stats}")
                for inv, items in res.violations.items():
                    for item in items[:10]:
                        self.say(f"  VIOLATION {inv}: {item}")
            ok = all(r.ok for r in self.results)
            return self.results
        finally:
            self.teardown(success=ok)

    def round(self, n: int, kinds: list[str]) -> RoundResult:
        cfg = self.cfg
        started = time.monotonic()
        self._round_notes = []
        self._current_round = n
        rng = random.Random(self.rng.randrange(1 << 30))
        prefix = f"R{n}"
        rnd = RoundCtx(
            n,
            prefix,
            pick_skus(f"{prefix}-HOT", cfg.hot_skus, cfg.partitions, 0),
            pick_skus(f"{prefix}-COLD", cfg.cold_skus, cfg.partitions, cfg.hot_skus),
        )
        for sku in rnd.skus:
            self.ledger.sku_round[sku] = n
        old = [s for s in self.ledger.sku_round if s not in rnd.skus]
        self.sampler.skus = rnd.skus + rng.sample(old, min(2, len(old)))
        self._rnd = rnd
        self.say(f"round {n}: faults {kinds}; hot {rnd.hot}, cold {rnd.cold}")

        p = QuietProducer(self.ns.settings, on_delivery=self.ledger.on_delivery)
        for sku in rnd.skus:
            qty = cfg.hot_units if sku in rnd.hot else cfg.cold_units
            eid = f"init-{sku}"
            self.ledger.add_restock(eid, sku, qty)
            self.ledger.send(p, "RestockReceived", {"sku": sku, "qty": qty, "event_id": eid}, n)
        flush(p, self.ledger)

        shoppers = [Shopper(self, rnd, i, rng.randrange(1 << 30)) for i in range(cfg.shoppers)]
        faults = [FaultRecord(k) for k in kinds]
        offsets = [rng.uniform(*cfg.fault_window) * cfg.traffic_s for _ in faults]
        for s in shoppers:
            s.start()
        traffic_start = time.monotonic()
        traffic_wall = time.time()
        threads = []
        for fr, off in sorted(zip(faults, offsets, strict=True), key=lambda x: x[1]):
            frng = random.Random(rng.randrange(1 << 30))

            def go(fr: FaultRecord = fr, off: float = off, frng: random.Random = frng) -> None:
                time.sleep(max(0.0, traffic_start + off - time.monotonic()))
                self.run_fault(fr, frng)

            t = threading.Thread(target=go, daemon=True, name=f"fault-{fr.kind}")
            t.start()
            threads.append(t)
        while time.monotonic() - traffic_start < cfg.traffic_s:
            time.sleep(0.5)
            self._watchdog()
        traffic_wall_end = rnd.stopped_at = time.time()
        rnd.stop_traffic.set()
        self.say(f"round {n}: traffic stopped; draining")
        for t in threads:
            while t.is_alive():
                t.join(1.0)
                self._watchdog()
        for s in shoppers:
            while s.is_alive():
                s.join(1.0)
                self._watchdog()
        self.wait_workers(f"round {n} end")
        notes = list(self._round_notes)
        for s in shoppers:
            if s.error:
                notes.append(f"shopper {s.name} crashed: {s.error}")
        for fr in faults:
            if fr.error:
                notes.append(f"fault {fr.kind} failed: {fr.error.splitlines()[-1]}")
        violations, stats = self.settle_and_check(rnd, shoppers)
        stats["traffic"] = (traffic_wall, traffic_wall_end)  # time.time() of the sale
        if cfg.audit_changelog:
            try:
                stats["changelog_skus"] = len(audit_changelog(self.ns.settings))
            except AssertionError as exc:
                violations["I4"].append(f"changelog version chain: {exc}")
        for s in shoppers:
            if s.error:
                violations["I6"].append(f"shopper {s.name} crashed:\n{s.error}")
        with self.ledger.lock:
            commands = self.ledger.round_sends[n]
            if self.ledger.failures:
                notes.extend(f"delivery: {f}" for f in self.ledger.failures)
                self.ledger.failures.clear()
        return RoundResult(
            n, faults, commands, violations, time.monotonic() - started, notes, stats
        )

    def _watchdog(self) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None:
                lock = self.worker_locks[w.name]
                if lock.acquire(blocking=False):
                    try:
                        if w.proc.poll() is not None:
                            self.incident(
                                f"{w.name} exited on its own rc={w.proc.returncode}; restarted", w
                            )
                            self.restart_worker(w, "unexpected exit")
                    finally:
                        lock.release()


def run_chaos(cfg: ChaosConfig, log: Callable[[str], None] = print) -> list[RoundResult]:
    """Run ``cfg.rounds`` rounds and return their results (cleans up in any case)."""
    run = ChaosRun(cfg, log)
    try:
        results = run.run()
    finally:
        if run.incidents:
            log("incidents:\n  " + "\n  ".join(run.incidents))
    log(format_table(results))
    return results


__all__ = [
    "CLUSTER_ONLY",
    "FAULT_KINDS",
    "SINGLE_BROKER_ONLY",
    "ChaosConfig",
    "ChaosRun",
    "LedgerView",
    "OrderInfo",
    "RoundResult",
    "check_invariants",
    "format_table",
    "round_plan",
    "run_chaos",
    "violation_report",
]
