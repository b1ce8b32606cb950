"""The projection contract, run once per real target (Redis, OpenSearch).

Every test gets a fresh key prefix / index (removed afterwards) and inspects the
target with its own plain client, so the checks do not trust the adapter under
test. A missing service fails the test (``redis_service`` / ``opensearch``).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import orjson
import pytest
import redis
from opensearchpy import OpenSearch

from config.settings import Settings, settings
from pipeline.domain.core import INCOMING_FIELDS
from pipeline.sinks.base import ApplyReport, Projection
from pipeline.sinks.redis_sink import RedisProjection
from pipeline.sinks.search_sink import MAPPING, SearchProjection

pytestmark = pytest.mark.integration

T = TypeVar("T")

NUMBERS = ("on_hand", "reserved", "safety_stock", "available", "damaged", "version", "occurred_at")
MESSAGE_FIELDS = {
    "sku",
    "version",
    "on_hand",
    "reserved",
    "safety_stock",
    "available",
    "in_stock",
    "updated_at",
    "occurred_at",
    "backorderable",
}
BASE_MS = 1_767_225_600_000


def change(
    sku: str,
    version: int,
    on_hand: int | None = None,
    reserved: int = 0,
    safety_stock: int = 0,
    damaged: int = 0,
) -> dict[str, Any]:
    """A StockChanged record; by default the numbers differ per version."""
    on_hand = 10 * version if on_hand is None else on_hand
    return {
        "sku": sku,
        "version": version,
        "on_hand": on_hand,
        "reserved": reserved,
        "safety_stock": safety_stock,
        "available": max(on_hand - reserved - safety_stock, 0),
        "damaged": damaged,
        "cause_type": "RestockReceived",
        "cause_event_id": f"ev-{sku}-{version}",
        "order_id": "",
        "channel": "test",
        "occurred_at": BASE_MS + version,
        "processed_at": BASE_MS + version + 5,
    }


def expected(c: dict[str, Any]) -> dict[str, Any]:
    """What a target must hold for change ``c`` (updated_at aside)."""
    return {**{k: c[k] for k in NUMBERS}, "in_stock": c["available"] > 0}


@dataclass
class Target:
    kind: str
    cfg: Settings
    projection: Projection
    loop: asyncio.AbstractEventLoop
    redis: redis.Redis | None = None
    search: OpenSearch | None = None

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def apply(self, changes: list[dict[str, Any]]) -> ApplyReport:
        return self.run(self.projection.apply(changes))

    def versions(self, skus: list[str]) -> dict[str, int]:
        return self.run(self.projection.versions(skus))

    def raw(self, sku: str) -> dict[str, Any] | None:
        """The stored record as the target has it (hash fields / _source)."""
        if self.redis is not None:
            return self.redis.hgetall(self.cfg.redis_stock_key(sku)) or None
        assert self.search is not None
        doc = self.search.get(index=self.cfg.search_index, id=sku, ignore=404)
        return doc["_source"] if doc.get("found") else None

    def stored(self, sku: str) -> dict[str, Any] | None:
        """The stored record normalised: ints, in_stock as bool, updated_at kept."""
        raw = self.raw(sku)
        if raw is None:
            return None
        out = {k: int(raw[k]) for k in (*NUMBERS, "updated_at")}
        flag = raw["in_stock"]
        out["in_stock"] = flag if isinstance(flag, bool) else {"1": True, "0": False}[flag]
        return out

    def holds(self, c: dict[str, Any]) -> bool:
        got = self.stored(c["sku"])
        return got is not None and {k: v for k, v in got.items() if k != "updated_at"} == (
            expected(c)
        )


@contextmanager
def _target(kind: str, request: pytest.FixtureRequest) -> Iterator[Target]:
    """A set-up projection of ``kind`` on a fresh prefix / index, removed afterwards."""
    request.getfixturevalue("redis_service" if kind == "redis" else "opensearch")
    token = uuid.uuid4().hex[:12]
    cfg = replace(
        settings,
        redis_key_prefix=f"test-contract-{token}:",
        search_index=f"test-contract-{token}",
    )
    loop = asyncio.new_event_loop()
    if kind == "redis":
        client = redis.Redis.from_url(cfg.redis_url, decode_responses=True)
        target = Target(kind, cfg, RedisProjection(cfg), loop, redis=client)
    else:
        search = OpenSearch(hosts=[cfg.opensearch_url], timeout=30)
        target = Target(kind, cfg, SearchProjection(cfg), loop, search=search)
    try:
        target.run(target.projection.setup())
        yield target
    finally:
        try:
            target.run(target.projection.close())
            loop.close()
        finally:
            if target.redis is not None:
                keys = list(target.redis.scan_iter(match=f"{cfg.redis_key_prefix}*", count=500))
                if keys:
                    target.redis.delete(*keys)
                target.redis.close()
            if target.search is not None:
                target.search.indices.delete(index=cfg.search_index, ignore=[404])
                target.search.close()


@pytest.fixture(params=["redis", "search"])
def projection(request: pytest.FixtureRequest) -> Iterator[Target]:
    """Each real target in turn: the contract tests run once per adapter."""
    with _target(request.param, request) as target:
        yield target


@pytest.fixture
def redis_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    with _target("redis", request) as target:
        yield target


@pytest.fixture
def search_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    with _target("search", request) as target:
        yield target


def test_versions_in_order_apply_one_by_one(projection: Target) -> None:
    for v in range(1, 5):
        c = change("A", v)
        report = projection.apply([c])
        assert (report.applied, report.stale) == (1, 0)
        assert projection.versions(["A"]) == {"A": v}
        assert projection.holds(c)


def test_in_order_batch_ends_at_last_version(projection: Target) -> None:
    batch = [change("A", v) for v in range(1, 6)]
    report = projection.apply(batch)
    assert report.applied >= 1 and report.applied + report.stale == 5
    assert projection.versions(["A"]) == {"A": 5}
    assert projection.holds(batch[-1])


def test_replay_of_the_same_batch_changes_nothing(projection: Target) -> None:
    batch = [change("A", 1), change("A", 2), change("B", 1)]
    first = projection.apply(batch)
    assert first.applied + first.stale == 3
    before = {sku: projection.raw(sku) for sku in ("A", "B")}

    again = projection.apply(batch)

    assert (again.applied, again.stale) == (0, 3)
    # updated_at included: a stale change must not even rewrite the record
    assert {sku: projection.raw(sku) for sku in ("A", "B")} == before
    assert projection.versions(["A", "B"]) == {"A": 2, "B": 1}


def test_stale_version_after_newer_does_not_regress(projection: Target) -> None:
    newer = change("A", 5, on_hand=50, reserved=7)
    assert projection.apply([newer]).applied == 1

    report = projection.apply([change("A", 3, on_hand=3), change("A", 5, on_hand=999)])

    assert (report.applied, report.stale) == (0, 2)
    assert projection.versions(["A"]) == {"A": 5}
    assert projection.holds(newer)


def test_mixed_skus_in_shuffled_order_end_at_each_max(projection: Target) -> None:
    top = {"A": 7, "B": 3, "C": 1, "D": 12, "E": 5}
    batch = [change(sku, v) for sku, n in top.items() for v in range(1, n + 1)]
    random.Random(20240607).shuffle(batch)

    report = projection.apply(batch)

    assert report.applied >= len(top) and report.applied + report.stale == len(batch)
    assert projection.versions([*top, "NEVER-WRITTEN"]) == top
    for sku, n in top.items():
        assert projection.holds(change(sku, n)), sku
    replay = projection.apply(list(reversed(batch)))
    assert (replay.applied, replay.stale) == (0, len(batch))


def test_duplicates_of_one_version_apply_once(projection: Target) -> None:
    c = change("A", 1, on_hand=4)
    report = projection.apply([c, dict(c), dict(c)])
    assert (report.applied, report.stale) == (1, 2)
    assert projection.versions(["A"]) == {"A": 1}
    assert projection.holds(c)


def test_in_stock_is_false_when_available_is_zero(projection: Target) -> None:
    sold_out = change("A", 1, on_hand=5, reserved=5)
    protected = change("B", 1, on_hand=3, safety_stock=3)
    some = change("C", 1, on_hand=3, reserved=1)
    projection.apply([sold_out, protected, some])
    assert [projection.stored(s)["in_stock"] for s in "ABC"] == [False, False, True]
    assert [projection.stored(s)["available"] for s in "ABC"] == [0, 0, 2]

    projection.apply([change("A", 2, on_hand=6, reserved=5), change("C", 2, on_hand=1, reserved=1)])
    assert [projection.stored(s)["in_stock"] for s in "AC"] == [True, False]


def test_empty_batch_and_unknown_skus(projection: Target) -> None:
    report = projection.apply([])
    assert (report.applied, report.stale) == (0, 0)
    assert projection.versions([]) == {}
    assert projection.versions(["NOPE"]) == {}
    assert projection.raw("NOPE") is None


def test_record_layout_and_updated_at(projection: Target) -> None:
    sku = 'SKU "quoted" /ü/ 1'
    c = change(sku, 3, on_hand=9, reserved=2, safety_stock=1, damaged=4)
    start = int(time.time() * 1000)
    report = projection.apply([c])
    end = int(time.time() * 1000)

    raw = projection.raw(sku)
    assert raw is not None
    stored = projection.stored(sku)
    if projection.kind == "redis":
        assert set(raw) == MESSAGE_FIELDS - {"sku"} | {
            "shared_available",
            "damaged",
            *INCOMING_FIELDS,
        }
        assert raw["in_stock"] == "1" and raw["shared_available"] == "6"
        assert raw["damaged"] == "4"
        # a change without purchase orders (or a StockChanged of v4 or older) holds 0
        assert [raw[f] for f in INCOMING_FIELDS] == ["0"] * 4
    else:
        assert set(raw) == set(MAPPING["properties"])
        assert raw["damaged"] == 4
        assert [raw[f] for f in INCOMING_FIELDS] == [0] * 4
        assert raw["sku"] == sku and raw["in_stock"] is True
    assert stored["available"] == 6 and stored["damaged"] == 4
    # clocks of a local target: allow a little skew either way
    assert start - 1000 <= stored["updated_at"] <= end + 1000
    assert report.applied_at_ms == stored["updated_at"]
    assert projection.run(projection.projection.ping()) is True


# ---- OpenSearch only -----------------------------------------------------------


def test_search_term_query_on_in_stock_returns_exactly_in_stock_skus(search_target: Target) -> None:
    projection = search_target
    projection.apply(
        [
            change("IN-1", 1, on_hand=5),
            change("IN-2", 2, on_hand=1),
            change("OUT-1", 1, on_hand=0),
            change("OUT-2", 1, on_hand=4, reserved=4),
            change("FLIP-OUT", 1, on_hand=8),
            change("FLIP-IN", 1, on_hand=0),
        ]
    )
    projection.apply(
        [
            change("FLIP-OUT", 2, on_hand=2, safety_stock=2),
            change("FLIP-IN", 2, on_hand=3),
            change("IN-1", 0, on_hand=0),  # stale, must not knock IN-1 out
        ]
    )
    assert projection.search is not None
    projection.search.indices.refresh(index=projection.cfg.search_index)

    def skus(flag: bool) -> set[str]:
        body = {"query": {"bool": {"filter": [{"term": {"in_stock": flag}}]}}, "size": 100}
        hits = projection.search.search(index=projection.cfg.search_index, body=body)
        return {h["_source"]["sku"] for h in hits["hits"]["hits"]}

    assert skus(True) == {"IN-1", "IN-2", "FLIP-IN"}
    assert skus(False) == {"OUT-1", "OUT-2", "FLIP-OUT"}


def test_search_index_mapping_is_strict_single_shard(search_target: Target) -> None:
    projection = search_target
    assert projection.search is not None
    index = projection.cfg.search_index
    mapping = projection.search.indices.get_mapping(index=index)[index]["mappings"]
    assert mapping == MAPPING
    got = projection.search.indices.get_settings(index=index)[index]["settings"]["index"]
    assert (got["number_of_shards"], got["number_of_replicas"], got["refresh_interval"]) == (
        "1",
        "0",
        "1s",
    )
    # setup is idempotent on an existing, matching index
    projection.run(projection.projection.setup())


def test_an_index_of_an_earlier_sink_gets_the_new_fields_in_place(search_target: Target) -> None:
    """An index created before ``damaged`` and the purchase order figures existed: setup
    adds the fields to its (strict) mapping and keeps the index, its uuid and its
    documents, so no replay is needed."""
    projection = search_target
    assert projection.search is not None
    index = projection.cfg.search_index + "-old"
    newer = {"damaged", *INCOMING_FIELDS}
    old = {
        **MAPPING,
        "properties": {k: v for k, v in MAPPING["properties"].items() if k not in newer},
    }
    projection.search.indices.create(index=index, body={"mappings": old})
    try:
        projection.search.index(
            index=index, id="OLD-1", body={"sku": "OLD-1", "available": 2, "version": 1}
        )
        uuid_before = projection.search.indices.get(index=index)[index]["settings"]["index"]["uuid"]
        upgraded = SearchProjection(replace(projection.cfg, search_index=index))
        projection.run(upgraded.setup())
        got = projection.search.indices.get(index=index)[index]
        for f in newer:
            assert got["mappings"]["properties"][f] == {"type": "integer"}, f
        assert got["settings"]["index"]["uuid"] == uuid_before
        assert projection.search.get(index=index, id="OLD-1")["found"]
        projection.run(
            upgraded.apply([{**change("OLD-1", 2, on_hand=5, damaged=3), "incoming": 40}])
        )
        src = projection.search.get(index=index, id="OLD-1")["_source"]
        assert (src["damaged"], src["incoming"]) == (3, 40)
        projection.run(upgraded.close())
    finally:
        projection.search.indices.delete(index=index, ignore_unavailable=True)


# ---- Redis only ----------------------------------------------------------------


def test_redis_publishes_one_message_per_applied_change(redis_target: Target) -> None:
    projection = redis_target
    assert projection.redis is not None
    sub = projection.redis.pubsub()
    sub.subscribe(projection.cfg.redis_channel)
    try:
        confirm = sub.get_message(timeout=5)
        assert confirm is not None and confirm["type"] == "subscribe"
        odd = 'SKU "quoted" /ü/'
        batch = [
            change("A", 1),
            change("A", 2),
            change("A", 1),  # stale
            change("A", 2),  # duplicate
            {**change(odd, 1, on_hand=0), "incoming": 9, "backorderable": 5},  # preorderable
            change("B", 4, on_hand=3, reserved=1, safety_stock=1),
        ]
        start = int(time.time() * 1000)
        first = projection.apply(batch)
        replay = projection.apply(batch)
        end = int(time.time() * 1000)
        assert (first.applied, first.stale) == (4, 2)
        assert (replay.applied, replay.stale) == (0, 6)

        # PUBLISH ran inside apply, so everything is on the socket by now
        messages = []
        while (m := sub.get_message(timeout=0.5)) is not None:
            if m["type"] == "message":
                messages.append(orjson.loads(m["data"]))
    finally:
        sub.close()

    applied = [batch[0], batch[1], batch[4], batch[5]]
    assert len(messages) == first.applied
    for m, c in zip(messages, applied, strict=True):
        assert set(m) == MESSAGE_FIELDS
        assert m["sku"] == c["sku"]
        # the live message has the product page's fields; damaged is in the hash only
        want = {k: v for k, v in expected(c).items() if k != "damaged"}
        assert {k: m[k] for k in (*NUMBERS, "in_stock") if k != "damaged"} == want
        assert m["backorderable"] == c.get("backorderable", 0)
        assert isinstance(m["in_stock"], bool) and isinstance(m["updated_at"], int)
        assert start - 1000 <= m["updated_at"] <= end + 1000
    # the message of a SKU's last change carries the hash's updated_at
    for m in messages[1:]:
        assert m["updated_at"] == int(projection.raw(m["sku"])["updated_at"])


def test_redis_hash_shows_availability_per_channel(redis_target: Target) -> None:
    sku = "SKU-CH"
    first = change(sku, 1, on_hand=50, reserved=5)
    first["channels"] = [
        {
            "channel": "marketplace",
            "allocated": 20,
            "reserved": 5,
            "available": 15,
            "use_shared": False,
        },
        {"channel": "store", "allocated": 10, "reserved": 0, "available": 30, "use_shared": True},
    ]
    redis_target.apply([first])
    raw = redis_target.raw(sku)
    assert raw is not None
    channel_fields = {k: v for k, v in raw.items() if k.startswith("channel:")}
    assert channel_fields == {
        "channel:marketplace:available": "15",
        "channel:marketplace:allocated": "20",
        "channel:marketplace:reserved": "5",
        "channel:store:available": "30",
        "channel:store:allocated": "10",
        "channel:store:reserved": "0",
    }
    # 45 available, 15 + 10 of them ring-fenced: 20 left for channels without an allocation
    assert raw["shared_available"] == "20"
    # the next version drops the marketplace allocation: its fields go with it
    second = change(sku, 2, on_hand=50, reserved=0)
    second["channels"] = [
        {"channel": "store", "allocated": 10, "reserved": 0, "available": 50, "use_shared": True}
    ]
    redis_target.apply([second])
    raw = redis_target.raw(sku)
    assert raw is not None
    assert sorted(k for k in raw if k.startswith("channel:")) == [
        "channel:store:allocated",
        "channel:store:available",
        "channel:store:reserved",
    ]
    assert raw["shared_available"] == "40"


def where(location: str, on_hand: int, reserved: int = 0, inbound: int = 0) -> dict[str, Any]:
    """One entry of StockChanged ``locations``."""
    return {
        "location": location,
        "on_hand": on_hand,
        "reserved": reserved,
        "damaged": 0,
        "available": max(0, on_hand - reserved),
        "inbound": inbound,
    }


def test_redis_hash_shows_the_figures_per_location(redis_target: Target) -> None:
    sku = "SKU-LOC"
    first = change(sku, 1, on_hand=7, reserved=2)
    first["locations"] = [where("dc-1", 5, 2), where("store-7", 2, inbound=3)]
    redis_target.apply([first])
    raw = redis_target.raw(sku)
    assert raw is not None
    assert {k: v for k, v in raw.items() if k.startswith("location:")} == {
        "location:dc-1:on_hand": "5",
        "location:dc-1:reserved": "2",
        "location:dc-1:damaged": "0",
        "location:dc-1:available": "3",
        "location:dc-1:inbound": "0",
        "location:store-7:on_hand": "2",
        "location:store-7:reserved": "0",
        "location:store-7:damaged": "0",
        "location:store-7:available": "2",
        "location:store-7:inbound": "3",
    }
    # the figures are replaced as a whole by the next version
    second = change(sku, 2, on_hand=5)
    second["locations"] = [where("store-7", 5)]
    redis_target.apply([second])
    raw = redis_target.raw(sku)
    assert raw is not None
    assert sorted(k for k in raw if k.startswith("location:")) == [
        f"location:store-7:{f}" for f in ("available", "damaged", "inbound", "on_hand", "reserved")
    ]
    assert raw["location:store-7:available"] == "5"


def test_search_finds_the_skus_in_stock_at_one_location(search_target: Target) -> None:
    """The README's query: ``locations`` is nested, so the location and its in_stock must
    hold for the same entry (a SKU out of stock at X and in stock elsewhere is no hit)."""
    projection = search_target
    at_x = change("AT-X", 1, on_hand=4)
    at_x["locations"] = [where("store-x", 4), where("dc-1", 0)]
    elsewhere = change("ELSEWHERE", 1, on_hand=6)
    elsewhere["locations"] = [where("store-x", 2, reserved=2), where("dc-1", 4)]
    none = change("NO-LOCATIONS", 1, on_hand=9)
    projection.apply([at_x, elsewhere, none])
    assert projection.search is not None
    projection.search.indices.refresh(index=projection.cfg.search_index)
    body = {
        "query": {
            "nested": {
                "path": "locations",
                "query": {
                    "bool": {
                        "filter": [
                            {"term": {"locations.location": "store-x"}},
                            {"term": {"locations.in_stock": True}},
                        ]
                    }
                },
            }
        },
        "size": 100,
    }
    hits = projection.search.search(index=projection.cfg.search_index, body=body)
    assert {h["_source"]["sku"] for h in hits["hits"]["hits"]} == {"AT-X"}
    doc = projection.raw("ELSEWHERE")
    assert doc is not None and doc["locations"][1] == {
        "location": "dc-1",
        "available": 4,
        "in_stock": True,
        "on_hand": 4,
        "reserved": 0,
        "damaged": 0,
        "inbound": 0,
    }
    assert projection.raw("NO-LOCATIONS")["locations"] == []


def test_both_targets_hold_the_purchase_order_figures(projection: Target) -> None:
    """incoming / promised / backorderable / staged of StockChanged v5 are stored as they
    come, and replaced by the next version (the SKU's last purchase order ended)."""
    sku = "SKU-PO"
    first = {
        **change(sku, 1, on_hand=3),
        "incoming": 40,
        "promised": 12,
        "backorderable": 28,
        "staged": 3,
    }
    projection.apply([first])
    raw = projection.raw(sku)
    assert raw is not None
    want = [40, 12, 28, 3]
    if projection.kind == "redis":
        assert [raw[f] for f in INCOMING_FIELDS] == [str(n) for n in want]
    else:
        assert [raw[f] for f in INCOMING_FIELDS] == want
    projection.apply([change(sku, 2, on_hand=43)])  # v4-style record: no figures, all 0
    raw = projection.raw(sku)
    assert raw is not None
    assert [int(raw[f]) for f in INCOMING_FIELDS] == [0, 0, 0, 0]


def test_search_finds_the_skus_that_can_be_preordered(search_target: Target) -> None:
    """The README's preorder query: out of stock now, but a backorder would be taken."""
    projection = search_target
    sold_out = change("PRE-1", 1, on_hand=0)
    projection.apply(
        [
            {**sold_out, "incoming": 20, "backorderable": 20},
            {**change("PRE-FULL", 1, on_hand=0), "incoming": 20, "promised": 20},
            {**change("IN-STOCK", 1, on_hand=5), "incoming": 10, "backorderable": 10},
            change("NOTHING", 1, on_hand=0),
        ]
    )
    assert projection.search is not None
    projection.search.indices.refresh(index=projection.cfg.search_index)
    body = {
        "query": {
            "bool": {
                "filter": [
                    {"term": {"in_stock": False}},
                    {"range": {"backorderable": {"gt": 0}}},
                ]
            }
        },
        "size": 100,
    }
    hits = projection.search.search(index=projection.cfg.search_index, body=body)
    assert {h["_source"]["sku"] for h in hits["hits"]["hits"]} == {"PRE-1"}


def test_an_index_from_before_locations_gets_the_nested_field_in_place(
    search_target: Target,
) -> None:
    projection = search_target
    assert projection.search is not None
    index = projection.cfg.search_index + "-preloc"
    old = {
        **MAPPING,
        "properties": {k: v for k, v in MAPPING["properties"].items() if k != "locations"},
    }
    projection.search.indices.create(index=index, body={"mappings": old})
    try:
        upgraded = SearchProjection(replace(projection.cfg, search_index=index))
        projection.run(upgraded.setup())
        got = projection.search.indices.get_mapping(index=index)[index]["mappings"]
        assert got == MAPPING
        c = change("OLD-2", 2, on_hand=5)
        c["locations"] = [where("store-7", 5)]
        projection.run(upgraded.apply([c]))
        doc = projection.search.get(index=index, id="OLD-2")["_source"]
        assert doc["locations"][0]["location"] == "store-7"
        projection.run(upgraded.close())
    finally:
        projection.search.indices.delete(index=index, ignore_unavailable=True)


def test_redis_reloads_the_script_on_noscript(redis_target: Target) -> None:
    """A server that lost the script (restart, failover, SCRIPT FLUSH) is handled in apply.

    SCRIPT FLUSH would disturb other users of the shared Redis, so the projection is
    pointed at a digest the server has never seen, which answers NOSCRIPT the same way.
    """
    projection = redis_target
    proj = projection.projection
    assert isinstance(proj, RedisProjection)
    real_sha = proj._script.sha
    proj._script.sha = "0" * 40

    report = projection.apply([change("A", 1), change("B", 1), change("A", 1)])

    assert (report.applied, report.stale) == (2, 1)
    assert proj._script.sha == real_sha
    assert projection.versions(["A", "B"]) == {"A": 1, "B": 1}


def test_wipe_empties_the_target_and_lets_a_rebuild_start_from_version_1(
    projection: Target,
) -> None:
    projection.apply([change("A", 3), change("B", 1)])
    if projection.redis is not None:
        # a key under the prefix that is not a stock hash is not the projection's to delete
        projection.redis.set(f"{projection.cfg.redis_key_prefix}other", "keep")

    projection.run(projection.projection.wipe())

    assert projection.versions(["A", "B"]) == {}
    assert projection.raw("A") is None
    if projection.redis is not None:
        assert projection.redis.get(f"{projection.cfg.redis_key_prefix}other") == "keep"
    # no tombstone of the old versions: a lower version applies again
    report = projection.apply([change("A", 1)])
    assert (report.applied, report.stale) == (1, 0)
    assert projection.holds(change("A", 1))
    projection.run(projection.projection.wipe())
    projection.run(projection.projection.wipe())  # idempotent on an empty target
