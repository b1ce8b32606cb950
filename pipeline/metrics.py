"""Prometheus metrics of the worker. No per-SKU labels: SKUs are unbounded."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from faust.sensors.prometheus import FaustMetrics
    from faust.types import AppT

REGISTRY = CollectorRegistry(auto_describe=True)

COMMANDS = Counter(
    "inventory_commands_total",
    "Commands decided, by command type, outcome and channel.",
    ["type", "outcome", "channel"],
    registry=REGISTRY,
)
CHANNEL_UNITS_RESERVED = Counter(
    "inventory_channel_units_reserved_total",
    "Units reserved per sales channel, by where they came from: the channel's allocation "
    "or the shared pool.",
    ["channel", "source"],
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "inventory_rejections_total",
    "Reservations refused for lack of stock.",
    ["channel"],
    registry=REGISTRY,
)
TRANSFER_UNITS_LOST = Counter(
    "inventory_transfer_units_lost_total",
    "Units shipped by transfers that did not arrive (a TransferReceived below the shipped "
    "qty); the ledger logs each one with its SKU and transfer.",
    registry=REGISTRY,
)
CUSTOMER_LIMIT_REJECTIONS = Counter(
    "inventory_customer_limit_rejections_total",
    "Reservations refused by a SKU's per-customer cap (CustomerLimitSet); not counted "
    "in inventory_rejections_total.",
    ["channel"],
    registry=REGISTRY,
)
DECISION_SECONDS = Histogram(
    "inventory_decision_seconds",
    "From a command's arrival at the worker to the commit of the batch that decided it.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "inventory_batch_commands",
    "Commands per ledger batch.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
    registry=REGISTRY,
)
BATCH_COMMIT_SECONDS = Histogram(
    "inventory_batch_commit_seconds",
    "Time to write and commit one ledger batch's Kafka transaction.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
    registry=REGISTRY,
)
BATCH_FOLD_SECONDS = Histogram(
    "inventory_batch_fold_seconds",
    "CPU time to decide one ledger batch (the fold, before its transaction).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
    registry=REGISTRY,
)
BATCH_ABORTS = Counter(
    "inventory_batch_aborts_total",
    "Ledger batch transactions aborted by the broker (the batch is retried).",
    registry=REGISTRY,
)
LEDGER_RESTARTS = Counter(
    "inventory_ledger_partition_restarts_total",
    "Times a ledger partition took ownership again after its producer was fenced or failed.",
    registry=REGISTRY,
)
COMMAND_AGE_SECONDS = Histogram(
    "inventory_command_age_seconds",
    "From a command's occurred_at to its decision (producer clock to worker clock).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "inventory_dead_letters_total",
    "Input records sent to the dead-letter topic, by reason.",
    ["reason"],
    registry=REGISTRY,
)
REDELIVERED = Counter(
    "inventory_redelivered_skipped_total",
    "Input records skipped because the table already holds their effect (Kafka redelivery).",
    ["topic"],
    registry=REGISTRY,
)
REGISTRY_WAITS = Counter(
    "inventory_schema_registry_waits_total",
    "Times a consumer waited for the schema registry (down or not answering) to read a "
    "record; it retries with backoff and never dead-letters the record for it.",
    registry=REGISTRY,
)


def registry_wait(exc: Exception, delay: float) -> None:
    """Count and log one wait for the schema registry (see retry_while_registry_down)."""
    REGISTRY_WAITS.inc()
    logging.getLogger("inventory.registry").warning(
        "schema registry unavailable (%s); retrying in %.1fs", exc, delay
    )


REROUTED = Counter(
    "inventory_rerouted_total",
    "Input records found on a partition other than their key's, re-sent to the right one.",
    ["topic"],
    registry=REGISTRY,
)
INPUT_GAPS = Counter(
    "inventory_input_gaps_total",
    "Input records Kafka never delivered to the agent: a forward jump in a partition's offsets "
    "(should stay 0: each one triggers a rewind, see pipeline/kafka/sequencing.py).",
    ["topic"],
    registry=REGISTRY,
)
INPUT_REWINDS = Counter(
    "inventory_input_rewinds_total",
    "Times the worker re-read an input partition from its next offset to fetch "
    "a record Faust had not delivered.",
    registry=REGISTRY,
)
INPUT_STALLS = Counter(
    "inventory_input_stalls_total",
    "Input partitions found applying nothing for a while with records waiting in the log "
    "(each one is rewound; see pipeline/kafka/sequencing.py).",
    ["topic"],
    registry=REGISTRY,
)
SHORTFALLS = Counter(
    "inventory_shortfalls_total",
    "Cycle counts that came in below the reserved units.",
    registry=REGISTRY,
)
LOW_STOCK = Counter(
    "inventory_low_stock_crossings_total",
    "Changes that moved available across the low-stock threshold, by direction (down|up).",
    ["direction"],
    registry=REGISTRY,
)
RESERVATIONS_PENDING = Gauge(
    "inventory_reservations_pending",
    "Open reservations in this worker's partitions (from the expiry sweeper's scan).",
    registry=REGISTRY,
)
RESERVATIONS_OVERDUE = Gauge(
    "inventory_reservations_overdue",
    "Open reservations past their expiry in this worker's partitions, awaiting release.",
    registry=REGISTRY,
)
EXPIRY_SENT = Counter(
    "inventory_expiry_commands_sent_total",
    "ExpireReservation commands sent by the expiry sweeper.",
    registry=REGISTRY,
)
RELAY_PUBLISHED = Counter(
    "inventory_relay_published_total",
    "Records the changelog relay published, by record type.",
    ["record"],
    registry=REGISTRY,
)
RELAY_LAG = Gauge(
    "inventory_relay_lag_records",
    "Changelog records not yet relayed (sum over partitions).",
    registry=REGISTRY,
)
RECOVERY_COMPLETE = Gauge(
    "inventory_table_recovery_complete",
    "1 when table recovery has finished.",
    registry=REGISTRY,
)

SINK_APPLIED = Counter(
    "inventory_sink_changes_total",
    "StockChanged records handled by a projection sink, by target and result "
    "(applied|stale|coalesced: an older version of a batch that held a newer one).",
    ["target", "result"],
    registry=REGISTRY,
)
SINK_ERRORS = Counter(
    "inventory_sink_errors_total",
    "Failed attempts to write a batch to a projection target.",
    ["target"],
    registry=REGISTRY,
)
SINK_STATE = Gauge(
    "inventory_sink_degraded",
    "1 while a projection target is failing (the sink is paused and retrying), else 0.",
    ["target"],
    registry=REGISTRY,
)
SINK_REPLAYS = Counter(
    "inventory_sink_replays_total",
    "Times a sink found its target had lost data (restarted empty, flushed, index "
    "deleted) and re-applied the changelog from the beginning.",
    ["target"],
    registry=REGISTRY,
)
SINK_REPLAYING = Gauge(
    "inventory_sink_replaying",
    "1 while a sink re-applies the changelog into a target that lost data, else 0.",
    ["target"],
    registry=REGISTRY,
)
SINK_LAG = Gauge(
    "inventory_sink_lag_records",
    "stock-changes records not yet applied to a target (sum over this worker's partitions).",
    ["target"],
    registry=REGISTRY,
)
SINK_FRESHNESS = Histogram(
    "inventory_sink_freshness_seconds",
    "From a change's occurred_at (the command's time) to its write at the target.",
    ["target"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)


# --- Faust's own framework metrics --------------------------------------------
#
# Faust's Prometheus sensor (faust/sensors/prometheus.py) records messages in and
# out, events per stream, table operations, sends, commit/send/assign/rebalance
# latencies (milliseconds), HTTP status codes and per topic/partition offsets.
# Its labels are topic, partition, table, stream, operation, status_code and
# metric: bounded, never a SKU. The prefix is fixed rather than the app id
# (Faust's default), so the dashboard and alerts name the same series in every
# deployment: faust_messages_received_total, faust_topic_partition_end_offset, ...
# No name starts with "inventory_", so they cannot collide with the ones above.

FAUST_PREFIX = "faust"

_faust_metrics: FaustMetrics | None = None


def faust_metrics() -> FaustMetrics:
    """Faust's sensor metrics, created in REGISTRY on the first call and reused after."""
    global _faust_metrics
    if _faust_metrics is None:
        from faust.sensors.prometheus import FaustMetrics

        _faust_metrics = FaustMetrics.create(REGISTRY, FAUST_PREFIX)
    return _faust_metrics


