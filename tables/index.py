"""A worker-local index over some keys of a table, kept current by the agent's writes.

Sweepers (reservation expiry, saga re-sends) need the few *open* entries of a
table that keeps every order ever seen. Decoding the whole table every second
costs CPU in proportion to all orders ever seen, so the agent notes every write
in an index and the sweeper reads only the index. A restore from the changelog
writes the table without the agent, so the index is rebuilt by a scan after
every rebalance and, as a backstop, every few minutes
(:class:`pipeline.kafka.indexing.IndexRefresher`). The scan runs in slices between
which the agent keeps writing: notes made after :meth:`start_rebuild` win over
what the scan read for the same key.
"""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterable
from typing import Generic, TypeVar

E = TypeVar("E")


class LiveIndex(Generic[E]):
    """key -> entry of the open items; ``None`` entries mean "not open" and are dropped."""

    def __init__(self) -> None:
        self._entries: dict[bytes, E] = {}
        self._noted: dict[bytes, E | None] | None = None  # notes during a rebuild

    def put(self, key: bytes, entry: E | None) -> None:
        """The agent wrote ``key``: it is open with ``entry``, or closed (None)."""
        if entry is not None:
            self._entries[key] = entry
        else:
            self._entries.pop(key, None)
        if self._noted is not None:
            self._noted[key] = entry

    def start_rebuild(self) -> None:
        """Begin a scan of the table; notes from now on override what it finds."""
        self._noted = {}

    def abort_rebuild(self) -> None:
        """Forget a scan that did not finish (e.g. a rebalance began); keep the old set."""
        self._noted = None

    def finish_rebuild(self, found: dict[bytes, E]) -> None:
        """Replace the set by ``found`` plus the notes since :meth:`start_rebuild`."""
        for key, entry in (self._noted or {}).items():
            if entry is None:
                found.pop(key, None)
            else:
                found[key] = entry
        self._noted = None
        self._entries = found

    def rebuild(
        self,
        items: Iterable[tuple[bytes, bytes]],
        entry_of: Callable[[bytes, bytes], E | None],
    ) -> None:
        """Replace the set in one go from ``items`` (table key, value)."""
        self.start_rebuild()
        found: dict[bytes, E] = {}
        for key, value in items:
            entry = entry_of(key, value)
            if entry is not None:
                found[key] = entry
        self.finish_rebuild(found)

    def items(self) -> ItemsView[bytes, E]:
        return self._entries.items()

    def __len__(self) -> int:
        return len(self._entries)
