"""Send input commands to the pipeline: a library producer and a command line.

Command line (``python -m pipeline.produce ...``)::

    send TYPE JSON                   one command, e.g. send RestockReceived '{"sku":"A","qty":5}'
    send-file FILE                   JSON lines: {"type": "ReserveStock", ...fields}
    import-csv FILE --mode restock   sku,qty rows -> RestockReceived (or StockCounted: --mode count)

Every record is checked against its schema before anything connects to Kafka, so a
bad one fails at once, naming the field (``send --help`` lists every record's
fields and defaults). Missing ``event_id`` defaults to a fresh uuid4 and ``occurred_at`` to now. The
key is the SKU's UTF-8 bytes and the partitioner is murmur2, like the Java
client and aiokafka, so every command of a SKU reaches the partition that owns
it. Exit codes: 0 all sent, 2 bad input (bad rows are reported and skipped,
the good ones are sent), 1 Kafka or delivery failure.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import re
import sys
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from tqdm import tqdm  # type: ignore[import-untyped]

from config.settings import Settings, settings
from pipeline.cli import prog
from pipeline.clients import confluent_config
from pipeline.clock import now_ms
from pipeline.kafka.topics import ensure_topics
from schemas.codec import SCHEMA_DIR, AvroCodec, EncodeError, codec_from_settings
from schemas.validation import Invalid, check_sku

_TOPIC_OF_TYPE = {
    "ReserveStock": "orders_topic",
    "CommitReservation": "orders_topic",
    "ReleaseReservation": "orders_topic",
    "RestockReceived": "restocks_topic",
    "StockCounted": "restocks_topic",
    "SafetyStockSet": "restocks_topic",
    "ChannelAllocationSet": "restocks_topic",
    "CustomerLimitSet": "restocks_topic",
    "TransferShipped": "restocks_topic",
    "TransferReceived": "restocks_topic",
    "TransferCancelled": "restocks_topic",
    "IncomingStock": "restocks_topic",
    "PurchaseOrderClosed": "restocks_topic",
    "BackorderCapSet": "restocks_topic",
    "ReturnReceived": "returns_topic",
    "DamagedStockResolved": "returns_topic",
    "PlaceOrder": "checkouts_topic",
    "CommitOrder": "checkouts_topic",
    "CancelOrder": "checkouts_topic",
}
_KEYED_BY_ORDER = ("PlaceOrder", "CommitOrder", "CancelOrder")
INPUT_TYPES: tuple[str, ...] = tuple(_TOPIC_OF_TYPE)
"""The record types producers may send (ExpireReservation is the pipeline's own)."""

CSV_MODES = {"restock": "RestockReceived", "count": "StockCounted"}


def topic_for_type(cfg: Settings, name: str) -> str:
    """The input topic of record type ``name``; ``ValueError`` for a non-input type."""
    attr = _TOPIC_OF_TYPE.get(name)
    if attr is None:
        raise ValueError(f"{name!r} is not an input record type; one of {', '.join(INPUT_TYPES)}")
    topic: str = getattr(cfg, attr)
    return topic


TOPIC_FOR_TYPE: dict[str, str] = {name: topic_for_type(settings, name) for name in INPUT_TYPES}


def fill_defaults(fields: Mapping[str, Any], *, now: int | None = None) -> dict[str, Any]:
    """A copy of ``fields`` with ``event_id`` (uuid4) and ``occurred_at`` (now, ms) if absent."""
    out = dict(fields)
    if out.get("event_id") is None:
        out["event_id"] = str(uuid.uuid4())
    if out.get("occurred_at") is None:
        out["occurred_at"] = now_ms() if now is None else now
    return out


def producer_config(cfg: Settings) -> dict[str, Any]:
    """librdkafka settings of :class:`CommandProducer`."""
    return confluent_config(
        cfg,
        # librdkafka's default (consistent_random, CRC32) sends a key to another partition than
        # the Java client and aiokafka, which the tables and the co-partitioning rely on
        **{
            "partitioner": "murmur2_random",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        },
    )


class DeliveryError(RuntimeError):
    """Records were not acknowledged by the broker."""


DeliveryReport = Callable[[str, str, int, int], None]
"""Called per delivered record with (label, topic, partition, offset); label is the event_id."""


class CommandProducer:
    """An idempotent, murmur2-partitioned producer of the pipeline's input commands.

    Creates the project's topics if missing (:func:`pipeline.kafka.topics.ensure_topics`).
    Sends are asynchronous; :meth:`flush` (also on leaving a ``with`` block)
    waits for every record and raises :class:`DeliveryError` if any failed.
    """

    def __init__(
        self,
        cfg: Settings = settings,
        codec: AvroCodec | None = None,
        *,
        on_delivery: DeliveryReport | None = None,
    ) -> None:
        self.settings = cfg
        self.codec = codec if codec is not None else codec_from_settings(cfg)
        self._on_delivery = on_delivery
        self._failures: list[str] = []
        ensure_topics(cfg)
        self._producer = Producer(producer_config(cfg))

    def send(
        self,
        type_name: str,
        fields: Mapping[str, Any],
        *,
        partition: int | None = None,
        key: bytes | None = None,
    ) -> str:
        """Encode and send one command to its topic; returns its ``event_id``.

        ``key`` defaults to the SKU and ``partition`` to the partitioner's
        choice (override both only to test the pipeline's guards). Raises
        :class:`~schemas.codec.EncodeError` for a record that does not fit its
        schema and ``ValueError`` for a type that is not an input type.
        """
        topic = topic_for_type(self.settings, type_name)
        record = fill_defaults(fields)
        value = self.codec.encode(type_name, record)
        if key is None:
            # checkout commands are keyed by order (the saga's partition), the rest by SKU
            key = (record["order_id"] if type_name in _KEYED_BY_ORDER else record["sku"]).encode()
        self.send_raw(
            topic,
            key,
            value,
            partition,
            label=record["event_id"],
        )
        event_id: str = record["event_id"]
        return event_id

    def send_raw(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        partition: int | None = None,
        *,
        label: str = "",
    ) -> None:
        """Send bytes as they are (no encoding); ``label`` names the record in reports."""
        kwargs: dict[str, Any] = {} if partition is None else {"partition": partition}
        callback = self._callback(label)
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=callback, **kwargs)
                break
            except BufferError:  # local queue full: serve delivery reports to make room
                self._producer.poll(0.1)
        self._producer.poll(0)

    def flush(self, timeout: float = 30) -> None:
        """Wait for every sent record; :class:`DeliveryError` if any was not delivered."""
        left = self._producer.flush(timeout)
        failures, self._failures = self._failures, []
        problems = []
        if left:
            problems.append(f"{left} records still unacknowledged after {timeout}s")
        if failures:
            problems.append(f"{len(failures)} failed: " + "; ".join(failures[:5]))
        if problems:
            raise DeliveryError(", ".join(problems))

    def __enter__(self) -> CommandProducer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.flush()
        else:
            self._producer.flush(5)  # best effort; the exception in flight is the one to report

    def _callback(self, label: str) -> Callable[[KafkaError | None, Message], None]:
        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                self._failures.append(f"{label or msg.topic()}: {err.str()}")
            elif self._on_delivery is not None:
                # a delivered message always has its topic, partition and offset
                self._on_delivery(label, msg.topic() or "", msg.partition() or 0, msg.offset() or 0)

        return delivered


