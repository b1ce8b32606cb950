"""The continuous invariant auditor: ``python -m pipeline.auditor`` / ``inventory-auditor``.

An operator watches it during a sale. It reads, all the time and committed records
only, ``inventory.stock-changes`` (from ``INVENTORY_AUDITOR_FROM``: the beginning or
the end) and the ledger's ``{app_id}-stock-changelog`` (from the beginning), with an
assigned consumer that joins no group and commits nothing, and samples the Redis
hashes and the search documents. It exports on ``INVENTORY_AUDITOR_METRICS_PORT``
``inventory_invariant_violations_total{invariant}`` (every label value starts at 0)
and logs each violation (logger ``inventory.auditor``, WARNING) with the SKU, the
invariant, a ``kind`` and the evidence. The checks (``invariant`` label values):

* ``version_chain`` (DESIGN I4), per StockChanged as it arrives: the next version of a
  SKU is the last one + 1 (``gap`` otherwise); the same version again must have the
  same content (``conflict``); an older version again must be an identical re-send of
  the relay (``went_back`` otherwise) - re-sends older than the last
  :data:`DIGEST_WINDOW` versions cannot be compared and are let through. The first
  version of a SKU must be 1 when the partition was read from offset 0 and no SKU of
  it was forgotten (else it is where the chain starts, like ``inventory-audit``).
* ``conservation`` (I1, I2), per StockChanged: no count negative, ``available`` =
  max(0, on_hand - reserved - safety_stock), channel numbers within the SKU's; and
  against the previous version, the change fits its cause (only restocks, returns and
  restocked damaged units add to on_hand, only a commit takes from it - with the same
  units from reserved -, a count sets it; a reserve adds to reserved and leaves
  ``available`` >= 0, a release, expiry or commit takes from it; safety stock changes
  only by its command; ``damaged`` grows only by a return that cannot be resold, which
  leaves on_hand alone, and shrinks only by a ``DamagedStockResolved``, whose RESTOCK
  adds the same units to on_hand and whose WRITE_OFF leaves on_hand alone; a transfer
  shipped takes units from on_hand, one received or cancelled adds them back, and
  neither touches reserved). For a SKU with locations, ``available`` is instead the sum
  of its locations' own, and the totals must be the sums over its ``locations``.
  Each changelog record's state too: nothing negative.
* ``changelog_agreement``: the latest published version of each SKU equals the
  changelog's (the relay publishes what the ledger stored, and nothing else), with the
  same counts when the versions are equal (checked at once; the counts are on_hand,
  reserved, safety_stock, available, damaged and the purchase orders' incoming,
  promised, backorderable and staged); a different version is
  counted only when it lasts longer than ``INVENTORY_AUDITOR_GRACE_S``.
* ``projection_agreement`` (I4, I5): each interval ``INVENTORY_AUDITOR_SAMPLE_SKUS``
  SKUs (round robin) are read from Redis and the search index; a projection at the
  changelog's version must hold its counts (checked at once); one behind it must
  reach, within the grace, the version the changelog had when it was seen behind; one
  ahead of it is a violation when it still is after the grace.

A timed disagreement is judged only once the auditor itself has read both topics up
to their ends as of the end of the grace, so a slow auditor does not count its own
lag. One disagreement is counted once, however long it lasts.

Memory: at most ``INVENTORY_AUDITOR_MAX_SKUS`` SKUs (the least recently changed are
forgotten first), each about 0.7 KB (measured, 680 bytes: last published version, its
counts and the digests of the last :data:`DIGEST_WINDOW` versions; the changelog's version
and counts): 100,000 SKUs (the default) take about 68 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition

from config.settings import Settings, settings
from pipeline import metrics
from pipeline.cli import prog
from pipeline.clients import confluent_config, opensearch_kwargs, redis_kwargs
from pipeline.domain import core
from pipeline.domain.core import INCOMING_FIELDS, StockRecord
from pipeline.kafka.topics import changelog_topic
from pipeline.logs import configure_logging
from schemas.codec import AvroCodec, DecodeError, codec_from_settings
from tables.stock import StoredStock, is_stock_key

log = logging.getLogger("inventory.auditor")

DIGEST_WINDOW = 8
"""Versions per SKU whose content digest is kept, to tell a re-send from a rewrite."""
_DIGEST = 8  # bytes per digest

VERSION_CHAIN, CONSERVATION, CHANGELOG, PROJECTION = metrics.INVARIANTS

# on_hand, reserved, safety_stock, available, damaged, then the purchase orders' figures:
# incoming, promised, backorderable, staged (INCOMING_FIELDS)
Counts = tuple[int, ...]


@dataclass(frozen=True)
class Violation:
    invariant: str
    sku: str
    kind: str
    evidence: dict[str, Any]


# --------------------------------------------------------------------------- pure part


def counts_of(change: Mapping[str, Any]) -> Counts:
    return (
        int(change["on_hand"]),
        int(change["reserved"]),
        int(change["safety_stock"]),
        int(change["available"]),
        int(change.get("damaged") or 0),  # 0 in StockChanged v1/v2 (its default)
        # 0 in StockChanged v1..v4 (their defaults)
        *(int(change.get(f) or 0) for f in INCOMING_FIELDS),
    )


def ledger_counts(r: StockRecord) -> Counts:
    """The counts of a changelog record, as :func:`counts_of` gives them for a change."""
    po = core.incoming_figures(r.incoming)
    return (
        r.on_hand,
        r.reserved,
        r.safety_stock,
        r.available,
        r.damaged,
        *(po[f] for f in INCOMING_FIELDS),
    )


def digest(change: Mapping[str, Any]) -> bytes:
    return hashlib.blake2b(
        orjson.dumps(dict(change), option=orjson.OPT_SORT_KEYS), digest_size=_DIGEST
    ).digest()


def check_counts(change: Mapping[str, Any]) -> list[str]:
    """What is wrong with one StockChanged's counts on their own ([] = nothing)."""
    on_hand, reserved, safety, available, damaged, *po = counts_of(change)
    problems = [
        f"{name} is {value}"
        for name, value in (
            ("on_hand", on_hand),
            ("reserved", reserved),
            ("safety_stock", safety),
            ("available", available),
            ("damaged", damaged),
            *zip(INCOMING_FIELDS, po, strict=True),
        )
        if value < 0
    ]
    locations = change.get("locations") or []
    if locations:
        problems.extend(_check_locations(locations, on_hand, reserved, damaged, available))
    elif available != max(0, on_hand - reserved - safety - int(change.get("staged") or 0)):
        problems.append(
            f"available {available} is not max(0, on_hand {on_hand} - reserved {reserved} "
            f"- safety_stock {safety} - staged {change.get('staged') or 0})"
        )
    channels = change.get("channels") or []
    held = sum(int(c["reserved"]) for c in channels)
    if held > reserved:
        problems.append(f"channels hold {held} reserved units of {reserved}")
    for c in channels:
        if min(int(c["allocated"]), int(c["reserved"]), int(c["available"])) < 0:
            problems.append(f"channel {c['channel']} has a negative count")
        if int(c["available"]) > available:
            problems.append(f"channel {c['channel']} available {c['available']} > {available}")
    return problems


