"""The application the CLI loads: the runtime plus every agent, view and timer.

Start a worker with the standard CLI::

    faust -A pipeline.app --datadir .data/worker1 worker --web-port 6066

:mod:`pipeline.runtime` builds the App, its topics and the ledger's feed and imports
no agent; the modules imported here register themselves on it (agents, sweepers,
views, the live stream, the reserve API, the sinks and the fixed ``faust agents``
command). Nothing but this module and the CLI imports ``pipeline.app``: ``make lint``
checks it.
"""

from __future__ import annotations

import agents.orders  # noqa: F401
import agents.stock  # noqa: F401
import pipeline.expiry  # noqa: F401
import pipeline.faust_commands  # noqa: F401
import pipeline.sinks.worker  # noqa: F401
import pipeline.web.live  # noqa: F401
import pipeline.web.reserve_api  # noqa: F401
import pipeline.web.views  # noqa: F401
from pipeline.runtime import app, settings

__all__ = ["app"]

if settings.relay_enabled:
    from pipeline.kafka.consuming import run_forever
    from pipeline.relay import ChangelogRelay
    from schemas.codec import codec_from_settings

    @app.task
    async def run_relay() -> None:
        await run_forever(ChangelogRelay(settings, codec_from_settings(settings)).run, "relay")
