"""Projections survive target outages mid-stream, converge, and can be rebuilt.

Redis: the test's own redis-server (append-only, so a restart keeps its data)
is stopped for 12 s in the middle of a stream and started again. OpenSearch:
the worker reaches the shared node through a proxy that first refuses
connections and then black-holes them (a hung server) for 12 s. Afterwards
every SKU's version in Redis and in the index must equal the table's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest
import redis

from config.settings import settings as base
from faults import PrivateRedis, TcpProxy
from harness import OUT, REPO, Namespace, Worker, delete_index, wait_for
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration

SKUS = [f"OUT-{i}" for i in range(12)]


def search_version(os_url: str, index: str, sku: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{os_url}/{index}/_doc/{sku}", timeout=5) as resp:
            return json.loads(resp.read())["_source"]["version"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def table_versions(worker: Worker) -> dict[str, int]:
    out = {}
    for sku in SKUS:
        status, body = worker.get_json(f"/stock/{sku}")
        assert status == 200, (sku, body)
        out[sku] = body["version"]
    return out


def metric(worker: Worker, name: str, label: str) -> float:
    with urllib.request.urlopen(worker.url + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + "{") and label in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture()
def targets(redis_service, opensearch):
    r = PrivateRedis(OUT / f"redis-{uuid.uuid4().hex[:6]}").start()
    host, port = base.opensearch_url.rsplit("//", 1)[1].split(":")
    proxy = TcpProxy(host, int(port)).start()
    yield r, proxy
    proxy.close()
    r.stop()


def test_outages_of_redis_and_search_lose_nothing_and_converge(kafka, targets):
    private_redis, proxy = targets
    index = f"outage-{uuid.uuid4().hex[:8]}"
    ns = Namespace.fresh(
        "outage",
        INVENTORY_REDIS_URL=private_redis.url,
        INVENTORY_OPENSEARCH_URL=f"http://127.0.0.1:{proxy.port}",
        INVENTORY_SEARCH_INDEX=index,
        INVENTORY_SINK_MAX_BACKOFF_S="2",
    )
    worker = Worker(ns).start()
    stop = threading.Event()

    def stream() -> None:
        with CommandProducer(ns.settings) as p:
            i = 0
            while not stop.is_set():
                sku = SKUS[i % len(SKUS)]
                if (i // len(SKUS)) % 3 == 0:  # every SKU: a round of restocks, two of orders
                    p.send("RestockReceived", {"sku": sku, "qty": 2})
                else:
                    p.send("ReserveStock", {"order_id": f"out-{i}", "sku": sku, "qty": 1})
                i += 1
                if i % 20 == 0:
                    p.flush()
                    time.sleep(0.1)

    producer = threading.Thread(target=stream)
    saw_degraded = {"redis": False, "search": False}
    try:
        producer.start()
        time.sleep(3)
        private_redis.stop()
        proxy.set_mode("refuse")
        outage_end = time.monotonic() + 12
        while time.monotonic() < outage_end:
            status, body = worker.get_json("/healthz")
            for target, state in body.get("sinks", {}).items():
                saw_degraded[target] |= state == "degraded"
            if time.monotonic() > outage_end - 6 and proxy.mode != "blackhole":
                proxy.set_mode("blackhole")  # second half: a hung server, not a dead one
            time.sleep(0.5)
        assert metric(worker, "inventory_sink_degraded", 'target="redis"') == 1.0
        private_redis.start()  # the same port and append-only file: its data is back
        proxy.set_mode("up")
        time.sleep(3)
        stop.set()
        producer.join(30)
        assert saw_degraded == {"redis": True, "search": True}

        rds = redis.Redis.from_url(private_redis.url)

        behind: dict[str, tuple[int, int | None, int | None]] = {}
        # the worker may still be applying the tail of the stream (it can lag the producer
        # on a busy machine): only a table unchanged for 2 s is the final state
        seen: dict[str, Any] = {"versions": None, "since": 0.0}

        def converged() -> bool:
            behind.clear()
            versions = table_versions(worker)
            if versions != seen["versions"]:
                seen.update(versions=versions, since=time.monotonic())
                return False
            if time.monotonic() - seen["since"] < 2.0:
                return False
            for sku, v in versions.items():
                got = rds.hget(ns.settings.redis_stock_key(sku), "version")
                in_redis = None if got is None else int(got)
                in_search = search_version(base.opensearch_url, index, sku)
                if (in_redis, in_search) != (v, v):
                    behind[sku] = (v, in_redis, in_search)
            return not behind

        try:
            wait_for(converged, 90, "Redis and OpenSearch to reach the table's versions")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; (table, redis, search) per SKU: {behind}") from None
        assert worker.get_json("/healthz")[1]["status"] == "ok"

        # rebuild: wipe Redis and rebuild it from the changelog while the worker runs
        rds.flushdb()
        env = ns.env(worker.port, worker.data_dir)
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.rebuild", "--target", "redis", "--quiet"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert f"redis: {len(SKUS)} SKUs" in done.stdout, done.stdout
        want = table_versions(worker)
        for sku, v in want.items():
            assert int(rds.hget(ns.settings.redis_stock_key(sku), "version")) == v
    finally:
        stop.set()
        worker.stop()
        delete_index(index)
