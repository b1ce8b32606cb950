"""The invariants I1..I6, checked over everything a chaos run sent and saw."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from chaos_plan import TERMINAL, OrderInfo

# --------------------------------------------------------------------------
# the invariants


@dataclass
class LedgerView:
    commands: dict[str, tuple[str, dict[str, Any]]]
    delivered: Counter[str]
    orders: dict[str, OrderInfo]
    restocks: dict[str, tuple[str, int]]
    skus: list[str]


def check_invariants(
    led: LedgerView,
    by_event: dict[str, list[dict[str, Any]]],
    changes: dict[str, list[dict[str, Any]]],
    dead: list[dict[str, Any]],
    table: dict[str, dict[str, Any]],
    samples: dict[str, dict[str, list[tuple[float, tuple[int, ...]]]]],
    disruptions: list[tuple[float, float]],
    expiry_slack_s: float,
    topic_anomalies: list[str],
    round_no: int | None = None,
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """I1..I6 over every SKU and order of the run; returns violations and stats.

    * I1 no oversell: 0 <= reserved <= on_hand in the table and in *every*
      StockChanged version; units committed plus still reserved never exceed
      the units restocked.
    * I2 conservation: table on_hand = restocked - committed (answers) and
      reserved = units of orders still open; replaying the versions 1..V, each
      step's change of (on_hand, reserved) is exactly what its cause did
      (restock +qty; reserve +qty held; commit -qty both; release/expiry -qty
      held), and available = on_hand - reserved.
    * I3 exactly-once effect: per (order, event_id) the non-duplicate answers
      agree (a relay re-send is identical); an order is RESERVED at most once
      and closed at most once; every RESERVED/COMMITTED/RELEASED/EXPIRED answer
      has exactly one StockChanged of that cause and vice versa; each cause
      event_id makes at most one version; every restock sent is applied
      exactly once; duplicate answers (duplicate=true) repeat an outcome of
      the order; re-sent commands change nothing.
    * I4 versions: each SKU's versions are 1..V without a gap, a version seen
      twice has identical content, the table's version is V and its numbers
      are version V's; projections sampled during the rounds never go
      backwards, never run ahead of the ledger and show version v's numbers.
    * I5 convergence: checked by the caller (Redis and search equal the table).
    * I6 liveness: every delivered order command answered (also checked by the
      caller); every RESERVED order ends COMMITTED, RELEASED or EXPIRED; an
      abandoned cart ends EXPIRED, never before its expiry and no later than
      the bound; a long-ttl order never expires; dead letters only for
      commits of orders that were never reserved.
    """
    v: dict[str, list[str]] = defaultdict(list)
    stats: dict[str, Any] = {}

    # answers per order, keyed by event id; non-duplicate and duplicate
    nondup: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    dups: dict[str, list[dict]] = defaultdict(list)
    for eid, answers in by_event.items():
        for a in answers:
            if a["duplicate"]:
                dups[a["order_id"]].append(a)
            else:
                nondup[a["order_id"]][eid].append(a)

    # versions per SKU
    versions: dict[str, dict[int, dict]] = defaultdict(dict)
    for sku, items in changes.items():
        for c in items:
            prev = versions[sku].get(c["version"])
            if prev is not None and prev != c:
                v["I4"].append(f"{sku} v{c['version']} published twice, differently: {prev} / {c}")
            versions[sku].setdefault(c["version"], c)
    for a in topic_anomalies:
        v["I4"].append(f"topic record changed or unreadable: {a}")

    # I3: per (order, event) agreement; outcome of each order
    order_outcome: dict[str, dict[str, str]] = {}  # order -> {"reserve": .., "close": .., ...}
    state_changing = ("RESERVED",) + TERMINAL
    for oid, per_event in nondup.items():
        reserve_eids, close_eids = [], []
        for eid, answers in per_event.items():
            first = answers[0]
            for a in answers[1:]:
                both = first["outcome"] in state_changing and a["outcome"] in state_changing
                if both or first["outcome"] == a["outcome"]:
                    # a relay re-send is identical; for a no-op outcome such as
                    # UNKNOWN_RESERVATION 'available' is that of the moment
                    key = ("qty", "reason") if not both else tuple(first)
                    same = all(a.get(k) == first.get(k) for k in key)
                    if not same:
                        v["I3"].append(f"{oid} {eid}: answers disagree: {first} / {a}")
                else:
                    # a re-send of the same event_id answered with another outcome as if
                    # new (duplicate=false): the client is not told the original outcome
                    v["I6"].append(
                        f"{oid}: re-sent {eid} answered {a['outcome']} ({a['reason']!r}, "
                        f"duplicate=false); its original answer was {first['outcome']}"
                    )
            if first["outcome"] == "RESERVED":
                reserve_eids.append(eid)
            elif first["outcome"] in TERMINAL:
                close_eids.append(eid)
        if len(reserve_eids) > 1:
            v["I3"].append(f"{oid} RESERVED by several events: {reserve_eids}")
        if len(close_eids) > 1:
            v["I3"].append(f"{oid} closed by several events: {close_eids}")
        if close_eids and not reserve_eids:
            v["I3"].append(f"{oid} closed without being reserved")
        out = {}
        for eid, answers in per_event.items():
            out[eid] = answers[0]["outcome"]
        order_outcome[oid] = out
    for oid, answers in dups.items():
        known = set(order_outcome.get(oid, {}).values())
        for a in answers:
            if a["outcome"] not in known:
                v["I3"].append(f"{oid}: duplicate answer {a['outcome']} not among {sorted(known)}")

    # I3: answers <-> changes, one each; each cause makes at most one version
    cause_versions: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for sku, per in versions.items():
        for ver, c in per.items():
            cause_versions[c["cause_event_id"]].add((sku, ver))
    for eid, vs in cause_versions.items():
        if len(vs) > 1:
            v["I3"].append(f"event {eid} applied {len(vs)} times: versions {sorted(vs)}")
    for oid, per_event in nondup.items():
        for eid, answers in per_event.items():
            outcome = answers[0]["outcome"]
            if outcome in state_changing and len(cause_versions.get(eid, ())) != 1:
                v["I3"].append(
                    f"{oid} {eid} answered {outcome} but made "
                    f"{len(cause_versions.get(eid, ()))} versions"
                )
    answered_changes = {eid for per in nondup.values() for eid in per}
    for eid, vs in cause_versions.items():
        sku, ver = next(iter(vs))
        c = versions[sku][ver]
        if c["cause_type"] != "RestockReceived" and eid not in answered_changes:
            v["I3"].append(f"{sku} v{ver} ({c['cause_type']} {eid}) has no answer")
    for eid, (sku, _) in led.restocks.items():
        if led.delivered.get(eid, 0) and len(cause_versions.get(eid, ())) != 1:
            v["I3"].append(
                f"restock {eid} on {sku} applied {len(cause_versions.get(eid, ()))} times"
            )

    # committed / open units per SKU from the answers
    committed: dict[str, int] = defaultdict(int)
    open_units: dict[str, int] = defaultdict(int)
    restocked: dict[str, int] = defaultdict(int)
    for eid, (sku, qty) in led.restocks.items():
        if led.delivered.get(eid, 0):
            restocked[sku] += qty
    term_of: dict[str, tuple[str, str]] = {}
    for oid, per_event in nondup.items():
        outs = {eid: a[0]["outcome"] for eid, a in per_event.items()}
        info = led.orders.get(oid)
        if info is None:
            continue
        res = [e for e, o in outs.items() if o == "RESERVED"]
        term = [(e, o) for e, o in outs.items() if o in TERMINAL]
        if res:
            qty = per_event[res[0]][0]["qty"]
            if term:
                term_of[oid] = term[0]
                if term[0][1] == "COMMITTED":
                    committed[info.sku] += qty
            else:
                open_units[info.sku] += qty

    # per SKU: table, version history, replay
    for sku in led.skus:
        t = table.get(sku)
        per = versions.get(sku, {})
        if t is None:
            v["I5"].append(f"{sku}: table did not answer")
            continue
        if not 0 <= t["reserved"] <= t["on_hand"] or t["available"] < 0:
            v["I1"].append(f"{sku}: table {t}")
        if committed[sku] + open_units[sku] > restocked[sku]:
            v["I1"].append(
                f"{sku}: {committed[sku]} committed + {open_units[sku]} held > "
                f"{restocked[sku]} restocked"
            )
        if t["on_hand"] != restocked[sku] - committed[sku]:
            v["I2"].append(
                f"{sku}: on_hand {t['on_hand']} != restocked {restocked[sku]} - "
                f"committed {committed[sku]}"
            )
        if t["reserved"] != open_units[sku]:
            v["I2"].append(f"{sku}: reserved {t['reserved']} != open orders' {open_units[sku]}")
        V = t["version"]
        if sorted(per) != list(range(1, V + 1)):
            have = sorted(per)
            gaps = sorted(set(range(1, max(have + [V]) + 1)) - set(have))
            v["I4"].append(
                f"{sku}: versions {len(have)} (max {max(have, default=0)}), table v{V}, missing {gaps[:10]}"
            )
        elif V:
            last = per[V]
            if (last["on_hand"], last["reserved"]) != (t["on_hand"], t["reserved"]):
                v["I4"].append(f"{sku}: table {t} but v{V} is {last}")
        prev_on, prev_res = 0, 0
        for ver in sorted(per):
            c = per[ver]
            if not 0 <= c["reserved"] <= c["on_hand"]:
                v["I1"].append(f"{sku} v{ver}: reserved {c['reserved']} on_hand {c['on_hand']}")
            if c["available"] != max(0, c["on_hand"] - c["reserved"] - c["safety_stock"]):
                v["I2"].append(f"{sku} v{ver}: available {c['available']} inconsistent")
            if ver - 1 not in per and ver != 1:
                prev_on, prev_res = c["on_hand"], c["reserved"]  # after a gap (reported)
                continue
            d = (c["on_hand"] - prev_on, c["reserved"] - prev_res)
            expect = _expected_delta(c, led, nondup)
            if d not in expect:
                v["I2"].append(
                    f"{sku} v{ver}: {c['cause_type']} {c['cause_event_id']} changed "
                    f"(on_hand, reserved) by {d}, expected one of {expect}"
                )
            prev_on, prev_res = c["on_hand"], c["reserved"]

    # I4: sampled projections never regress, never run ahead, show the right numbers
    sampled = 0
    for target, per_sku in samples.items():
        for sku, items in per_sku.items():
            last = None
            top = table.get(sku, {}).get("version")
            for _t, vals in items:
                sampled += 1
                ver = vals[0]
                if last is not None and ver < last[0]:
                    v["I4"].append(f"{target} {sku} went back from v{last[0]} to v{ver}")
                if top is not None and ver > top:
                    v["I4"].append(f"{target} {sku} v{ver} ahead of the ledger's v{top}")
                c = versions.get(sku, {}).get(ver)
                if c is not None and (c["on_hand"], c["reserved"], c["available"]) != vals[1:]:
                    v["I4"].append(f"{target} {sku} v{ver} shows {vals[1:]}, the ledger {c}")
                last = vals
    stats["samples"] = sampled

    # I6: every reserved order closed; expiry on time; dead letters explained
    lateness: list[float] = []
    calm: list[float] = []  # expiries no disruption overlapped
    for oid, info in led.orders.items():
        outs = order_outcome.get(oid, {})
        if not led.delivered.get(f"r-{oid}", 0):
            continue
        if f"r-{oid}" not in outs:
            continue  # reported as unanswered
        if outs[f"r-{oid}"] != "RESERVED":
            continue
        term = term_of.get(oid)
        if term is None:
            v["I6"].append(f"{oid} ({info.plan}) reserved and never closed")
            continue
        eid, outcome = term
        if not info.short:
            if outcome == "EXPIRED":
                v["I6"].append(f"{oid}: a 15-min reservation EXPIRED")
            continue
        if outcome != "EXPIRED":
            v["I6"].append(f"{oid}: short-ttl reservation ended {outcome}, not EXPIRED")
            continue
        c = _change_of(eid, versions, info.sku)
        if c is None:
            continue  # reported under I3
        if c["occurred_at"] < info.expires_at:
            v["I6"].append(f"{oid} expired early: at {c['occurred_at']} < {info.expires_at}")
        late = (c["processed_at"] - info.expires_at) / 1000
        t0, t1 = info.expires_at / 1000, c["processed_at"] / 1000
        allowed = expiry_slack_s + sum(b - a for a, b in disruptions if a <= t1 and b >= t0)
        if round_no is None or info.round == round_no:  # stats of this round's orders
            lateness.append(late)
            if allowed == expiry_slack_s:
                calm.append(late)
        if late > allowed:
            v["I6"].append(
                f"{oid} expired {late:.1f}s after its expiry; bound {allowed:.1f}s "
                f"({c['cause_type']})"
            )
    stats["expired"] = len(lateness)
    stats["expiry_late_max_s"] = round(max(lateness, default=0.0), 2)
    stats["expiry_late_max_undisrupted_s"] = round(max(calm, default=0.0), 2)
    reason_counts: Counter[str] = Counter()
    for d in dead:
        reason_counts[d["reason"]] += 1
        if d["reason"] != "unknown_reservation":
            v["I6"].append(f"dead letter {d['reason']}: {d['detail']}")
            continue
        oid = d["detail"].rsplit(" ", 1)[-1]
        if order_outcome.get(oid, {}).get(f"r-{oid}") == "RESERVED":
            v["I6"].append(f"unknown_reservation dead letter for reserved order {oid}")
    stats["dead_letters"] = dict(reason_counts)
    stats["orders_total"] = len(led.orders)
    stats["answers_total"] = sum(len(a) for a in by_event.values())
    stats["changes_total"] = sum(len(c) for c in changes.values())
    return v, stats


def _change_of(eid: str, versions: dict[str, dict[int, dict]], sku: str) -> dict | None:
    for c in versions.get(sku, {}).values():
        if c["cause_event_id"] == eid:
            return c
    return None


def _expected_delta(
    c: dict[str, Any], led: LedgerView, nondup: dict[str, dict[str, list[dict]]]
) -> list[tuple[int, int]]:
    cause, eid, oid = c["cause_type"], c["cause_event_id"], c["order_id"]
    if cause == "RestockReceived":
        got = led.restocks.get(eid)
        return [(got[1], 0)] if got else []
    info = led.orders.get(oid)
    if info is None:
        return []
    q = info.qty
    if cause == "ReserveStock":
        return [(0, q)]
    if cause == "CommitReservation":
        outcome = (nondup.get(oid, {}).get(eid) or [{}])[0].get("outcome")
        return [(0, -q)] if outcome == "EXPIRED" else [(-q, -q)]
    if cause in ("ReleaseReservation", "ExpireReservation"):
        return [(0, -q)]
    return []