def _check_locations(
    locations: Sequence[Mapping[str, Any]],
    on_hand: int,
    reserved: int,
    damaged: int,
    available: int,
) -> list[str]:
    """A SKU with locations: its totals are the sums over them (available too: each
    location's own), no location counts negative units (on_hand aside: a sale after a
    count found fewer units than were held) and none shows more available than it has
    units free."""
    problems: list[str] = []
    sums = [sum(int(x[f]) for x in locations) for f in ("on_hand", "reserved", "damaged")]
    if sums != [on_hand, reserved, damaged]:
        problems.append(
            f"locations hold on_hand/reserved/damaged {sums}, the SKU {[on_hand, reserved, damaged]}"
        )
    if sum(int(x["available"]) for x in locations) != available:
        problems.append(f"locations' available do not sum to {available}")
    for x in locations:
        if min(int(x["reserved"]), int(x["damaged"]), int(x["available"]), int(x["inbound"])) < 0:
            problems.append(f"location {x['location']} has a negative count")
        if int(x["available"]) > max(0, int(x["on_hand"]) - int(x["reserved"])):
            problems.append(f"location {x['location']} shows more available than it has free")
    return problems


def check_transition(prev: Counts, change: Mapping[str, Any]) -> list[str]:
    """What is wrong with the change from the previous version's counts to ``change``,
    given its cause ([] = nothing; an unknown cause is not judged)."""
    on_hand, reserved, safety, available, damaged, *_ = counts_of(change)
    d_on, d_res, d_safe = on_hand - prev[0], reserved - prev[1], safety - prev[2]
    d_dmg = damaged - prev[4]
    cause = str(change.get("cause_type", ""))
    # a SKU with an open purchase order (incoming units) may take and release backorders,
    # which move no unit (a release may let staged units convert the next one); and a
    # purchase order's arrival, cut or close converts backorders into holds
    backorders = int(change.get("incoming") or 0) > 0
    untouched = d_on == 0 and d_safe == 0 and d_dmg == 0
    # damaged units come only from returns that cannot be resold and leave only by a
    # DamagedStockResolved: back on hand (RESTOCK, the same units) or written off
    rules: dict[str, bool] = {
        "RestockReceived": d_on > 0 and d_res >= 0 and d_safe == 0 and d_dmg == 0,
        "ReturnReceived": d_res == 0
        and d_safe == 0
        and ((d_on > 0 and d_dmg == 0) or (d_on == 0 and d_dmg > 0)),
        "DamagedStockResolved": d_dmg < 0 and d_on in (-d_dmg, 0) and d_res == 0 and d_safe == 0,
        "StockCounted": d_res == 0 and d_safe == 0 and d_dmg == 0,
        "SafetyStockSet": d_on == 0 and d_res == 0 and d_dmg == 0,
        "ChannelAllocationSet": d_on == 0 and d_res == 0 and d_safe == 0 and d_dmg == 0,
        "ReserveStock": untouched and (d_res > 0 or (d_res == 0 and backorders)),
        "ReleaseReservation": untouched and (d_res < 0 or backorders),
        "ExpireReservation": d_on == 0 and d_res < 0 and d_safe == 0 and d_dmg == 0,
        # a commit after the expiry releases instead (on_hand unchanged)
        "CommitReservation": d_res < 0 and d_on in (d_res, 0) and d_safe == 0 and d_dmg == 0,
        # a transfer's units are at neither end on the way (inbound at the destination)
        "TransferShipped": d_on < 0 and d_res == 0 and d_safe == 0 and d_dmg == 0,
        "TransferReceived": d_on >= 0 and d_res == 0 and d_safe == 0 and d_dmg == 0,
        "TransferCancelled": d_on > 0 and d_res == 0 and d_safe == 0 and d_dmg == 0,
        "IncomingStock": untouched and d_res >= 0,
        "PurchaseOrderClosed": untouched and d_res >= 0,
        "BackorderCapSet": untouched and d_res == 0,
    }
    problems = []
    if cause in rules and not rules[cause]:
        problems.append(
            f"{cause} changed on_hand by {d_on}, reserved by {d_res}, safety_stock by {d_safe}, "
            f"damaged by {d_dmg}"
        )
    # with locations, a location a count left holding more than it has (a shortfall)
    # makes the SKU's sum negative without any oversell: judged per location instead
    # (check_counts: no location shows more available than it has free)
    shortfall = any(int(x["reserved"]) > int(x["on_hand"]) for x in change.get("locations") or ())
    if cause == "ReserveStock" and on_hand - reserved - safety < 0 and not shortfall:
        problems.append(
            f"reserved {reserved} beyond on_hand {on_hand} - safety_stock {safety} (oversell)"
        )
    return problems


