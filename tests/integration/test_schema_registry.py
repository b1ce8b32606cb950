"""The codec's Confluent wire format against a real schema registry.

The registry is Apicurio Registry's Confluent-compatible API, started by
``scripts/registry.sh up`` (downloads it once into .stack/). The module fails,
never skips, when it cannot start. It is stopped at the end only when this
module started it.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from io import BytesIO
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer

from harness import REPO, Namespace, Worker, metric_total, read_topic, wait_for, wait_stock
from pipeline.kafka.partitioning import partition_for
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
    rec = _reserve(
        qty=5,
        allow_partial=True,
        channel="mobile",
        ttl_ms=60_000,
        customer_id="c-1",
        location="store-7",
        split=True,
        allow_backorder=True,
    )
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
    assert back == dict(
        rec,
        channel="web",
        ttl_ms=0,
        allow_partial=False,
        customer_id="",
        location="",
        split=False,
        allow_backorder=False,
    )


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
            "damaged": 0,
            "locations": {},
            "incoming": {
                "open": 0,
                "promised": 0,
                "backorderable": 0,
                "cap": 0,
                "staged": 0,
                "waiting": 0,
                "purchase_orders": {},
            },
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


def _register_typed(url: str, subject: str, schema: str, schema_type: str) -> int:
    body = json.dumps({"schema": schema, "schemaType": schema_type}).encode()
    req = urllib.request.Request(
        f"{url}/subjects/{urllib.parse.quote(subject, safe='')}/versions",
        data=body,
        method="POST",
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(json.loads(resp.read())["id"])


def test_a_record_framed_with_a_non_avro_schema_id_is_a_dead_letter(kafka, registry_url):
    """Before: the registry's "not an Avro schema" was taken for a registry failure and the
    ledger retried it for ever, so nothing after it on its partition was applied."""
    ns = Namespace.fresh("regjson", 1, INVENTORY_SCHEMA_REGISTRY_URL=registry_url)
    json_id = _register_typed(
        registry_url,
        f"json-{uuid.uuid4().hex[:8]}",
        json.dumps(
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "type": "object",
                "properties": {"qty": {"type": "integer"}},
            }
        ),
        "JSON",
    )
    sku = f"REGJ-{uuid.uuid4().hex[:8]}"
    worker = Worker(ns).start()
    try:
        codec = AvroCodec(SchemaRegistry(registry_url))
        with CommandProducer(ns.settings, codec=codec) as producer:
            frame = b"\x00" + json_id.to_bytes(4, "big") + b'{"sku": "x", "qty": 1}'
            producer.send_raw(ns.settings.restocks_topic, sku.encode(), frame, 0)
            producer.send("RestockReceived", {"sku": sku, "qty": 4})
        wait_stock(worker, sku, on_hand=4, timeout=60)
        dead = read_topic(
            ns.settings,
            ns.settings.dead_letters_topic,
            until=lambda rs: len(rs) >= 1,
            idle=1.0,
            codec=codec,
        )
        assert [(d.value["reason"], d.value["source_offset"]) for d in dead] == [
            ("unknown_schema", 0)
        ]
        assert "JSON schema, not Avro" in dead[0].value["detail"]
    finally:
        worker.stop()


def test_a_hung_registry_does_not_block_the_event_loop(kafka, registry_url):
    """The registry answers nothing (a proxy that accepts and never replies) while a record
    needs a writer schema the worker has not seen: the worker keeps answering HTTP and
    applying the other partition's commands, and applies the record once the registry is
    back. Before, the look-up ran on the event loop: each try froze the whole worker for
    the client's 10 s timeout."""
    from faults import TcpProxy

    parts = urllib.parse.urlsplit(registry_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 80).start()
    via_proxy = f"http://127.0.0.1:{proxy.port}{parts.path}"
    ns = Namespace.fresh("reghung", 2, INVENTORY_SCHEMA_REGISTRY_URL=via_proxy)
    skus: dict[int, str] = {}
    while len(skus) < 2:
        sku = f"REGH-{uuid.uuid4().hex[:8]}"
        skus.setdefault(partition_for(sku.encode(), 2), sku)
    direct = SchemaRegistry(registry_url)
    # an older RestockReceived writer with one more field: an id the worker has never read
    schema = json.loads((SCHEMA_DIR / "RestockReceived.avsc").read_text())
    schema["fields"].append(
        {"name": f"note_{uuid.uuid4().hex[:6]}", "type": "string", "default": ""}
    )
    old_id = direct.register("inventory.v1.RestockReceived", json.dumps(schema))
    worker = Worker(ns).start()
    try:
        codec = AvroCodec(direct)
        with CommandProducer(ns.settings, codec=codec) as producer:
            for sku in skus.values():
                producer.send("RestockReceived", {"sku": sku, "qty": 1})
        for sku in skus.values():
            wait_stock(worker, sku, on_hand=1, timeout=60)
        proxy.set_mode("blackhole")
        record = {
            "event_id": str(uuid.uuid4()),
            "sku": skus[0],
            "qty": 5,
            "occurred_at": 1_700_000_000_000,
            schema["fields"][-1]["name"]: "older writer",
        }
        body = BytesIO()
        schemaless_writer(body, parse_schema(schema), fill_defaults_for(schema, record))
        with CommandProducer(ns.settings, codec=codec) as producer:
            frame = b"\x00" + old_id.to_bytes(4, "big") + body.getvalue()
            producer.send_raw(ns.settings.restocks_topic, skus[0].encode(), frame, 0)
            producer.flush(10)
            time.sleep(1.0)  # the worker has it and is waiting for the registry
            producer.send("RestockReceived", {"sku": skus[1], "qty": 2})
        slowest = 0.0
        deadline = time.monotonic() + 12  # more than one 10 s client timeout
        while time.monotonic() < deadline:
            started = time.monotonic()
            status, _ = worker.get_json(f"/stock/{skus[1]}")
            slowest = max(slowest, time.monotonic() - started)
            assert status == 200
            time.sleep(0.2)
        assert slowest < 2.0, f"a request took {slowest:.1f} s while the registry hung"
        wait_stock(worker, skus[1], on_hand=3, timeout=5)  # the other partition went on
        assert worker.get_json(f"/stock/{skus[0]}")[1]["on_hand"] == 1  # this one waits
        assert metric_total(worker.url, "inventory_schema_registry_waits_total") >= 1
        proxy.set_mode("up")
        wait_stock(worker, skus[0], on_hand=6, timeout=60)
        dead = read_topic(ns.settings, ns.settings.dead_letters_topic, timeout=1.0, codec=codec)
        assert dead == []
    finally:
        worker.stop()
        proxy.close()


def fill_defaults_for(schema: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    return {f["name"]: record.get(f["name"], f.get("default")) for f in schema["fields"]}
