"""Profiles a worker with py-spy (``record --format raw``) and summarises the stacks.

``py-spy record`` samples the worker's Python stacks from outside the process (no code
change, small overhead); the raw output has one line per distinct stack:
``frame;frame;...;leaf COUNT``. :func:`summarise` turns it into the share of samples
spent *in* each function (inclusive) and *at* each function (self, the leaf).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def record(pid: int, out: Path, seconds: float, rate: int = 100) -> subprocess.Popen[bytes] | None:
    """Start ``py-spy record`` on ``pid`` for ``seconds`` in the background (None: no py-spy)."""
    exe = py_spy()
    if exe is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--output",
            str(out),
            "--format",
            "raw",
            "--rate",
            str(rate),
            "--duration",
            str(max(1, int(seconds))),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)`` with the package dir kept."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    parts = path.split("/")
    site = next((i for i, p in enumerate(parts) if p == "site-packages"), None)
    if site is not None:
        path = "/".join(parts[site + 1 :])
    elif "/work/" in path or path.startswith(("agents", "pipeline", "tables", "schemas")):
        path = "/".join(parts[-2:])
    else:
        path = "/".join(parts[-2:])
    return f"{m.group('func')} ({path})"


@dataclass
class Profile:
    samples: int
    inclusive: Counter[str]
    self_: Counter[str]
    by_module_self: Counter[str]

    def top(self, which: str = "self", n: int = 15) -> list[tuple[str, float]]:
        counter = self.self_ if which == "self" else self.inclusive
        return [(k, v / self.samples) for k, v in counter.most_common(n)] if self.samples else []

    def share(self, pattern: str, which: str = "inclusive") -> float:
        """Fraction of samples whose stack contains a frame matching ``pattern`` (regex)."""
        return self.matching.get((pattern, which), 0.0)

    def self_share(self, regex: str) -> float:
        """Fraction of samples whose leaf (short name, ``func (pkg/file.py)``) matches."""
        if not self.samples:
            return 0.0
        rx = re.compile(regex)
        return sum(n for name, n in self.self_.items() if rx.search(name)) / self.samples

    matching: dict[tuple[str, str], float]


def summarise(path: Path, patterns: dict[str, str] | None = None) -> Profile:
    """Summarise a py-spy raw file; ``patterns`` name regexes to measure inclusively."""
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    by_mod: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    total = 0
    pats = {k: re.compile(v) for k, v in (patterns or {}).items()}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        shorts = [short(f) for f in frames]
        for s in set(shorts):
            inclusive[s] += n
        self_[shorts[-1]] += n
        leaf_file = _FRAME.match(frames[-1].strip())
        mod = leaf_file.group("file") if leaf_file else "?"
        by_mod[_module_of(mod)] += n
        for name, rx in pats.items():
            if any(rx.search(f) for f in frames):
                hits[name] += n
    matching = {(k, "inclusive"): hits[k] / total for k in pats} if total else {}
    return Profile(total, inclusive, self_, by_mod, matching)


def _module_of(path: str) -> str:
    parts = path.split("/")
    if "site-packages" in parts:
        i = parts.index("site-packages")
        return parts[i + 1] if i + 1 < len(parts) else path
    for top in ("agents", "pipeline", "tables", "schemas", "config"):
        if top in parts:
            return f"project:{top}"
    if "python3" in path or path.startswith("<"):
        return "stdlib"
    return parts[-1]


if __name__ == "__main__":
    prof = summarise(Path(sys.argv[1]))
    print(f"{prof.samples} samples")
    for which in ("self", "inclusive"):
        print(f"--- {which}")
        for name, frac in prof.top(which, 30):
            print(f"{frac * 100:5.1f}%  {name}")
    print("--- self by module")
    for name, n in prof.by_module_self.most_common(15):
        print(f"{n / prof.samples * 100:5.1f}%  {name}")
