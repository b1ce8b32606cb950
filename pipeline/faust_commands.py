"""Faust's own ``faust -A pipeline.app ...`` commands, fixed for this app.

``faust agents`` lists an agent's topic with ``Topic.get_topic_name()``, which raises
``ValueError`` for a topic of several names; both our agents read several (the ledger
its three co-partitioned inputs, the saga the checkouts and the order-line results),
so the command crashed. A command class named like a built-in one replaces it in
Faust's command group once the app module is imported (which ``faust -A`` does before
it picks the command); this one names every topic an agent reads.
"""

from __future__ import annotations

from typing import Any

from faust.cli import agents as _faust_agents


class agents(_faust_agents.agents):  # noqa: N801 - the class name is the command's name
    """List agents."""

    def _maybe_topic(self, agent: Any) -> str | None:
        names = getattr(agent.channel, "topics", None) or ()
        if len(names) > 1:
            return ", ".join(names)
        topic: str | None = super()._maybe_topic(agent)
        return topic