def install_faust_sensor(app: AppT) -> None:
    """Make ``app`` record Faust's framework metrics into REGISTRY (served at /metrics).

    Only the monitor half of Faust's ``setup_prometheus_sensors`` is used: that
    helper would also add a second ``/metrics`` page over ours. The
    ``PrometheusMonitor`` replaces the app's default ``Monitor`` (it is a
    subclass, so Faust's own statistics keep working). Call it before the app
    starts: ``App.on_init_dependencies`` adds ``app.monitor`` to ``app.sensors``,
    and a monitor swapped in later would never be called. Calling it again is a
    no-op; raises RuntimeError if the app already uses another monitor sensor.
    """
    from faust.sensors.prometheus import PrometheusMonitor

    # the private attribute: reading ``app.monitor`` would create the default one
    current = getattr(app, "_monitor", None)
    if isinstance(current, PrometheusMonitor):
        return
    if current is not None and current in app.sensors:
        raise RuntimeError("install_faust_sensor(app) must run before the app starts")
    app.monitor = PrometheusMonitor(metrics=faust_metrics())


def serve_standalone(port: int, host: str) -> None:
    """``/metrics`` of REGISTRY on ``host:port`` for a process without a Faust web server
    (``python -m pipeline.relay`` / ``python -m pipeline.sinks``); no-op for port 0."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=REGISTRY)


BATCH_CUTS = Counter(
    "inventory_batch_cuts_total",
    "Ledger batches ended early so that a SKU's changelog record stays under the record size.",
    registry=REGISTRY,
)
EVENT_IDS_PRUNED = Counter(
    "inventory_event_ids_pruned_total",
    "Applied event ids dropped after INVENTORY_EVENT_ID_RETENTION_MS.",
    registry=REGISTRY,
)
OFFSET_REGRESSIONS = Counter(
    "inventory_input_offset_regressions_total",
    "Input partitions found ending below the next offset to apply (topic re-created, "
    "unclean leader election): the partition halts.",
    ["topic"],
    registry=REGISTRY,
)
LEDGER_HALTED = Gauge(
    "inventory_ledger_partition_halted",
    "1 while a ledger partition is halted because its input offsets went backwards.",
    ["partition"],
    registry=REGISTRY,
)
RESERVATIONS_PRUNED = Counter(
    "inventory_reservations_pruned_total",
    "Closed reservations dropped after INVENTORY_RESERVATION_RETENTION_MS.",
    registry=REGISTRY,
)


# --- the invariant auditor (python -m pipeline.auditor) -------------------------
#
# Its own registry: the auditor is its own process with its own /metrics port, and a
# worker's page must not show a violations counter that nothing there increments.

AUDITOR_REGISTRY = CollectorRegistry(auto_describe=True)

INVARIANTS = ("version_chain", "conservation", "changelog_agreement", "projection_agreement")
"""The auditor's ``invariant`` label values (DESIGN.md s.4): I4 versions on stock-changes;
I1/I2 each StockChanged's counts and their change against its cause; the latest published
version and counts against the ledger's changelog; I4/I5 Redis and search against it."""