class Sender(Protocol):
    """What the command-line commands need from :class:`CommandProducer`."""

    def send(
        self,
        type_name: str,
        fields: Mapping[str, Any],
        *,
        partition: int | None = None,
        key: bytes | None = None,
    ) -> str: ...

    def flush(self, timeout: float = 30) -> None: ...


@dataclass(frozen=True)
class BadRow:
    """An input line that is not sent; prints as ``line N: reason``."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True)
class StockRow:
    """One good CSV row; ``qty`` is the restocked units or the counted on_hand."""

    line: int
    sku: str
    qty: int
    event_id: str


_INTEGER = re.compile(r"[+-]?[0-9]+")


def parse_stock_csv(data: bytes, mode: str, cfg: Settings) -> tuple[list[StockRow], list[BadRow]]:
    """Parse a ``sku,qty`` CSV (UTF-8, optional ``sku,qty`` header, blank lines ignored).

    Returns the good rows and the bad ones with 1-based line numbers. A row is
    bad for a column count other than 2, a SKU the pipeline would reject, a qty
    that is not an integer, or out of range (restock: 1..max_qty, count:
    0..max_qty). Event ids are ``csv-{mode}-{content hash}-{line}``, so importing
    the same file again is deduplicated downstream. Raises ``ValueError`` for
    an unknown mode, ``UnicodeDecodeError`` or ``csv.Error`` for an unreadable file.
    """
    if mode not in CSV_MODES:
        raise ValueError(f"mode must be one of {', '.join(CSV_MODES)}, not {mode!r}")
    digest = hashlib.sha256(data).hexdigest()[:20]
    column = "qty" if mode == "restock" else "on_hand"
    lowest = 1 if mode == "restock" else 0
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    rows: list[StockRow] = []
    bad: list[BadRow] = []
    seen_data = False
    end = 0
    for raw in reader:
        # a quoted field may span lines: report the line the row starts on
        line, end = end + 1, reader.line_num
        cells = [c.strip() for c in raw]
        if not any(cells):
            continue
        is_first = not seen_data
        seen_data = True
        if len(cells) != 2:
            bad.append(BadRow(line, f"expected 2 columns (sku,qty), got {len(cells)}"))
            continue
        sku, qty_text = cells
        if is_first and sku.lower() == "sku" and not _INTEGER.fullmatch(qty_text):
            continue  # header
        try:
            check_sku(sku, cfg)
        except Invalid as exc:
            bad.append(BadRow(line, exc.detail))
            continue
        if not _INTEGER.fullmatch(qty_text):
            bad.append(BadRow(line, f"{column} {qty_text!r} is not an integer"))
            continue
        qty = int(qty_text)
        if qty < lowest:
            bad.append(BadRow(line, f"{column} {qty} below minimum {lowest}"))
        elif qty > cfg.max_qty:
            bad.append(BadRow(line, f"{column} {qty} above maximum {cfg.max_qty}"))
        else:
            rows.append(StockRow(line, sku, qty, f"csv-{mode}-{digest}-{line}"))
    return rows, bad


def stock_command(row: StockRow, mode: str, source: str, now: int) -> tuple[str, dict[str, Any]]:
    """The (record type, fields) a CSV row becomes; ``source`` names the file in references."""
    if mode == "restock":
        return "RestockReceived", {
            "event_id": row.event_id,
            "sku": row.sku,
            "qty": row.qty,
            "occurred_at": now,
            "reference": f"{source}:{row.line}",
        }
    return "StockCounted", {
        "event_id": row.event_id,
        "sku": row.sku,
        "on_hand": row.qty,
        "occurred_at": now,
    }


def parse_command_line(text: str) -> tuple[str, dict[str, Any]]:
    """``(type, fields)`` from one JSON line ``{"type": ..., ...fields}``; ``ValueError`` if bad."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    type_name = obj.pop("type", None)
    if type_name not in _TOPIC_OF_TYPE:
        raise ValueError(f"type must be one of {', '.join(INPUT_TYPES)}, got {type_name!r}")
    return type_name, obj


