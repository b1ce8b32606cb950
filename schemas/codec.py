"""Avro codec for every event of the pipeline, with two framings.

* Avro single-object encoding (no registry needed): ``C3 01`` + the 8-byte
  little-endian CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form
  + the Avro binary body.
* Confluent wire format (when a schema registry is configured): ``00`` + the
  4-byte big-endian schema id + the body. Schemas are registered under their
  full name (RecordNameStrategy), e.g. ``inventory.v1.ReserveStock``.

:meth:`AvroCodec.decode` accepts both framings whatever the codec's own mode, and
records written with any released version of a schema (``released/``).
Bad bytes raise :class:`DecodeError` and bad records :class:`EncodeError`, each
with a machine-readable ``reason`` (the dead-letter reason) and a ``detail``.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from fastavro import schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from fastavro.schema import fingerprint as _fastavro_fingerprint
from fastavro.schema import parse_schema, to_parsing_canonical_form
from fastavro.validation import ValidationError, validate

from config.settings import Settings
from schemas.registry import NotAvroSchema, RegistryError, SchemaRegistry

SCHEMA_DIR = Path(__file__).resolve().parent
# every released version of every record: released/<Name>/v<N>.avsc (see load_released)
RELEASED_DIR = SCHEMA_DIR / "released"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
_SO_HEADER_LEN = 10
_CONFLUENT_HEADER_LEN = 5
# registry ids remembered as unreadable; random ids from a hostile producer cannot grow it
_MAX_UNREADABLE_IDS = 10_000


class CodecError(Exception):
    """Base codec error: ``reason`` is machine-readable, ``detail`` is for people."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DecodeError(CodecError):
    """Bytes that are not a record this codec can read.

    ``reason`` is ``undecodable``, ``unknown_schema`` or ``truncated``.
    """


class EncodeError(CodecError):
    """A record that does not fit its schema.

    ``reason`` is ``missing_field``, ``invalid_record`` or ``unknown_record``.
    """


@functools.cache
def _load(schema_dir: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(schema_dir.glob("*.avsc")):
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or raw.get("type") != "record" or raw.get("name") != path.stem:
            raise ValueError(f"{path}: expected one record schema named {path.stem!r}")
        out[path.stem] = cast(dict[str, Any], parse_schema(raw))
    if not out:
        raise ValueError(f"no .avsc schema in {schema_dir}")
    return out


def load_schemas(schema_dir: Path = SCHEMA_DIR) -> dict[str, dict[str, Any]]:
    """Short record name -> parsed fastavro schema for every ``*.avsc`` in ``schema_dir``.

    Each directory is read and parsed once per process. Raises ``ValueError``
    for a file that is not one record named like the file.
    """
    return dict(_load(Path(schema_dir).resolve()))


@functools.cache
def _load_released(released_dir: Path) -> dict[str, tuple[dict[str, Any], ...]]:
    out: dict[str, tuple[dict[str, Any], ...]] = {}
    for folder in sorted(p for p in released_dir.iterdir() if p.is_dir()):
        versions = sorted(folder.glob("v*.avsc"), key=lambda p: int(p.stem[1:]))
        if [p.stem for p in versions] != [f"v{i}" for i in range(1, len(versions) + 1)]:
            raise ValueError(f"{folder}: versions must be v1.avsc, v2.avsc, ... without gaps")
        parsed = []
        for path in versions:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict) or raw.get("name") != folder.name:
                raise ValueError(f"{path}: expected a record schema named {folder.name!r}")
            parsed.append(cast(dict[str, Any], parse_schema(raw)))
        out[folder.name] = tuple(parsed)
    return out


def load_released(released_dir: Path = RELEASED_DIR) -> dict[str, tuple[dict[str, Any], ...]]:
    """Short record name -> every released version of its schema, oldest first.

    A record's schema is released once it has been on main: producers and topics may
    hold records written with it for as long as the topics keep them, so the codec
    reads every released version (resolved to the current schema), and a change to a
    ``.avsc`` file adds a version here (``tests/unit/test_schema_evolution.py``
    checks that, and that each version is backward and forward compatible).
    """
    return dict(_load_released(Path(released_dir).resolve()))