INVARIANT_VIOLATIONS = Counter(
    "inventory_invariant_violations",
    "Invariant violations the auditor found, by invariant (each one is logged with the SKU "
    "and the evidence).",
    ["invariant"],
    registry=AUDITOR_REGISTRY,
)
AUDITOR_CHECKS = Counter(
    "inventory_auditor_checks",
    "SKU checks the auditor made, by invariant.",
    ["invariant"],
    registry=AUDITOR_REGISTRY,
)
AUDITOR_LAST_CHECK = Gauge(
    "inventory_auditor_last_check_timestamp_seconds",
    "Unix time of the auditor's last check, by invariant.",
    ["invariant"],
    registry=AUDITOR_REGISTRY,
)
AUDITOR_SKUS = Gauge(
    "inventory_auditor_skus_tracked",
    "SKUs the auditor remembers (at most INVENTORY_AUDITOR_MAX_SKUS).",
    registry=AUDITOR_REGISTRY,
)
AUDITOR_ERRORS = Counter(
    "inventory_auditor_errors",
    "Failed reads of the auditor (kafka, redis, search); that round's check is skipped.",
    ["source"],
    registry=AUDITOR_REGISTRY,
)
AUDITOR_UNREADABLE = Counter(
    "inventory_auditor_unreadable_records",
    "Records the auditor could not read, by source (stock_changes: not a StockChanged of "
    "any released schema version; changelog: not a ledger record). Every shop reading the "
    "topic fails on them too. Alert: InventoryUnreadableRecords.",
    ["source"],
    registry=AUDITOR_REGISTRY,
)
for _source in ("stock_changes", "changelog"):
    AUDITOR_UNREADABLE.labels(_source)
for _invariant in INVARIANTS:
    INVARIANT_VIOLATIONS.labels(_invariant)
    AUDITOR_CHECKS.labels(_invariant)
    AUDITOR_LAST_CHECK.labels(_invariant)
for _source in ("kafka", "redis", "search"):
    AUDITOR_ERRORS.labels(_source)


# --- the checkout saga (agents/orders.py) -----------------------------------

ORDER_OUTCOMES = Counter(
    "inventory_order_outcomes_total",
    "Order saga answers published, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
SAGA_RESENT = Counter(
    "inventory_saga_resent_total",
    "Ledger commands re-sent by the saga sweeper for sagas that made no progress.",
    registry=REGISTRY,
)
SAGA_EXPIRY_SENT = Counter(
    "inventory_saga_expiry_sent_total",
    "Order expiry commands sent by the saga sweeper.",
    registry=REGISTRY,
)
SAGAS_PRUNED = Counter(
    "inventory_sagas_pruned_total",
    "Finished checkout sagas deleted (tombstoned) after INVENTORY_ORDER_RETENTION_MS.",
    registry=REGISTRY,
)
SAGA_PRUNE_SENT = Counter(
    "inventory_saga_prune_sent_total",
    "Prune commands sent by the saga sweeper for finished sagas past their retention.",
    registry=REGISTRY,
)
SAGAS_OPEN = Gauge(
    "inventory_sagas_open",
    "Orders of this worker's partitions not settled (reserving, committing or releasing).",
    registry=REGISTRY,
)
