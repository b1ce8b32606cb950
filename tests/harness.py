"""Test harness for the real stack: namespaces, worker subprocesses, Kafka reads.

Each test that runs workers gets its own :class:`Namespace` (topic prefix and
Faust app id), so topics, changelogs and consumer groups never leak between
tests. Workers are real ``faust -A pipeline.app worker`` subprocesses with their
own web port and data dir, stopped with SIGTERM or killed with SIGKILL.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from config.settings import Settings
from config.settings import settings as base_settings
from pipeline.clients import confluent_config
from schemas.codec import AvroCodec, DecodeError

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "test-output"
FAUST = Path(sys.executable).parent / "faust"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Namespace:
    """A fresh set of topics and a fresh app id on the shared broker (or, with ``base``,
    on the Kafka that ``base`` names: the 3-node cluster of tests/cluster.py)."""

    name: str
    partitions: int = 4
    extra_env: dict[str, str] = field(default_factory=dict)
    # the settings the namespace starts from: its Kafka (bootstrap, replication factor,
    # min ISR, standby replicas) reaches the workers' environment too
    base: Settings = field(default_factory=lambda: base_settings)

    @classmethod
    def fresh(
        cls, label: str, partitions: int = 4, *, base: Settings | None = None, **env: str
    ) -> Namespace:
        return cls(f"{label}-{uuid.uuid4().hex[:8]}", partitions, dict(env), base or base_settings)

    @property
    def settings(self) -> Settings:
        """The namespace's settings, with its own Redis key prefix and search index when
        its environment names them (so drop_projections removes the namespace's own)."""
        env = self.extra_env
        return replace(
            self.base,
            app_id=f"inv-{self.name}",
            topic_prefix=f"{self.name}.",
            partitions=self.partitions,
            redis_key_prefix=env.get("INVENTORY_REDIS_KEY_PREFIX", self.base.redis_key_prefix),
            search_index=env.get("INVENTORY_SEARCH_INDEX", self.base.search_index),
        )

    def env(self, web_port: int, data_dir: Path) -> dict[str, str]:
        """The namespace's environment for a process; ``web_port`` 0: one that serves no
        Faust web (a sidecar, a CLI tool), so INVENTORY_WEB_PORT stays unset."""
        env = dict(os.environ)
        env.pop("INVENTORY_WEB_PORT", None)
        if web_port:
            env["INVENTORY_WEB_PORT"] = str(web_port)
        env.update(
            INVENTORY_APP_ID=self.settings.app_id,
            INVENTORY_TOPIC_PREFIX=self.settings.topic_prefix,
            INVENTORY_PARTITIONS=str(self.partitions),
            INVENTORY_DATA_DIR=str(data_dir),
            INVENTORY_KAFKA_BOOTSTRAP=self.base.kafka_bootstrap,
            INVENTORY_KAFKA_SECURITY_PROTOCOL=self.base.kafka_security_protocol,
            INVENTORY_REPLICATION_FACTOR=str(self.base.replication_factor),
            INVENTORY_MIN_INSYNC_REPLICAS=str(self.base.min_insync_replicas),
            INVENTORY_TABLE_STANDBY_REPLICAS=str(self.base.table_standby_replicas),
            PYTHONUNBUFFERED="1",
            # the broker's minimum: a killed worker's partitions move on within seconds
            INVENTORY_SESSION_TIMEOUT_S="6",
        )
        env.update(self.extra_env)
        return env


_STARTED: list[Worker | Sidecar] = []


@atexit.register
def _kill_leftovers() -> None:
    """A test that died mid-way must not leave workers running after pytest exits."""
    for w in _STARTED:
        w.kill()


class Worker:
    """One worker subprocess."""

    makes_data_dir = True  # False: the worker itself must create it (a test of that)

    def __init__(self, ns: Namespace, name: str = "w1", data_dir: Path | None = None) -> None:
        self.ns = ns
        self.name = name
        self.port = free_port()
        self.data_dir = data_dir or OUT / ns.name / name / "data"
        self.log_path = OUT / ns.name / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.cwd = REPO

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The worker's command line (a subclass changes how the worker is started)."""
        return [
            str(FAUST),
            "-A",
            "pipeline.app",
            "--datadir",
            str(self.data_dir),
            "worker",
            "--web-port",
            str(self.port),
            "--web-host",
            "127.0.0.1",
            "-l",
            "info",
        ]

    def environment(self) -> dict[str, str]:
        return self.ns.env(self.port, self.data_dir)

    def start(self, wait: bool = True, timeout: float = 90.0) -> Worker:
        if self.makes_data_dir:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts} =====\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.cwd,
            env=self.environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        _STARTED.append(self)
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"worker {self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            if self.status("/healthz") == 200:
                return
            time.sleep(0.25)
        raise AssertionError(f"worker {self.name} not healthy in {timeout}s:\n{self.tail()}")

    def status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, OSError):
            return None

    def get_json(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()
            return exc.code, json.loads(body) if body else None

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (no clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class Sidecar:
    """A non-Faust process of the pipeline (``python -m pipeline.relay`` or
    ``python -m pipeline.sinks``) in a namespace, killed with its process group."""

    def __init__(
        self,
        ns: Namespace,
        module: str,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.ns = ns
        self.module = module
        self.log_path = log_path or OUT / ns.name / f"{module}.log"
        self.extra_env = env or {}
        self.port = free_port()  # its /metrics
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Sidecar:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module],
                cwd=REPO,
                env={
                    **self.ns.env(0, OUT / self.ns.name / "sidecar"),
                    "INVENTORY_METRICS_PORT": str(self.port),
                    **self.extra_env,
                },
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _STARTED.append(self)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    name: str
    value: dict[str, Any]


def read_topic(
    ns_settings: Settings,
    topic: str,
    *,
    until: Callable[[list[Record]], bool] = lambda _: False,
    timeout: float = 30.0,
    idle: float = 0.0,
    codec: AvroCodec | None = None,
) -> list[Record]:
    """Read ``topic`` from the beginning until ``until(records)`` or the timeout.

    With ``idle`` > 0 it also stops once no record arrived for ``idle`` seconds
    after ``until`` became true (to catch trailing duplicates).
    """
    codec = codec or AvroCodec()
    consumer = Consumer(
        {
            **confluent_config(ns_settings),
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    meta = consumer.list_topics(topic, timeout=10)
    parts = meta.topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    done_at: float | None = None
    last = time.monotonic()
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                try:
                    name, value = codec.decode(msg.value())
                except DecodeError:
                    name, value = "?", {"raw": msg.value()}
                out.append(Record(topic, msg.partition(), msg.offset(), msg.key(), name, value))
                last = time.monotonic()
                continue
            if done_at is None and until(out):
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - last >= idle:
                break
    finally:
        consumer.close()
    return out


def drop_projections(settings: Settings) -> None:
    """Delete a namespace's own search index (and its sink markers) and Redis keys, so a
    test that gave them a prefix of its own leaves nothing behind."""
    import redis  # the tests that need no Redis never import it
    from opensearchpy import OpenSearch

    search = OpenSearch(hosts=[settings.opensearch_url], timeout=30)
    for index in (settings.search_index, f"{settings.search_index}-sink-markers"):
        search.indices.delete(index=index, ignore_unavailable=True)
    r = redis.Redis.from_url(settings.redis_url)
    keys = list(r.scan_iter(match=f"{settings.redis_key_prefix}*"))
    if keys:
        r.delete(*keys)


def delete_index(index: str, url: str = base_settings.opensearch_url) -> None:
    """Delete a search index (a missing one is fine): a sink must re-create it."""
    req = urllib.request.Request(f"{url}/{index}", method="DELETE")
    try:
        urllib.request.urlopen(req, timeout=10).close()
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.25
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def metric_total(url: str, name: str) -> float:
    """The sum of every sample of metric ``name`` on ``url``'s /metrics (0 when the process
    does not answer yet)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


def wait_stock(worker: Worker, sku: str, timeout: float = 60, **expected: int) -> dict[str, Any]:
    """``GET /stock/{sku}`` once it answers 200 with every ``expected`` field."""
    body: dict[str, Any] = {}

    def matches() -> bool:
        nonlocal body
        try:
            status, body = worker.get_json(f"/stock/{sku}")
        except OSError as exc:  # an answer slower than get_json's timeout: ask again
            body = {"error": repr(exc)}
            return False
        return status == 200 and all(body.get(k) == v for k, v in expected.items())

    try:
        wait_for(matches, timeout, f"{sku} to reach {expected}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; it is {body}") from None
    return body


def restock_and_wait(worker: Worker, producer: Any, sku: str, qty: int) -> None:
    """Restocks travel on another topic than orders: Kafka orders nothing across topics,
    so a test that reserves right after a restock waits until the restock is applied."""
    producer.send("RestockReceived", {"sku": sku, "qty": qty})
    producer.flush()
    wait_stock(worker, sku, on_hand=qty)


def latest_by_key(records: Iterable[Record], field: str = "version") -> dict[Any, Record]:
    latest: dict[Any, Record] = {}
    for r in records:
        k = r.value.get("sku")
        if k not in latest or r.value[field] > latest[k].value[field]:
            latest[k] = r
    return latest
