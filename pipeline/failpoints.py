"""Fault injection for tests: make Faust lose a record on its way to an agent.

``INVENTORY_FAILPOINT_DROP_DELIVERY="orders:2:1,restocks:0:5"`` drops the first
delivery of each listed record (topic name without the prefix, partition,
offset) between Faust's fetch loop and the agents, the way faust-streaming 0.15
was seen to lose records around rebalances: the fetch loop moves on as if it had
been delivered. Off unless the variable is set; every drop is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("inventory.failpoints")


def parse_drops(spec: str) -> set[tuple[str, int, int]]:
    drops = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        topic, partition, offset = item.rsplit(":", 2)
        drops.add((topic, int(partition), int(offset)))
    return drops


def drop_deliveries(
    callback: Callable[[Any], Awaitable[None]], drops: set[tuple[str, int, int]], prefix: str
) -> Callable[[Any], Awaitable[None]]:
    """Wrap Faust's per-message callback so the listed records' first delivery vanishes."""
    pending = {(prefix + topic, partition, offset) for topic, partition, offset in drops}

    async def on_message(message: Any) -> None:
        key = (message.topic, message.partition, message.offset)
        if key in pending:
            pending.discard(key)
            log.warning("failpoint: dropped delivery of %s/%d@%d", *key)
            return
        await callback(message)

    return on_message
