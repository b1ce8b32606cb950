"""docs/asyncapi.yaml, the event contract for producers in other languages, checked
against the code: topics from the settings, records from schemas/*.avsc, which record
goes on which topic, keys, and example frames decoded by the project's codec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from config.settings import Settings
from pipeline.kafka.partitioning import partition_for
from pipeline.produce import INPUT_TYPES, topic_for_type
from schemas import validation
from schemas.codec import SCHEMA_DIR, AvroCodec, fingerprint, load_schemas

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "asyncapi.yaml"


def doc() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(DOC.read_text())
    return data


def resolve(root: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def settings_topics(s: Settings) -> set[str]:
    """Every topic name the settings define (each ``*_topic`` property)."""
    return {
        getattr(s, name)
        for name in dir(type(s))
        if name.endswith("_topic") and isinstance(getattr(type(s), name), property)
    }


def test_it_is_an_asyncapi_3_document():
    d = doc()
    assert d["asyncapi"] == "3.0.0"
    assert d["info"]["title"] and d["info"]["version"]
    assert {"channels", "operations", "components"} <= set(d)


def test_every_topic_of_the_settings_is_a_channel_and_nothing_else():
    s = Settings()
    addresses = [c["address"] for c in doc()["channels"].values()]
    assert len(addresses) == len(set(addresses))
    assert set(addresses) == settings_topics(s)
    assert len(settings_topics(s)) == 9  # grows with a new topic: describe it in the doc


def test_every_schema_is_a_message_whose_payload_is_that_file():
    messages = doc()["components"]["messages"]
    assert set(messages) == set(load_schemas())
    for name, message in messages.items():
        assert message["name"] == name
        payload = message["payload"]
        assert payload["schemaFormat"].startswith("application/vnd.apache.avro+json")
        target = (DOC.parent / payload["schema"]["$ref"]).resolve()
        assert target == (SCHEMA_DIR / f"{name}.avsc").resolve(), name
        assert target.is_file()


def channel_records() -> dict[str, set[str]]:
    d = doc()
    out = {}
    for channel in d["channels"].values():
        names = set()
        for key, ref in channel["messages"].items():
            message = resolve(d, ref["$ref"])
            assert message["name"] == key
            names.add(key)
        out[channel["address"]] = names
    return out


def test_each_channel_carries_the_records_the_pipeline_accepts_or_writes_there():
    s = Settings()
    got = channel_records()
    # inputs: what the ledger's validation accepts per topic, and the producer's checkouts
    for topic, names in validation.records_for_topic(s).items():
        assert got[topic] == set(names), topic
    assert got[s.checkouts_topic] == {
        n for n in INPUT_TYPES if topic_for_type(s, n) == s.checkouts_topic
    }
    for name in ("PlaceOrder", "CommitOrder", "CancelOrder", "ReserveStock", "RestockReceived"):
        assert name in got[topic_for_type(s, name)]
    # outputs: the relay's effects, the saga's answers and the dead letters
    assert got[s.stock_changes_topic] == {"StockChanged", "LowStockCrossed", "StockShortfall"}
    assert got[s.results_topic] == got[s.line_results_topic] == {"ReservationResult"}
    assert got[s.order_results_topic] == {"OrderResult"}
    assert got[s.dead_letters_topic] == {"DeadLetter"}
    # every record is on some topic
    assert set().union(*got.values()) == set(load_schemas())


def test_operations_point_at_channels_and_their_messages():
    d = doc()
    for op_id, op in d["operations"].items():
        assert op["action"] in ("send", "receive"), op_id
        channel = resolve(d, op["channel"]["$ref"])
        prefix = op["channel"]["$ref"] + "/messages/"
        for m in op["messages"]:
            assert m["$ref"].startswith(prefix), (op_id, m)
            resolve(d, m["$ref"])
        if "reply" in op:
            reply = op["reply"]
            resolve(d, reply["channel"]["$ref"])
            for m in reply["messages"]:
                resolve(d, m["$ref"])
        assert channel


def test_keys_are_described_as_sku_or_order_id_bytes():
    d = doc()
    traits = d["components"]["messageTraits"]
    by_order = {"PlaceOrder", "CommitOrder", "CancelOrder", "ReservationResult", "OrderResult"}
    for name, message in d["components"]["messages"].items():
        refs = [t["$ref"].rsplit("/", 1)[-1] for t in message.get("traits", [])]
        if name == "DeadLetter":
            assert refs == []
            continue
        assert refs == ["keyedByOrder" if name in by_order else "keyedBySku"], name
        field = "order_id" if name in by_order else "sku"
        assert field in {f["name"] for f in load_schemas()[name]["fields"]}, name
    assert "`sku` as UTF-8" in traits["keyedBySku"]["bindings"]["kafka"]["key"]["description"]
    text = d["info"]["description"]
    for words in ("murmur2", "key_mismatch", "re-sent", "little-endian", "toByteBuffer()"):
        assert words in text, words


def examples(name: str) -> dict[str, dict[str, Any]]:
    """The message's examples by name, each with its bytes from ``x-frames``."""
    message = doc()["components"]["messages"][name]
    out = {e["name"]: dict(e) for e in message["examples"]}
    for frame in message["x-frames"]:
        out[frame["example"]].update(frame)
    return out


