"""Topic layout: creates the project's topics and refuses a partition mismatch.

Input topics and the table changelog must be co-partitioned (same count, same
key bytes, murmur2 partitioner) or one SKU's events could be applied by two
workers. The count is fixed once data exists, so a mismatch is fatal here
rather than something to repair silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from config.settings import Settings
from pipeline.clients import confluent_config, recent_kafka_errors

log = logging.getLogger("inventory.topics")


class KafkaUnreachable(RuntimeError):
    """Kafka did not answer, or refused us (e.g. wrong SASL credentials)."""


class PartitionMismatch(RuntimeError):
    """An existing topic does not have the configured partition count."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]
    must_match: bool  # part of the co-partitioned set


def changelog_topic(settings: Settings, table: str = "stock") -> str:
    """A table's changelog topic, named the way Faust names them.

    ``stock``: the ledger's SKU records (state, watermarks and each batch's effects:
    what the relay publishes); ``reservations``: the ledger's reservation records
    (written in the same transactions, read only on restore); ``orders``: the saga's
    Faust table.
    """
    return f"{settings.app_id}-{table}-changelog"


def ledger_changelogs(settings: Settings) -> tuple[str, str]:
    """The ledger's two changelog topics: SKU records, then reservation records."""
    return changelog_topic(settings), changelog_topic(settings, "reservations")


def durability_config(settings: Settings) -> dict[str, str]:
    """Topic config every topic of the app gets, Faust's own included (its tables'
    ``extra_topic_configs``): ``INVENTORY_MIN_INSYNC_REPLICAS``, the replicas an acks=all
    write needs (every producer of ours writes with acks=all)."""
    return {"min.insync.replicas": str(settings.min_insync_replicas)}


def leader_topic(settings: Settings) -> str:
    """Faust's assignor topic (``{app id}-__assignor-__leader``, one partition, never
    written): created here so it gets the same replication and min ISR as the others
    (Faust would create it with the broker's default min ISR)."""
    return f"{settings.app_id}-__assignor-__leader"


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic the pipeline creates; each gets :func:`durability_config` besides its
    own configuration."""
    return [
        TopicSpec(s.name, s.partitions, {**durability_config(settings), **s.config}, s.must_match)
        for s in _topic_specs(settings)
    ]


def _topic_specs(settings: Settings) -> list[TopicSpec]:
    n = settings.partitions
    specs = [TopicSpec(t, n, {}, True) for t in settings.input_topics]
    specs.append(
        TopicSpec(
            settings.stock_changes_topic,
            n,
            {"cleanup.policy": "delete", "retention.ms": str(settings.stock_changes_retention_ms)},
            False,
        )
    )
    # keyed by order id and co-partitioned with the checkouts topic and the orders table
    specs.append(TopicSpec(settings.results_topic, n, {}, True))
    specs.append(TopicSpec(settings.checkouts_topic, n, {}, True))
    specs.append(TopicSpec(settings.line_results_topic, n, {}, True))
    # the ledger's changelogs (agents.ledger writes them in transactions; not Faust tables)
    for name in ledger_changelogs(settings):
        specs.append(
            TopicSpec(
                name,
                n,
                {
                    "cleanup.policy": "compact",
                    "min.compaction.lag.ms": str(settings.changelog_min_compaction_lag_ms),
                },
                True,
            )
        )
    specs.append(TopicSpec(settings.order_results_topic, n, {}, False))
    specs.append(TopicSpec(settings.dead_letters_topic, n, {}, False))
    specs.append(TopicSpec(leader_topic(settings), 1, {}, False))
    return specs


def replica_count(topic: Any) -> int | None:
    """The fewest replicas of any partition of a topic's metadata (None: no partitions)."""
    counts = [len(p.replicas) for p in topic.partitions.values()]
    return min(counts) if counts else None


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient(confluent_config(settings))


def ensure_topics(settings: Settings, timeout: float = 30.0) -> None:
    """Create missing topics; raise :class:`PartitionMismatch` on a wrong count.

    Also checks the stock table's changelog if it already exists.
    """
    admin = admin_client(settings)
    try:
        meta = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        admin.poll(1.0)  # serve librdkafka's callbacks: they carry the real reason
        reasons = "; ".join(dict.fromkeys(recent_kafka_errors())) or str(exc)
        raise KafkaUnreachable(
            f"cannot use Kafka at {settings.kafka_bootstrap} "
            f"({settings.kafka_security_protocol}): {reasons}"
        ) from None
    existing = {name: len(t.partitions) for name, t in meta.topics.items() if t.error is None}
    specs = topic_specs(settings)
    for s in specs:
        replicas = replica_count(meta.topics[s.name]) if s.name in existing else None
        if replicas is not None and replicas < settings.replication_factor:
            # existing topics are never altered: a reassignment is the operator's call
            log.warning(
                "%s has %d replicas, INVENTORY_REPLICATION_FACTOR is %d (not changed: "
                "reassign its partitions with kafka-reassign-partitions)",
                s.name,
                replicas,
                settings.replication_factor,
            )
    mismatches = [
        f"{s.name} has {existing[s.name]} partitions, configured {s.partitions}"
        for s in specs
        if s.must_match and s.name in existing and existing[s.name] != s.partitions
    ]
    for cl in (changelog_topic(settings, "orders"),):  # Faust creates it; check it
        if cl in existing and existing[cl] != settings.partitions:
            mismatches.append(
                f"{cl} has {existing[cl]} partitions, configured {settings.partitions}"
            )
    if mismatches:
        raise PartitionMismatch(
            "refusing to start: input topics and the table changelog must be co-partitioned; "
            + "; ".join(mismatches)
            + " (set INVENTORY_PARTITIONS to match, or use new topics)"
        )
    missing = [s for s in specs if s.name not in existing]
    if not missing:
        return
    futures = admin.create_topics(
        [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=settings.replication_factor,
                config=s.config,
            )
            for s in missing
        ],
        operation_timeout=timeout,
    )
    for name, fut in futures.items():
        try:
            fut.result(timeout)
        except Exception as exc:  # noqa: BLE001 - inspect the Kafka error code
            err = exc.args[0] if exc.args else None
            if getattr(err, "name", lambda: "")() == "TOPIC_ALREADY_EXISTS":
                continue  # raced with another worker: fine, re-checked on the next start
            raise RuntimeError(f"could not create topic {name}: {exc}") from exc
