"""Rebuilds a :class:`tables.index.LiveIndex` from a Faust table without stalling the agents."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from tables.index import LiveIndex

log = logging.getLogger("inventory.indexing")

E = TypeVar("E")
SCAN_SLICE = 2_000  # table items per slice of a rebuild, between which the agents run


def settled(app: Any) -> bool:
    """No rebalance or restore under way. A restore writes the table without the agents,
    so an index is rebuilt only after it (Faust ends a rebalance after its recovery)."""
    return not app.rebalancing and not app.in_recovery and app.tables.recovery.completed.is_set()


class IndexRefresher(Generic[E]):
    """Rebuilds ``index`` from a table's items after each change of the partitions and
    every ``full_scan_s``, reading the table in slices of SCAN_SLICE items.

    ``items()`` iterates the (key, value) pairs of this worker's partitions;
    ``token()`` changes whenever what they hold may have changed without the
    agent noting it (a rebalance, a restore)."""

    def __init__(
        self,
        name: str,
        app: Any,
        items: Callable[[], Iterable[tuple[bytes, bytes]]],
        index: LiveIndex[E],
        entry_of: Callable[[bytes, bytes], E | None],
        full_scan_s: float,
        token: Callable[[], Any] | None = None,
    ) -> None:
        self.name = name
        self.app = app
        self.items = items
        self.index = index
        self.entry_of = entry_of
        self.full_scan_s = full_scan_s
        self.token = token or (lambda: app.consumer_generation_id)
        self._generation: Any = None
        self._at = 0.0

    async def refresh(self) -> bool:
        """Rebuild if due. False when a rebalance or an error interrupted the scan: the old
        index stays and the next call tries again."""
        generation = self.token()
        mono = time.monotonic()
        if generation == self._generation and mono - self._at < self.full_scan_s:
            return True
        started = time.perf_counter()
        self.index.start_rebuild()
        found: dict[bytes, E] = {}
        try:
            for i, (key, value) in enumerate(self.items(), 1):
                entry = self.entry_of(key, value)
                if entry is not None:
                    found[key] = entry
                if i % SCAN_SLICE == 0:
                    await asyncio.sleep(0)
                    if not settled(self.app) or self.token() != generation:
                        self.index.abort_rebuild()
                        return False
        except Exception as exc:  # noqa: BLE001 - a partition closed under the scan: retry
            self.index.abort_rebuild()
            log.warning("%s index rebuild interrupted (%s); retrying", self.name, exc)
            return False
        self.index.finish_rebuild(found)
        self._generation, self._at = generation, mono
        log.info(
            "%s index rebuilt: %d open in %.2f s",
            self.name,
            len(found),
            time.perf_counter() - started,
        )
        return True
