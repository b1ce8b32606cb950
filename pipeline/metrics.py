"""Prometheus metrics of the worker. No per-SKU labels: SKUs are unbounded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

COMMANDS = Counter(
    "inventory_commands_total",
    "Commands decided, by command type, outcome and channel.",
    ["type", "outcome", "channel"],
    registry=REGISTRY,
)
REJECTIONS = Counter(
    "inventory_rejections_total",
    "Reservations refused for lack of stock.",
    ["channel"],
    registry=REGISTRY,
)
DECISION_SECONDS = Histogram(
    "inventory_decision_seconds",
    "Time to decide and store one command in the agent.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
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
REROUTED = Counter(
    "inventory_rerouted_total",
    "Input records found on a partition other than their key's, re-sent to the right one.",
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
    "StockChanged records handled by a projection sink, by target and result (applied|stale).",
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
