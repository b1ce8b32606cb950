"""Shared fixtures. Tests that need a service fail (never skip) when it is missing."""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from config.settings import settings  # noqa: E402


def _kafka_error() -> str | None:
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(timeout=5)
    except Exception as exc:  # noqa: BLE001 - reported as the failure reason
        return f"Kafka at {settings.kafka_bootstrap} is not answering ({exc}); run `make stack-up`"
    return None


def _redis_error() -> str | None:
    import redis

    try:
        redis.Redis.from_url(settings.redis_url, socket_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001
        return f"Redis at {settings.redis_url} is not answering ({exc}); run `make stack-up`"
    return None


def _opensearch_error() -> str | None:
    url = settings.opensearch_url.rstrip("/") + "/_cluster/health"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            if resp.status != 200:
                return f"OpenSearch health at {url} answered {resp.status}"
    except Exception as exc:  # noqa: BLE001
        return (
            f"OpenSearch at {settings.opensearch_url} is not answering ({exc}); run `make stack-up`"
        )
    return None


@pytest.fixture(scope="session")
def kafka() -> None:
    err = _kafka_error()
    if err:
        pytest.fail(err, pytrace=False)


@pytest.fixture(scope="session")
def redis_service() -> None:
    err = _redis_error()
    if err:
        pytest.fail(err, pytrace=False)


@pytest.fixture(scope="session")
def opensearch() -> None:
    err = _opensearch_error()
    if err:
        pytest.fail(err, pytrace=False)


@pytest.fixture(scope="session")
def kafka_cluster() -> Iterator[str]:
    """The local 3-node Kafka cluster (scripts/stack.sh cluster-up, ports 19092-19094,
    beside the shared broker on 9092); started here when it is down, and then stopped
    again at the end of the session. Yields its bootstrap servers."""
    import cluster

    started = False
    if not cluster.cluster_running():
        try:
            cluster.stack("cluster-up", timeout=600)
        except RuntimeError as exc:
            pytest.fail(f"could not start the 3-node Kafka cluster: {exc}", pytrace=False)
        started = True
    try:
        yield cluster.bootstrap()
    finally:
        if started:
            cluster.stack("cluster-down", timeout=300)
