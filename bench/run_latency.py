"""P6: decision and projection latency, paced and at full rate."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
import uuid
from typing import Any

from bench import baselines
from bench.common import (
    BenchNamespace,
    percentile,
    rss_mb,
    undisturbed,
)
from bench.loadgen import (
    LoadGenerator,
    LoadSpec,
    TopicReader,
    end_offsets,
)
from bench.run_pipeline import _restock_waiter, engine_stats, wait_quiet
from bench.run_sizes import LEVER_ENV, LEVER_SIDECARS, TUNED, Sizes, log
from schemas.codec import AvroCodec

# ---------------------------------------------------------------- P6


def latency_run(sizes: Sizes) -> dict[str, Any]:
    """P6 on one worker: find its max rate, then order-to-decision/Redis/search at half of it.

    The maximum is measured on the same worker right before (a steady Zipf burst sent as
    fast as possible), because the machine's load drifts within a run. If a backlog grows
    during the paced window (the last third's median latency over 3x the first third's, or
    fewer than 95% of the send rate answered),
    that rate was not sustainable after all and the window is repeated at a lower share
    of the maximum (0.5, then 0.3, then 0.2); every attempt is reported.
    """
    ns = BenchNamespace.fresh("p6", **LEVER_ENV[TUNED])
    cfg = ns.settings
    worker = ns.worker()
    sides = [ns.sidecar(m) for m in LEVER_SIDECARS[TUNED]]
    prefix = f"P6{uuid.uuid4().hex[:6]}"
    attempts_out: list[dict[str, Any]] = []
    try:
        worker.start(timeout=180)
        for side in sides:
            side.start()
        gen = LoadGenerator(cfg)
        calib = LoadSpec(
            mode="steady",
            attempts=sizes.p6_calibration,
            units=100_000,
            skus=sizes.p6_skus,
            producers=4,
            sku_prefix=prefix,
        )
        log(f"P6: maximum rate, {calib.attempts} reserves as fast as possible")
        max_rate = gen.run(calib, wait_restocked=_restock_waiter(worker)).throughput
        for share in (0.5, 0.3, 0.2):
            wait_quiet([worker, *sides])
            rate = max(5.0, max_rate * share)
            log(
                f"P6: {rate:.0f}/s paced for {sizes.p6_seconds:.0f} s ({share} x max {max_rate:.0f}/s)"
            )
            got = _paced_latency(cfg, gen, worker, sizes, rate, prefix, seed=11 + len(attempts_out))
            got["share_of_max"] = share
            attempts_out.append(got)
            if not got["backlog"]:
                break
        assert worker.proc is not None
        rss = rss_mb(worker.proc.pid)[0]
        engine = engine_stats(worker)
    finally:
        worker.stop()
        for side in sides:
            side.kill()
        ns.cleanup()
    final = attempts_out[-1]
    log("P6: bare Kafka produce-to-consume at the same rate")
    bare = undisturbed(
        "bare Kafka latency",
        lambda: baselines.bare_latency(cfg, final["rate_per_s"], sizes.p6_seconds),
        log=log,
    )
    final["bare_kafka"] = _pct(bare)
    final["samples"]["bare_kafka"] = bare
    final["max_rate_per_s"] = max_rate
    final["seconds"] = sizes.p6_seconds
    final["rss_mb"] = rss
    final["engine"] = engine  # over the whole worker: calibration and every window
    final["attempts"] = [{k: v for k, v in a.items() if k != "samples"} for a in attempts_out]
    return final


def _pct(v: list[float]) -> dict[str, float]:
    return {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)}


def _paced_latency(
    cfg: Any, gen: LoadGenerator, worker: Any, sizes: Sizes, rate: float, prefix: str, seed: int
) -> dict[str, Any]:
    """One paced window at ``rate``; latencies to the answer, Redis and the search index."""
    import redis

    codec = AvroCodec()
    changes: dict[str, tuple[str, int, int]] = {}  # cause_event_id -> (sku, version, processed)
    redis_seen: dict[str, list[tuple[int, int]]] = {}  # sku -> [(version, updated_at ms)]
    stop = threading.Event()
    spec = LoadSpec(
        mode="steady",
        attempts=max(1, int(rate * sizes.p6_seconds)),
        units=100_000,
        skus=sizes.p6_skus,
        rate=rate,
        producers=4,
        sku_prefix=prefix,
        restock=False,
        seed=seed,
    )

    def on_change(msg: Any, now: float) -> None:
        name, v = codec.decode(msg.value())
        if name == "StockChanged" and v["cause_type"] == "ReserveStock":
            changes[v["cause_event_id"]] = (v["sku"], v["version"], v["processed_at"])

    r = redis.Redis.from_url(cfg.redis_url)
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(cfg.redis_channel)

    def listen() -> None:
        while not stop.is_set():
            msg = pubsub.get_message(timeout=0.1)
            if msg and msg.get("type") == "message":
                d = json.loads(msg["data"])
                redis_seen.setdefault(d["sku"], []).append((d["version"], d["updated_at"]))

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    reader = TopicReader(cfg, end_offsets(cfg, cfg.stock_changes_topic), on_change)
    reader.start()
    try:
        result = gen.run(spec)
        deadline = time.monotonic() + 60  # let the projections catch up with the last changes
        while time.monotonic() < deadline and len(changes) < len(result.reserve_ids):
            time.sleep(0.2)
        latest: dict[str, int] = {}
        for sku, ver, _p in changes.values():
            latest[sku] = max(latest.get(sku, 0), ver)
        while time.monotonic() < deadline:
            if all(
                max((v for v, _ in redis_seen.get(s, [])), default=0) >= v
                for s, v in latest.items()
            ):
                break
            time.sleep(0.2)
        docs = _search_docs(cfg, list(latest), latest, deadline)
    finally:
        stop.set()
        reader.stop()
        listener.join(5)
        pubsub.close()
    sent = result.sent
    decision = result.latencies_ms(result.reserve_ids)
    to_agent, relay_hop, to_redis, to_search = [], [], [], []
    for eid in result.reserve_ids:
        ch = changes.get(eid)
        if ch is None or eid not in sent:
            continue
        sku, ver, processed = ch
        to_agent.append(processed - sent[eid] * 1000)
        got = result.answers.get(eid)
        if got:
            relay_hop.append(got[0].at * 1000 - processed)
        applied = [u for v, u in redis_seen.get(sku, []) if v >= ver]
        if applied:
            to_redis.append(min(applied) - sent[eid] * 1000)
        doc = docs.get(sku)
        if doc is not None and doc[0] == ver:
            to_search.append(doc[1] - sent[eid] * 1000)
    third = max(1, len(result.reserve_ids) // 3)
    early = percentile(result.latencies_ms(result.reserve_ids[:third]), 50)
    late = percentile(result.latencies_ms(result.reserve_ids[-third:]), 50)
    return {
        "rate_per_s": rate,
        "achieved_send_rate": result.send_rate,
        "achieved_answer_rate": result.throughput,
        "first_third_p50_ms": early,
        "last_third_p50_ms": late,
        # a backlog: waits grew over the window, or the answers fell behind the sends (a
        # burst-calibrated maximum can overstate what is sustainable)
        "backlog": bool(late > 3 * max(1.0, early) or result.throughput < 0.95 * result.send_rate),
        "complete": result.complete,
        "order_to_decision": _pct(decision),
        "order_to_agent": _pct(to_agent),
        "agent_to_answer": _pct(relay_hop),
        "order_to_redis": _pct(to_redis),
        "order_to_search": _pct(to_search),
        "samples": {
            "order_to_decision": decision,
            "order_to_redis": to_redis,
            "order_to_search": to_search,
        },
    }


def _search_docs(
    cfg: Any, skus: list[str], latest: dict[str, int], deadline: float
) -> dict[str, tuple[int, int]]:
    """sku -> (version, updated_at) from the search index, waiting for the latest versions."""
    docs: dict[str, tuple[int, int]] = {}
    while True:
        for i in range(0, len(skus), 500):
            body = json.dumps({"ids": skus[i : i + 500]}).encode()
            req = urllib.request.Request(
                f"{cfg.opensearch_url}/{cfg.search_index}/_mget",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with contextlib.suppress(Exception), urllib.request.urlopen(req, timeout=10) as resp:
                for d in json.loads(resp.read())["docs"]:
                    if d.get("found"):
                        src = d["_source"]
                        docs[d["_id"]] = (int(src["version"]), int(src["updated_at"]))
        done = all(docs.get(s, (0, 0))[0] >= v for s, v in latest.items())
        if done or time.monotonic() > deadline:
            return docs
        time.sleep(0.5)
