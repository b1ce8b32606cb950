"""OpenSearch projection: one document per SKU, written with external versioning.

The index ``cfg.search_index`` holds one document per SKU, ``_id`` = SKU, whose
OpenSearch ``_version`` is the ledger's ``version`` (``version_type=external``):
OpenSearch itself refuses a version at or below the stored one with a 409, so
replays, duplicates and reordering never move a document backwards. Mapping
(``dynamic: strict``, 1 shard, 0 replicas, refresh every 1 s): see :data:`MAPPING`.
``updated_at`` is the sink host's clock when the bulk request was built (OpenSearch
cannot stamp it without scripts or ingest pipelines); ``occurred_at`` is the
command's time from the ledger.

Storefront query, in-stock products only (``filter`` context: no scoring, cached)::

    POST /inventory-stock/_search
    {
      "query": {"bool": {"filter": [
        {"term": {"in_stock": true}},
        {"terms": {"sku": ["SKU-1", "SKU-2", "SKU-3"]}}
      ]}},
      "_source": ["sku", "available"]
    }

    # opensearch-py:
    await client.search(index=cfg.search_index, body={
        "query": {"bool": {"filter": [{"term": {"in_stock": True}}]}}})

In stock at one location (a store): ``locations`` is a nested field, so both terms
must hold for the same location entry (a SKU that never named a location has none;
its units are all at its default location, ``"default"``)::

    POST /inventory-stock/_search
    {
      "query": {"nested": {"path": "locations", "query": {"bool": {"filter": [
        {"term": {"locations.location": "store-7"}},
        {"term": {"locations.in_stock": true}}
      ]}}}},
      "_source": ["sku", "locations"]
    }

The sink's markers live in ``<index>-sink-markers`` (one document per changelog
partition naming the uuid of the index it was fully applied to): a deleted or
re-created index has another uuid, so the sink re-applies the changelog into it.

Search sees a change after the next refresh (up to 1 s); ``GET``/``mget`` by id
see it at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson
from opensearchpy import AsyncOpenSearch
from opensearchpy.exceptions import NotFoundError, OpenSearchException, TransportError

from config.settings import Settings
from pipeline.clients import opensearch_kwargs
from pipeline.clock import now_ms
from pipeline.domain.core import INCOMING_FIELDS, in_stock
from pipeline.sinks.base import ApplyReport, Projection, StockChange, TargetUnavailable

log = logging.getLogger("inventory.sink")

# the client logs every request at INFO: far too loud for a sink's steady state
logging.getLogger("opensearch").setLevel(logging.WARNING)

TIMEOUT_S = 5.0

SETTINGS: dict[str, Any] = {
    "number_of_shards": 1,
    "number_of_replicas": 0,
    "refresh_interval": "1s",
}

MAPPING: dict[str, Any] = {
    "dynamic": "strict",
    "properties": {
        "sku": {"type": "keyword"},
        "available": {"type": "integer"},
        "in_stock": {"type": "boolean"},
        "on_hand": {"type": "integer"},
        "reserved": {"type": "integer"},
        "safety_stock": {"type": "integer"},
        "damaged": {"type": "integer"},
        # the purchase orders' figures (StockChanged v5): units still coming, promised to
        # backorders, what one more backorder could get ("can be preordered": > 0), and
        # units on hand staged for the next backorder
        "incoming": {"type": "integer"},
        "promised": {"type": "integer"},
        "backorderable": {"type": "integer"},
        "staged": {"type": "integer"},
        # per location (empty for a SKU that never named one): nested, so one query can
        # ask for the figures of one location ("in stock at store X", module docstring)
        "locations": {
            "type": "nested",
            "properties": {
                "location": {"type": "keyword"},
                "available": {"type": "integer"},
                "in_stock": {"type": "boolean"},
                "on_hand": {"type": "integer"},
                "reserved": {"type": "integer"},
                "damaged": {"type": "integer"},
                "inbound": {"type": "integer"},
            },
        },
        "version": {"type": "long"},
        "updated_at": {"type": "date", "format": "epoch_millis"},
        "occurred_at": {"type": "date", "format": "epoch_millis"},
    },
}

# the markers index: <index>-sink-markers, one document per changelog partition
MARKERS_SUFFIX = "-sink-markers"
MARKERS_MAPPING: dict[str, Any] = {
    "dynamic": "strict",
    "properties": {"index_uuid": {"type": "keyword"}},
}

# Item statuses that mean "try again later" rather than "this document can never go in".
_TRANSIENT_ITEM_STATUSES = frozenset({408, 429})

_UNAVAILABLE = (OpenSearchException, OSError, asyncio.TimeoutError)


class SearchRejected(TargetUnavailable):
    """OpenSearch refused a document or the index for good (mapping, bad request).

    A subclass of :class:`TargetUnavailable`, so a runner that only knows the base
    class still retries the batch and never commits past it (nothing is lost);
    one that knows this class can alert instead of backing off quietly, since
    retrying will not help until the index or the code is fixed.
    """


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}"


class SearchProjection(Projection):
    """Keeps one OpenSearch document per SKU at its highest version.

    Contract (see :class:`pipeline.sinks.base.Projection`): ``apply`` sends one bulk
    request per batch; a 409 version conflict for an item is a stale change (success).
    Connection errors, timeouts, HTTP 429/5xx and item errors 408/429/5xx raise
    :class:`TargetUnavailable`; a 4xx item error other than those (a mapping or parsing
    error) or a 400 for the whole request raises :class:`SearchRejected`. Items
    of the batch that succeeded before the raise stay written; a retry is idempotent.

    The client has a 5 s timeout and no retries of its own; the runner owns retrying.
    """

    name = "search"

    def __init__(self, cfg: Settings, client: AsyncOpenSearch | None = None) -> None:
        self._cfg = cfg
        self._index = cfg.search_index
        self._replay_into: dict[int, str] = {}  # per partition: the index uuid of its replay
        self._owns_client = client is None
        self._client: AsyncOpenSearch = client or AsyncOpenSearch(
            hosts=[cfg.opensearch_url],
            timeout=TIMEOUT_S,
            max_retries=0,
            retry_on_timeout=False,
            **opensearch_kwargs(cfg),
        )

    def _unavailable(
        self, what: str, exc: BaseException | str, kind: type[TargetUnavailable] = TargetUnavailable
    ) -> TargetUnavailable:
        detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        password = urlsplit(self._cfg.opensearch_url).password
        if password:
            detail = detail.replace(password, "***")
        return kind(
            f"opensearch {_redacted(self._cfg.opensearch_url)} index {self._index!r}: "
            f"{what} failed ({detail})"
        )

    def _from_transport(self, what: str, exc: BaseException) -> TargetUnavailable:
        # A whole-request 400 is a request the server will never accept (our bug or
        # an incompatible index); everything else (no connection, timeout, 401/403,
        # 429, 5xx) may pass later.
        if isinstance(exc, TransportError) and exc.status_code == 400:
            return self._unavailable(what, exc, SearchRejected)
        return self._unavailable(what, exc)

    async def setup(self) -> None:
        """Create the index with :data:`MAPPING` if missing, then check the mapping.

        Idempotent and safe when several sinks race to create it. Raises
        TargetUnavailable when OpenSearch is down, SearchRejected when the index
        exists with a mapping that differs from :data:`MAPPING` (e.g. it was
        auto-created by a write before setup ran).
        """
        try:
            if not await self._client.indices.exists(index=self._index):
                try:
                    await self._client.indices.create(
                        index=self._index, body={"settings": SETTINGS, "mappings": MAPPING}
                    )
                except TransportError as exc:
                    if exc.status_code != 400 or exc.error != "resource_already_exists_exception":
                        raise
            found = await self._client.indices.get_mapping(index=self._index)
        except _UNAVAILABLE as exc:
            raise self._from_transport("setup", exc) from exc
        # get_mapping on a name resolves aliases, so take the one entry it returns.
        mappings = next(iter(found.values()), {}).get("mappings", {})
        missing = _missing_fields(mappings)
        if missing and str(mappings.get("dynamic")) == "strict":
            # an index of an earlier version of the sink (e.g. before ``damaged`` or
            # ``locations``; a new nested field may be added in place too): a strict
            # mapping takes new fields in place, so its documents and uuid stay (no replay;
            # a document gets the field with its SKU's next change or a rebuild)
            try:
                await self._client.indices.put_mapping(
                    index=self._index, body={"properties": missing}
                )
                found = await self._client.indices.get_mapping(index=self._index)
            except _UNAVAILABLE as exc:
                raise self._from_transport("setup", exc) from exc
            log.info("search index %r: added fields %s", self._index, sorted(missing))
            mappings = next(iter(found.values()), {}).get("mappings", {})
        problems = _mapping_problems(mappings)
        if problems:
            raise self._unavailable("setup", "; ".join(problems), SearchRejected)

    @property
    def markers_index(self) -> str:
        """The small index of the sink's markers: one document per changelog partition,
        ``_id`` = the partition, holding the uuid of the index it was fully applied to."""
        return self._index + MARKERS_SUFFIX

    async def _index_state(self) -> tuple[str, list[str]] | None:
        """(uuid, mapping problems) of the index; None when it does not exist."""
        try:
            found = await self._client.indices.get(index=self._index)
        except NotFoundError:
            return None
        entry = next(iter(found.values()), {})
        uuid = str(entry.get("settings", {}).get("index", {}).get("uuid", ""))
        return uuid, _mapping_problems(entry.get("mappings", {}))

    async def lost(self, partitions: Sequence[int]) -> set[int]:
        """Every partition when the index is missing or has a wrong mapping (an index
        created again by a write after a delete has a dynamic one); else those whose
        marker does not name the index's current uuid (the index was deleted and created
        again, by anyone, or the partition was never fully applied to it)."""
        wanted = list(partitions)
        if not wanted:
            return set()
        try:
            state = await self._index_state()
            if state is None:
                log.warning("search index %r is missing", self._index)
                return set(wanted)
            uuid, problems = state
            if problems:
                log.warning("search index %r has a wrong mapping: %s", self._index, problems)
                return set(wanted)
            response = await self._client.mget(
                index=self.markers_index, body={"ids": [str(p) for p in wanted]}
            )
        except _UNAVAILABLE as exc:
            raise self._from_transport("marker check", exc) from exc
        held: dict[str, str] = {}
        for doc in response.get("docs", []):
            if doc.get("found"):
                held[doc["_id"]] = str(doc["_source"].get("index_uuid"))
        return {p for p in wanted if held.get(str(p)) != uuid}

    async def repair(self, partitions: Sequence[int]) -> None:
        """Delete the index when its mapping is wrong (its documents cannot be trusted
        or written), create it with :data:`MAPPING` if missing (:meth:`setup`), and
        remember its uuid for the markers of ``partitions``."""
        try:
            state = await self._index_state()
            if state is not None and state[1]:
                log.warning("search sink: deleting index %r to re-create it", self._index)
                await self._client.indices.delete(index=self._index, ignore_unavailable=True)
        except _UNAVAILABLE as exc:
            raise self._from_transport("repair", exc) from exc
        await self.setup()
        try:
            state = await self._index_state()
            if not await self._client.indices.exists(index=self.markers_index):
                try:
                    await self._client.indices.create(
                        index=self.markers_index,
                        body={"settings": SETTINGS, "mappings": MARKERS_MAPPING},
                    )
                except TransportError as exc:
                    if exc.status_code != 400 or exc.error != "resource_already_exists_exception":
                        raise
        except _UNAVAILABLE as exc:
            raise self._from_transport("repair", exc) from exc
        if state is None:
            raise self._unavailable("repair", "the index is gone again")
        for p in partitions:
            self._replay_into[p] = state[0]

    async def mark_intact(self, partitions: Sequence[int]) -> None:
        """Write each partition's marker: the uuid of the index :meth:`repair` saw (or
        of the current one without a repair)."""
        wanted = list(partitions)
        if not wanted:
            return
        try:
            current: str | None = None
            lines: list[bytes] = []
            for p in wanted:
                uuid = self._replay_into.get(p)
                if uuid is None:
                    if current is None:
                        state = await self._index_state()
                        if state is None:
                            raise self._unavailable("marker write", "the index is gone")
                        current = state[0]
                    uuid = current
                lines.append(orjson.dumps({"index": {"_id": str(p)}}))
                lines.append(orjson.dumps({"index_uuid": uuid}))
            response = await self._client.bulk(
                body=b"\n".join(lines) + b"\n", index=self.markers_index, filter_path="errors"
            )
        except _UNAVAILABLE as exc:
            raise self._from_transport("marker write", exc) from exc
        if response.get("errors"):
            raise self._unavailable("marker write", "a marker was not written")
        for p in wanted:
            self._replay_into.pop(p, None)

    async def apply(self, changes: Sequence[StockChange]) -> ApplyReport:
        """Apply a batch with one bulk request; returns applied/stale counts.

        Per SKU only the highest version of the batch is sent; the others are counted
        stale. ``applied_at_ms`` is the local clock used as ``updated_at``.
        """
        now = now_ms()
        if not changes:
            return ApplyReport(applied=0, stale=0, applied_at_ms=now)
        # Documents are full snapshots, not deltas, and OpenSearch keeps only the highest
        # external version of an id: sending v1..v3 of a SKU in any order ends exactly as
        # sending v3 alone does, the lower ones being either overwritten by v3 or refused.
        latest: dict[str, StockChange] = {}
        for change in changes:
            sku = str(change["sku"])
            held = latest.get(sku)
            if held is None or int(change["version"]) > int(held["version"]):
                latest[sku] = change
        superseded = len(changes) - len(latest)

        lines: list[bytes] = []
        for sku, change in latest.items():
            version = int(change["version"])
            available = int(change["available"])
            action = {"index": {"_id": sku, "version": version, "version_type": "external"}}
            doc = {
                "sku": sku,
                "available": available,
                "in_stock": in_stock(available),
                "on_hand": int(change["on_hand"]),
                "reserved": int(change["reserved"]),
                "safety_stock": int(change["safety_stock"]),
                "damaged": int(change.get("damaged") or 0),
                **{f: int(change.get(f) or 0) for f in INCOMING_FIELDS},
                "locations": [
                    {
                        "location": str(x["location"]),
                        "available": int(x["available"]),
                        "in_stock": int(x["available"]) > 0,
                        "on_hand": int(x["on_hand"]),
                        "reserved": int(x["reserved"]),
                        "damaged": int(x["damaged"]),
                        "inbound": int(x["inbound"]),
                    }
                    for x in change.get("locations") or ()
                ],
                "version": version,
                "updated_at": now,
                "occurred_at": int(change["occurred_at"]),
            }
            lines.append(orjson.dumps(action))
            lines.append(orjson.dumps(doc))
        body = b"\n".join(lines) + b"\n"

        try:
            response = await self._client.bulk(
                body=body,
                index=self._index,
                filter_path="errors,items.*.status,items.*.error.type,items.*.error.reason",
            )
        except _UNAVAILABLE as exc:
            raise self._from_transport("bulk", exc) from exc

        items = response.get("items") or []
        if len(items) != len(latest):
            raise self._unavailable(
                "bulk", f"answered {len(items)} items for {len(latest)} documents"
            )
        applied = conflicts = 0
        transient: list[str] = []
        rejected: list[str] = []
        for sku, item in zip(latest, items, strict=True):
            result = next(iter(item.values()))
            status = int(result.get("status", 0))
            if 200 <= status < 300:
                applied += 1
            elif status == 409:
                conflicts += 1
            else:
                error = result.get("error") or {}
                what = f"{sku!r}: {status} {error.get('type')}: {error.get('reason')}"
                if 400 <= status < 500 and status not in _TRANSIENT_ITEM_STATUSES:
                    rejected.append(what)
                else:
                    transient.append(what)
        if rejected:
            raise self._unavailable(
                "bulk", f"{len(rejected)} documents rejected, first {rejected[0]}", SearchRejected
            )
        if transient:
            raise self._unavailable(
                "bulk", f"{len(transient)} documents not written, first {transient[0]}"
            )
        return ApplyReport(applied=applied, stale=conflicts + superseded, applied_at_ms=now)

    async def versions(self, skus: Sequence[str]) -> dict[str, int]:
        """The stored ``version`` per SKU via one realtime mget; absent if none (or no index)."""
        wanted = list(dict.fromkeys(skus))
        if not wanted:
            return {}
        try:
            response = await self._client.mget(
                index=self._index, body={"ids": wanted}, _source_includes=["version"]
            )
        except _UNAVAILABLE as exc:
            raise self._from_transport("versions", exc) from exc
        found: dict[str, int] = {}
        for doc in response.get("docs", []):
            error = doc.get("error")
            if error:
                # mget on a missing index answers 200 with this error per document.
                if error.get("type") == "index_not_found_exception":
                    continue
                raise self._unavailable("versions", f"{doc.get('_id')!r}: {error.get('type')}")
            if doc.get("found"):
                found[doc["_id"]] = int(doc["_source"]["version"])
        return found

    async def wipe(self) -> None:
        """Delete the index and create it again, empty, with :data:`MAPPING`.

        For a full rebuild. Deleting the index (rather than its documents) also drops
        the external versions; deleted documents would keep theirs as tombstones for
        ``index.gc_deletes`` (60 s) and refuse a rebuild's equal version with 409. A
        sink writing at the same moment can make OpenSearch auto-create the index
        with a dynamic mapping; the check in :meth:`setup` then raises SearchRejected.
        Raises TargetUnavailable when down.
        """
        try:
            await self._client.indices.delete(index=self._index, ignore_unavailable=True)
        except _UNAVAILABLE as exc:
            raise self._from_transport("wipe", exc) from exc
        await self.setup()

    async def ping(self) -> bool:
        """True when OpenSearch answers ``HEAD /`` now; never raises."""
        try:
            return bool(await self._client.ping())
        except Exception:  # noqa: BLE001 - ping reports, it does not raise
            return False

    async def close(self) -> None:
        """Close the HTTP session (only when this projection created the client)."""
        if self._owns_client:
            await self._client.close()


def _missing_fields(mappings: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of :data:`MAPPING` an existing index's mapping does not have."""
    have = mappings.get("properties", {})
    return {f: want for f, want in MAPPING["properties"].items() if f not in have}


def _mapping_problems(mappings: Mapping[str, Any]) -> list[str]:
    """How an existing index's mapping differs from :data:`MAPPING` (empty = compatible)."""
    problems: list[str] = []
    if str(mappings.get("dynamic")) != "strict":
        problems.append(f"dynamic is {mappings.get('dynamic')!r}, expected 'strict'")
    have = mappings.get("properties", {})
    for field, want in MAPPING["properties"].items():
        got = have.get(field)
        if got is None:
            problems.append(f"field {field!r} missing")
            continue
        for key, value in want.items():
            if got.get(key) != value:
                problems.append(f"field {field!r} has {key} {got.get(key)!r}, expected {value!r}")
    return problems
