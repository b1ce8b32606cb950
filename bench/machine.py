"""Describes the machine and the software versions a benchmark ran on."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import platform
import re
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.common import REPO


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _mem_gib() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def _kafka_version() -> str:
    jars = glob.glob(str(REPO / ".stack" / "kafka-libs" / "kafka_2.*-*.jar"))
    for jar in sorted(jars):
        m = re.search(r"kafka_2\.\d+-([\d.]+)\.jar$", jar)
        if m:
            return m.group(1)
    return "?"


def _opensearch_version(url: str) -> str:
    with contextlib.suppress(Exception), urllib.request.urlopen(url, timeout=5) as resp:
        return str(json.loads(resp.read())["version"]["number"])
    return "?"


def _pkg(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def _git() -> dict[str, Any]:
    import subprocess

    def git(*args: str) -> str:
        with contextlib.suppress(Exception):
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        return ""

    dirty = [
        line[3:]
        for line in git("status", "--porcelain").splitlines()
        if not line[3:].startswith("bench/")
    ]
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": dirty}


def describe() -> dict[str, Any]:
    from bench.baselines import redis_version
    from config.settings import settings

    try:
        import confluent_kafka

        librdkafka = confluent_kafka.libversion()[0]
    except Exception:  # noqa: BLE001
        librdkafka = "?"
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(_mem_gib(), 1),
        "kernel": platform.release(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "kafka": _kafka_version(),
        "redis": redis_version(settings.redis_url),
        "opensearch": _opensearch_version(settings.opensearch_url),
        "packages": {
            n: _pkg(n)
            for n in (
                "faust-streaming",
                "aiokafka",
                "confluent-kafka",
                "rocksdict",
                "fastavro",
                "orjson",
                "redis",
                "psycopg",
                "py-spy",
                "matplotlib",
            )
        },
        "librdkafka": librdkafka,
        "git": _git(),
    }
