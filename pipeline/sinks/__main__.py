"""Run the projection sinks alone, without a Faust worker: ``python -m pipeline.sinks``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from config.settings import settings
from pipeline import metrics
from pipeline.cli import prog
from pipeline.logs import configure_logging
from pipeline.sinks.runner import SinkRunner, build_projections, run_forever
from schemas.codec import codec_from_settings


async def run() -> None:
    runners = [
        SinkRunner(settings, p, codec_from_settings(settings)) for p in build_projections(settings)
    ]
    await asyncio.gather(*(run_forever(r) for r in runners))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.sinks`` / ``inventory-sinks``: the sinks alone, until stopped."""
    parser = argparse.ArgumentParser(
        prog=prog("pipeline.sinks"),
        description="Project the ledger's SKU records into Redis and OpenSearch without a "
        "worker (set INVENTORY_SINK_ENABLED=0 on the workers then): one consumer group per "
        "target, applied by version. Configured by the INVENTORY_* variables; /metrics on "
        "INVENTORY_METRICS_PORT (0 = none).",
    )
    parser.parse_args(argv)
    configure_logging(settings.log_level)
    metrics.serve_standalone(settings.metrics_port, settings.web_host)
    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
