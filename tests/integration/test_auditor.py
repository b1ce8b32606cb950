"""The continuous invariant auditor against a real worker, relay and sinks.

A sale with contention, a shortfall, releases and commits: the auditor finds
nothing. Then the relay is stopped and the test forges, in its own namespace, one
breach of each invariant (a conflicting and a rewritten version, a gap, a change that
does not fit its cause, a change the relay never published, a stale Redis hash and a
stale search document): each raises its own counter, by exactly what was forged, and
no other.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from typing import Any

import pytest
import redis
from opensearchpy import OpenSearch

from config.settings import settings as base
from harness import Namespace, Sidecar, Worker, read_topic, wait_for, wait_stock
from pipeline.kafka.reading import read_to_end
from pipeline.kafka.topics import changelog_topic
from pipeline.metrics import INVARIANTS
from pipeline.produce import CommandProducer
from schemas.codec import AvroCodec
from tables.stock import StoredStock, is_stock_key

pytestmark = pytest.mark.integration

GRACE_S = 5.0


def scrape(url: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample on ``url``/metrics ({} when down)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def violations(url: str) -> dict[str, float]:
    got = scrape(url)
    return {
        i: got.get(f'inventory_invariant_violations_total{{invariant="{i}"}}', -1)
        for i in INVARIANTS
    }


def ledger_changes(ns: Namespace) -> dict[str, dict[str, Any]]:
    """The latest StockChanged of every SKU in the ledger's changelog."""
    out: dict[str, dict[str, Any]] = {}
    for msg in read_to_end(ns.settings, changelog_topic(ns.settings), timeout=30):
        if msg.value() is not None and msg.key() is not None and is_stock_key(msg.key()):
            stored = StoredStock.from_bytes(msg.value())
            out[stored.record.sku] = stored.latest_change()
    return out


def published(ns: Namespace) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in read_topic(ns.settings, ns.settings.stock_changes_topic, until=lambda _: True, idle=1):
        if r.name == "StockChanged":
            out.setdefault(r.value["sku"], []).append(r.value)
    return out


@pytest.fixture()
def stack(kafka, redis_service, opensearch):
    prefix = f"audt-{uuid.uuid4().hex[:8]}:"
    index = f"audt-{uuid.uuid4().hex[:8]}"
    ns = Namespace.fresh(
        "auditor",
        INVENTORY_REDIS_KEY_PREFIX=prefix,
        INVENTORY_SEARCH_INDEX=index,
        INVENTORY_RELAY_ENABLED="0",
        INVENTORY_LOW_STOCK_THRESHOLD="-1",
    )
    worker = Worker(ns)
    relay = Sidecar(ns, "pipeline.relay")
    auditor = Sidecar(ns, "pipeline.auditor")
    auditor.extra_env = {
        "INVENTORY_AUDITOR_METRICS_PORT": str(auditor.port),
        "INVENTORY_AUDITOR_GRACE_S": str(GRACE_S),
        "INVENTORY_AUDITOR_INTERVAL_S": "0.25",
    }
    r = redis.Redis.from_url(base.redis_url)
    search = OpenSearch(hosts=[base.opensearch_url])
    try:
        worker.start()
        relay.start()
        auditor.start()
        yield ns, worker, relay, auditor, r, search, prefix, index
    finally:
        auditor.kill()
        relay.kill()
        worker.stop()
        for key in r.scan_iter(match=f"{prefix}*"):
            r.delete(key)
        search.indices.delete(index=index, ignore_unavailable=True)
        r.close()
        search.close()


