"""What the command-line tools share: the name they show in their usage line."""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPT_PREFIX = "inventory-"


def prog(module: str) -> str:
    """``inventory-NAME`` when run as its console script, else ``python -m MODULE``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith(SCRIPT_PREFIX) else f"python -m {module}"