class SkuState:
    """What the auditor remembers of one SKU."""

    __slots__ = ("version", "counts", "digests", "cl_version", "cl_counts", "partition")

    def __init__(self) -> None:
        self.version = 0  # highest published version seen (0 = none)
        self.counts: Counts | None = None  # its counts
        self.digests = b""  # digests of versions version-n+1 .. version, newest last
        self.cl_version = -1  # the changelog's version (-1 = not seen)
        self.cl_counts: Counts | None = None
        self.partition = -1  # of both topics (same count, same key, murmur2)

    def digest_of(self, version: int) -> bytes | None:
        back = self.version - version
        if back < 0 or (back + 1) * _DIGEST > len(self.digests):
            return None
        end = len(self.digests) - back * _DIGEST
        return self.digests[end - _DIGEST : end]


@dataclass
class Suspicion:
    """A disagreement seen at ``since``, judged after the grace."""

    invariant: str
    sku: str
    target: str  # "" (changelog_agreement), "redis" or "search"
    since: float
    seen: int  # the other side's version then (published, or the projection's)
    ledger: int  # the changelog's version then
    snapshot: dict[tuple[str, int], int] | None = None  # ends to read before judging


@dataclass
class Auditor:
    """The checks over the records fed to it (no I/O: :class:`AuditorProcess` feeds it)."""

    grace_s: float
    max_skus: int
    skus: OrderedDict[str, SkuState] = field(default_factory=OrderedDict)
    complete: set[int] = field(default_factory=set)  # partitions read from offset 0, none forgotten
    suspicions: dict[tuple[str, str], Suspicion] = field(default_factory=dict)
    reported: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)

    # ---- bookkeeping
    def _state(self, sku: str, partition: int) -> SkuState:
        state = self.skus.get(sku)
        if state is None:
            state = self.skus[sku] = SkuState()
            state.partition = partition
            if len(self.skus) > self.max_skus:
                old, _forgotten = self.skus.popitem(last=False)
                for key in [k for k in self.suspicions if k[1] == old]:
                    del self.suspicions[key]
                for key in [k for k in self.reported if k[1] == old]:
                    del self.reported[key]
                # a forgotten SKU's chain cannot be checked from its start any more
                self.complete.clear()
        else:
            self.skus.move_to_end(sku)
        return state

    def _violate(self, invariant: str, sku: str, kind: str, **evidence: Any) -> None:
        v = Violation(invariant, sku, kind, evidence)
        self.violations.append(v)
        metrics.INVARIANT_VIOLATIONS.labels(invariant).inc()
        log.warning(
            "invariant %s violated on %s: %s %s",
            invariant,
            sku,
            kind,
            evidence,
            extra={"sku": sku, "invariant": invariant, "kind": kind, "evidence": evidence},
        )

    @staticmethod
    def _checked(invariant: str, n: int = 1) -> None:
        metrics.AUDITOR_CHECKS.labels(invariant).inc(n)
        metrics.AUDITOR_LAST_CHECK.labels(invariant).set(time.time())

    # ---- stock-changes
    def observe_change(self, partition: int, change: Mapping[str, Any], now: float) -> None:
        """One StockChanged read from ``partition`` of stock-changes."""
        sku = str(change["sku"])
        version = int(change["version"])
        state = self._state(sku, partition)
        self._checked(VERSION_CHAIN)
        self._checked(CONSERVATION)
        problems = check_counts(change)
        if problems:
            self._violate(CONSERVATION, sku, "counts", version=version, problems=problems)
        d = digest(change)
        if state.version == 0:
            if version > 1 and partition in self.complete:
                self._violate(VERSION_CHAIN, sku, "gap", missing=[1, version - 1])
            self._advance(state, version, change, d, reset=True)
        elif version == state.version + 1:
            if state.counts is not None:
                problems = check_transition(state.counts, change)
                if problems:
                    self._violate(
                        CONSERVATION,
                        sku,
                        "transition",
                        version=version,
                        cause_type=change.get("cause_type"),
                        cause_event_id=change.get("cause_event_id"),
                        problems=problems,
                    )
            self._advance(state, version, change, d, reset=False)
        elif version > state.version + 1:
            self._violate(
                VERSION_CHAIN, sku, "gap", missing=[state.version + 1, version - 1], read=version
            )
            self._advance(state, version, change, d, reset=True)
        else:
            known = state.digest_of(version)
            if known is not None and known != d:
                kind = "conflict" if version == state.version else "went_back"
                self._violate(
                    VERSION_CHAIN,
                    sku,
                    kind,
                    version=version,
                    latest=state.version,
                    record=dict(change),
                )
            return  # a re-send (or too old to compare): the state stays
        self._agree(sku, state, now)

    @staticmethod
    def _advance(
        state: SkuState, version: int, change: Mapping[str, Any], d: bytes, *, reset: bool
    ) -> None:
        state.version = version
        state.counts = counts_of(change)
        kept = b"" if reset else state.digests[-(DIGEST_WINDOW - 1) * _DIGEST :]
        state.digests = kept + d

    # ---- the changelog
    def observe_stock(self, partition: int, stored: StoredStock, now: float) -> None:
        """One SKU record read from ``partition`` of the ledger's changelog."""
        r = stored.record
        state = self._state(r.sku, partition)
        self._checked(CONSERVATION)
        negative = {
            k: v
            for k, v in (
                ("on_hand", r.on_hand),
                ("reserved", r.reserved),
                ("safety_stock", r.safety_stock),
                ("damaged", r.damaged),
            )
            if v < 0
        }
        if negative:
            self._violate(CONSERVATION, r.sku, "ledger_state", version=r.version, negative=negative)
        state.cl_version = r.version
        state.cl_counts = ledger_counts(r)
        self._agree(r.sku, state, now)

    def _agree(self, sku: str, state: SkuState, now: float) -> None:
        """Published against the changelog, for one SKU whose either side just moved."""
        if state.cl_version < 0 or state.version == 0:
            return  # one side not seen (yet): FROM=LATEST, or a SKU just created
        key = (CHANGELOG, sku)
        if state.version == state.cl_version:
            self._checked(CHANGELOG)
            self.suspicions.pop(key, None)
            pair = (state.version, state.cl_version)
            if state.counts != state.cl_counts and self.reported.get(key) != pair:
                self.reported[key] = pair
                self._violate(
                    CHANGELOG,
                    sku,
                    "counts",
                    version=state.version,
                    published=state.counts,
                    ledger=state.cl_counts,
                )
            elif state.counts == state.cl_counts:
                self.reported.pop(key, None)
        elif key not in self.suspicions:
            self.suspicions[key] = Suspicion(
                CHANGELOG, sku, "", now, state.version, state.cl_version
            )

    # ---- projections
    def compare_projection(
        self,
        target: str,
        sku: str,
        held: tuple[int, Counts | None],
        now: float,
        *,
        judged: bool = False,
    ) -> None:
        """A projection's (version, counts) of ``sku`` (version 0: it has none); ``judged``:
        read for a due suspicion whose snapshot the auditor has read (see tick)."""
        state = self.skus.get(sku)
        if state is None or state.cl_version < 0:
            return
        version, counts = held
        key = (f"{PROJECTION}:{target}", sku)
        self._checked(PROJECTION)
        if version == state.cl_version:
            self.suspicions.pop(key, None)
            pair = (version, state.cl_version)
            if counts != state.cl_counts:
                if self.reported.get(key) != pair:
                    self.reported[key] = pair
                    self._violate(
                        PROJECTION,
                        sku,
                        "counts",
                        target=target,
                        version=version,
                        projected=counts,
                        ledger=state.cl_counts,
                    )
            else:
                self.reported.pop(key, None)
            return
        sus = self.suspicions.get(key)
        if sus is None:
            self.suspicions[key] = Suspicion(
                PROJECTION, sku, target, now, version, state.cl_version
            )
            return
        if not judged or sus.snapshot is None or now - sus.since < self.grace_s:
            return  # judged once due and the auditor has read its snapshot (tick)
        if version < sus.ledger or version > state.cl_version:
            self._report(
                key,
                sus,
                version,
                state.cl_version,
                kind="behind" if version < state.cl_version else "ahead",
                target=target,
                projected=version,
                ledger_then=sus.ledger,
                ledger_now=state.cl_version,
                seconds=round(now - sus.since, 1),
            )
        else:  # it moved on, the ledger too: a new disagreement, if any
            self.suspicions[key] = Suspicion(
                PROJECTION, sku, target, now, version, state.cl_version
            )

    def _report(
        self, key: tuple[str, str], sus: Suspicion, seen: int, ledger: int, **evidence: Any
    ) -> None:
        del self.suspicions[key]
        pair = (seen, ledger)
        if self.reported.get(key) == pair:
            return  # the same disagreement, still there: counted once
        self.reported[key] = pair
        kind = evidence.pop("kind")
        self._violate(sus.invariant, sus.sku, kind, **evidence)

    def due(self, now: float) -> list[Suspicion]:
        """Suspicions whose grace is over (their snapshot is still to be taken or read)."""
        return [s for s in self.suspicions.values() if now - s.since >= self.grace_s]

    def judge_changelog(self, sus: Suspicion, now: float) -> None:
        """A changelog_agreement suspicion, once the auditor has read its snapshot."""
        key = (CHANGELOG, sus.sku)
        state = self.skus.get(sus.sku)
        if state is None:
            self.suspicions.pop(key, None)
            return
        if state.version == state.cl_version:
            self.suspicions.pop(key, None)
            return
        if state.version < sus.ledger or state.version > state.cl_version:
            self._report(
                key,
                sus,
                state.version,
                state.cl_version,
                kind="behind" if state.version < state.cl_version else "ahead",
                published=state.version,
                ledger_then=sus.ledger,
                ledger_now=state.cl_version,
                seconds=round(now - sus.since, 1),
            )
        else:
            self.suspicions[key] = Suspicion(
                CHANGELOG, sus.sku, "", now, state.version, state.cl_version
            )


