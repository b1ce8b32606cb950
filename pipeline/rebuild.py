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
from collections.abc import Sequence

from tqdm import tqdm

from config.settings import Settings, settings
from pipeline.cli import prog
from pipeline.kafka.reading import read_to_end
from pipeline.kafka.topics import changelog_topic
from pipeline.sinks.base import Projection
from pipeline.sinks.runner import build_projections
from tables.stock import StoredStock, is_stock_key


def latest_states(cfg: Settings, progress: bool = True) -> dict[str, StoredStock]:
    """Each SKU's newest stored state from the changelog, read up to its current end."""
    topic = changelog_topic(cfg)
    latest: dict[str, StoredStock] = {}
    bar = tqdm(desc="changelog", unit="rec", disable=not progress, file=sys.stderr)
    try:
        for msg in read_to_end(cfg, topic, timeout=600):
            bar.update(1)
            key, value = msg.key(), msg.value()
            if key is None or value is None or not is_stock_key(key):
                continue
            stored = StoredStock.from_bytes(value)
            sku = stored.record.sku
            if sku not in latest or stored.record.version >= latest[sku].record.version:
                latest[sku] = stored
    except LookupError:
        raise SystemExit(f"changelog topic {topic} not found: has a worker run yet?") from None
    finally:
        bar.close()
    return latest


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
    parser = argparse.ArgumentParser(prog=prog("pipeline.rebuild"), description=__doc__)
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
