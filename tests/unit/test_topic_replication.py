"""INVENTORY_REPLICATION_FACTOR and INVENTORY_MIN_INSYNC_REPLICAS reach every topic the
pipeline creates (checked on a fake admin client: no Kafka needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from config.settings import Settings, SettingsError
from pipeline.kafka import topics

REPO = Path(__file__).resolve().parents[2]


def test_one_replica_by_default_as_on_the_local_broker():
    s = Settings.from_env({})
    assert (s.replication_factor, s.min_insync_replicas, s.table_standby_replicas) == (1, 1, 0)


def test_a_real_clusters_replication_is_read_from_the_environment():
    s = Settings.from_env(
        {
            "INVENTORY_REPLICATION_FACTOR": "3",
            "INVENTORY_MIN_INSYNC_REPLICAS": "2",
            "INVENTORY_TABLE_STANDBY_REPLICAS": "1",
        }
    )
    assert (s.replication_factor, s.min_insync_replicas, s.table_standby_replicas) == (3, 2, 1)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INVENTORY_REPLICATION_FACTOR": "0"}, "INVENTORY_REPLICATION_FACTOR='0': must be"),
        ({"INVENTORY_REPLICATION_FACTOR": "three"}, "INVENTORY_REPLICATION_FACTOR='three'"),
        ({"INVENTORY_MIN_INSYNC_REPLICAS": "0"}, "INVENTORY_MIN_INSYNC_REPLICAS='0': must be"),
        ({"INVENTORY_TABLE_STANDBY_REPLICAS": "-1"}, "INVENTORY_TABLE_STANDBY_REPLICAS='-1'"),
        # more in-sync replicas than replicas: no acks=all write could ever succeed
        ({"INVENTORY_MIN_INSYNC_REPLICAS": "2"}, "must be at most INVENTORY_REPLICATION_FACTOR"),
        (
            {"INVENTORY_REPLICATION_FACTOR": "2", "INVENTORY_MIN_INSYNC_REPLICAS": "3"},
            "INVENTORY_MIN_INSYNC_REPLICAS=3: must be at most INVENTORY_REPLICATION_FACTOR (2)",
        ),
    ],
)
def test_impossible_replication_is_refused(env, message):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert message in str(err.value)


class FakeFuture:
    def result(self, timeout: float | None = None) -> None:
        return None


class FakeAdmin:
    """list_topics and create_topics as confluent_kafka's AdminClient answers them."""

    def __init__(self, existing: dict[str, tuple[int, int]] | None = None) -> None:
        self.existing = existing or {}  # name -> (partitions, replicas)
        self.created: list[Any] = []

    def list_topics(self, timeout: float | None = None) -> Any:
        return SimpleNamespace(
            topics={
                name: SimpleNamespace(
                    error=None,
                    partitions={
                        p: SimpleNamespace(replicas=list(range(replicas)))
                        for p in range(partitions)
                    },
                )
                for name, (partitions, replicas) in self.existing.items()
            }
        )

    def create_topics(self, new_topics: list[Any], operation_timeout: float = 0) -> Any:
        self.created.extend(new_topics)
        return {t.topic: FakeFuture() for t in new_topics}


def test_every_created_topic_gets_the_replication_factor_and_min_insync_replicas(monkeypatch):
    cfg = Settings(replication_factor=3, min_insync_replicas=2)
    admin = FakeAdmin()
    monkeypatch.setattr(topics, "admin_client", lambda _s: admin)
    topics.ensure_topics(cfg)
    names = {t.topic for t in admin.created}
    assert names == {s.name for s in topics.topic_specs(cfg)}
    assert cfg.orders_topic in names and topics.changelog_topic(cfg) in names
    for t in admin.created:
        assert t.replication_factor == 3, t.topic
        assert t.config["min.insync.replicas"] == "2", t.topic
    # their own settings are kept next to it
    changelog = next(t for t in admin.created if t.topic == topics.changelog_topic(cfg))
    assert changelog.config["cleanup.policy"] == "compact"


