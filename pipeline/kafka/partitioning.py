"""Kafka's default key partitioner (murmur2), the one the table and topics rely on."""

from __future__ import annotations

from aiokafka.partitioner import murmur2


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Java clients and aiokafka choose for ``key``."""
    return (int(murmur2(key)) & 0x7FFFFFFF) % partitions
