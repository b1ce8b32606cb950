"""The changelog relay as its own process (``python -m pipeline.relay``).

With ``INVENTORY_RELAY_ENABLED=0`` the worker only decides and writes its
table; a separate relay process publishes the answers and stock changes. A
``kill -9`` of that process mid-stream must lose nothing: its replacement
re-publishes from the last committed changelog offset, so every order gets an
answer and every version of the SKU reaches ``inventory.stock-changes``. The
kill comes from a failpoint (``INVENTORY_FAILPOINT_RELAY_KILL_AFTER``) right
after a batch was published and before its offsets were committed, so the test
knows the kill fell mid-stream.
"""

from __future__ import annotations

import pytest

from harness import Namespace, Sidecar, Worker, metric_total, read_topic, restock_and_wait, wait_for
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration

ORDERS = 600
UNITS = 400


def test_relay_process_killed_mid_stream_loses_no_answer_or_version(kafka):
    ns = Namespace.fresh("relayproc", INVENTORY_RELAY_ENABLED="0", INVENTORY_SINK_ENABLED="0")
    worker = Worker(ns).start()
    # the first relay SIGKILLs itself after publishing a batch it has not committed
    doomed = Sidecar(ns, "pipeline.relay", env={"INVENTORY_FAILPOINT_RELAY_KILL_AFTER": "300"})
    doomed.start()
    relay: Sidecar | None = None
    try:
        with CommandProducer(ns.settings) as producer:
            restock_and_wait(worker, producer, "RP-1", UNITS)
            for i in range(ORDERS):
                producer.send("ReserveStock", {"sku": "RP-1", "order_id": f"o-{i}", "qty": 1})
        wait_for(lambda: not doomed.alive(), 120, "the relay's kill failpoint")
        assert doomed.proc is not None and doomed.proc.returncode == -9
        relay = Sidecar(ns, "pipeline.relay").start()

        # the killed relay may have published every answer in its last, uncommitted round:
        # the replacement (once the group let it in, after the killed member's session)
        # publishes that round again; read the answers once it has
        def published() -> float:
            return metric_total(relay.url, "inventory_relay_published_total")

        wait_for(lambda: published() >= ORDERS, 120, "the replacement relay to re-publish")
        answers = read_topic(
            ns.settings,
            ns.settings.results_topic,
            until=lambda rs: len({r.value["order_id"] for r in rs}) >= ORDERS,
            timeout=180,
            idle=2.0,
        )
        by_order: dict[str, set[str]] = {}
        for r in answers:
            by_order.setdefault(r.value["order_id"], set()).add(r.value["outcome"])
        assert len(by_order) == ORDERS
        # the killed relay's last batch was published again: identical answers, never
        # a second, different outcome for an order
        assert len(answers) > ORDERS
        assert all(len(outcomes) == 1 for outcomes in by_order.values())
        assert sum(1 for o in by_order.values() if o == {"RESERVED"}) == UNITS
        # the standalone relay serves its own /metrics (INVENTORY_METRICS_PORT)
        assert published() > 0

        _, stock = worker.get_json("/stock/RP-1")
        final = stock["version"]
        changes = read_topic(
            ns.settings,
            ns.settings.stock_changes_topic,
            until=lambda rs: any(
                r.name == "StockChanged" and r.value["version"] == final for r in rs
            ),
            timeout=120,
        )
        versions = {r.value["version"] for r in changes if r.name == "StockChanged"}
        # every version from the restock to the last granted reserve, none missing
        assert versions == set(range(1, final + 1))
        assert final == 1 + UNITS
        assert stock["reserved"] == UNITS and stock["available"] == 0
    finally:
        doomed.kill()
        if relay is not None:
            relay.kill()
        worker.stop()
    assert worker.proc is not None and worker.proc.returncode == 0, worker.tail()
