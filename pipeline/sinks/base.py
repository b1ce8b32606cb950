"""The one small interface every projection target implements.

A projection receives batches of ``StockChanged`` records (the dicts of
``schemas/StockChanged.avsc``) and must make the target hold, per SKU, the
change with the highest ``version`` it has seen: applying a version that is
not newer than what the target holds is a no-op, so replays, duplicates and
reordering never move a projection backwards. ``apply`` either applies the
whole batch (idempotently) or raises :class:`TargetUnavailable`; the runner
then retries the same batch later and never commits past it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

StockChange = Mapping[str, Any]


class TargetUnavailable(RuntimeError):
    """The target is down, slow or refused the batch; retry the same batch later."""


@dataclass(frozen=True)
class ApplyReport:
    applied: int  # changes that moved the target forward
    stale: int  # changes at or below the version the target already held
    applied_at_ms: int  # target-side time of the write, for freshness


class Projection(ABC):
    """A target kept in step with the stock table by version."""

    name: str

    @abstractmethod
    async def setup(self) -> None:
        """Create clients, scripts, indices; idempotent. Raise TargetUnavailable if down."""

    @abstractmethod
    async def apply(self, changes: Sequence[StockChange]) -> ApplyReport:
        """Apply a batch (any SKUs, any order, duplicates allowed); all or raise."""

    @abstractmethod
    async def versions(self, skus: Sequence[str]) -> dict[str, int]:
        """The version the target holds per SKU (absent = never written); for checks."""

    @abstractmethod
    async def ping(self) -> bool:
        """True when the target answers now."""

    @abstractmethod
    async def close(self) -> None:
        """Release clients."""

    async def lost(self, partitions: Sequence[int]) -> set[int]:
        """Which of ``partitions`` (of the ledger's changelog) the target may have lost
        records of since :meth:`mark_intact` (restarted empty, flushed, a key evicted,
        index deleted): the runner then re-applies those partitions from the beginning.
        Per partition, because each sink of a target (one per worker) replays only the
        partitions it is assigned. Raise TargetUnavailable when it cannot tell.
        Default: nothing is ever lost."""
        return set()

    async def repair(self, partitions: Sequence[int]) -> None:
        """Before ``partitions`` are re-applied: make the target able to take them (a
        deleted or wrongly mapped index created again) and remember what it is now, so
        :meth:`mark_intact` names the target the replay went into. Raise
        TargetUnavailable when it cannot now. Default: nothing to repair."""
        return None

    async def mark_intact(self, partitions: Sequence[int]) -> None:
        """Record that the target now holds every record of ``partitions`` up to the
        changelog's end (as the target was at :meth:`repair`)."""
        return None

    async def wipe(self) -> None:
        """Delete everything this projection wrote (for a full rebuild)."""
        raise NotImplementedError(f"{self.name} cannot be wiped")
