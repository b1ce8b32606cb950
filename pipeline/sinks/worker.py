"""Runs the projection sinks inside a Faust worker (unless INVENTORY_SINK_ENABLED=0).

Nothing is built at import: the sinks' runners (and their Redis and OpenSearch
clients) are made when the worker starts its tasks, so a tool that only loads the
app (``faust -A pipeline.app`` commands, tests) opens no client."""

from __future__ import annotations

import asyncio

from config.settings import settings
from pipeline.runtime import app
from pipeline.sinks.runner import SinkRunner, build_projections, run_forever
from schemas.codec import codec_from_settings

RUNNERS: list[SinkRunner] = []

if settings.sink_enabled:

    @app.task
    async def run_sinks() -> None:
        RUNNERS.extend(
            SinkRunner(settings, p, codec_from_settings(settings))
            for p in build_projections(settings)
        )
        await asyncio.gather(*(run_forever(r) for r in RUNNERS))


def sink_states() -> dict[str, str]:
    """Per target, for /healthz: "ok", "degraded" (the target fails; the sink is paused)
    or "replaying" (the target lost data and is being re-applied from the changelog)."""
    return {r.target: r.state for r in RUNNERS}