# --------------------------------------------------------------------------- I/O part


def _redis_client(cfg: Settings) -> Any:
    import redis

    return redis.Redis.from_url(
        cfg.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0, **redis_kwargs(cfg)
    )


def _search_client(cfg: Settings) -> Any:
    from opensearchpy import OpenSearch

    logging.getLogger("opensearch").setLevel(logging.WARNING)
    return OpenSearch(hosts=[cfg.opensearch_url], timeout=5, **opensearch_kwargs(cfg))


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def redis_held(cfg: Settings, client: Any, skus: Sequence[str]) -> dict[str, tuple[int, Any]]:
    """(version, counts) of each SKU's hash; (0, None) when it has none. A hash without
    ``damaged`` or the purchase orders' figures (written before they existed) holds 0
    of them."""
    fields = (
        "version",
        "on_hand",
        "reserved",
        "safety_stock",
        "available",
        "damaged",
        *INCOMING_FIELDS,
    )
    pipe = client.pipeline(transaction=False)
    for sku in skus:
        pipe.hmget(cfg.redis_stock_key(sku), fields)
    out: dict[str, tuple[int, Any]] = {}
    for sku, values in zip(skus, pipe.execute(), strict=True):
        nums = [_int_or_none(v) for v in values]
        if nums[0] is None:
            out[sku] = (0, None)
        else:
            later = (0 if v is None else n for v, n in zip(values[5:], nums[5:], strict=True))
            out[sku] = (nums[0], (*nums[1:5], *later))
    return out


