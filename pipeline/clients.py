"""Connection settings for every client the project runs, built from one Settings.

Kafka is reached the same way by Faust, aiokafka (relay, sinks) and
confluent-kafka (admin, producer CLI, rebuild, audit): PLAINTEXT by default, or
SASL/SCRAM over TLS when ``INVENTORY_KAFKA_SECURITY_PROTOCOL=SASL_SSL``.
Passwords come from :class:`config.settings.Secret` values and are revealed
only here, inside the client configuration.
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from typing import Any

from config.settings import Settings


def _ssl_context(cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile or None)
    return ctx


def uses_sasl(cfg: Settings) -> bool:
    return cfg.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


def uses_tls(cfg: Settings) -> bool:
    return cfg.kafka_security_protocol in ("SSL", "SASL_SSL")


_KAFKA_ERRORS: deque[str] = deque(maxlen=20)


def _on_kafka_error(err: Any) -> None:
    """librdkafka's error callback: keep the reason so a failure can name it."""
    _KAFKA_ERRORS.append(str(err.str() if hasattr(err, "str") else err))
    logging.getLogger("inventory.kafka").warning("kafka client error: %s", err)


def recent_kafka_errors() -> list[str]:
    """Errors librdkafka reported lately (e.g. a SASL authentication failure), newest last."""
    return list(_KAFKA_ERRORS)


def confluent_config(cfg: Settings, **extra: Any) -> dict[str, Any]:
    """librdkafka settings (confluent-kafka Producer/Consumer/AdminClient)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": cfg.kafka_bootstrap,
        "security.protocol": cfg.kafka_security_protocol,
        # librdkafka's own log lines go through Python logging (JSON in workers)
        "logger": logging.getLogger("inventory.librdkafka"),
        "error_cb": _on_kafka_error,
        # librdkafka refreshes the metadata of topics it does not consume or produce only
        # this often (its default is 5 min): a broker's death left a long-lived query
        # client without the partition's leader for minutes (see watermarks())
        "topic.metadata.refresh.interval.ms": 10_000,
    }
    if uses_sasl(cfg):
        conf.update(
            {
                "sasl.mechanism": cfg.kafka_sasl_mechanism,
                "sasl.username": cfg.kafka_sasl_username,
                "sasl.password": cfg.kafka_sasl_password.reveal(),
            }
        )
    if uses_tls(cfg) and cfg.kafka_ssl_cafile:
        conf["ssl.ca.location"] = cfg.kafka_ssl_cafile
    conf.update(extra)
    return conf


def watermarks(consumer: Any, topic: str, partition: int, timeout_s: float) -> tuple[int, int]:
    """(log start, log end) of a partition, asked of its leader now, from a confluent-kafka
    consumer. When the client's metadata has lost the partition's leader (a broker died;
    librdkafka says "Local: Unknown partition") it asks the cluster for the topic's
    metadata and tries once more, instead of failing until the periodic refresh: after a
    leader kill, a worker's every check of its changelog failed for 3 minutes."""
    from confluent_kafka import KafkaError, KafkaException, TopicPartition

    tp = TopicPartition(topic, partition)
    try:
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError._UNKNOWN_PARTITION:
            raise
        consumer.list_topics(topic, timeout=timeout_s)
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
    return int(low), int(high)


def aiokafka_kwargs(cfg: Settings) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaConsumer/AIOKafkaProducer."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": cfg.kafka_bootstrap,
        "security_protocol": cfg.kafka_security_protocol,
        # see consumer_metadata_max_age_ms in pipeline.runtime: a consumer that joined
        # before a just-started broker listed its topics rejoins within 10 s
        "metadata_max_age_ms": 10_000,
    }
    if uses_sasl(cfg):
        kwargs.update(
            sasl_mechanism=cfg.kafka_sasl_mechanism,
            sasl_plain_username=cfg.kafka_sasl_username,
            sasl_plain_password=cfg.kafka_sasl_password.reveal(),
        )
    if uses_tls(cfg):
        kwargs["ssl_context"] = _ssl_context(cfg.kafka_ssl_cafile)
    return kwargs


def faust_broker_kwargs(cfg: Settings) -> dict[str, Any]:
    """``broker`` and ``broker_credentials`` for faust.App."""
    import faust
    from faust.types.auth import SASLMechanism

    kwargs: dict[str, Any] = {"broker": f"kafka://{cfg.kafka_bootstrap}"}
    if uses_sasl(cfg):
        kwargs["broker_credentials"] = faust.SASLCredentials(
            username=cfg.kafka_sasl_username,
            password=cfg.kafka_sasl_password.reveal(),
            mechanism=SASLMechanism(cfg.kafka_sasl_mechanism),
            ssl_context=_ssl_context(cfg.kafka_ssl_cafile) if uses_tls(cfg) else None,
        )
    elif uses_tls(cfg):
        kwargs["broker_credentials"] = faust.SSLCredentials(_ssl_context(cfg.kafka_ssl_cafile))
    return kwargs


def redis_kwargs(cfg: Settings) -> dict[str, Any]:
    """Extra arguments for ``redis.Redis.from_url(cfg.redis_url, **...)`` (ACL user, password)."""
    out: dict[str, Any] = {}
    if cfg.redis_username:
        out["username"] = cfg.redis_username
    if cfg.redis_password:
        out["password"] = cfg.redis_password.reveal()
    return out


def opensearch_kwargs(cfg: Settings) -> dict[str, Any]:
    """Extra arguments for the OpenSearch client: basic auth and the CA for TLS."""
    out: dict[str, Any] = {}
    if cfg.opensearch_username:
        out["http_auth"] = (cfg.opensearch_username, cfg.opensearch_password.reveal())
    if cfg.opensearch_url.startswith("https://"):
        out["use_ssl"] = True
        out["verify_certs"] = True
        if cfg.opensearch_ca_file:
            out["ca_certs"] = cfg.opensearch_ca_file
    return out