def test_a_clean_sale_has_no_violation_and_each_forged_breach_counts_once(stack):
    ns, worker, relay, auditor, r, search, prefix, index = stack
    skus = [f"AU-{i}" for i in range(7)]
    with CommandProducer(ns.settings) as producer:
        for sku in skus:
            producer.send("RestockReceived", {"sku": sku, "qty": 10})
        producer.flush()
        for sku in skus:
            wait_stock(worker, sku, on_hand=10)
        # a flash sale on AU-0: 30 reserves for 10 units; a bit of everything elsewhere
        for i in range(30):
            producer.send("ReserveStock", {"order_id": f"o-{i}", "sku": "AU-0", "qty": 1})
        for sku in skus[1:]:
            producer.send("ReserveStock", {"order_id": f"a-{sku}", "sku": sku, "qty": 3})
            producer.send("ReserveStock", {"order_id": f"b-{sku}", "sku": sku, "qty": 2})
        producer.flush()
        for sku in skus[1:]:
            wait_stock(worker, sku, reserved=5)
        for sku in skus[1:]:
            producer.send("CommitReservation", {"order_id": f"a-{sku}", "sku": sku})
            producer.send("ReleaseReservation", {"order_id": f"b-{sku}", "sku": sku})
        producer.send("CommitReservation", {"order_id": "o-0", "sku": "AU-0"})
        producer.send("SafetyStockSet", {"sku": "AU-1", "qty": 1})
        producer.flush()
        wait_stock(worker, "AU-1", on_hand=7, reserved=0, safety_stock=1)
        producer.send("StockCounted", {"sku": "AU-0", "on_hand": 4})  # below reserved: shortfall
        producer.flush()
        wait_stock(worker, "AU-0", on_hand=4, reserved=9)
        for sku in skus[1:]:
            wait_stock(worker, sku, on_hand=7, reserved=0)

        ledger = ledger_changes(ns)
        assert set(ledger) == set(skus)

        def all_published() -> bool:
            pub = published(ns)
            return all(
                pub.get(s) and max(c["version"] for c in pub[s]) == ledger[s]["version"]
                for s in skus
            )

        wait_for(all_published, 30, "the relay to publish every version")
        # the auditor read it all and sampled every SKU's projections, twice the grace
        wait_for(
            lambda: (
                scrape(auditor.url).get(
                    'inventory_auditor_checks_total{invariant="projection_agreement"}', 0
                )
                >= 2 * len(skus) * 2
            ),
            30,
            "the auditor to sample the projections",
        )
        time.sleep(GRACE_S + 1)
        assert violations(auditor.url) == dict.fromkeys(INVARIANTS, 0.0), auditor.log_path
        got = scrape(auditor.url)
        assert got["inventory_auditor_skus_tracked"] == len(skus)
        for inv in INVARIANTS:
            assert got[f'inventory_auditor_checks_total{{invariant="{inv}"}}'] > 0, inv
            assert got[f'inventory_auditor_last_check_timestamp_seconds{{invariant="{inv}"}}'] > 0

        # ---- from here on the test is the relay: what it publishes is forged
        relay.kill()
        codec = AvroCodec()
        history = published(ns)

        def forge(change: dict[str, Any]) -> None:
            producer.send_raw(
                ns.settings.stock_changes_topic,
                change["sku"].encode(),
                codec.encode_trusted("StockChanged", change),
            )
            producer.flush()

        expected = dict.fromkeys(INVARIANTS, 0.0)

        def counted(invariant: str, n: int = 1, timeout: float = 15) -> None:
            expected[invariant] += n
            wait_for(
                lambda: violations(auditor.url)[invariant] >= expected[invariant],
                timeout,
                f"{invariant} to reach {expected[invariant]}",
            )
            time.sleep(0.5)
            assert violations(auditor.url) == expected

        # version_chain: the latest version again, with other content
        last = dict(max(history["AU-1"], key=lambda c: c["version"]))
        forge({**last, "cause_event_id": "forged"})
        counted("version_chain")
        # version_chain: an earlier version rewritten
        earlier = dict(next(c for c in history["AU-2"] if c["version"] == 2))
        forge({**earlier, "order_id": "forged"})
        counted("version_chain")
        # an identical re-send is no violation
        forge(earlier)

        # version_chain: a gap - the ledger goes 2 versions on, only the second is published
        producer.send("RestockReceived", {"sku": "AU-3", "qty": 1})
        producer.flush()
        wait_stock(worker, "AU-3", on_hand=8)
        producer.send("RestockReceived", {"sku": "AU-3", "qty": 1})
        producer.flush()
        wait_stock(worker, "AU-3", on_hand=9)
        forge(ledger_changes(ns)["AU-3"])
        counted("version_chain")

        # conservation: the ledger's next state, published as if a reserve had added units
        producer.send("RestockReceived", {"sku": "AU-4", "qty": 5})
        producer.flush()
        wait_stock(worker, "AU-4", on_hand=12)
        forge({**ledger_changes(ns)["AU-4"], "cause_type": "ReserveStock"})
        counted("conservation")

        # changelog_agreement: the ledger moves on and nobody publishes it
        producer.send("RestockReceived", {"sku": "AU-5", "qty": 1})
        producer.flush()
        wait_stock(worker, "AU-5", on_hand=8)
        # projection_agreement: a stale Redis hash, and a search document with other counts
        key = f"{prefix}stock:AU-6"  # the namespace's own hash (its settings come from env)
        version = int(r.hget(key, "version"))
        r.hset(key, mapping={"version": version - 1, "on_hand": 99})
        doc = search.get(index=index, id="AU-0")
        search.index(
            index=index,
            id="AU-0",
            body={**doc["_source"], "on_hand": 1000},
            version=doc["_version"],
            version_type="external_gte",
            refresh=True,
        )
        counted("projection_agreement", 1, timeout=GRACE_S + 15)  # the search doc: at once
        expected["changelog_agreement"] += 1
        expected["projection_agreement"] += 1
        wait_for(
            lambda: violations(auditor.url) == expected, GRACE_S + 20, f"violations {expected}"
        )
        # each counted once, however long it lasts
        time.sleep(GRACE_S + 1)
        assert violations(auditor.url) == expected
    text = auditor.log_path.read_text()
    for kind in ('"kind": "conflict"', '"kind": "went_back"', '"kind": "gap"', '"kind": "behind"'):
        assert kind in text, kind
    assert '"sku": "AU-6"' in text and '"sku": "AU-5"' in text