def hex_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_the_single_object_example_decodes_with_the_projects_codec():
    example = examples("ReserveStock")["single-object frame"]
    frame = hex_bytes(example["value-hex"])
    assert frame[:2] == b"\xc3\x01"
    assert frame[2:10] == fingerprint("ReserveStock")  # little-endian CRC-64-AVRO
    java_long = int.from_bytes(frame[2:10], "little", signed=True)
    assert str(java_long) in example["summary"]  # parsingFingerprint64 as Java prints it
    assert f"{java_long & (2**64 - 1):#x}" in example["summary"]
    assert AvroCodec().decode(frame) == ("ReserveStock", example["payload"])
    # and the codec writes the very same bytes for it
    assert AvroCodec().encode("ReserveStock", example["payload"]) == frame
    key = hex_bytes(example["key-hex"])
    assert key == example["payload"]["sku"].encode("utf-8")
    assert partition_for(key, 8) == example["partition-of-8"]


class OneSchemaRegistry:
    """The registry call the codec makes to read a Confluent frame."""

    def __init__(self, schema_id: int, name: str) -> None:
        self.schema_id, self.name = schema_id, name

    def schema_by_id(self, schema_id: int) -> str:
        assert schema_id == self.schema_id
        return (SCHEMA_DIR / f"{self.name}.avsc").read_text()


def test_the_confluent_example_is_the_same_body_behind_its_own_header():
    so = examples("ReserveStock")["single-object frame"]
    cf = examples("ReserveStock")["Confluent frame"]
    frame = hex_bytes(cf["value-hex"])
    assert frame[:1] == b"\x00"
    assert int.from_bytes(frame[1:5], "big") == cf["schema-id"]
    assert frame[5:] == hex_bytes(so["value-hex"])[10:]
    codec = AvroCodec(registry=OneSchemaRegistry(cf["schema-id"], "ReserveStock"))  # type: ignore[arg-type]
    assert codec.decode(frame) == ("ReserveStock", cf["payload"])


@pytest.mark.parametrize("flip", [2, 9, 12])
def test_a_wrong_example_would_not_decode(flip):
    # the decode check can fail: one changed byte of the header or body is refused
    from schemas.codec import DecodeError

    frame = bytearray(hex_bytes(examples("ReserveStock")["single-object frame"]["value-hex"]))
    frame[flip] ^= 0xFF
    try:
        name, record = AvroCodec().decode(bytes(frame))
    except DecodeError:
        return
    assert record != examples("ReserveStock")["single-object frame"]["payload"]
