"""Schema evolution: every released schema version stays readable, both ways.

A ``.avsc`` change must add a version under ``schemas/released/<Name>/`` (the
first test fails until it does), and every released version must be backward
compatible (the current reader reads its records) and forward compatible (a
reader of that version reads the current records). Both are checked by the spec's
rules (``schemas.compat``) and by writing generated records with one schema and
reading them with the other through fastavro.
"""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from fastavro import schemaless_reader, schemaless_writer
from fastavro.schema import parse_schema
from fastavro.utils import generate_many

from schemas import compat
from schemas.codec import (
    RELEASED_DIR,
    SCHEMA_DIR,
    SINGLE_OBJECT_MAGIC,
    AvroCodec,
    DecodeError,
    fingerprint,
    load_released,
    load_schemas,
)

CURRENT = load_schemas()
RELEASED = load_released()
PAIRS = [
    pytest.param(name, i + 1, version, id=f"{name}-v{i + 1}")
    for name, versions in sorted(RELEASED.items())
    for i, version in enumerate(versions)
]


def _without_docs(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_docs(v) for k, v in value.items() if k != "doc"}
    if isinstance(value, list):
        return [_without_docs(v) for v in value]
    return value


def _raw(path: Path) -> Any:
    return _without_docs(json.loads(path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("name", sorted(CURRENT))
def test_the_current_schema_is_its_latest_released_version(name: str) -> None:
    """Fails when a .avsc file changed without a new released version (or a record is
    new without its v1): copy the file to schemas/released/<Name>/v<N+1>.avsc."""
    versions = sorted((RELEASED_DIR / name).glob("v*.avsc"), key=lambda p: int(p.stem[1:]))
    assert versions, f"schemas/released/{name}/v1.avsc is missing"
    # docs may be edited in place; fields, types, order and defaults may not
    assert _raw(versions[-1]) == _raw(SCHEMA_DIR / f"{name}.avsc"), (
        f"schemas/{name}.avsc differs from {versions[-1].relative_to(SCHEMA_DIR.parent)}: "
        f"add it as v{len(versions) + 1}.avsc"
    )


def test_no_released_record_type_was_removed() -> None:
    assert set(RELEASED) == set(CURRENT)


def test_released_versions_have_distinct_fingerprints() -> None:
    # two versions with one fingerprint differ in defaults only: that is not a new version
    for name, versions in RELEASED.items():
        fps = [fingerprint(v) for v in versions]
        assert len(set(fps)) == len(fps), name


@pytest.mark.parametrize(("name", "n", "old"), PAIRS)
def test_each_released_version_is_backward_and_forward_compatible(
    name: str, n: int, old: dict[str, Any]
) -> None:
    assert compat.problems(old, CURRENT[name]) == [], f"current {name} cannot read v{n}"
    assert compat.problems(CURRENT[name], old) == [], f"{name} v{n} cannot read the current"


def _write(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = BytesIO()
    schemaless_writer(buf, schema, record)
    return buf.getvalue()


@pytest.mark.parametrize(("name", "n", "old"), PAIRS)
def test_records_of_each_version_read_with_the_other(
    name: str, n: int, old: dict[str, Any]
) -> None:
    current = CURRENT[name]
    codec = AvroCodec()
    header = SINGLE_OBJECT_MAGIC + fingerprint(old)
    old_fields = {f["name"] for f in old["fields"]}
    for record in generate_many(old, 25):
        # backward, through the codec as the pipeline reads topics
        got_name, got = codec.decode(header + _write(old, record))
        assert got_name == name
        for field in current["fields"]:
            if field["name"] in old_fields:
                assert got[field["name"]] == record[field["name"]]
            else:
                assert got[field["name"]] == field["default"]
    for record in generate_many(current, 25):
        # forward: a not-yet-upgraded reader of version n
        got = schemaless_reader(BytesIO(_write(current, record)), current, old)
        assert isinstance(got, dict)
        assert {k: got[k] for k in old_fields & record.keys()} == {
            k: record[k] for k in old_fields & record.keys()
        }


def test_a_stock_changed_of_the_first_release_decodes_with_empty_channels() -> None:
    v1, current = RELEASED["StockChanged"][0], CURRENT["StockChanged"]
    assert fingerprint(v1) != fingerprint(current)  # the channels field came in v2
    record = next(iter(generate_many(v1, 1)))
    frame = SINGLE_OBJECT_MAGIC + fingerprint(v1) + _write(v1, record)
    name, got = AvroCodec().decode(frame)
    assert name == "StockChanged"
    assert got["channels"] == []
    assert got["on_hand"] == record["on_hand"]


def test_a_codec_without_the_released_versions_does_not_read_them() -> None:
    # the behaviour before released versions were kept: what the test above guards against
    v1 = RELEASED["StockChanged"][0]
    record = next(iter(generate_many(v1, 1)))
    frame = SINGLE_OBJECT_MAGIC + fingerprint(v1) + _write(v1, record)
    with pytest.raises(DecodeError) as err:
        AvroCodec(schemas=CURRENT).decode(frame)
    assert err.value.reason == "unknown_schema"


# -- the checker itself finds incompatibilities ---------------------------------------


def _record(*fields: dict[str, Any], name: str = "R") -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": "t", "fields": list(fields)}


BASE = _record({"name": "a", "type": "int"}, {"name": "s", "type": "string"})


@pytest.mark.parametrize(
    ("writer", "reader", "fragment"),
    [
        # a new reader field without a default: old records lack it (backward)
        (BASE, _record(*BASE["fields"], {"name": "b", "type": "int"}), "b: reader field"),
        # a field removed that an old reader requires (forward)
        (_record({"name": "a", "type": "int"}), BASE, "s: reader field"),
        # a narrowing type change
        (_record({"name": "a", "type": "long"}), _record({"name": "a", "type": "int"}), "a:"),
        (_record({"name": "a", "type": "string"}), _record({"name": "a", "type": "int"}), "a:"),
        # an enum symbol the reader lacks, without a default
        (
            _record({"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["X", "Y"]}}),
            _record({"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["X"]}}),
            "lacks symbols",
        ),
        # a union branch the reader cannot take
        (
            _record({"name": "u", "type": ["null", "string"]}),
            _record({"name": "u", "type": ["null", "int"]}),
            "u: writer type string",
        ),
        # a renamed record
        (BASE, {**BASE, "name": "Other"}, "is not reader's"),
        # nested: an array of records whose item gained a required field
        (
            _record({"name": "xs", "type": {"type": "array", "items": _record(name="I")}}),
            _record(
                {
                    "name": "xs",
                    "type": {
                        "type": "array",
                        "items": _record({"name": "q", "type": "int"}, name="I"),
                    },
                }
            ),
            "xs[].q",
        ),
    ],
)
def test_the_checker_reports_incompatible_changes(
    writer: dict[str, Any], reader: dict[str, Any], fragment: str
) -> None:
    found = compat.problems(parse_schema(writer), parse_schema(reader))
    assert any(fragment in p for p in found), found


@pytest.mark.parametrize(
    ("writer", "reader"),
    [
        (BASE, _record(*BASE["fields"], {"name": "b", "type": "int", "default": 0})),
        (_record(*BASE["fields"], {"name": "b", "type": "int"}), BASE),  # extra writer field
        (_record({"name": "a", "type": "int"}), _record({"name": "a", "type": "long"})),
        (
            _record({"name": "a", "type": "string"}),
            _record({"name": "a", "type": ["null", "string"]}),
        ),
        (
            _record({"name": "a", "type": "int"}),
            _record({"name": "b", "type": "int", "aliases": ["a"]}),
        ),
    ],
)
def test_the_checker_accepts_compatible_changes(
    writer: dict[str, Any], reader: dict[str, Any]
) -> None:
    assert compat.problems(parse_schema(writer), parse_schema(reader)) == []