def checked_command(
    type_name: str, fields: Mapping[str, Any], codec: AvroCodec | None = None
) -> dict[str, Any]:
    """``fields`` with their defaults filled, checked against the schema of ``type_name``
    without any network (a local codec); :class:`EncodeError` names what is wrong."""
    topic_for_type(settings, type_name)  # ValueError for a type producers may not send
    record = fill_defaults(fields)
    (codec or _local_codec()).encode(type_name, record)
    return record


def read_command_file(
    path: Path, codec: AvroCodec | None = None
) -> tuple[list[tuple[str, dict[str, Any]]], list[BadRow]]:
    """The good commands of a JSON-lines file (defaults filled, schema-checked) and the bad lines."""
    commands: list[tuple[str, dict[str, Any]]] = []
    bad: list[BadRow] = []
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                type_name, fields = parse_command_line(text)
                commands.append((type_name, checked_command(type_name, fields, codec)))
            except (EncodeError, ValueError) as exc:
                bad.append(BadRow(number, str(exc)))
    return commands, bad


def run_send_file(path: Path, producer: Sender, *, out: TextIO, err: TextIO) -> int:
    """Send every good JSON line of ``path``; report bad ones on ``err``. Exit code.

    Every line is checked first: the bad ones are reported before anything is sent.
    """
    commands, bad = read_command_file(path)
    for b in bad:
        print(b, file=err)
    for type_name, record in commands:
        producer.send(type_name, record)
    producer.flush()
    print(f"{path}: {len(commands)} commands sent, {len(bad)} bad lines skipped", file=out)
    return 2 if bad else 0


def run_import_csv(
    path: Path, mode: str, producer: Sender, cfg: Settings, *, out: TextIO, err: TextIO
) -> int:
    """Send one command per good row of the CSV ``path``; report bad rows on ``err``. Exit code."""
    data = path.read_bytes()
    try:
        rows, bad = parse_stock_csv(data, mode, cfg)
    except (UnicodeDecodeError, csv.Error) as exc:
        print(f"{path}: unreadable CSV: {exc}", file=err)
        return 2
    for b in bad:
        print(b, file=err)
    now = now_ms()
    # disable=None: no bar when stderr is not a terminal (logs, CI)
    for row in tqdm(rows, desc="import", unit="row", file=err, disable=None):
        producer.send(*stock_command(row, mode, path.name, now))
    producer.flush()
    print(f"{path}: {len(rows)} {CSV_MODES[mode]} sent, {len(bad)} bad rows skipped", file=out)
    return 2 if bad else 0


