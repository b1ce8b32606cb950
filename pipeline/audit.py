"""Audit one SKU: its full history from the stock-changes topic, with the version chain checked.

Usage::

    python -m pipeline.audit SKU [--json] [--since ISO|ms] [--timeout S]

Reads only the SKU's partition of ``settings.stock_changes_topic`` (murmur2 of
the key, like every producer of the pipeline), from the log start offset to the
end offset as of the start of the run, with an assigned consumer that joins no
group and commits nothing. Records keyed by the SKU are decoded and shown in
version order: each ``StockChanged`` with its cause (command type, event id,
order, channel) and stock, one line per location for a SKU whose stock is at named
locations (on hand, reserved, available, damaged and inbound there), followed by the
events it caused (``StockShortfall``, ``LowStockCrossed``).

The relay publishes at least once, so a version may appear more than once
with identical content: such copies are counted (``duplicates``) and shown
once. The chain check (:func:`check_chain`, pure) reports

* **gaps**: versions missing between the first and the last one, or before the
  first when the partition still starts at offset 0;
* **conflicts**: one version published with different contents;
* a **truncated start**: the first version is above 1 but the partition's log
  start offset is above 0, so retention (``INVENTORY_STOCK_CHANGES_RETENTION_MS``)
  may have deleted the beginning. That is not a gap and does not fail the check.

``--since`` (ISO 8601, naive = UTC, or epoch milliseconds) only limits the
records printed; the chain is always checked over everything read.

Exit codes: 0 the chain is whole; 1 gaps or conflicts; 2 usage error or no
record of the SKU; 3 Kafka unreachable, the topic's metadata unavailable or the
read not finished within ``--timeout``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from config.settings import Settings, settings
from pipeline.cli import prog
from pipeline.clients import confluent_config
from pipeline.kafka.partitioning import partition_for
from schemas.codec import AvroCodec, DecodeError, codec_from_settings
from schemas.registry import RegistryError
from schemas.validation import Invalid, check_sku

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_USAGE = 2
EXIT_KAFKA = 3

CHANGE = "StockChanged"
SHORTFALL = "StockShortfall"
LOW_STOCK = "LowStockCrossed"


class AuditError(Exception):
    """The audit could not run; ``code`` is the exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- pure part


@dataclass(frozen=True)
class Gap:
    """Versions ``first``..``last`` (inclusive) are missing."""

    first: int
    last: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def to_json(self) -> dict[str, int]:
        return {"from": self.first, "to": self.last, "count": self.count}

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}..{self.last}"


@dataclass(frozen=True)
class Conflict:
    """One version published with different contents (``variants``, first seen first)."""

    version: int
    fields: tuple[str, ...]
    variants: tuple[Mapping[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "fields": list(self.fields),
            "variants": [dict(v) for v in self.variants],
        }


@dataclass(frozen=True)
class ChainReport:
    versions: tuple[int, ...]  # distinct, ascending
    duplicates: int  # identical re-sends
    gaps: tuple[Gap, ...]
    conflicts: tuple[Conflict, ...]
    start_truncated: bool  # first version > 1 and the log start offset > 0

    @property
    def first_version(self) -> int | None:
        return self.versions[0] if self.versions else None

    @property
    def last_version(self) -> int | None:
        return self.versions[-1] if self.versions else None

    @property
    def ok(self) -> bool:
        return not self.gaps and not self.conflicts


def _differing_fields(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))


def check_chain(changes: Sequence[Mapping[str, Any]], *, log_start_offset: int = 0) -> ChainReport:
    """Check the version chain of one SKU's ``StockChanged`` values, in topic order.

    ``log_start_offset`` is the partition's first retained offset: above 0,
    versions missing before the first one read are a truncated start (retention),
    not a gap.
    """
    variants: dict[int, list[Mapping[str, Any]]] = {}
    duplicates = 0
    for change in changes:
        seen = variants.setdefault(int(change["version"]), [])
        if any(dict(change) == dict(s) for s in seen):
            duplicates += 1
        else:
            seen.append(change)
    versions = tuple(sorted(variants))
    conflicts = tuple(
        Conflict(
            v,
            tuple(sorted({f for other in vs[1:] for f in _differing_fields(vs[0], other)})),
            tuple(vs),
        )
        for v, vs in sorted(variants.items())
        if len(vs) > 1
    )
    gaps: list[Gap] = []
    start_truncated = False
    if versions and versions[0] > 1:
        if log_start_offset > 0:
            start_truncated = True
        else:
            gaps.append(Gap(1, versions[0] - 1))
    for prev, nxt in zip(versions, versions[1:], strict=False):
        if nxt > prev + 1:
            gaps.append(Gap(prev + 1, nxt - 1))
    return ChainReport(versions, duplicates, tuple(gaps), conflicts, start_truncated)


