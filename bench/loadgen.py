"""Load generator: flash sales, steady Zipf traffic and duplicate injection.

Sends Avro commands with K producer threads (one confluent-kafka producer each, the
project's murmur2 ``producer_config``), optionally paced to a total rate, and reads
``reservation-results`` from where they stood before the first send. Every command's
send time (wall clock, taken just before ``produce``) and the arrival time of its
answer are recorded, so throughput and latency percentiles come from the same data.

Modes (:class:`LoadSpec`):

* ``flash``: one hot SKU restocked with ``units``, then ``attempts`` ReserveStock of
  ``qty`` from ``producers`` threads; optionally a mix where a RESERVED answer is
  followed by a CommitReservation (``commit_fraction``) or a ReleaseReservation
  (``release_fraction``), and a share of the reserves carries a short ttl and is left
  to expire (``expire_fraction``);
* ``steady``: ``skus`` SKUs restocked with ``units`` each, reserves drawn with Zipf
  popularity (exponent ``zipf``);
* ``dup``: steady (or flash with ``--hot``) where ``dup_fraction`` of the reserves is
  sent a second time with the same event and order id; each must be answered once more
  with ``duplicate=true`` and change nothing.

Command line (needs a running worker for the namespace; the namespace's topics are
``--prefix``)::

    python -m bench.loadgen flash --prefix inventory. --units 1000 --attempts 5000
    python -m bench.loadgen steady --skus 1000 --attempts 20000 --rate 1500
    python -m bench.loadgen dup --skus 100 --attempts 2000 --dup-fraction 0.2
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from confluent_kafka import Producer
from tqdm import tqdm  # type: ignore[import-untyped]

from bench.loadgen_kafka import ResultCollector, Sender, TopicReader, consumer_config, end_offsets
from bench.loadgen_result import Answer, LoadResult, LoadSpec
from config.settings import Settings
from config.settings import settings as base_settings
from pipeline.kafka.topics import ensure_topics
from pipeline.produce import producer_config
from schemas.codec import AvroCodec


def plan_reserves(spec: LoadSpec, skus: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """The ReserveStock commands (duplicates included) in send order."""
    rng = random.Random(spec.seed)
    if len(skus) == 1:
        picks = [skus[0]] * spec.attempts
    else:
        weights = [1.0 / (k**spec.zipf) for k in range(1, len(skus) + 1)]
        order = skus[:]
        rng.shuffle(order)  # popularity unrelated to name or partition
        picks = rng.choices(order, weights=weights, k=spec.attempts)
    run = uuid.uuid4().hex[:8]
    cmds: list[tuple[str, dict[str, Any]]] = []
    for i, sku in enumerate(picks):
        ttl = spec.expire_ttl_ms if rng.random() < spec.expire_fraction else 0
        cmds.append(
            (
                "ReserveStock",
                {
                    "event_id": f"r-{run}-{i}",
                    "order_id": f"o-{run}-{i}",
                    "sku": sku,
                    "qty": spec.qty,
                    "channel": "web",
                    "ttl_ms": ttl,
                },
            )
        )
    if spec.dup_fraction > 0:
        dups = [c for c in cmds if rng.random() < spec.dup_fraction]
        for c in dups:
            # the same event again, somewhere later in the stream
            at = rng.randrange(cmds.index(c) + 1, len(cmds) + 1)
            cmds.insert(at, (c[0], dict(c[1])))
    return cmds


class LoadGenerator:
    """Runs one :class:`LoadSpec` against a namespace whose worker is up."""

    def __init__(self, cfg: Settings, codec: AvroCodec | None = None) -> None:
        self.cfg = cfg
        self.codec = codec or AvroCodec()

    def restock(
        self, skus: list[str], units: int, wait: Callable[[list[str], int], None] | None
    ) -> None:
        sender = Sender(self.cfg, self.codec, 2, None)
        cmds = []
        for sku in skus:
            left = units
            while left > 0:  # RestockReceived qty is capped by INVENTORY_MAX_QTY
                qty = min(left, self.cfg.max_qty)
                left -= qty
                cmds.append(
                    (
                        "RestockReceived",
                        {"event_id": f"s-{uuid.uuid4().hex}", "sku": sku, "qty": qty},
                    )
                )
        sender.send_all(cmds)
        if wait is not None:
            wait(skus, units)

    def run(
        self,
        spec: LoadSpec,
        wait_restocked: Callable[[list[str], int], None] | None = None,
        on_sent: Callable[[], None] | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> LoadResult:
        """Restock, then send ``spec``'s commands and collect every answer.

        ``wait_restocked(skus, units)`` runs after the restock is sent; ``on_start()``
        right before the first command is sent (the answer reader is connected by
        then); ``on_sent()`` once every answer arrived (or the timeout passed).
        """
        ensure_topics(self.cfg)
        skus = spec.sku_names()
        if spec.restock:
            self.restock(skus, spec.units, wait_restocked)
        commands = plan_reserves(spec, skus)
        reserve_ids = list(dict.fromkeys(c[1]["event_id"] for c in commands))
        injected = len(commands) - len(reserve_ids)
        collector = ResultCollector(self.cfg, self.codec)
        collector.tracked.update(reserve_ids)
        followups: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        short_ttl = {c[1]["event_id"] for c in commands if c[1]["ttl_ms"]}
        rng = random.Random(spec.seed + 1)
        decided: set[str] = set()
        follow_ids: set[str] = set()
        expected_expiries = [0]

        def react(event_id: str, a: Answer) -> None:
            if a.duplicate or event_id in decided or a.outcome != "RESERVED":
                return
            decided.add(event_id)
            if event_id in short_ttl:
                expected_expiries[0] += 1
                return
            roll = rng.random()
            kind = None
            if roll < spec.commit_fraction:
                kind = "CommitReservation"
            elif roll < spec.commit_fraction + spec.release_fraction:
                kind = "ReleaseReservation"
            if kind:
                fid = f"f-{uuid.uuid4().hex}"
                follow_ids.add(fid)
                collector.tracked.add(fid)
                fields = {"event_id": fid, "order_id": a.order_id, "sku": a.sku}
                followups.put((kind, fields))

        mixing = spec.commit_fraction > 0 or spec.release_fraction > 0 or short_ttl
        if mixing:
            collector.listeners.append(react)
        collector.start()
        sender = Sender(self.cfg, self.codec, spec.producers, spec.rate)
        follow_sender = Sender(self.cfg, self.codec, 1, None)

        def follow_loop() -> None:
            producer = follow_sender._producer()
            from pipeline.produce import topic_for_type

            while True:
                item = followups.get()
                if item is None:
                    break
                type_name, fields = item
                now = time.time()
                rec = dict(fields, occurred_at=int(now * 1000), channel="web")
                producer.produce(
                    topic_for_type(self.cfg, type_name),
                    self.codec.encode_trusted(type_name, rec),
                    rec["sku"].encode(),
                )
                follow_sender.sent[fields["event_id"]] = now
                producer.poll(0)
            producer.flush(30)

        follower = threading.Thread(target=follow_loop, daemon=True)
        if mixing:
            follower.start()
        total_expected = len(commands)
        bar = tqdm(
            total=total_expected,
            desc=f"{spec.mode} {len(skus)} sku",
            unit="ans",
            leave=False,
            disable=not spec.progress or not sys.stderr.isatty(),
            file=sys.stderr,
        )
        if on_start:
            on_start()
        t_first = time.time()
        send_thread = threading.Thread(target=sender.send_all, args=(commands,), daemon=True)
        send_thread.start()
        deadline = time.monotonic() + spec.timeout
        complete = False
        shown = 0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            got = collector.total
            bar.update(max(0, min(got, total_expected) - shown))
            shown = max(shown, min(got, total_expected))
            if send_thread.is_alive() or collector.tracked_answered < len(collector.tracked):
                continue
            dup_done = collector.total >= len(commands) + len(follow_ids)
            follow_done = followups.empty()
            exp_done = len(collector.expired) >= expected_expiries[0]
            if dup_done and follow_done and exp_done:
                complete = True
                break
        bar.close()
        followups.put(None)
        if mixing:
            follower.join(30)
        send_thread.join(5)
        if on_sent:
            on_sent()
        time.sleep(0.2)
        collector.stop()
        sent = dict(sender.sent)
        sent.update(follow_sender.sent)
        first = min(sender.sent.values()) if sender.sent else t_first
        return LoadResult(
            spec=spec,
            skus=skus,
            sent=sent,
            reserve_ids=reserve_ids,
            answers=dict(collector.answers),
            outcomes=collector.outcomes,
            first_send=first,
            last_send=max(sender.sent.values()) if sender.sent else first,
            last_answer=collector.last_at,
            restocked_units={s: spec.units for s in skus} if spec.restock else {},
            injected_dups=injected,
            expected_expiries=expected_expiries[0],
            complete=complete,
            extra={"expired_orders": dict(collector.expired), "failures": sender.failures},
        )


def measure_alone(cfg: Settings, commands: int, producers: int = 4) -> dict[str, Any]:
    """The load generator without a pipeline, in a namespace nobody consumes.

    Send side: the same :class:`Sender` (``producers`` threads) sends ``commands``
    ReserveStock of one hot SKU, planned by :func:`plan_reserves`, to the orders topic.
    Read side: ``commands`` ReservationResult records are produced to the results topic
    first, then a :class:`ResultCollector` reads them. Rates and this process's CPU
    (every thread, librdkafka's included) per command and per answer.
    """
    ensure_topics(cfg)
    codec = AvroCodec()
    spec = LoadSpec(mode="flash", attempts=commands, units=0, producers=producers)
    cmds = plan_reserves(spec, spec.sku_names())
    sender = Sender(cfg, codec, producers, None)
    c0, t0 = time.process_time(), time.perf_counter()
    sender.send_all(cmds)
    send_wall, send_cpu = time.perf_counter() - t0, time.process_time() - c0
    times = sorted(sender.sent.values())
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    # the read side: answers already in the topic, read as fast as the collector goes
    collector = ResultCollector(cfg, codec)  # starts at the current end of the topic
    producer = Producer(dict(producer_config(cfg), **{"queue.buffering.max.messages": 2_000_000}))
    for i, (_type, fields) in enumerate(cmds):
        answer = {
            "event_id": fields["event_id"],
            "order_id": fields["order_id"],
            "sku": fields["sku"],
            "outcome": "RESERVED" if i % 4 == 0 else "REJECTED",
            "qty": 1,
            "available": 0,
            "reason": "",
            "duplicate": False,
        }
        value = codec.encode("ReservationResult", answer)
        while True:
            try:
                producer.produce(cfg.results_topic, value, fields["order_id"].encode())
                break
            except BufferError:
                producer.poll(0.05)
        if not i & 1023:
            producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("load generator alone: answers not all produced")
    c1, t1 = time.process_time(), time.time()
    collector.start()
    deadline = time.monotonic() + 300
    while collector.total < len(cmds) and time.monotonic() < deadline:
        time.sleep(0.01)
    read_cpu = time.process_time() - c1
    read_wall = collector.last_at - t1  # wall clock of the batch holding the last answer
    collector.stop()
    n = len(cmds)
    return {
        "commands": n,
        "producers": producers,
        "send_failures": len(sender.failures),
        "send_rate_per_s": n / span if span == span and span > 0 else float("nan"),
        "send_acked_per_s": n / send_wall if send_wall > 0 else float("nan"),
        "send_cpu_us_per_command": send_cpu / n * 1e6,
        "answers_read": collector.total,
        "read_rate_per_s": collector.total / read_wall if read_wall > 0 else float("nan"),
        "read_cpu_us_per_answer": read_cpu / max(1, collector.total) * 1e6,
        "complete": collector.total >= n and not sender.failures,
    }


def _wait_http(url: str) -> Callable[[list[str], int], None]:
    import urllib.request

    def wait(skus: list[str], units: int) -> None:
        for sku in skus:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"{url}/stock/{sku}", timeout=5) as r:
                        if json.loads(r.read())["on_hand"] >= units:
                            break
                except OSError:
                    pass
                time.sleep(0.1)

    return wait


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("flash", "steady", "dup"))
    p.add_argument("--prefix", default=base_settings.topic_prefix, help="topic prefix")
    p.add_argument("--worker", default="http://127.0.0.1:6066", help="worker URL (restock wait)")
    p.add_argument("--attempts", type=int, default=2000)
    p.add_argument("--units", type=int, default=500)
    p.add_argument("--skus", type=int, default=1000)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--hot", action="store_true", help="dup mode on one hot SKU")
    p.add_argument("--producers", type=int, default=4)
    p.add_argument("--rate", type=float, default=None, help="total commands/s (default: max)")
    p.add_argument("--commit-fraction", type=float, default=0.0)
    p.add_argument("--release-fraction", type=float, default=0.0)
    p.add_argument("--expire-fraction", type=float, default=0.0)
    p.add_argument("--dup-fraction", type=float, default=None)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    cfg = replace(base_settings, topic_prefix=args.prefix)
    single = args.mode == "flash" or (args.mode == "dup" and args.hot)
    dup = args.dup_fraction if args.dup_fraction is not None else (0.2 if args.mode == "dup" else 0)
    spec = LoadSpec(
        mode=args.mode,
        attempts=args.attempts,
        units=args.units,
        skus=1 if single else args.skus,
        zipf=args.zipf,
        producers=args.producers,
        rate=args.rate,
        commit_fraction=args.commit_fraction,
        release_fraction=args.release_fraction,
        expire_fraction=args.expire_fraction,
        dup_fraction=dup,
    )
    result = LoadGenerator(cfg).run(spec, wait_restocked=_wait_http(args.worker))
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        lat = summary["latency_ms"]
        print(
            f"{summary['decisions']} decisions in {summary['decisions'] / result.throughput:.1f} s"
            f" = {result.throughput:,.0f}/s; outcomes {summary['outcomes']};"
            f" oversold {summary['oversold_units']}; duplicates injected"
            f" {summary['injected_duplicates']}, answered {summary['duplicate_answers']};"
            f" latency p50 {lat['p50']:.1f} ms p99 {lat['p99']:.1f} ms"
            + ("" if result.complete else " (INCOMPLETE: timed out)")
        )
    return 0 if result.complete and result.oversold_units() == 0 else 1


__all__ = [
    "Answer",
    "LoadGenerator",
    "LoadResult",
    "LoadSpec",
    "ResultCollector",
    "Sender",
    "TopicReader",
    "consumer_config",
    "end_offsets",
    "measure_alone",
    "plan_reserves",
]


if __name__ == "__main__":
    sys.exit(main())
