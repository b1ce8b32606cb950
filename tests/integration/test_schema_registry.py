"""The codec's Confluent wire format against a real schema registry.

The registry is Apicurio Registry's Confluent-compatible API, started by
``scripts/registry.sh up`` (downloads it once into .stack/). The module fails,
never skips, when it cannot start. It is stopped at the end only when this
module started it.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
import uuid
from io import BytesIO
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer

from harness import REPO, Namespace, Worker, read_topic, wait_for
from pipeline.produce import CommandProducer
from schemas.codec import SCHEMA_DIR, AvroCodec, DecodeError
from schemas.registry import SchemaRegistry

pytestmark = pytest.mark.integration

REGISTRY_SH = REPO / "scripts" / "registry.sh"


def _sh(cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REGISTRY_SH), cmd],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def registry_url() -> Any:
    was_up = _sh("status", 30).returncode == 0
    try:
        # the first run downloads ~150 MB from Maven Central
        up = _sh("up", 900)
    except subprocess.TimeoutExpired:
        pytest.fail("scripts/registry.sh up did not finish within 900s", pytrace=False)
    if up.returncode != 0:
        pytest.fail(
            f"the schema registry could not start (scripts/registry.sh up exited "
            f"{up.returncode}):\n{up.stdout}{up.stderr}",
            pytrace=False,
        )
    url = _sh("url", 30).stdout.strip()
    yield url
    if not was_up:
        down = _sh("down", 120)
        assert down.returncode == 0, f"scripts/registry.sh down failed:\n{down.stdout}{down.stderr}"


def _get(url: str) -> Any:
    req = urllib.request.Request(url, headers={"Accept": "application/vnd.schemaregistry.v1+json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _subject_ids(url: str, subject: str) -> set[int]:
    """Every schema id registered under ``subject`` (GET /subjects/{s}/versions[/{v}])."""
    base = f"{url}/subjects/{urllib.parse.quote(subject, safe='')}/versions"
    return {_get(f"{base}/{v}")["id"] for v in _get(base)}


def _reserve(**over: Any) -> dict[str, Any]:
    rec = {
        "event_id": str(uuid.uuid4()),
        "order_id": "o-1",
        "sku": "REG-1",
        "qty": 2,
        "occurred_at": 1_700_000_000_000,
    }
    rec.update(over)
    return rec


class RawKeepingCodec(AvroCodec):
    """A registry codec that also keeps the framed bytes it decoded."""

    def __init__(self, registry: SchemaRegistry) -> None:
        super().__init__(registry)
        self.raw: list[bytes] = []

    def decode(self, data: bytes) -> tuple[str, dict[str, Any]]:
        self.raw.append(bytes(data))
        return super().decode(data)


def test_encode_writes_confluent_framing_with_an_id_registered_under_the_record_name(registry_url):
    codec = AvroCodec(SchemaRegistry(registry_url))
    data = codec.encode("ReserveStock", _reserve())
    assert data[0] == 0
    schema_id = int.from_bytes(data[1:5], "big")
    assert schema_id in _subject_ids(registry_url, "inventory.v1.ReserveStock")
    answer = _get(f"{registry_url}/schemas/ids/{schema_id}")
    assert json.loads(answer["schema"])["name"] in ("ReserveStock", "inventory.v1.ReserveStock")
    assert answer.get("schemaType", "AVRO") == "AVRO"


def test_round_trip_through_a_fresh_client(registry_url):
    rec = _reserve(qty=5, allow_partial=True, channel="mobile", ttl_ms=60_000)
    data = AvroCodec(SchemaRegistry(registry_url)).encode("ReserveStock", rec)
    # a new client has nothing cached: it must fetch the writer schema by id
    name, back = AvroCodec(SchemaRegistry(registry_url)).decode(data)
    assert (name, back) == ("ReserveStock", rec)


def test_codec_without_registry_rejects_a_confluent_frame_as_unknown_schema(registry_url):
    data = AvroCodec(SchemaRegistry(registry_url)).encode("ReserveStock", _reserve())
    with pytest.raises(DecodeError) as err:
        AvroCodec().decode(data)
    assert err.value.reason == "unknown_schema"


def test_unknown_id_is_unknown_schema(registry_url):
    data = b"\x00" + (2**31 - 7).to_bytes(4, "big") + b"\x02"
    with pytest.raises(DecodeError) as err:
        AvroCodec(SchemaRegistry(registry_url)).decode(data)
    assert err.value.reason == "unknown_schema"


def test_older_writer_schema_under_the_same_subject_decodes_by_resolution(registry_url):
    current = json.loads((SCHEMA_DIR / "ReserveStock.avsc").read_text())
    old = dict(current, fields=[f for f in current["fields"] if f["name"] != "allow_partial"])
    registry = SchemaRegistry(registry_url)
    old_id = registry.register("inventory.v1.ReserveStock", json.dumps(old))
    new_id = int.from_bytes(
        AvroCodec(SchemaRegistry(registry_url)).encode("ReserveStock", _reserve())[1:5], "big"
    )
    assert old_id != new_id
    assert {old_id, new_id} <= _subject_ids(registry_url, "inventory.v1.ReserveStock")

    rec = _reserve(qty=3)
    buf = BytesIO()
    buf.write(b"\x00" + old_id.to_bytes(4, "big"))
    schemaless_writer(buf, parse_schema(old), rec)
    name, back = AvroCodec(SchemaRegistry(registry_url)).decode(buf.getvalue())
    assert name == "ReserveStock"
    assert back == dict(rec, channel="web", ttl_ms=0, allow_partial=False)


def test_worker_reads_and_writes_the_confluent_format(kafka, registry_url):
    ns = Namespace.fresh("registry", INVENTORY_SCHEMA_REGISTRY_URL=registry_url)
    sku = f"REG-{uuid.uuid4().hex[:8]}"
    worker = Worker(ns).start()
    try:
        codec = AvroCodec(SchemaRegistry(registry_url))
        with CommandProducer(ns.settings, codec=codec) as producer:
            producer.send("RestockReceived", {"sku": sku, "qty": 4})
        wait_for(lambda: worker.get_json(f"/stock/{sku}")[0] == 200, 30, f"stock of {sku}")
        assert worker.get_json(f"/stock/{sku}")[1] == {
            "sku": sku,
            "on_hand": 4,
            "reserved": 0,
            "safety_stock": 0,
            "available": 4,
            "version": 1,
            "shared_available": 4,
            "channels": {},
        }

        reader = RawKeepingCodec(SchemaRegistry(registry_url))
        changes = read_topic(
            ns.settings,
            ns.settings.stock_changes_topic,
            codec=reader,
            until=lambda rs: len(rs) >= 1,
        )
        assert [(r.name, r.key, r.value["available"]) for r in changes] == [
            ("StockChanged", sku.encode(), 4)
        ]
        raw = reader.raw[0]
        assert raw[0] == 0, f"the worker wrote {raw[:10].hex()}, not the Confluent framing"
        assert int.from_bytes(raw[1:5], "big") in _subject_ids(
            registry_url, "inventory.v1.StockChanged"
        )
        dead = read_topic(ns.settings, ns.settings.dead_letters_topic, timeout=1.0, codec=reader)
        assert dead == []
    finally:
        worker.stop()
    assert worker.proc is not None and worker.proc.returncode == 0, worker.tail()