def test_existing_topics_with_fewer_replicas_are_left_alone_and_named(monkeypatch, caplog):
    cfg = Settings(replication_factor=3, min_insync_replicas=2)
    specs = topics.topic_specs(cfg)
    admin = FakeAdmin({s.name: (cfg.partitions, 3) for s in specs})
    admin.existing[cfg.orders_topic] = (cfg.partitions, 1)
    monkeypatch.setattr(topics, "admin_client", lambda _s: admin)
    with caplog.at_level("WARNING", logger="inventory.topics"):
        topics.ensure_topics(cfg)
    assert admin.created == []
    assert f"{cfg.orders_topic} has 1 replicas, INVENTORY_REPLICATION_FACTOR is 3" in caplog.text
    assert cfg.restocks_topic not in caplog.text


def test_the_topics_faust_creates_itself_get_the_replication_factor_too():
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    env.update(
        INVENTORY_REPLICATION_FACTOR="3",
        INVENTORY_MIN_INSYNC_REPLICAS="2",
        INVENTORY_TABLE_STANDBY_REPLICAS="1",
    )
    # the saga table's changelog is the one topic Faust creates that anyone writes to
    code = (
        "import json; from pipeline.app import app, settings; import agents.orders as o; "
        "from pipeline.kafka.topics import leader_topic; "
        "print(json.dumps([app.conf.topic_replication_factor, app.conf.table_standby_replicas, "
        "o.orders_table.changelog_topic.config, "
        "app._leader_assignor._leader_topic_name == leader_topic(settings)]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rf, standby, changelog_config, same_leader_topic = json.loads(out.stdout.splitlines()[-1])
    assert (rf, standby) == (3, 1)
    assert changelog_config["min.insync.replicas"] == "2"
    assert same_leader_topic, "pipeline.kafka.topics.leader_topic is not Faust's assignor topic"


def test_fausts_assignor_topic_is_created_by_us_with_the_min_insync_replicas():
    """Faust declares its leader topic without a config (the broker's default min ISR); a
    topic that exists already is left as it is, so ours comes first."""
    cfg = Settings(app_id="app-x", replication_factor=3, min_insync_replicas=2)
    spec = next(s for s in topics.topic_specs(cfg) if s.name == "app-x-__assignor-__leader")
    assert (spec.partitions, spec.config["min.insync.replicas"]) == (1, "2")


def test_every_producer_waits_for_the_in_sync_replicas():
    """acks=all everywhere (with min.insync.replicas 2 an acknowledged write is on two
    brokers): the CLI/command producer, the ledger's transactional writers, the relay;
    Faust's producer (the saga, the sweepers) is checked in the worker's own conf; both
    relays (stock and order answers) use the relay producer; the sinks' dead-letter
    producer is an aiokafka one built with ``acks="all"`` (pipeline/sinks/runner.py)."""
    from pipeline.kafka.consuming import relay_producer_config
    from pipeline.kafka.transactions import writer_config
    from pipeline.produce import producer_config

    cfg = Settings.from_env({})
    for name, conf in (
        ("command producer", producer_config(cfg)),
        ("ledger writer", writer_config(cfg, 3)),
        ("relay", relay_producer_config(cfg)),
    ):
        assert conf["acks"] == "all", name
        assert conf["enable.idempotence"] is True, name
    assert writer_config(cfg, 3)["transactional.id"] == f"{cfg.app_id}-ledger-3"
    built = 0
    for path in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "agents").glob("*.py")]:
        source = path.read_text()
        assert source.count("AIOKafkaProducer(") == source.count('acks="all"'), path
        built += source.count("AIOKafkaProducer(")
    assert built >= 1
    code = "from pipeline.app import app; print(app.conf.producer_acks)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1] == "-1"
