"""Rebuild the projections from the authoritative state: ``python -m pipeline.rebuild``.

Reads the stock table's changelog (compacted: the latest record of every SKU,
plus not-yet-compacted older ones) from the beginning up to its end as of the
start, keeps each SKU's highest version, and writes those to the targets in
batches through the same adapters the sink uses. Targets apply by version, so
running it while the sink runs is safe: a rebuilt version never overwrites a
newer one the sink already wrote. ``--wipe`` empties a target first (then
rebuilds); without it, rebuild only fills gaps and repairs lagging SKUs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Sequence

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from tqdm import tqdm

from config.settings import Settings, settings
from pipeline.clients import confluent_config
from pipeline.sinks.base import Projection
from pipeline.sinks.runner import build_projections
from pipeline.topics import changelog_topic
from tables.stock import StoredStock, is_stock_key


def latest_states(cfg: Settings, progress: bool = True) -> dict[str, StoredStock]:
    """Each SKU's newest stored state from the changelog, read up to its current end."""
    topic = changelog_topic(cfg)
    consumer = Consumer(
        confluent_config(
            cfg,
            **{
                "group.id": f"rebuild-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            },
        )
    )
    try:
        meta = consumer.list_topics(topic, timeout=10)
        if topic not in meta.topics or meta.topics[topic].error is not None:
            raise SystemExit(f"changelog topic {topic} not found: has a worker run yet?")
        ends: dict[int, int] = {}
        for p in meta.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        total = sum(ends.values())
        latest: dict[str, StoredStock] = {}
        bar = tqdm(total=total, desc="changelog", unit="rec", disable=not progress, file=sys.stderr)
        done: set[int] = set()
        while len(done) < len(ends):
            msg = consumer.poll(1.0)
            if msg is None or msg.error() is not None:
                continue
            bar.update(1)
            if msg.offset() + 1 >= ends[msg.partition()]:
                done.add(msg.partition())
            key, value = msg.key(), msg.value()
            if key is None or value is None or not is_stock_key(key):
                continue
            stored = StoredStock.from_bytes(value)
            sku = stored.record.sku
            if sku not in latest or stored.record.version >= latest[sku].record.version:
                latest[sku] = stored
        bar.close()
        return latest
    finally:
        consumer.close()


async def rebuild(
    cfg: Settings,
    targets: Sequence[Projection],
    *,
    wipe: bool = False,
    batch: int = 500,
    progress: bool = True,
) -> dict[str, dict[str, int]]:
    """Write every SKU's latest state to ``targets``; returns applied/stale per target."""
    states = latest_states(cfg, progress)
    changes = [s.as_change() for s in states.values() if s.record.version > 0]
    report: dict[str, dict[str, int]] = {}
    for target in targets:
        await target.setup()
        if wipe:
            await target.wipe()
            await target.setup()
        applied = stale = 0
        bar = tqdm(
            total=len(changes),
            desc=target.name,
            unit="sku",
            disable=not progress,
            file=sys.stderr,
        )
        for i in range(0, len(changes), batch):
            part = changes[i : i + batch]
            r = await target.apply(part)
            applied, stale = applied + r.applied, stale + r.stale
            bar.update(len(part))
        bar.close()
        await target.close()
        report[target.name] = {"skus": len(changes), "applied": applied, "stale": stale}
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.rebuild", description=__doc__)
    parser.add_argument("--target", choices=("redis", "search", "all"), default="all")
    parser.add_argument("--wipe", action="store_true", help="empty each target first")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    targets = [
        p for p in build_projections(settings) if args.target == "all" or p.name == args.target
    ]
    report = asyncio.run(rebuild(settings, targets, wipe=args.wipe, progress=not args.quiet))
    for name, r in report.items():
        print(f"{name}: {r['skus']} SKUs, {r['applied']} applied, {r['stale']} already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
