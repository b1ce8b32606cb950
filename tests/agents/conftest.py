"""The agent tier: the ledger engine and the saga handler over in-memory Kafka fakes.

Fast and without the stack: ``make test-agents`` (or ``pytest tests/agents``). The
fakes stand for the I/O boundary only (see ``memory_kafka.py``); the partition tasks,
the batch fold, the codec and the RocksDB store are the real ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
