"""Avro codec for every event of the pipeline, with two framings.

* Avro single-object encoding (no registry needed): ``C3 01`` + the 8-byte
  little-endian CRC-64-AVRO fingerprint of the schema's Parsing Canonical Form
  + the Avro binary body.
* Confluent wire format (when a schema registry is configured): ``00`` + the
  4-byte big-endian schema id + the body. Schemas are registered under their
  full name (RecordNameStrategy), e.g. ``inventory.v1.ReserveStock``.

:meth:`AvroCodec.decode` accepts both framings whatever the codec's own mode.
Bad bytes raise :class:`DecodeError` and bad records :class:`EncodeError`, each
with a machine-readable ``reason`` (the dead-letter reason) and a ``detail``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
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
from schemas.registry import RegistryError, SchemaRegistry

SCHEMA_DIR = Path(__file__).resolve().parent
SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = b"\x00"
_SO_HEADER_LEN = 10
_CONFLUENT_HEADER_LEN = 5


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
    ) -> None:
        parsed = load_schemas() if schemas is None else schemas
        self._registry = registry
        self._by_name = {name: _entry(name, p) for name, p in parsed.items()}
        self._by_fingerprint = {e.header[2:]: e for e in self._by_name.values()}
        self._by_full_name = {e.full_name: e for e in self._by_name.values()}
        self.names: tuple[str, ...] = tuple(sorted(self._by_name))
        # name -> framing prefix; filled lazily in registry mode (one registration per schema)
        self._prefix: dict[str, bytes] = (
            {} if registry is not None else {e.name: e.header for e in self._by_name.values()}
        )
        # registry id -> (short name, writer schema, reader schema or None when identical)
        self._readers: dict[int, tuple[str, dict[str, Any], dict[str, Any] | None]] = {}

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

        Raises :class:`DecodeError`: ``unknown_schema`` for an unknown
        fingerprint or registry id, a Confluent frame without a registry, or a
        writer schema that cannot be resolved to the local one; ``truncated``
        when the bytes end early; ``undecodable`` for anything else, including
        bytes left after the record.
        """
        if data[:2] == SINGLE_OBJECT_MAGIC:
            if len(data) < _SO_HEADER_LEN:
                raise DecodeError("truncated", f"single-object header cut at {len(data)} bytes")
            entry = self._by_fingerprint.get(data[2:_SO_HEADER_LEN])
            if entry is None:
                raise DecodeError(
                    "unknown_schema",
                    f"no local schema has fingerprint {data[2:_SO_HEADER_LEN].hex()}",
                )
            return entry.name, _read(data, _SO_HEADER_LEN, entry.parsed, None)
        if data[:1] == CONFLUENT_MAGIC:
            if len(data) < _CONFLUENT_HEADER_LEN:
                raise DecodeError("truncated", f"Confluent header cut at {len(data)} bytes")
            schema_id = int.from_bytes(data[1:_CONFLUENT_HEADER_LEN], "big")
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
        """Fetch writer schema ``schema_id`` and pair it with the local reader schema."""
        if self._registry is None:
            raise DecodeError(
                "unknown_schema",
                f"Confluent-framed record (schema id {schema_id}) "
                "but no schema registry configured",
            )
        try:
            text = self._registry.schema_by_id(schema_id)
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


def codec_from_settings(s: Settings) -> AvroCodec:
    """A codec using the schema registry when ``s.schema_registry_url`` is set."""
    return AvroCodec(SchemaRegistry(s.schema_registry_url) if s.schema_registry_url else None)
