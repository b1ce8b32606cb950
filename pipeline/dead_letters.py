"""The one way a dead letter is built: the record that failed, its reason, and where it was.

A dead letter copies the failed record's key and value, so a record at the broker's
size limit would make a dead letter above it, which the broker refuses: the partition
would then stop on that record for ever. :func:`dead_letter` keeps every dead letter
within ``max_bytes``: a key or value too large keeps its first bytes, and the detail
says how much was cut.
"""

from __future__ import annotations

from typing import Any

MAX_DETAIL = 1000
MAX_KEY = 1024
OVERHEAD = 4096  # reason, detail, topic, numbers and Avro framing, with room to spare


def dead_letter(
    *,
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes,
    dead_at: int,
    max_bytes: int,
) -> tuple[bytes | None, dict[str, Any]]:
    """The dead letter's Kafka key and DeadLetter record (Avro-ready), within ``max_bytes``."""
    cuts: list[str] = []
    if key is not None and len(key) > MAX_KEY:
        cuts.append(f"key truncated from {len(key)} to {MAX_KEY} bytes")
        key = key[:MAX_KEY]
    room = max(0, max_bytes - OVERHEAD - 2 * len(key or b""))
    if len(value) > room:
        cuts.append(f"value truncated from {len(value)} to {room} bytes")
        value = value[:room]
    if cuts:
        note = "; " + "; ".join(cuts)
        detail = detail[: MAX_DETAIL - len(note)] + note
    record = {
        "reason": reason[:200],
        "detail": detail[:MAX_DETAIL],
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "key": key,
        "value": value,
        "dead_at": dead_at,
    }
    return key, record
