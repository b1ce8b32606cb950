"""The Faust runtime: the App, its topics, the input guard and the ledger's feed.

It imports no agent, view or timer: those import this module and register themselves
on ``app``; :mod:`pipeline.app` imports them all (that is the module the CLI loads).
``--datadir`` (a global option of ``faust``, before ``worker``) wins over
``INVENTORY_DATA_DIR``; the directory is created if missing.

The stock ledger is not a Faust table: :mod:`agents.ledger` keeps it in its own
RocksDB files and a transactional changelog (``{app_id}-stock-changelog``), fed in
batches by the consumer (:mod:`pipeline.kafka.feed`). Its local files are written
only after the changelog committed, so they are kept across a ``kill -9``.

The saga's Faust table is trusted only after a clean shutdown: Faust writes
RocksDB before the changelog acknowledges, so a worker that finds no
clean-shutdown marker wipes its Faust table files and restores them from their
changelog.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import faust
from faust.exceptions import AlreadyConfiguredWarning
from yarl import URL

from config.settings import UNSPECIFIED_HOSTS, Settings, settings
from pipeline.clients import confluent_config, faust_broker_kwargs
from pipeline.failpoints import drop_deliveries, parse_drops
from pipeline.kafka.feed import BatchFeed, feeding_transport
from pipeline.kafka.sequencing import InputGuard, confluent_offsets
from pipeline.kafka.sequencing import install as install_input_guard
from pipeline.kafka.topics import KafkaUnreachable, PartitionMismatch, ensure_topics
from pipeline.logs import faust_logging_config
from pipeline.metrics import install_faust_sensor
from tables.stock import OpenReservations

log = logging.getLogger("inventory.app")

CLEAN_MARKER = "clean-shutdown"


def advertise(conf: Any, cfg: Settings) -> None:
    """Set Faust's ``canonical_url`` (what this worker puts in the group's assignment
    metadata, where the others send its partitions' routed ``/stock`` queries) from
    ``INVENTORY_ADVERTISED_URL``, else from the host and port it binds.

    ``faust worker --web-port/--web-host`` reset ``canonical_url`` to
    ``http://{web_host}:{web_port}`` after the app is built, so this runs again when
    the app starts (before it joins the group).
    """
    url = cfg.advertised_url_for(conf.web_host, conf.web_port)
    if str(conf.canonical_url) != url:
        with warnings.catch_warnings():
            # on purpose, before the worker joins the group (nothing used the old value)
            warnings.simplefilter("ignore", AlreadyConfiguredWarning)
            conf.canonical_url = url
    if URL(url).host in UNSPECIFIED_HOSTS:
        log.warning(
            "advertising %s to the other workers, which they cannot reach: routed /stock "
            "queries for this worker's partitions will fail; set INVENTORY_ADVERTISED_URL",
            url,
        )


class InventoryApp(faust.App):
    """faust.App plus the start-up checks and the clean-shutdown marker."""

    _flushed_on_stop: bool = False

    def _new_transport(self) -> Any:
        # the consumer hands the ledger's input topics to the feed in batches
        return feeding_transport(self, ledger_feed)

    def _marker(self) -> Path:
        return Path(self.conf.datadir) / CLEAN_MARKER

    async def on_first_start(self) -> None:
        advertise(self.conf, settings)
        # Faust creates only the last level of the data dir (FileNotFoundError on a fresh clone)
        Path(self.conf.datadir).mkdir(parents=True, exist_ok=True)
        try:
            ensure_topics(settings)
        except PartitionMismatch as exc:
            log.critical("%s", exc)
            raise SystemExit(3) from exc
        except KafkaUnreachable as exc:  # wrong credentials, TLS trouble, broker down
            log.critical("%s", exc)
            raise SystemExit(2) from exc
        marker = self._marker()
        tabledir = Path(self.conf.tabledir)
        if marker.exists():
            marker.unlink()
        elif tabledir.exists():
            log.warning(
                "no clean-shutdown marker in %s: restoring tables from the changelog",
                self.conf.datadir,
            )
            shutil.rmtree(tabledir)
        await super().on_first_start()

    async def on_stop(self) -> None:
        await super().on_stop()  # stops the consumer, then flushes the producer
        self._flushed_on_stop = True

    async def on_shutdown(self) -> None:
        await super().on_shutdown()
        if self._flushed_on_stop and Path(self.conf.datadir).exists():
            self._marker().write_text("ok\n")


def table_options(cfg: Settings) -> dict[str, Any]:
    """Options of every RocksDB table: memory per partition DB from the settings."""
    mib = 1024 * 1024
    return {
        "driver": "rocksdict",
        "write_buffer_size": cfg.rocksdb_write_buffer_mb * mib,
        "max_write_buffer_number": cfg.rocksdb_max_write_buffers,
        "block_cache_size": cfg.rocksdb_block_cache_mb * mib,
    }


def _raw_topic(*names: str, acks: bool = True, guarded: bool = False) -> Any:
    """A topic of raw bytes; ``acks=False`` for agent inputs, which Faust never commits:
    ``guarded`` ones are committed and watched by :mod:`pipeline.kafka.sequencing` (the saga's),
    the ledger's by its transactions."""
    if guarded:
        input_guard.watch(*names)
    return app.topic(
        *names,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
        acks=acks,
    )


app = InventoryApp(
    settings.app_id,
    **faust_broker_kwargs(settings),
    store="rocksdb://",
    datadir=str(settings.data_dir),  # faust --datadir, else INVENTORY_DATA_DIR
    web_host=settings.web_host,
    web_bind=settings.web_host,  # Faust binds 0.0.0.0 unless told
    web_port=settings.web_port,
    # Faust's /table/{name}/... and /router/... views: off by default (INVENTORY_FAUST_WEB_ENDPOINTS)
    web_tables_enabled=settings.faust_web_endpoints,
    web_router_enabled=settings.faust_web_endpoints,
    # routed queries go here; set again at start (advertise): the CLI's --web-port resets it
    canonical_url=settings.advertised_url_for(),
    topic_partitions=settings.partitions,
    # the topics Faust creates itself (the saga table's changelog, the leader topic)
    topic_replication_factor=settings.replication_factor,
    table_standby_replicas=settings.table_standby_replicas,
    producer_acks=-1,
    broker_session_timeout=settings.session_timeout_s,
    broker_heartbeat_interval=settings.heartbeat_interval_s,
    producer_linger_ms=1,
    # the saga's and the sweepers' sends: a hot SKU's partition fills one request, not a
    # 16 KiB batch per round trip (Faust's default)
    producer_max_batch_size=1_000_000,
    # a worker that joins while a just-started broker does not list its topics yet
    # gets an empty assignment; the consumer rejoins when a metadata refresh shows
    # them, so refresh every 10 s instead of aiokafka's 5 min
    consumer_metadata_max_age_ms=10_000,
    key_serializer="raw",
    value_serializer="raw",
    # JSON logs at INVENTORY_LOG_LEVEL (the CLI's -l is ignored: Faust's spinner would reset it)
    logging_config=faust_logging_config(settings.log_level),
    Worker="pipeline.logs:JsonLoggingWorker",
)

# Faust's framework metrics into our registry (one /metrics page); before the app starts
install_faust_sensor(app)

# the ledger's input records, handed over in batches by the consumer (agents.ledger)
ledger_feed = BatchFeed(settings.input_topics, max_buffered=settings.feed_max_buffered)

# the saga's inputs are applied in offset order and committed by this guard, not by Faust
input_guard = InputGuard(
    app,
    confluent_offsets(confluent_config(settings), app.conf.id),  # Faust's group id
    commit_interval_s=settings.commit_interval_s,
)
install_input_guard(app, input_guard)

if settings.failpoint_drop_delivery:
    drops = parse_drops(settings.failpoint_drop_delivery)
    # before the consumer exists: it takes the conductor's callback when created
    app.topics.on_message = drop_deliveries(  # type: ignore[method-assign]
        app.topics.on_message, drops, settings.topic_prefix
    )
    ledger_feed.drop_once(drops, settings.topic_prefix)

orders_topic = _raw_topic(settings.orders_topic, acks=False)
returns_topic = _raw_topic(settings.returns_topic, acks=False)
restocks_topic = _raw_topic(settings.restocks_topic, acks=False)
dead_letters_topic = _raw_topic(settings.dead_letters_topic)
INPUT_TOPICS = {
    settings.orders_topic: orders_topic,
    settings.returns_topic: returns_topic,
    settings.restocks_topic: restocks_topic,
}

# open reservations of this worker's partitions, for the expiry sweeper (pipeline.expiry)
open_reservations = OpenReservations()