def fingerprint(name_or_parsed: str | dict[str, Any] | list[Any]) -> bytes:
    """The 8-byte CRC-64-AVRO fingerprint of a schema's Parsing Canonical Form.

    ``name_or_parsed`` is a short record name from :data:`SCHEMA_DIR` or any
    Avro schema (parsed or not, e.g. ``"int"``). The bytes are little-endian, as
    in the single-object header (Java: ``SchemaNormalization.parsingFingerprint64``
    written little-endian).
    """
    schema: Any = name_or_parsed
    if isinstance(name_or_parsed, str):
        schema = _load(SCHEMA_DIR).get(name_or_parsed, name_or_parsed)
    # fastavro's hex string already holds the little-endian byte order
    # (checked against the Avro spec's test vectors in tests/unit/test_codec.py)
    return bytes.fromhex(_fastavro_fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


def _schema_json(parsed: dict[str, Any]) -> str:
    # parse_schema adds private "__fastavro_parsed"/"__named_schemas" keys at the top level; the
    # rest (defaults included, which resolution needs) is the schema as written
    return json.dumps({k: v for k, v in parsed.items() if not k.startswith("__")})


@dataclass(frozen=True, slots=True)
class _Schema:
    name: str
    full_name: str
    parsed: dict[str, Any]
    canonical: str
    header: bytes  # single-object header
    fields: frozenset[str]
    required: frozenset[str]  # fields without a default


def _entry(name: str, parsed: dict[str, Any]) -> _Schema:
    fields = parsed["fields"]
    return _Schema(
        name=name,
        full_name=parsed["name"],
        parsed=parsed,
        canonical=to_parsing_canonical_form(parsed),
        header=SINGLE_OBJECT_MAGIC + fingerprint(parsed),
        fields=frozenset(f["name"] for f in fields),
        required=frozenset(f["name"] for f in fields if "default" not in f),
    )


class AvroCodec:
    """Encodes and decodes the pipeline's records; see the module docstring.

    ``schemas`` (short name -> parsed schema, as :func:`load_schemas` returns)
    defaults to every schema in :data:`SCHEMA_DIR`. Without ``registry`` it
    writes single-object framing; with one it writes the Confluent framing,
    registering each schema on first use. Registry failures
    other than an unknown id raise :class:`~schemas.registry.RegistryError`, not
    a codec error: an unreachable registry says nothing about the record.
    """

    def __init__(
        self,
        registry: SchemaRegistry | None = None,
        schemas: Mapping[str, dict[str, Any]] | None = None,
        released: Mapping[str, Sequence[dict[str, Any]]] | None = None,
    ) -> None:
        parsed = load_schemas() if schemas is None else schemas
        if released is None:
            released = load_released() if schemas is None else {}
        self._registry = registry
        self._by_name = {name: _entry(name, p) for name, p in parsed.items()}
        self._by_fingerprint = {e.header[2:]: e for e in self._by_name.values()}
        # fingerprint of an earlier released version -> (current entry, that writer schema)
        self._older: dict[bytes, tuple[_Schema, dict[str, Any]]] = {}
        for name, versions in released.items():
            entry = self._by_name.get(name)
            if entry is None:
                continue  # a record type that is gone: nothing reads it any more
            for version in versions:
                fp = fingerprint(version)
                if fp not in self._by_fingerprint:
                    self._older[fp] = (entry, version)
        self._by_full_name = {e.full_name: e for e in self._by_name.values()}
        self.names: tuple[str, ...] = tuple(sorted(self._by_name))
        # name -> framing prefix; filled lazily in registry mode (one registration per schema)
        self._prefix: dict[str, bytes] = (
            {} if registry is not None else {e.name: e.header for e in self._by_name.values()}
        )
        # registry id -> (short name, writer schema, reader schema or None when identical)
        self._readers: dict[int, tuple[str, dict[str, Any], dict[str, Any] | None]] = {}
        # registry id -> why its records cannot be read (unknown id, not Avro, foreign record):
        # kept so that every later record with the id is a dead letter without asking again
        self._unreadable: dict[int, DecodeError] = {}

    @property
    def registry(self) -> SchemaRegistry | None:
        return self._registry

    def lookup_needed(self, data: bytes) -> int | None:
        """The registry id whose writer schema :meth:`decode` would fetch over the network
        for ``data``, or None when decoding it needs no I/O."""
        if self._registry is None or data[:1] != CONFLUENT_MAGIC or len(data) < 5:
            return None
        schema_id = int.from_bytes(data[1:_CONFLUENT_HEADER_LEN], "big")
        if schema_id in self._readers or schema_id in self._unreadable:
            return None
        return schema_id

    def fetch_writer(self, schema_id: int) -> None:
        """Fetch and keep writer schema ``schema_id`` (blocking I/O: call it off the event
        loop). An id whose records cannot be read is kept as such, so :meth:`decode` raises
        its ``unknown_schema`` without I/O. Raises
        :class:`~schemas.registry.RegistryError` when the registry does not answer."""
        try:
            self._resolve(schema_id)
        except DecodeError:
            pass  # remembered by _resolve: decode raises it without I/O

    async def prepare(self, values: Iterable[bytes | None], executor: Executor | None) -> None:
        """Fetch, in ``executor``, every writer schema that decoding ``values`` needs, so
        that :meth:`decode` of them does no I/O on the event loop. Raises
        :class:`~schemas.registry.RegistryError` when the registry does not answer (the
        caller waits and calls again). Without a registry it returns at once."""
        if self._registry is None:
            return
        ids = {i for v in values if v and (i := self.lookup_needed(v)) is not None}
        loop = asyncio.get_running_loop()
        for schema_id in sorted(ids):
            await loop.run_in_executor(executor, self.fetch_writer, schema_id)

    async def ensure_registered(
        self,
        on_wait: Callable[[RegistryError, float], None],
        executor: Executor | None = None,
    ) -> None:
        """:meth:`register_all` in ``executor``, waiting while the registry is down; once
        done, later calls return at once. Call it before the first :meth:`encode` of an
        event loop's hot path."""
        if self._registry is None or len(self._prefix) == len(self._by_name):
            return
        loop = asyncio.get_running_loop()
        await retry_while_registry_down(
            lambda: loop.run_in_executor(executor, self.register_all), on_wait
        )

    def register_all(self) -> None:
        """Register every schema now (blocking: call it off the event loop), so that
        :meth:`encode` never registers on the hot path. Without a registry, nothing."""
        if self._registry is None:
            return
        for entry in self._by_name.values():
            if entry.name not in self._prefix:
                self._register(entry)

    def encode(self, name: str, record: Mapping[str, Any]) -> bytes:
        """Framed Avro bytes of ``record`` as the record type ``name``.

        Missing fields with a default take it. Raises :class:`EncodeError`:
        ``unknown_record`` for a name without schema, ``missing_field`` naming a
        required field that is absent, ``invalid_record`` for an unknown field
        or a value of the wrong type or range.
        """
        entry = self._by_name.get(name)
        if entry is None:
            raise EncodeError("unknown_record", f"no schema named {name!r}; known: {self.names}")
        keys = record.keys()
        missing = entry.required - keys
        if missing:
            raise EncodeError(
                "missing_field", f"{name}: missing required field {', '.join(sorted(missing))}"
            )
        extra = keys - entry.fields
        if extra:
            raise EncodeError("invalid_record", f"{name}: unknown field {', '.join(sorted(extra))}")
        try:
            # the writer alone would silently truncate floats and overflow int32s
            validate(record, entry.parsed, raise_errors=True)
        except ValidationError as exc:
            raise EncodeError(
                "invalid_record", f"{name}: " + "; ".join(str(e) for e in exc.errors)
            ) from None
        prefix = self._prefix.get(name) or self._register(entry)
        buf = BytesIO()
        buf.write(prefix)
        schemaless_writer(buf, entry.parsed, record)
        return buf.getvalue()

    def encode_trusted(self, name: str, record: Mapping[str, Any]) -> bytes:
        """Like :meth:`encode` for records this pipeline built itself (the core's events):
        no validation pass. A record that does not fit its schema still raises from the
        writer (a missing field, a string where a number belongs), but an int32 overflow
        or a float in an int field is written as it comes: never pass input through here.
        """
        entry = self._by_name[name]
        prefix = self._prefix.get(name) or self._register(entry)
        buf = BytesIO()
        buf.write(prefix)
        schemaless_writer(buf, entry.parsed, record)
        return buf.getvalue()

    def decode(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """``(short record name, record)`` from framed bytes of either framing.

        A record written with an earlier released version of its schema (single-object
        fingerprint from :func:`load_released`, or a registry id of an older writer) is
        resolved to the current schema, fields it lacks taking their defaults.

        Raises :class:`DecodeError`: ``unknown_schema`` for a fingerprint of no
        released version or an unknown registry id, a Confluent frame without a registry, or a
        writer schema that cannot be resolved to the local one; ``truncated``
        when the bytes end early; ``undecodable`` for anything else, including
        bytes left after the record.
        """
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < _SO_HEADER_LEN:
                raise DecodeError("truncated", f"single-object header cut at {len(data)} bytes")
            fp = data[2:_SO_HEADER_LEN]
            entry = self._by_fingerprint.get(fp)
            if entry is not None:
                return entry.name, _read(data, _SO_HEADER_LEN, entry.parsed, None)
            older = self._older.get(fp)
            if older is None:
                raise DecodeError(
                    "unknown_schema", f"no released schema has fingerprint {fp.hex()}"
                )
            # an earlier released version: resolved to the current schema (defaults fill in)
            return older[0].name, _read(data, _SO_HEADER_LEN, older[1], older[0].parsed)
        if data[:1] == CONFLUENT_MAGIC:
            if len(data) < _CONFLUENT_HEADER_LEN:
                raise DecodeError("truncated", f"Confluent header cut at {len(data)} bytes")
            schema_id = int.from_bytes(data[1:_CONFLUENT_HEADER_LEN], "big")
            known = self._unreadable.get(schema_id)
            if known is not None:
                raise DecodeError(known.reason, known.detail)
            reader = self._readers.get(schema_id) or self._resolve(schema_id)
            return reader[0], _read(data, _CONFLUENT_HEADER_LEN, reader[1], reader[2])
        if not data:
            raise DecodeError("undecodable", "empty value")
        raise DecodeError(
            "undecodable",
            f"unknown framing {data[:2].hex()} (expected c301 single-object or 00 Confluent)",
        )

    def _register(self, entry: _Schema) -> bytes:
        assert self._registry is not None  # prefixes are prefilled without a registry
        schema_id = self._registry.register(entry.full_name, _schema_json(entry.parsed))
        self._readers[schema_id] = (entry.name, entry.parsed, None)
        prefix = CONFLUENT_MAGIC + schema_id.to_bytes(4, "big")
        self._prefix[entry.name] = prefix
        return prefix

    def _resolve(self, schema_id: int) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
        """Fetch writer schema ``schema_id`` and pair it with the local reader schema; an
        id whose records cannot be read is remembered as such (registry ids never change)."""
        try:
            return self._resolve_uncached(schema_id)
        except DecodeError as exc:
            if self._registry is not None:
                if len(self._unreadable) >= _MAX_UNREADABLE_IDS:
                    del self._unreadable[next(iter(self._unreadable))]  # the oldest
                self._unreadable[schema_id] = exc
            raise

    def _resolve_uncached(
        self, schema_id: int
    ) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
        if self._registry is None:
            raise DecodeError(
                "unknown_schema",
                f"Confluent-framed record (schema id {schema_id}) "
                "but no schema registry configured",
            )
        try:
            text = self._registry.schema_by_id(schema_id)
        except NotAvroSchema as exc:
            raise DecodeError(
                "unknown_schema",
                f"schema id {schema_id} is a {exc.schema_type} schema, not Avro",
            ) from None
        except RegistryError as exc:
            if exc.status == 404:
                raise DecodeError(
                    "unknown_schema", f"schema id {schema_id} is not in the registry"
                ) from None
            raise
        try:
            writer = parse_schema(json.loads(text))
        except Exception as exc:  # noqa: BLE001 - foreign schema text fails in many ways
            raise DecodeError(
                "unknown_schema", f"schema id {schema_id} does not parse: {exc}"
            ) from None
        full_name = writer.get("name") if isinstance(writer, dict) else None
        entry = self._by_full_name.get(full_name) if isinstance(full_name, str) else None
        if entry is None or not isinstance(writer, dict):
            raise DecodeError(
                "unknown_schema", f"schema id {schema_id} is {full_name!r}, not a known record"
            )
        same = to_parsing_canonical_form(writer) == entry.canonical
        reader = (entry.name, writer, None if same else entry.parsed)
        self._readers[schema_id] = reader
        return reader


def _read(
    data: bytes, offset: int, writer: dict[str, Any], reader: dict[str, Any] | None
) -> dict[str, Any]:
    fo = BytesIO(data)
    fo.seek(offset)
    try:
        record = schemaless_reader(fo, writer, reader)
    except EOFError as exc:
        raise DecodeError("truncated", f"record body ends early: {exc}") from None
    except SchemaResolutionError as exc:
        raise DecodeError("unknown_schema", f"writer schema does not resolve: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - garbage makes fastavro raise many types
        raise DecodeError("undecodable", f"{type(exc).__name__}: {exc}") from None
    end = fo.tell()
    if end != len(data):
        raise DecodeError("undecodable", f"{len(data) - end} bytes left after the record")
    return record  # type: ignore[return-value]  # a record schema reads as a dict


async def retry_while_registry_down(
    step: Callable[[], Awaitable[None]], on_wait: Callable[[RegistryError, float], None]
) -> None:
    """Await ``step()`` until it does not raise :class:`~schemas.registry.RegistryError`,
    sleeping 0.5 s, 1 s, ... up to 30 s between tries (``on_wait(error, delay)`` before
    each sleep: log and count it). Input must wait for the registry, never be
    dead-lettered for it."""
    delay = 0.5
    while True:
        try:
            await step()
            return
        except RegistryError as exc:
            on_wait(exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


def codec_from_settings(s: Settings) -> AvroCodec:
    """A codec using the schema registry when ``s.schema_registry_url`` is set."""
    return AvroCodec(SchemaRegistry(s.schema_registry_url) if s.schema_registry_url else None)
