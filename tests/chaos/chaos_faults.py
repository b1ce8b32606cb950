"""The faults a chaos round injects (kill -9, broker restart, leader kill, Redis,
OpenSearch, duplicate commands), as methods mixed into ChaosRun."""

from __future__ import annotations

import random
import subprocess
import time
import traceback

from confluent_kafka.admin import AdminClient

import cluster
from chaos_observe import QuietProducer, flush
from chaos_plan import STACK, FaultRecord
from pipeline.clients import confluent_config
from pipeline.kafka.partitioning import partition_for
from pipeline.kafka.topics import changelog_topic


class FaultsMixin:
    """``fault_<kind>`` for every kind of FAULT_KINDS; uses ChaosRun's state (workers, ns, ledger)."""

    # -- faults ------------------------------------------------------------
    def run_fault(self, fr: FaultRecord, rng: random.Random) -> None:
        try:
            getattr(self, f"fault_{fr.kind}")(fr, rng)
        except BaseException:  # noqa: BLE001 - recorded; the round goes on
            fr.error = traceback.format_exc()
            self.say(f"fault {fr.kind} failed:\n{fr.error}")
        fr.end = time.time()
        if fr.disruptive:
            self.disruptions.append((fr.start, fr.end))

    def fault_kill9(self, fr: FaultRecord, rng: random.Random) -> None:
        w = rng.choice(self.workers)
        fr.disruptive = True
        with self.worker_locks[w.name]:
            fr.start = time.time()
            w.kill()
            self.say(f"kill -9 {w.name}")
            time.sleep(rng.uniform(*self.cfg.kill_down_s))
            self.restart_worker(w, "kill -9")
        self.wait_workers("kill -9")
        healthy = time.time() - fr.start
        self.wait_backlog(fr.start, time.time())
        fr.detail = (
            f"{w.name}, healthy after {healthy:.1f}s, caught up after {time.time() - fr.start:.1f}s"
        )

    def fault_broker(self, fr: FaultRecord, rng: random.Random) -> None:
        fr.disruptive = True
        fr.start = time.time()
        self.broker_restarted = True
        self.say("broker restart: scripts/stack.sh down kafka")
        down = subprocess.run(
            [str(STACK), "down", "kafka"], capture_output=True, text=True, timeout=300
        )
        t_down = time.time() - fr.start
        if down.returncode != 0:
            self.incident(f"stack.sh down kafka rc={down.returncode}: {down.stderr[-500:]}")
        time.sleep(rng.uniform(*self.cfg.broker_down_s))
        t1 = time.time()
        up = subprocess.run(
            [str(STACK), "up", "kafka"], capture_output=True, text=True, timeout=600
        )
        if up.returncode != 0:
            self.incident(f"stack.sh up kafka rc={up.returncode}: {up.stderr[-500:]}")
            subprocess.run([str(STACK), "up", "kafka"], capture_output=True, timeout=600)
        t_up = time.time() - t1
        self.say(f"broker back (down took {t_down:.1f}s, up {t_up:.1f}s)")
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None:
                with self.worker_locks[w.name]:
                    if w.proc.poll() is not None:
                        self.incident(
                            f"{w.name} died during the broker restart rc={w.proc.returncode};"
                            " restarted",
                            w,
                        )
                        self.restart_worker(w, "broker restart")
        self.wait_workers("broker restart", timeout=180)
        healthy = time.time() - fr.start
        self.wait_backlog(fr.start, time.time())
        fr.detail = (
            f"down {t_down:.0f}s+up {t_up:.0f}s, workers healthy after {healthy:.0f}s, "
            f"caught up after {time.time() - fr.start:.0f}s"
        )

    def fault_leader_kill(self, fr: FaultRecord, rng: random.Random) -> None:
        """SIGKILL the broker leading the hot SKU's partition of the ledger's changelog
        (where the ledger writes that SKU's state in transactions; the node usually leads
        that partition of other topics too, inputs and results: logged), keep it down
        until that leadership has moved to another in-sync replica and at least
        ``leader_down_s``, start it again, wait until every replica is in sync again."""
        if not self.cfg.cluster:
            raise RuntimeError("leader_kill needs the cluster (ChaosConfig.cluster / --cluster)")
        s = self.ns.settings
        assert self._rnd is not None
        hot = self._rnd.hot[0]
        part = partition_for(hot.encode(), s.partitions)
        names = [
            t
            for t in AdminClient(confluent_config(s)).list_topics(timeout=20).topics
            if t.startswith((s.topic_prefix, s.app_id + "-"))
        ]
        leaders = cluster.partition_leaders(s, names, part)
        node = leaders.get(changelog_topic(s), -1)
        if node < 0:
            raise RuntimeError(f"{changelog_topic(s)}[{part}] has no leader: {leaders}")
        led = sorted(t.removeprefix(s.topic_prefix) for t, n in leaders.items() if n == node)
        fr.disruptive = True
        fr.start = time.time()
        cluster.kill_node(node)
        self.killed_nodes.add(node)
        self.say(
            f"leader kill: kafka-{node} SIGKILLed; it led partition {part} ({hot}) of "
            f"{len(led)}/{len(leaders)} topics: {', '.join(led)}"
        )
        # down until the controller has fenced it and its leaderships moved to the
        # other in-sync replicas (the sale goes on against them), and at least
        # leader_down_s; the fencing takes at least the cluster's 6 s broker session
        # timeout (one run here: still not moved 10 s after the kill, so a fixed sleep
        # is not enough)
        target = rng.uniform(*self.cfg.leader_down_s)
        moved_after: float | None = None
        moved: dict[str, int] = {}
        while time.time() - fr.start < 60:
            try:
                moved = cluster.partition_leaders(s, names, part)
            except Exception:  # noqa: BLE001 - metadata while leaderships move: retry
                moved = {}
            if moved.get(changelog_topic(s), node) not in (node, -1):
                moved_after = time.time() - fr.start
                break
            time.sleep(0.5)
        if moved_after is None:
            self.incident(
                f"leader kill: {changelog_topic(s)}[{part}] still on kafka-{node} 60 s on"
            )
        time.sleep(max(2.0, target - (time.time() - fr.start)))
        moved = cluster.partition_leaders(s, names, part)
        t1 = time.time()
        t_up = cluster.start_node(node)
        self.killed_nodes.discard(node)
        self.say(
            f"leader kill: kafka-{node} back after {t1 - fr.start:.1f}s (start {t_up:.1f}s); "
            f"p{part} of the changelog led by kafka-{moved.get(changelog_topic(s))} "
            f"{moved_after or -1:.1f}s after the kill"
        )
        self.wait_workers("leader kill", timeout=180)
        healthy = time.time() - fr.start
        in_sync = cluster.wait_in_sync(s, (s.topic_prefix, s.app_id + "-"))
        self.wait_backlog(fr.start, time.time())
        still = sorted(t for t, n in moved.items() if n == node)
        if still:  # a leadership the dead node kept: nothing moved it
            self.incident(f"leader kill: kafka-{node} still led {still} while down")
        stall = self.longest_gap(s.stock_changes_topic, part, fr.start, self._rnd.stopped_at or t1)
        fr.detail = (
            f"kafka-{node}, led {len(led)} topics at p{part}, moved after {moved_after or -1:.0f}s, "
            f"p{part} changes stalled {stall:.0f}s, "
            f"down {t1 - fr.start:.0f}s, workers healthy after {healthy:.0f}s, "
            f"in sync {in_sync:.0f}s later, caught up after {time.time() - fr.start:.0f}s"
        )

    def longest_gap(self, topic: str, part: int, start: float, end: float) -> float:
        """The longest time between ``start`` and ``end`` (time.time()) in which no record
        arrived in ``topic[part]`` (by record timestamp): how long a fault stalled it."""
        with self.tail.lock:
            ts = sorted(
                r.ts / 1000
                for (t, p, _), r in self.tail.seen.items()
                if t == topic and p == part and start <= r.ts / 1000 <= end
            )
        points = [start, *ts, max(start, end)]
        return max(b - a for a, b in zip(points, points[1:], strict=False))

    def fault_redis(self, fr: FaultRecord, rng: random.Random) -> None:
        fr.start = time.time()
        self.redis.stop()
        self.say("private redis stopped")
        time.sleep(rng.uniform(*self.cfg.outage_s))
        self.redis.start()
        fr.detail = f"{time.time() - fr.start:.1f}s"
        self.say("private redis started")

    def _search(self, fr: FaultRecord, rng: random.Random, mode: str) -> None:
        fr.start = time.time()
        self.proxy.set_mode(mode)
        self.say(f"opensearch proxy: {mode}")
        time.sleep(rng.uniform(*self.cfg.outage_s))
        self.proxy.set_mode("up")
        fr.detail = f"{time.time() - fr.start:.1f}s"
        self.say("opensearch proxy: up")

    def fault_search_refuse(self, fr: FaultRecord, rng: random.Random) -> None:
        self._search(fr, rng, "refuse")

    def fault_search_blackhole(self, fr: FaultRecord, rng: random.Random) -> None:
        self._search(fr, rng, "blackhole")

    def fault_dupes(self, fr: FaultRecord, rng: random.Random) -> None:
        """Re-send, verbatim, commands whose first send was already applied (any round)."""
        fr.start = time.time()
        with self.ledger.lock:
            candidates = [
                (eid, t, f)
                for eid, (t, f) in self.ledger.commands.items()
                if not eid.startswith("init-")
            ]
        rng.shuffle(candidates)
        chosen = []
        for eid, type_name, fields in candidates:
            if len(chosen) >= self.cfg.dupes_burst:
                break
            if type_name == "RestockReceived":
                if not self.tail.caused_change(fields["sku"], eid):
                    continue
            elif not self.tail.answers(eid):
                continue  # not answered yet: a re-send could overtake the original
            chosen.append((type_name, fields))
        p = QuietProducer(self.ns.settings, on_delivery=self.ledger.on_delivery)
        current = self._current_round
        for type_name, fields in chosen:
            self.ledger.send(p, type_name, fields, current)
        flush(p, self.ledger)
        fr.detail = f"{len(chosen)} re-sent"
        self.say(f"duplicate injection: {len(chosen)} commands re-sent")