def search_held(cfg: Settings, client: Any, skus: Sequence[str]) -> dict[str, tuple[int, Any]]:
    """(version, counts) of each SKU's search document; (0, None) when it has none."""
    from opensearchpy.exceptions import NotFoundError

    try:
        resp = client.mget(index=cfg.search_index, body={"ids": list(skus)})
    except NotFoundError:  # no index yet: no documents
        return {sku: (0, None) for sku in skus}
    out: dict[str, tuple[int, Any]] = {}
    for doc in resp["docs"]:
        src = doc.get("_source") if doc.get("found") else None
        if not src:
            out[doc["_id"]] = (0, None)
            continue
        out[doc["_id"]] = (
            int(src.get("version", 0)),
            (
                *(
                    _int_or_none(src.get(k))
                    for k in ("on_hand", "reserved", "safety_stock", "available")
                ),
                # absent in documents written before they existed
                *(_int_or_none(src.get(k, 0)) for k in ("damaged", *INCOMING_FIELDS)),
            ),
        )
    return out


class AuditorProcess:
    """Reads both topics and the projections and feeds an :class:`Auditor`."""

    def __init__(self, cfg: Settings, codec: AvroCodec | None = None) -> None:
        self.cfg = cfg
        self.codec = codec or codec_from_settings(cfg)
        self.auditor = Auditor(cfg.auditor_grace_s, cfg.auditor_max_skus)
        self.changes_topic = cfg.stock_changes_topic
        self.changelog = changelog_topic(cfg)
        self.read: dict[tuple[str, int], int] = {}  # next offset read, per topic partition
        self.queue: deque[str] = deque()
        self.redis = _redis_client(cfg)
        self.search = _search_client(cfg)
        quiet = logging.getLogger("inventory.auditor.kafka")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
        self.consumer = Consumer(
            confluent_config(
                cfg,
                **{
                    "group.id": f"{cfg.app_id}-auditor-{uuid.uuid4().hex}",  # never joined
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "enable.partition.eof": True,
                    "isolation.level": "read_committed",
                    "auto.offset.reset": "earliest",
                    "logger": quiet,
                },
            )
        )

    def assign(self, timeout: float = 120.0) -> None:
        """Assign every partition of both topics once they exist."""
        deadline = time.monotonic() + timeout
        while True:
            meta = self.consumer.list_topics(timeout=10)
            have = {
                t: len(m.partitions)
                for t, m in meta.topics.items()
                if m.error is None and m.partitions
            }
            if self.changes_topic in have and self.changelog in have:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.changes_topic} or {self.changelog} does not exist")
            log.info("waiting for %s and %s to exist", self.changes_topic, self.changelog)
            time.sleep(1.0)
        tps = []
        for p in range(have[self.changes_topic]):
            low, _high = self.consumer.get_watermark_offsets(
                TopicPartition(self.changes_topic, p), timeout=10, cached=False
            )
            start = OFFSET_BEGINNING if self.cfg.auditor_from == "EARLIEST" else OFFSET_END
            if self.cfg.auditor_from == "EARLIEST" and low == 0:
                self.auditor.complete.add(p)
            tps.append(TopicPartition(self.changes_topic, p, start))
        for p in range(have[self.changelog]):
            tps.append(TopicPartition(self.changelog, p, OFFSET_BEGINNING))
        self.consumer.assign(tps)

    def poll_once(self, timeout: float = 0.2) -> int:
        """Consume what is there (up to 5000 records); returns how many were read."""
        now = time.monotonic()
        msgs = self.consumer.consume(5000, timeout)
        for msg in msgs:
            err = msg.error()
            tp = (msg.topic(), msg.partition())
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.read[tp] = max(self.read.get(tp, 0), msg.offset())
                else:
                    metrics.AUDITOR_ERRORS.labels("kafka").inc()
                    log.warning("kafka: %s", err)
                continue
            self.read[tp] = max(self.read.get(tp, 0), msg.offset() + 1)
            value = msg.value()
            if value is None:
                continue
            if msg.topic() == self.changelog:
                key = msg.key()
                if key is None or not is_stock_key(key):
                    continue
                try:
                    stored = StoredStock.from_bytes(value)
                except (ValueError, KeyError, TypeError) as exc:
                    metrics.AUDITOR_UNREADABLE.labels("changelog").inc()
                    log.error("unreadable changelog record at %s@%d: %s", tp, msg.offset(), exc)
                    continue
                self.auditor.observe_stock(msg.partition(), stored, now)
            else:
                try:
                    name, rec = self.codec.decode(value)
                except DecodeError as exc:
                    metrics.AUDITOR_UNREADABLE.labels("stock_changes").inc()
                    log.error(
                        "undecodable stock-changes record at %s@%d: %s", tp, msg.offset(), exc
                    )
                    continue
                if name == "StockChanged":
                    self.auditor.observe_change(msg.partition(), rec, now)
        metrics.AUDITOR_SKUS.set(len(self.auditor.skus))
        return len(msgs)

    def _ends(
        self, sus: Suspicion, cache: dict[tuple[str, int], int]
    ) -> dict[tuple[str, int], int]:
        """The end offsets of the SKU's partition of both topics now (one query per
        partition and tick, shared through ``cache``)."""
        state = self.auditor.skus.get(sus.sku)
        part = state.partition if state is not None else -1
        out = {}
        for topic in (self.changes_topic, self.changelog):
            if part < 0:
                continue
            tp = (topic, part)
            if tp not in cache:
                _low, cache[tp] = self.consumer.get_watermark_offsets(
                    TopicPartition(topic, part), timeout=5, cached=False
                )
            out[tp] = cache[tp]
        return out

    def _read_up_to(self, snapshot: Mapping[tuple[str, int], int]) -> bool:
        return all(self.read.get(tp, 0) >= end for tp, end in snapshot.items())

    def projections(self, skus: Sequence[str], now: float, *, judged: bool = False) -> None:
        for target, read in (("redis", redis_held), ("search", search_held)):
            client = self.redis if target == "redis" else self.search
            try:
                held = read(self.cfg, client, skus)
            except Exception as exc:  # noqa: BLE001 - an unreachable target skips this round
                metrics.AUDITOR_ERRORS.labels(target).inc()
                log.warning("auditor: reading %s failed: %s", target, exc)
                continue
            for sku, value in held.items():
                self.auditor.compare_projection(target, sku, value, now, judged=judged)

    def tick(self, now: float) -> None:
        """Judge the due suspicions, then sample the next SKUs' projections."""
        ends: dict[tuple[str, int], int] = {}
        for sus in self.auditor.due(now):
            if sus.snapshot is None:
                try:
                    sus.snapshot = self._ends(sus, ends)
                except Exception as exc:  # noqa: BLE001 - judged next round
                    metrics.AUDITOR_ERRORS.labels("kafka").inc()
                    log.warning("auditor: end offsets: %s", exc)
                continue
            if not self._read_up_to(sus.snapshot):
                continue  # the auditor is behind: not the pipeline's fault
            if sus.invariant == CHANGELOG:
                self.auditor.judge_changelog(sus, now)
            else:
                self.projections([sus.sku], now, judged=True)
        if not self.queue:
            self.queue.extend(s for s, st in self.auditor.skus.items() if st.cl_version >= 0)
        batch = [
            self.queue.popleft() for _ in range(min(len(self.queue), self.cfg.auditor_sample_skus))
        ]
        if batch:
            self.projections(batch, now)

    def run(self, stop_after_s: float | None = None) -> None:
        self.assign()
        started = time.monotonic()
        next_tick = started
        while stop_after_s is None or time.monotonic() - started < stop_after_s:
            self.poll_once(timeout=min(0.2, self.cfg.auditor_interval_s))
            now = time.monotonic()
            if now >= next_tick:
                self.tick(now)
                next_tick = now + self.cfg.auditor_interval_s

    def close(self) -> None:
        self.consumer.close()
        self.redis.close()
        self.search.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.auditor`` / ``inventory-auditor``: audit until stopped."""
    parser = argparse.ArgumentParser(
        prog=prog("pipeline.auditor"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    configure_logging(settings.log_level)
    from prometheus_client import start_http_server

    start_http_server(
        settings.auditor_metrics_port, addr=settings.web_host, registry=metrics.AUDITOR_REGISTRY
    )
    proc = AuditorProcess(settings)
    log.info("auditor: %s and %s", proc.changes_topic, proc.changelog)
    try:
        proc.run()
    except KeyboardInterrupt:
        pass
    finally:
        proc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
