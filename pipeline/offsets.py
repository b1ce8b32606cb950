"""Notices input records that never reached the agent.

Input topics are neither compacted nor transactional, so one partition's
offsets arrive contiguously: a redelivery goes back, never forward. A forward
jump means records were skipped (chaos runs with kill -9 and two workers saw
faust-streaming 0.15 do this around rebalances). This module only detects and
reports the jump; it does not repair it.
"""

from __future__ import annotations


class OffsetTracker:
    """Last offset handled per (topic, partition) since the last rebalance."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, int], int] = {}

    def reset(self) -> None:
        """Forget everything: call when partitions are revoked or assigned."""
        self._last.clear()

    def observe(
        self, topic: str, partition: int, offset: int, committed: int | None = None
    ) -> tuple[int, int] | None:
        """Record ``offset``; return the skipped range ``(first, last)`` if there is one.

        ``committed`` is the group's committed offset for the partition, used for
        the first record after a rebalance (it must be where reading resumes).
        """
        key = (topic, partition)
        prev = self._last.get(key)
        self._last[key] = offset
        if prev is None:
            if committed is not None and offset > committed:
                return (committed, offset - 1)
            return None
        if offset > prev + 1:
            return (prev + 1, offset - 1)
        return None
