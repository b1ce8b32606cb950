"""Runs the projection sinks inside a Faust worker (unless INVENTORY_SINK_ENABLED=0)."""

from __future__ import annotations

import asyncio

from config.settings import settings
from pipeline.runtime import app
from pipeline.sinks.runner import SinkRunner, build_projections, run_forever
from schemas.codec import codec_from_settings

RUNNERS: list[SinkRunner] = []

if settings.sink_enabled:
    RUNNERS.extend(
        SinkRunner(settings, projection, codec_from_settings(settings))
        for projection in build_projections(settings)
    )

    @app.task
    async def run_sinks() -> None:
        await asyncio.gather(*(run_forever(r) for r in RUNNERS))


def sink_states() -> dict[str, str]:
    """Per target, for /healthz: "ok", "degraded" (the target fails; the sink is paused)
    or "replaying" (the target lost data and is being re-applied from the changelog)."""
    return {r.target: r.state for r in RUNNERS}
