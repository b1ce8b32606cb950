"""The wall clock, in the milliseconds every record carries (``occurred_at``,
``processed_at``, ``dead_at``). The domain never reads it: it is given ``now``."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the epoch, now."""
    return time.time_ns() // 1_000_000
