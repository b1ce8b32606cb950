"""The foundation works end to end on the real local stack."""

from __future__ import annotations

import urllib.request

import pytest
import redis

from config.settings import settings
from harness import Namespace, Worker, read_topic, wait_for
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration


def test_redis_answers_ping(redis_service):
    assert redis.Redis.from_url(settings.redis_url).ping() is True


def test_opensearch_cluster_is_at_least_yellow(opensearch):
    url = settings.opensearch_url + "/_cluster/health?wait_for_status=yellow&timeout=10s"
    with urllib.request.urlopen(url, timeout=15) as resp:
        assert resp.status == 200
        assert b'"status":"red"' not in resp.read()


def test_worker_applies_a_restock_and_answers_health_and_stock(kafka):
    ns = Namespace.fresh("smoke")
    worker = Worker(ns).start()
    try:
        assert worker.status("/healthz") == 200
        with CommandProducer(ns.settings) as producer:
            producer.send("RestockReceived", {"sku": "SMOKE-1", "qty": 7})
        wait_for(lambda: worker.get_json("/stock/SMOKE-1")[0] == 200, 30, "stock of SMOKE-1")
        status, body = worker.get_json("/stock/SMOKE-1")
        assert body == {
            "sku": "SMOKE-1",
            "on_hand": 7,
            "reserved": 0,
            "safety_stock": 0,
            "available": 7,
            "version": 1,
            "shared_available": 7,
            "channels": {},
            "damaged": 0,
            "locations": {},
            "incoming": {
                "open": 0,
                "promised": 0,
                "backorderable": 0,
                "cap": 0,
                "staged": 0,
                "waiting": 0,
                "purchase_orders": {},
            },
        }
        assert worker.get_json("/stock/NO-SUCH-SKU")[0] == 404
        changes = read_topic(
            ns.settings, ns.settings.stock_changes_topic, until=lambda rs: len(rs) >= 2
        )
        assert [
            (r.key, r.value["version"], r.value["available"])
            for r in changes
            if r.name == "StockChanged"
        ] == [(b"SMOKE-1", 1, 7)]
        assert worker.status("/metrics") == 200
    finally:
        worker.stop()
    assert worker.proc.returncode == 0, worker.tail()
