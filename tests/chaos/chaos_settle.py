"""After a round: wait until the pipeline settles, gather what it produced and
check the invariants; diagnose unanswered commands (mixed into ChaosRun)."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from agents.ledger import POSITIONS_KEY
from chaos_checks import LedgerView, check_invariants
from chaos_observe import FIELDS, high_watermarks, read_all
from chaos_plan import INVARIANTS, ORDER_TYPES
from chaos_workload import RoundCtx, Shopper
from pipeline.kafka.topics import changelog_topic
from schemas.codec import AvroCodec, DecodeError


class SettleMixin:
    """The end of a round for ChaosRun: table views, settling, the invariant checks."""

    def diagnose_unanswered(self, eids: Sequence[str]) -> list[str]:
        """Where each unanswered command sits in its input topic, how often it was
        answered, and whether the table's changelog ever applied that input offset."""
        s = self.ns.settings
        want = set(eids)
        codec = AvroCodec()

        def avro(v: bytes | None) -> dict[str, Any]:
            try:
                return codec.decode(v or b"")[1]
            except DecodeError:
                return {}

        where: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
        for topic in (s.orders_topic, s.restocks_topic):
            for part, off, _, value in read_all(s, topic, avro):
                if value.get("event_id") in want:
                    where[value["event_id"]].append((topic, part, off))
        # the ledger's positions records (each batch's, in its transaction) hold every
        # input's next offset: an input offset below one of them was decided. (A SKU
        # record's watermarks hold only the last input of its batch that touched it.)
        decided_to: dict[tuple[str, int], int] = defaultdict(int)
        for part, _, key, value in read_all(s, changelog_topic(s), lambda v: v):
            if key != POSITIONS_KEY or value is None:
                continue
            for topic, nxt in orjson.loads(value).items():
                decided_to[(topic, part)] = max(decided_to[(topic, part)], nxt)

        def spot(t: str, p: int, o: int) -> str:
            return f"{t.rsplit('.', 1)[-1]}/{p}@{o}"

        out = []
        for eid in eids:
            spots = where.get(eid, [])
            lost = [spot(*x) for x in spots if decided_to[(x[0], x[1])] <= x[2]]
            verdict = (
                "never decided by the ledger (no committed batch's positions pass "
                + ", ".join(lost)
                + ")"
                if lost
                else "every input offset was decided (the answer was lost after the ledger)"
            )
            answered = "" if eid.startswith("rs-") else f", {len(self.tail.answers(eid))} answers"
            out.append(
                f"{eid}: {len(spots)} records in the input topic "
                f"({', '.join(spot(*x) for x in spots)}){answered}; {verdict}"
            )
        return out

    # -- the tail's ground truth --------------------------------------------
    def refill_tail(self, why: str) -> int:
        """Re-read the output topics from the beginning into the tail (its one consumer
        may have lost its place across a broker restart); what the pass found goes into
        the round's stats, so a tail that loses records shows, never a false violation."""
        t0 = time.monotonic()
        try:
            found = self.tail.refill()
        except Exception as exc:  # noqa: BLE001 - the checks then run on what the tail has
            self.tail_refills.append(f"{why}: re-read failed: {exc}")
            return 0
        self.tail_refills.append(
            f"{why}: re-read found {found} records the tail had not ({time.monotonic() - t0:.1f}s)"
        )
        return found

    def await_tail(
        self,
        what: str,
        pending: Callable[[], list[str]],
        deadline: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> list[str]:
        """Poll ``pending`` until it is empty or ``clock()`` passes ``deadline``; what is
        still pending then is checked once more after a re-read of the topics."""
        while (left := pending()) and clock() < deadline:
            time.sleep(0.5)
        if left:
            self.refill_tail(f"{len(left)} {what} pending")
            left = pending()
        return left

    # -- settle, then check ------------------------------------------------
    def table_views(self, skus: Sequence[str], timeout: float = 90.0) -> tuple[dict, list[str]]:
        """Every SKU from both workers (they must agree); problems as strings."""
        views: dict[str, dict] = {}
        problems: list[str] = []
        deadline = time.monotonic() + timeout
        for sku in skus:
            while True:
                got = []
                for w in self.workers:
                    try:
                        got.append(w.get_json(f"/stock/{sku}"))
                    except Exception as exc:  # noqa: BLE001 - retried
                        got.append((None, str(exc)))
                if all(st == 200 for st, _ in got) and got[0][1] == got[1][1]:
                    views[sku] = got[0][1]
                    break
                if time.monotonic() > deadline:
                    problems.append(f"{sku}: workers answered {got}")
                    ok = [b for st, b in got if st == 200]
                    if ok:
                        views[sku] = ok[0]
                    break
                time.sleep(0.3)
        return views, problems

    def settle_and_check(
        self, rnd: RoundCtx, shoppers: list[Shopper]
    ) -> tuple[dict[str, list[str]], dict[str, Any]]:
        cfg = self.cfg
        led = self.ledger
        tail = self.tail
        settle: dict[str, list[str]] = defaultdict(list)
        stats: dict[str, Any] = {}
        t_settle = time.monotonic()

        for s in shoppers:
            if s.unfinished:
                settle["I6"].append(
                    f"{s.name}: {len(s.unfinished)} checkouts not finished in "
                    f"{cfg.drain_timeout_s:.0f}s, e.g. {s.unfinished[:5]}"
                )

        # every abandoned cart of this round gets its EXPIRED (or a late commit's answer)
        with led.lock:
            orders = [o for o in led.orders.values() if o.round == rnd.number]

        def reserved_short_open() -> list[str]:
            out = []
            for o in orders:
                if not o.short:
                    continue
                answers = tail.answers(f"r-{o.order_id}")
                if not any(a["outcome"] == "RESERVED" and not a["duplicate"] for a in answers):
                    continue
                if not tail.closed(o.order_id):
                    out.append(o.order_id)
            return out

        last_expiry = max((o.expires_at for o in orders if o.short), default=0) / 1000
        dis = sum(b - a for a, b in self.disruptions if b >= last_expiry - cfg.traffic_s)
        deadline = max(time.time(), last_expiry) + cfg.expiry_slack_s + dis + 30
        left = self.await_tail("short-ttl closes", reserved_short_open, deadline, time.time)
        if left:
            settle["I6"].append(f"{len(left)} short-ttl reservations never closed: {left[:8]}")

        # every delivered order command answered (at least once per delivery)
        def unanswered() -> list[str]:
            with led.lock:
                items = [
                    (eid, n)
                    for eid, n in led.delivered.items()
                    if led.commands[eid][0] in ORDER_TYPES
                ]
            return [
                eid for eid, n in items if eid not in self.given_up and len(tail.answers(eid)) < n
            ]

        deadline = time.monotonic() + cfg.answer_timeout_s
        missing = self.await_tail("answers", unanswered, deadline)
        if missing:
            self.given_up.update(missing)
            settle["I6"].append(
                f"{len(missing)} delivered commands not answered as often as sent "
                f"after {cfg.answer_timeout_s:.0f}s: {missing[:8]}"
            )
            try:
                settle["I6"].extend(self.diagnose_unanswered(missing[:20]))
            except Exception as exc:  # noqa: BLE001 - a diagnosis must not hide the finding
                settle["I6"].append(f"(diagnosis failed: {exc})")

        # the table is stable and the relay has published its last version of every SKU
        skus = sorted(led.sku_round)
        deadline = time.monotonic() + 90
        refilled = False
        while True:
            views, problems = self.table_views(skus)
            behind = [s for s in skus if tail.max_version(s) < views.get(s, {}).get("version", 0)]
            if not behind:
                again, _ = self.table_views(skus)
                if again == views:
                    break
            if time.monotonic() > deadline:
                if not refilled:  # first make sure it is the relay, not the tail
                    refilled = True
                    self.refill_tail("relay's versions")
                    continue
                settle["I4"].append(f"relay never published the table's version of {behind[:8]}")
                break
            time.sleep(0.5)
        for p in problems:
            settle["I5"].append(f"table not readable or workers disagree: {p}")
        s = self.ns.settings
        hw = high_watermarks(s, (s.results_topic, s.stock_changes_topic, s.dead_letters_topic))
        deadline = time.monotonic() + 60
        while not tail.caught_up(hw) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not tail.caught_up(hw):
            self.refill_tail(f"tail behind the high watermarks {tail.lag(hw)}")
        stats["settle_s"] = round(time.monotonic() - t_settle, 1)

        # I5: Redis and the search index reach the table's versions and numbers
        t_conv = time.monotonic()
        want = {k: tuple(v[f] for f in FIELDS) for k, v in views.items()}
        diff: dict[str, Any] = {}
        deadline = time.monotonic() + cfg.converge_timeout_s
        while True:
            diff = {}
            try:
                got_r = self.proj.redis_state(skus)
                got_s = self.proj.search_state(skus)
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                diff = {"error": str(exc)}
                got_r, got_s = {}, {}
            for sku, w in want.items():
                if got_r.get(sku) != w or got_s.get(sku) != w:
                    diff[sku] = {"table": w, "redis": got_r.get(sku), "search": got_s.get(sku)}
            if not diff or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        stats["converge_s"] = round(time.monotonic() - t_conv, 1)
        if diff:
            settle["I5"].append(
                f"not converged after {cfg.converge_timeout_s:.0f}s "
                f"(version, on_hand, reserved, available): "
                + "; ".join(f"{k}: {v}" for k, v in list(diff.items())[:8])
            )

        by_event, changes, dead = tail.snapshot()
        with led.lock:
            ledger_view = LedgerView(
                dict(led.commands),
                Counter(led.delivered),
                dict(led.orders),
                dict(led.restocks),
                list(led.sku_round),
            )
        found, extra = check_invariants(
            ledger_view,
            by_event,
            changes,
            dead,
            views,
            self.sampler.snapshot(),
            list(self.disruptions),
            cfg.expiry_slack_s,
            list(tail.rewritten) + [f"undecodable {u}" for u in tail.undecodable],
            rnd.number,
        )
        stats.update(extra)
        stats["tail_errors"] = tail.errors
        if tail.error_log:
            stats["tail_error_log"] = list(tail.error_log)
        if self.tail_refills:
            stats["tail_refills"] = list(self.tail_refills)
            self.tail_refills.clear()
        lost_restocks = [
            m.split()[1]
            for m in found.get("I3", [])
            if m.startswith("restock ") and m.endswith(" applied 0 times")
        ]
        lost_restocks = [e for e in lost_restocks if e not in self.given_up]
        if lost_restocks:
            self.given_up.update(lost_restocks)
            try:
                found["I3"].extend(self.diagnose_unanswered(lost_restocks[:20]))
            except Exception as exc:  # noqa: BLE001 - a diagnosis must not hide the finding
                found["I3"].append(f"(diagnosis failed: {exc})")
        for inv in INVARIANTS:
            # checks cover the whole run: count a violation in the round it first shows
            fresh = dict.fromkeys(settle.get(inv, []) + found.get(inv, []))
            found[inv] = [x for x in fresh if x not in self.reported]
            self.reported.update(found[inv])
        return found, stats