@dataclass(frozen=True)
class AuditRecord:
    """One record of the SKU as read: its offset, record name and decoded value."""

    offset: int
    name: str
    value: Mapping[str, Any]


def iso_ms(ms: int | None) -> str:
    """Epoch milliseconds as ISO 8601 UTC with milliseconds (``...T12:00:00.123Z``)."""
    if ms is None:
        return ""
    t = _dt.datetime.fromtimestamp(ms / 1000, _dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def history(records: Sequence[AuditRecord]) -> list[dict[str, Any]]:
    """The distinct records in version order, each event right after the change it belongs to.

    Identical copies are shown once with ``resent`` (how many copies followed);
    for a conflicting version only the first variant appears here. An event
    (``StockShortfall``, ``LowStockCrossed``, any other record of the SKU)
    belongs to the change of its ``version`` field if it has one, else to the
    change with its ``cause_event_id``; without either it stays after the change
    read before it. Each item has ``type``, ``offset``, ``time_ms`` and ``time``
    (the change's ``processed_at``; epoch ms and ISO UTC), the record's fields
    and ``resent``; an event also has ``version``, the version of its change.
    """
    items: list[dict[str, Any]] = []
    first_of: dict[tuple[str, str], dict[str, Any]] = {}
    change_by_version: dict[int, dict[str, Any]] = {}
    for rec in records:
        ident = (rec.name, json.dumps(dict(rec.value), sort_keys=True, default=str))
        if ident in first_of:
            first_of[ident]["resent"] += 1
            continue
        if rec.name == CHANGE and int(rec.value["version"]) in change_by_version:
            continue  # a conflicting variant: reported by check_chain, shown once here
        item = {"type": rec.name, "offset": rec.offset, **rec.value, "resent": 0}
        first_of[ident] = item
        if rec.name == CHANGE:
            change_by_version[int(rec.value["version"])] = item
        items.append(item)
    change_by_event = {
        c["cause_event_id"]: c
        for c in sorted(change_by_version.values(), key=lambda c: c["offset"])
    }
    keyed: list[tuple[tuple[int, int, int], dict[str, Any]]] = []
    last_version = 0
    for pos, item in enumerate(items):
        if item["type"] == CHANGE:
            last_version = int(item["version"])
            item["time"] = iso_ms(item.get("processed_at"))
            item["time_ms"] = item.get("processed_at")
            keyed.append(((last_version, 0, pos), item))
            continue
        parent: dict[str, Any] | None = None
        if isinstance(item.get("version"), int):
            version = int(item["version"])
            parent = change_by_version.get(version)
        else:
            parent = change_by_event.get(item.get("cause_event_id", ""))
            version = int(parent["version"]) if parent is not None else last_version
            item["version"] = version if version else None
        ms = parent.get("processed_at") if parent is not None else item.get("occurred_at")
        item["time"] = iso_ms(ms)
        item["time_ms"] = ms
        keyed.append(((version, 1, pos), item))
    keyed.sort(key=lambda kv: kv[0])
    return [item for _, item in keyed]


def _time_ms(item: Mapping[str, Any]) -> int:
    ms = item.get("time_ms")
    return int(ms) if ms is not None else 0


def parse_since(text: str) -> int:
    """``--since``: epoch milliseconds (digits) or ISO 8601 (naive = UTC) -> epoch ms.

    Raises ``ValueError`` for anything else.
    """
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        t = _dt.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected ISO 8601 (2025-01-31T12:00:00Z) or epoch milliseconds"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return int(t.timestamp() * 1000)


def report(
    sku: str,
    topic: str,
    partition: int,
    log_start_offset: int,
    end_offset: int,
    records: Sequence[AuditRecord],
    *,
    anomalies: Sequence[Mapping[str, Any]] = (),
    since_ms: int | None = None,
) -> dict[str, Any]:
    """The audit as one JSON-ready document (the ``--json`` output)."""
    chain = check_chain(
        [r.value for r in records if r.name == CHANGE], log_start_offset=log_start_offset
    )
    items = history(records)
    shown = [i for i in items if since_ms is None or _time_ms(i) >= since_ms]
    return {
        "sku": sku,
        "topic": topic,
        "partition": partition,
        "log_start_offset": log_start_offset,
        "end_offset": end_offset,
        "since": iso_ms(since_ms) if since_ms is not None else None,
        "records": shown,
        "changes": len(chain.versions),
        "shortfalls": sum(1 for i in items if i["type"] == SHORTFALL),
        "low_stock_crossings": sum(1 for i in items if i["type"] == LOW_STOCK),
        "duplicates": chain.duplicates,
        "gaps": [g.to_json() for g in chain.gaps],
        "conflicts": [c.to_json() for c in chain.conflicts],
        "first_version": chain.first_version,
        "last_version": chain.last_version,
        "start_truncated": chain.start_truncated,
        "anomalies": [dict(a) for a in anomalies],
        "ok": chain.ok,
    }


def summary_line(doc: Mapping[str, Any]) -> str:
    """One line: versions, duplicates, events, gaps, conflicts and the verdict."""
    parts = [
        f"{doc['sku']}: {doc['changes']} versions"
        + (f" ({doc['first_version']}..{doc['last_version']})" if doc["changes"] else "")
    ]
    parts.append(f"{doc['duplicates']} identical re-send{'s' if doc['duplicates'] != 1 else ''}")
    parts.append(f"{doc['shortfalls']} shortfall{'s' if doc['shortfalls'] != 1 else ''}")
    crossings = doc["low_stock_crossings"]
    parts.append(f"{crossings} low-stock crossing{'s' if crossings != 1 else ''}")
    gaps = doc["gaps"]
    parts.append(
        f"{len(gaps)} gap{'s' if len(gaps) != 1 else ''}"
        + (" (missing " + ", ".join(_gap_text(g) for g in gaps) + ")" if gaps else "")
    )
    conflicts = doc["conflicts"]
    parts.append(
        f"{len(conflicts)} conflict{'s' if len(conflicts) != 1 else ''}"
        + (
            " (version " + ", ".join(str(c["version"]) for c in conflicts) + ")"
            if conflicts
            else ""
        )
    )
    if doc["start_truncated"]:
        parts.append(
            f"history starts at version {doc['first_version']}: earlier versions were "
            f"removed by retention (log start offset {doc['log_start_offset']})"
        )
    if doc["anomalies"]:
        parts.append(f"{len(doc['anomalies'])} unreadable record(s)")
    verdict = "chain OK" if doc["ok"] else "chain BROKEN"
    return "summary: " + ", ".join(parts) + f" -> {verdict}"


def _event_text(item: Mapping[str, Any]) -> str:
    if item["type"] == SHORTFALL:
        return (
            f"! shortfall: counted {item['counted']}, reserved {item['reserved']}, "
            f"short by {item['shortfall']}"
            + (f" at {item['location']}" if item.get("location") else "")
            + f" (event {item['cause_event_id']})"
        )
    if item["type"] == LOW_STOCK:
        return (
            f"~ low stock {item['direction']}: available {item['available']}, "
            f"threshold {item['threshold']}"
        )
    fields = {
        k: v for k, v in item.items() if k not in ("type", "offset", "resent", "time", "time_ms")
    }
    return f"* {item['type']}: {json.dumps(fields, sort_keys=True, default=str)}"


def _gap_text(g: Mapping[str, int]) -> str:
    return str(g["from"]) if g["from"] == g["to"] else f"{g['from']}..{g['to']}"


_COLUMNS = (
    ("ver", "version", ">"),
    ("processed (UTC)", "time", "<"),
    ("cause", "cause_type", "<"),
    ("event id", "cause_event_id", "<"),
    ("order", "order_id", "<"),
    ("channel", "channel", "<"),
    ("on_hand", "on_hand", ">"),
    ("reserved", "reserved", ">"),
    ("safety", "safety_stock", ">"),
    ("available", "available", ">"),
    ("damaged", "damaged", ">"),
    ("", "note", "<"),
)


def _location_lines(change: Mapping[str, Any]) -> list[str]:
    """The per-location figures of a change (none for a SKU that never named a location:
    its totals are its default location's)."""
    return [
        f"      at {x['location']}: on_hand {x['on_hand']}, reserved {x['reserved']}, "
        f"available {x['available']}, damaged {x['damaged']}"
        + (f", inbound {x['inbound']}" if x.get("inbound") else "")
        for x in change.get("locations") or ()
    ]


def render_table(doc: Mapping[str, Any]) -> str:
    """The human output: a header, one row per version (shortfalls and gaps inline), a summary."""
    lines = [
        f"SKU {doc['sku']} - topic {doc['topic']} partition {doc['partition']}, "
        f"offsets {doc['log_start_offset']}..{doc['end_offset']}"
        + (f", since {doc['since']}" if doc["since"] else "")
    ]
    conflicted = {c["version"] for c in doc["conflicts"]}
    gaps = sorted(doc["gaps"], key=lambda g: g["from"])  # shown before the next version
    if doc["since"]:  # gaps before the first version shown stay in the summary only
        shown = [i["version"] for i in doc["records"] if i["type"] == CHANGE]
        gaps = [g for g in gaps if shown and g["to"] > shown[0]]
    rows: list[dict[str, str] | str] = []
    if doc["start_truncated"]:
        rows.append(
            f"  -- versions before {doc['first_version']} removed by retention "
            f"(log start offset {doc['log_start_offset']}) --"
        )
    for item in doc["records"]:
        if item["type"] != CHANGE:
            rows.append(
                "      "
                + _event_text(item)
                + (f" [re-sent x{item['resent']}]" if item["resent"] else "")
            )
            continue
        while gaps and gaps[0]["to"] < item["version"]:
            rows.append(f"  -- gap: version {_gap_text(gaps.pop(0))} missing --")
        notes = []
        if item["resent"]:
            notes.append(f"re-sent x{item['resent']}")
        if item["version"] in conflicted:
            notes.append("CONFLICT: published with other contents too")
        rows.append(
            {
                key: str(item.get(key, "")) if key != "note" else "; ".join(notes)
                for _, key, _ in _COLUMNS
            }
        )
        rows.extend(_location_lines(item))
    table_rows = [r for r in rows if isinstance(r, dict)]
    widths = {
        key: max([len(title)] + [len(r[key]) for r in table_rows]) for title, key, _ in _COLUMNS
    }

    def fmt(values: Mapping[str, str]) -> str:
        return "  ".join(
            f"{values[key]:{align}{widths[key]}}" for _, key, align in _COLUMNS
        ).rstrip()

    lines.append(fmt({key: title for title, key, _ in _COLUMNS}))
    lines.extend(fmt(r) if isinstance(r, dict) else r for r in rows)
    if not doc["records"]:
        lines.append("  (no records since then)")
    for c in doc["conflicts"]:
        lines.append(f"conflict at version {c['version']}: fields differ: {', '.join(c['fields'])}")
        for v in c["variants"]:
            lines.append("    " + json.dumps(v, sort_keys=True, default=str))
    for a in doc["anomalies"]:
        lines.append(f"unreadable record at offset {a['offset']}: {a['problem']}")
    lines.append(summary_line(doc))
    return "\n".join(lines)


# --------------------------------------------------------------------------- Kafka part


@dataclass
class PartitionRead:
    topic: str
    partition: int
    log_start_offset: int
    end_offset: int
    records: list[AuditRecord] = field(default_factory=list)
    anomalies: list[dict[str, Any]] = field(default_factory=list)


def consumer_config(cfg: Settings) -> dict[str, Any]:
    """librdkafka settings of the audit's reader: assigned partitions, no commits."""
    quiet = logging.getLogger("inventory.audit.kafka")
    quiet.addHandler(logging.NullHandler())  # failures are reported once, as the exit message
    quiet.propagate = False
    return confluent_config(
        cfg,
        **{
            # required by the client, never used: assign() joins no group, nothing is committed
            "group.id": f"{cfg.app_id}-audit-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "logger": quiet,
        },
    )


def read_partition(
    cfg: Settings, sku: str, timeout: float, codec: AvroCodec | None = None
) -> PartitionRead:
    """Every record keyed by ``sku`` in its partition, up to the end offset as of now.

    Raises :class:`AuditError` (exit 3) when Kafka does not answer, or the read
    does not reach the end offset within ``timeout`` seconds; (exit 2) when the
    topic does not exist.
    """
    codec = codec or codec_from_settings(cfg)
    topic = cfg.stock_changes_topic
    key = sku.encode("utf-8")
    deadline = time.monotonic() + timeout
    consumer = Consumer(consumer_config(cfg))
    try:
        try:
            meta = consumer.list_topics(topic, timeout=max(1.0, timeout))
        except KafkaException as exc:
            raise AuditError(EXIT_KAFKA, f"Kafka at {cfg.kafka_bootstrap}: {exc}") from None
        tmeta = meta.topics.get(topic)
        if tmeta is None or tmeta.error is not None:
            err = tmeta.error if tmeta is not None else None
            if err is None or err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise AuditError(EXIT_USAGE, f"topic {topic} does not exist: no history to audit")
            raise AuditError(EXIT_KAFKA, f"topic {topic}: {err}")
        partition = partition_for(key, len(tmeta.partitions))
        tp = TopicPartition(topic, partition)
        try:
            low, high = consumer.get_watermark_offsets(
                tp, timeout=max(1.0, deadline - time.monotonic()), cached=False
            )
        except KafkaException as exc:
            raise AuditError(EXIT_KAFKA, f"offsets of {topic}[{partition}]: {exc}") from None
        result = PartitionRead(topic, partition, low, high)
        if high <= low:
            return result
        consumer.assign([TopicPartition(topic, partition, low)])
        position = low
        while position < high:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AuditError(
                    EXIT_KAFKA,
                    f"read of {topic}[{partition}] stopped at offset {position} of {high} "
                    f"after {timeout:g}s (raise --timeout)",
                )
            msg = consumer.poll(min(0.5, left))
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    break  # nothing more right now: everything up to high (and beyond) was read
                if err.fatal() or not err.retriable():
                    raise AuditError(EXIT_KAFKA, f"reading {topic}[{partition}]: {err}")
                continue
            position = msg.offset() + 1
            if msg.offset() >= high:
                break  # written after the run started
            if msg.key() != key:
                continue
            _add(result, msg.offset(), msg.value(), sku, codec)
        return result
    finally:
        consumer.close()


def _add(
    result: PartitionRead, offset: int, value: bytes | None, sku: str, codec: AvroCodec
) -> None:
    if value is None:
        result.anomalies.append({"offset": offset, "problem": "empty value (tombstone)"})
        return
    try:
        name, rec = codec.decode(value)
    except DecodeError as exc:
        result.anomalies.append({"offset": offset, "problem": f"{exc.reason}: {exc.detail}"})
        return
    if rec.get("sku") != sku:
        result.anomalies.append(
            {"offset": offset, "problem": f"key {sku!r} but sku {rec.get('sku')!r}"}
        )
    else:
        result.records.append(AuditRecord(offset, name, rec))


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("pipeline.audit"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sku", help="the SKU to audit (the record key)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--since",
        metavar="ISO|ms",
        help="print only records processed at or after this time (the chain is checked in full)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds allowed for reading the partition (default 30)",
    )
    return parser


def main(
    argv: Sequence[str] | None = None,
    cfg: Settings = settings,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the command line; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        check_sku(args.sku, cfg)
        since = parse_since(args.since) if args.since is not None else None
        if args.timeout <= 0:
            raise ValueError("--timeout must be positive")
    except (Invalid, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_USAGE
    try:
        read = read_partition(cfg, args.sku, args.timeout)
    except AuditError as exc:
        print(f"error: {exc}", file=err)
        return exc.code
    except (KafkaException, RegistryError) as exc:
        print(f"error: {exc}", file=err)
        return EXIT_KAFKA
    if not read.records:
        print(
            f"error: no record of SKU {args.sku!r} in {read.topic}[{read.partition}] "
            f"(offsets {read.log_start_offset}..{read.end_offset})",
            file=err,
        )
        return EXIT_USAGE
    doc = report(
        args.sku,
        read.topic,
        read.partition,
        read.log_start_offset,
        read.end_offset,
        read.records,
        anomalies=read.anomalies,
        since_ms=since,
    )
    if args.json:
        print(json.dumps(doc, default=str), file=out)
    else:
        print(render_table(doc), file=out)
    return EXIT_OK if doc["ok"] else EXIT_BROKEN


if __name__ == "__main__":
    sys.exit(main())
