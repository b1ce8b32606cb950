"""Run the projection sinks alone, without a Faust worker: ``python -m pipeline.sinks``."""

from __future__ import annotations

import asyncio

from config.settings import settings
from pipeline import metrics
from pipeline.logs import configure_logging
from pipeline.sinks.runner import SinkRunner, build_projections, run_forever
from schemas.codec import codec_from_settings


async def main() -> None:
    runners = [
        SinkRunner(settings, p, codec_from_settings(settings)) for p in build_projections(settings)
    ]
    await asyncio.gather(*(run_forever(r) for r in runners))


if __name__ == "__main__":
    configure_logging(settings.log_level)
    metrics.serve_standalone(settings.metrics_port, settings.web_host)
    asyncio.run(main())
