"""The broker queries' error paths (a fake librdkafka consumer: the real one only fails
this way after a broker dies, which tests/integration/test_cluster_leader_kill.py does)."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from config.settings import Settings
from pipeline.clients import confluent_config, watermarks


class FlakyMetadata:
    """get_watermark_offsets fails with ``error`` until list_topics refreshed the topic."""

    def __init__(self, error: int) -> None:
        self.error = error
        self.refreshed: list[str] = []
        self.asked = 0

    def get_watermark_offsets(self, tp: Any, timeout: float, cached: bool) -> tuple[int, int]:
        self.asked += 1
        assert cached is False
        if not self.refreshed:
            raise KafkaException(KafkaError(self.error))
        return (3, 42)

    def list_topics(self, topic: str, timeout: float) -> None:
        self.refreshed.append(topic)


def test_a_lost_partition_leader_refreshes_the_metadata_and_asks_again() -> None:
    consumer = FlakyMetadata(KafkaError._UNKNOWN_PARTITION)
    assert watermarks(consumer, "t", 1, 2.0) == (3, 42)
    assert consumer.refreshed == ["t"] and consumer.asked == 2


def test_other_errors_are_raised_without_a_refresh() -> None:
    consumer = FlakyMetadata(KafkaError._TIMED_OUT)
    with pytest.raises(KafkaException):
        watermarks(consumer, "t", 1, 2.0)
    assert consumer.refreshed == [] and consumer.asked == 1


def test_librdkafka_clients_refresh_topic_metadata_every_10_s() -> None:
    assert confluent_config(Settings())["topic.metadata.refresh.interval.ms"] == 10_000
