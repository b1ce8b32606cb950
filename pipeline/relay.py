"""The changelog relay: publishes StockChanged and ReservationResult from the ledger.

Every SKU record in the ledger's changelog carries the effects of the batch that
wrote it (:mod:`pipeline.batch`). The relay consumes the changelog (committed
transactions only) in its own consumer group and publishes those effects, then
commits. ReservationResults of the saga's own commands (tagged ``reply_to``) go
to the internal order-line-results topic, the rest to reservation-results. By default
it runs in every worker (Kafka's group protocol spreads the changelog
partitions over them); with ``INVENTORY_RELAY_ENABLED=0`` on the workers it runs
as its own process instead, ``python -m pipeline.relay`` (any number of them,
same group), which takes its consume-decode-encode-produce work off the
deciding event loop.

Delivery is at-least-once: after a crash the relay re-publishes what it had
not committed, so ``inventory.stock-changes`` may hold a version twice (with
identical content) but never misses one that is in the changelog. Consumers
apply by version, which makes the duplicates harmless. The changelog is
compacted only after ``changelog_min_compaction_lag_ms``, which bounds how long
the relay may be down without missing versions.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer

from config.settings import Settings, settings
from pipeline import metrics
from pipeline.cli import prog
from pipeline.kafka.consuming import Output, Relay, lag, run_forever
from pipeline.kafka.topics import changelog_topic
from pipeline.logs import configure_logging
from schemas.codec import AvroCodec, codec_from_settings
from tables.orders import StoredSaga
from tables.stock import StoredStock, is_stock_key

log = logging.getLogger("inventory.relay")


class ChangelogRelay(Relay):
    """Consume the stock changelog, publish each record's effects, commit."""

    group = "relay"
    max_records = 200  # a SKU record carries up to a batch of effects: fewer per round

    def __init__(self, cfg: Settings, codec: AvroCodec) -> None:
        super().__init__(cfg, codec, changelog_topic(cfg))

    def outputs(self, key: bytes, value: bytes | None) -> list[Output]:
        """(topic, key, value, record name) to publish for one changelog record."""
        if value is None or not is_stock_key(key):
            return []
        stored = StoredStock.from_bytes(value)
        out: list[Output] = []
        for name, items in stored.effects.items():
            for item in items:
                if name == "ReservationResult":
                    okey = item["order_id"].encode()
                    # the saga's own commands are answered where only the saga reads
                    topic = (
                        self.cfg.line_results_topic
                        if item.pop("reply_to", "") == "saga"
                        else self.cfg.results_topic
                    )
                else:
                    topic, okey = self.cfg.stock_changes_topic, key
                out.append((topic, okey, self.codec.encode_trusted(name, item), name))
        return out

    def before_commit(self) -> None:
        kill_after = self.cfg.failpoint_relay_kill_after
        if kill_after and self.published >= kill_after:
            log.warning("failpoint: relay killed after %d records", self.published)
            os.kill(os.getpid(), signal.SIGKILL)  # published, not committed

    async def after_commit(self, consumer: AIOKafkaConsumer) -> None:
        metrics.RELAY_LAG.set(await lag(consumer))


class OrderRelay(Relay):
    """Consume the saga changelog, publish each record's OrderResults, commit."""

    group = "orders-relay"
    max_records = 2000

    def __init__(self, cfg: Settings, codec: AvroCodec) -> None:
        super().__init__(cfg, codec, changelog_topic(cfg, "orders"))

    def outputs(self, key: bytes, value: bytes | None) -> list[Output]:
        if value is None:
            return []
        stored = StoredSaga.from_bytes(value)
        return [
            (
                self.cfg.order_results_topic,
                item["order_id"].encode("utf-8"),
                self.codec.encode("OrderResult", item),
                "OrderResult",
            )
            for item in stored.effects
        ]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.relay`` / ``inventory-relay``: the relay alone, until stopped."""
    parser = argparse.ArgumentParser(
        prog=prog("pipeline.relay"),
        description="Publish StockChanged and ReservationResult from the ledger's changelog "
        "without a worker (set INVENTORY_RELAY_ENABLED=0 on the workers then). Any number "
        "may run: they share one consumer group. Configured by the INVENTORY_* variables; "
        "/metrics on INVENTORY_METRICS_PORT (0 = none).",
    )
    parser.parse_args(argv)
    configure_logging(settings.log_level)
    metrics.serve_standalone(settings.metrics_port, settings.web_host)
    asyncio.run(run_forever(ChangelogRelay(settings, codec_from_settings(settings)).run, "relay"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