@functools.cache
def _local_codec() -> AvroCodec:
    return AvroCodec()  # single-object framing: checks records without a registry


class LazyProducer:
    """A :class:`Sender` that connects (a :class:`CommandProducer`) on the first send, so a
    command line whose input is all bad never waits for Kafka."""

    def __init__(self, cfg: Settings, *, on_delivery: DeliveryReport | None = None) -> None:
        self._cfg = cfg
        self._on_delivery = on_delivery
        self._producer: CommandProducer | None = None

    def send(
        self,
        type_name: str,
        fields: Mapping[str, Any],
        *,
        partition: int | None = None,
        key: bytes | None = None,
    ) -> str:
        if self._producer is None:
            self._producer = CommandProducer(self._cfg, on_delivery=self._on_delivery)
        return self._producer.send(type_name, fields, partition=partition, key=key)

    def flush(self, timeout: float = 30) -> None:
        if self._producer is not None:
            self._producer.flush(timeout)

    def close(self) -> None:
        """Best effort after a failure: the exception in flight is the one to report."""
        if self._producer is not None:
            self._producer.__exit__(RuntimeError, None, None)


def _type_text(t: Any) -> str:
    if isinstance(t, list):
        return " or ".join(_type_text(x) for x in t)
    if isinstance(t, dict):
        if t.get("type") == "array":
            return f"array of {_type_text(t['items'])}"
        if t.get("type") == "map":
            return f"map of {_type_text(t['values'])}"
        if t.get("type") == "enum":
            return "one of " + ", ".join(t["symbols"])
        if t.get("type") == "record":
            inner = ", ".join(f"{f['name']}: {_type_text(f['type'])}" for f in t["fields"])
            return "{" + inner + "}"
        return _type_text(t.get("type"))
    return str(t)


_FILLED = {"event_id": "a new uuid4", "occurred_at": "now (epoch ms)"}


def fields_help(names: Sequence[str] = INPUT_TYPES) -> str:
    """Each input record's fields: type, and the default of the optional ones."""
    out = ["record fields (required unless a default is shown; key = the record's SKU,"]
    out.append("PlaceOrder/CommitOrder/CancelOrder are keyed by order_id):")
    for name in names:
        schema = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text(encoding="utf-8"))
        out.append(f"  {name}  (topic {TOPIC_FOR_TYPE[name]})")
        for f in schema["fields"]:
            if f["name"] in _FILLED:
                default = f" = {_FILLED[f['name']]}"
            elif "default" in f:
                default = f" = {json.dumps(f['default'])}"
            else:
                default = ""
            out.append(f"      {f['name']}: {_type_text(f['type'])}{default}")
    return "\n".join(out)


def _print_delivery(label: str, topic: str, partition: int, offset: int) -> None:
    print(f"topic={topic} partition={partition} offset={offset} event_id={label}", flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("pipeline.produce"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    send = sub.add_parser(
        "send",
        help="send one command",
        description="Send one command; it is checked against its schema before Kafka is asked.",
        epilog=fields_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    send.add_argument("type", choices=INPUT_TYPES, metavar="TYPE", help=", ".join(INPUT_TYPES))
    send.add_argument("json", metavar="JSON", help="the record's fields as a JSON object")
    send_file = sub.add_parser("send-file", help='send JSON lines {"type": ..., ...fields}')
    send_file.add_argument("file", type=Path)
    import_csv = sub.add_parser("import-csv", help="restock or count SKUs from a sku,qty CSV")
    import_csv.add_argument("file", type=Path)
    import_csv.add_argument("--mode", choices=tuple(CSV_MODES), required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    fields: dict[str, Any] = {}
    if args.command == "send":
        try:
            fields = json.loads(args.json)
        except ValueError as exc:
            parser.error(f"JSON: {exc}")
        if not isinstance(fields, dict):
            parser.error("JSON must be an object of the record's fields")
    elif not args.file.is_file():
        parser.error(f"{args.file}: no such file")
    report = None if args.command == "import-csv" else _print_delivery
    record: dict[str, Any] = {}
    if args.command == "send":
        try:  # before anything connects: a bad record fails at once, naming the field
            record = checked_command(args.type, fields)
        except EncodeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    # connects on the first good record: the file commands check every line first
    producer = LazyProducer(settings, on_delivery=report)
    try:
        if args.command == "send":
            producer.send(args.type, record)
            producer.flush()
            return 0
        if args.command == "send-file":
            return run_send_file(args.file, producer, out=sys.stdout, err=sys.stderr)
        return run_import_csv(
            args.file, args.mode, producer, settings, out=sys.stdout, err=sys.stderr
        )
    except (KafkaException, RuntimeError) as exc:  # DeliveryError, PartitionMismatch, registry
        producer.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
