"""The one place that reads the environment.

Every setting has a local default that matches the local stack started by
``make stack-up``; override with the ``INVENTORY_*`` variables below. Nothing
else in the project reads ``os.environ``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path


class SettingsError(ValueError):
    """A setting the pipeline cannot run with; the message names the variable and what it accepts."""


def _raw(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    return None if raw is None or raw.strip() == "" else raw.strip()


def _range_text(kind: str, minimum: float | None, maximum: float | None, above: bool) -> str:
    low = "" if minimum is None else (f"> {minimum}" if above else f">= {minimum}")
    if maximum is not None:
        return f"{kind} from {minimum} to {maximum}" if low else f"{kind} <= {maximum}"
    return f"{kind} {low}".rstrip()


def _int(
    env: Mapping[str, str],
    name: str,
    default: int,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """``name`` as an integer in ``minimum..maximum`` (inclusive), ``default`` when unset."""
    raw = _raw(env, name)
    if raw is None:
        return default
    accepted = _range_text("an integer", minimum, maximum, above=False)
    try:
        value = int(raw)
    except ValueError:  # a typo in deployment config must be loud
        raise SettingsError(f"{name}={raw!r}: must be {accepted}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise SettingsError(f"{name}={raw!r}: must be {accepted}")
    return value


def _float(
    env: Mapping[str, str],
    name: str,
    default: float,
    *,
    above: float | None = None,
    minimum: float | None = None,
) -> float:
    """``name`` as a finite number ``> above`` (or ``>= minimum``), ``default`` when unset."""
    raw = _raw(env, name)
    if raw is None:
        return default
    low = above if above is not None else minimum
    accepted = _range_text("a number", low, None, above=above is not None)
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: must be {accepted}") from None
    if (
        not math.isfinite(value)
        or (above is not None and value <= above)
        or (minimum is not None and value < minimum)
    ):
        raise SettingsError(f"{name}={raw!r}: must be {accepted}")
    return value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """``name`` as a boolean: 1/true/yes/on or 0/false/no/off in any case; nothing else."""
    raw = _raw(env, name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise SettingsError(
        f"{name}={raw!r}: must be one of {', '.join(_TRUE)} (on) or {', '.join(_FALSE)} (off),"
        " in any case"
    )


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    """``name`` as one of ``choices`` (compared in upper case), ``default`` when unset."""
    raw = _raw(env, name)
    if raw is None:
        return default
    if raw.upper() not in choices:
        raise SettingsError(f"{name}={raw!r}: must be one of {', '.join(choices)}")
    return raw.upper()


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name)
    return default if raw is None or raw == "" else raw


def _names(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """``name`` as a comma-separated list of 1..64-character names (at most 100)."""
    raw = _raw(env, name)
    if raw is None:
        return default
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    if len(names) > 100 or any(len(n) > 64 for n in names):
        raise SettingsError(f"{name}: at most 100 names of at most 64 characters each")
    return names


def _advertised_url(env: Mapping[str, str], name: str) -> str:
    """``name`` as ``http(s)://host:port`` other workers can reach; empty when unset.

    Only the host and port are used (Faust re-sends a routed request there), so a
    path, query, fragment or credentials are refused, and so is an address that
    means "every interface" (0.0.0.0, ::), which no other worker can connect to.
    """
    from urllib.parse import urlsplit

    raw = _raw(env, name)
    if raw is None:
        return ""
    shown = redact_url(raw)
    accepted = "an http:// or https:// URL with a host other workers can reach and a port"
    try:
        url = urlsplit(raw)
        port = url.port
    except ValueError:
        raise SettingsError(f"{name}={shown!r}: must be {accepted}") from None
    if (
        url.scheme not in ("http", "https")
        or not url.hostname
        or port is None
        or port < 1
        or url.path not in ("", "/")
        or url.query
        or url.fragment
        or url.username is not None
    ):
        raise SettingsError(f"{name}={shown!r}: must be {accepted}")
    if url.hostname in UNSPECIFIED_HOSTS:
        raise SettingsError(
            f"{name}={shown!r}: {url.hostname} is where a server listens, not an address "
            f"other workers can reach; must be {accepted}"
        )
    return raw.rstrip("/")


def _data_dir(env: Mapping[str, str], default: Path) -> Path:
    """Faust's ``--datadir`` first, then ``INVENTORY_DATA_DIR``, then ``default``.

    ``faust --datadir D ...`` puts D in ``FAUST_DATADIR`` (and ``F_DATADIR``) before
    it imports the app, which is Faust's only way to hand the option to an app; an
    app that passes its own ``datadir`` would override it. Faust expands
    ``{conf.id}``/``{conf.name}`` in the path later (``app.conf.datadir``).
    """
    for name in ("FAUST_DATADIR", "F_DATADIR"):
        if env.get(name):
            return Path(env[name])
    return Path(_str(env, "INVENTORY_DATA_DIR", str(default)))


KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
# the mechanisms a username and password are enough for (every client gets those two)
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")  # as logging takes them
PORT_MAX = 65535
AVRO_INT_MAX = 2**31 - 1  # quantities travel as Avro ints (32-bit)
# bind addresses meaning "every interface": a server listens there, nobody connects there
UNSPECIFIED_HOSTS = ("0.0.0.0", "::", "[::]")
# librdkafka's smallest message.max.bytes
MIN_RECORD_BYTES = 1000


class Secret(str):
    """A string that never shows itself in repr, str formatting of settings, or logs.

    Use :meth:`reveal` where a client library needs the value.
    """

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"

    def __str__(self) -> str:
        return "***" if self else ""

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def reveal(self) -> str:
        return self[:]  # slicing a str subclass gives a plain str with the content


def _secret(env: Mapping[str, str], name: str) -> Secret:
    """``NAME`` from the environment, or the content of the file named by ``NAME_FILE``."""
    value = env.get(name, "")
    path = env.get(f"{name}_FILE", "")
    if path:
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise SettingsError(f"{name}_FILE={path} cannot be read: {exc.strerror}") from None
    return Secret(value)


@dataclass(frozen=True)
class Settings:
    """Runtime settings; build with :meth:`from_env`."""

    app_id: str = "inventory"
    kafka_bootstrap: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    opensearch_url: str = "http://127.0.0.1:9200"
    schema_registry_url: str = ""
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    # the URL this worker advertises to the others for routed /stock queries (Faust's
    # canonical_url, in the group assignment); empty = http://{web_host}:{web_port} with the
    # port it really serves on (see advertised_url_for)
    advertised_url: str = ""
    # RocksDB files of this worker: faust --datadir D (FAUST_DATADIR), else INVENTORY_DATA_DIR;
    # read app.conf.datadir in a worker (Faust expands {conf.id} in it)
    data_dir: Path = field(default_factory=lambda: Path(".data/worker"))
    partitions: int = 8
    # replicas of every topic the pipeline creates, and the fewest in sync for a write
    # (acks=all) to succeed; 1/1 on the single local broker, e.g. 3/2 on a real cluster
    replication_factor: int = 1
    min_insync_replicas: int = 1
    # Faust's standby replicas of its own tables (the saga's orders table): other workers
    # keep a warm copy of a partition's RocksDB, so a failover restores only the tail.
    # Not the ledger's store (agents.ledger: a new owner replays the changelog from where
    # its own RocksDB stands). 0 locally (one worker), e.g. 1 on a real cluster
    table_standby_replicas: int = 0
    topic_prefix: str = "inventory."
    log_level: str = "INFO"
    # the channel label values metrics keep (producers choose channels: any other one is
    # counted as "other", so a producer cannot grow the metrics without bound)
    metric_channels: tuple[str, ...] = (
        "web", "mobile", "app", "marketplace", "store", "pos", "system", "saga"
    )  # fmt: skip
    # input validation
    max_qty: int = 100_000
    max_sku_len: int = 64
    # how many event ids of non-order commands each SKU remembers for dedupe
    dedupe_window: int = 256
    # how long a stock command's event id is remembered (re-sends within it are duplicates);
    # 0: only the SKU record's window of the last dedupe_window ids
    event_id_retention_ms: int = 7 * 24 * 3600 * 1000
    reservation_retention_ms: int = 7 * 24 * 3600 * 1000
    # how long a finished checkout saga is kept after it finished (0 = forever)
    order_retention_ms: int = 7 * 24 * 3600 * 1000
    default_ttl_ms: int = 15 * 60 * 1000
    # available at or below this emits LowStockCrossed (-1 = off)
    low_stock_threshold: int = 5
    # the order in which a reserve that names no location looks at a SKU's locations
    # (the listed ones first, in this order, then every other by name); empty = by name
    location_priority: tuple[str, ...] = ()
    # checkout orders (the saga): ledger holds outlive the order by this grace, so the saga
    # and not the ledger decides an order's expiry; re-send unanswered commands after
    order_grace_ms: int = 60_000
    saga_resend_after_ms: int = 3_000
    max_order_lines: int = 100
    # consumer group session: how long a killed worker's partitions stay orphaned
    session_timeout_s: float = 10.0
    expiry_scan_interval_s: float = 1.0
    # how often the sweeper re-reads every reservation from the table (a backstop:
    # between these it checks the open reservations the agent noted)
    expiry_full_scan_s: float = 300.0
    # how often the saga's input offsets are committed (after a producer flush;
    # pipeline.kafka.sequencing); the ledger commits its inputs in each batch's transaction
    commit_interval_s: float = 1.0
    # the ledger's batches (agents.ledger): records per batch (also the most commands one
    # SKU record carries the effects of), the transaction timeout after which the broker
    # aborts a dead worker's open batch, the largest record the producers write, and how
    # long a partition may apply nothing while its log holds records before it re-reads
    ledger_batch_max: int = 500
    transaction_timeout_s: float = 20.0
    max_record_bytes: int = 1_000_000
    ledger_stall_after_s: float = 3.0
    feed_max_buffered: int = 20_000
    # RocksDB memory per table partition (each partition is its own DB): memtables
    # (write buffers) and block cache; Faust's defaults are 64 MiB x 3 memtables
    rocksdb_write_buffer_mb: int = 8
    rocksdb_max_write_buffers: int = 2
    rocksdb_block_cache_mb: int = 8
    # tests only: records whose first delivery to the agents is dropped (pipeline.failpoints)
    failpoint_drop_delivery: str = ""
    # tests only: a relay process SIGKILLs itself once it has published this many
    # records, after sending a batch and before committing it (0 = off)
    failpoint_relay_kill_after: int = 0
    # how long the changelog keeps superseded versions, so the relay that
    # derives StockChanged/ReservationResult from it never misses one
    changelog_min_compaction_lag_ms: int = 7 * 24 * 3600 * 1000
    # security: Kafka SASL/SCRAM over TLS, Redis password/ACL user, OpenSearch basic auth + TLS
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    kafka_sasl_mechanism: str = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: Secret = field(default_factory=Secret, repr=False)
    kafka_ssl_cafile: str = ""
    redis_username: str = ""
    redis_password: Secret = field(default_factory=Secret, repr=False)
    opensearch_username: str = ""
    opensearch_password: Secret = field(default_factory=Secret, repr=False)
    opensearch_ca_file: str = ""
    # projections (Redis hash per SKU + pub/sub channel; OpenSearch index)
    redis_key_prefix: str = "inventory:"
    search_index: str = "inventory-stock"
    sink_enabled: bool = True
    # publish StockChanged/ReservationResult from the changelog inside each worker;
    # 0 = run it as its own process instead (python -m pipeline.relay)
    relay_enabled: bool = True
    # Faust's own /table and /router web endpoints (they show any table's values and the
    # partition assignment to whoever reaches the port): off unless asked for
    faust_web_endpoints: bool = False
    # /metrics port of a standalone relay or sinks process (0 = none)
    metrics_port: int = 0
    # the invariant auditor (python -m pipeline.auditor): its /metrics port, how long a
    # disagreement may last before it counts (in-flight changes), how often it samples
    # projections and how many SKUs each time, the most SKUs it remembers (least recently
    # changed are forgotten first) and where it starts reading stock-changes
    auditor_metrics_port: int = 6070
    auditor_grace_s: float = 10.0
    auditor_interval_s: float = 1.0
    auditor_sample_skus: int = 100
    auditor_max_skus: int = 100_000
    auditor_from: str = "EARLIEST"  # EARLIEST | LATEST
    sink_batch_size: int = 500
    sink_max_backoff_s: float = 30.0
    sink_check_interval_s: float = 5.0
    # open /live/stock streams per worker; past it a new one is answered 503
    live_max_connections: int = 1000
    # retention of the non-compacted audit topic inventory.stock-changes (-1 = forever)
    stock_changes_retention_ms: int = -1
    # the synchronous reserve API (pipeline.web.reserve_api): how long a request waits for the
    # ledger's or the saga's answer before it is answered 202, and the largest body it reads
    reserve_api_timeout_ms: int = 2000
    reserve_api_max_body_bytes: int = 65536

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        d = cls()
        replication_factor = _int(e, "INVENTORY_REPLICATION_FACTOR", d.replication_factor, 1)
        min_insync_replicas = _int(e, "INVENTORY_MIN_INSYNC_REPLICAS", d.min_insync_replicas, 1)
        if min_insync_replicas > replication_factor:  # every acks=all write would fail
            raise SettingsError(
                f"INVENTORY_MIN_INSYNC_REPLICAS={min_insync_replicas}: must be at most "
                f"INVENTORY_REPLICATION_FACTOR ({replication_factor}), or no write succeeds"
            )
        return cls(
            app_id=_str(e, "INVENTORY_APP_ID", d.app_id),
            kafka_bootstrap=_str(e, "INVENTORY_KAFKA_BOOTSTRAP", d.kafka_bootstrap),
            redis_url=_str(e, "INVENTORY_REDIS_URL", d.redis_url),
            opensearch_url=_str(e, "INVENTORY_OPENSEARCH_URL", d.opensearch_url),
            schema_registry_url=_str(e, "INVENTORY_SCHEMA_REGISTRY_URL", ""),
            web_host=_str(e, "INVENTORY_WEB_HOST", d.web_host),
            web_port=_int(e, "INVENTORY_WEB_PORT", d.web_port, 1, PORT_MAX),
            advertised_url=_advertised_url(e, "INVENTORY_ADVERTISED_URL"),
            data_dir=_data_dir(e, d.data_dir),
            partitions=_int(e, "INVENTORY_PARTITIONS", d.partitions, 1),
            replication_factor=replication_factor,
            min_insync_replicas=min_insync_replicas,
            table_standby_replicas=_int(
                e, "INVENTORY_TABLE_STANDBY_REPLICAS", d.table_standby_replicas, 0
            ),
            topic_prefix=_str(e, "INVENTORY_TOPIC_PREFIX", d.topic_prefix),
            log_level=_choice(e, "INVENTORY_LOG_LEVEL", d.log_level, LOG_LEVELS),
            metric_channels=_names(e, "INVENTORY_METRIC_CHANNELS", d.metric_channels),
            max_qty=_int(e, "INVENTORY_MAX_QTY", d.max_qty, 1, AVRO_INT_MAX),
            max_sku_len=_int(e, "INVENTORY_MAX_SKU_LEN", d.max_sku_len, 1),
            dedupe_window=_int(e, "INVENTORY_DEDUPE_WINDOW", d.dedupe_window, 0),
            event_id_retention_ms=_int(
                e, "INVENTORY_EVENT_ID_RETENTION_MS", d.event_id_retention_ms, 0
            ),
            reservation_retention_ms=_int(
                e, "INVENTORY_RESERVATION_RETENTION_MS", d.reservation_retention_ms, 0
            ),
            order_retention_ms=_int(e, "INVENTORY_ORDER_RETENTION_MS", d.order_retention_ms, 0),
            default_ttl_ms=_int(e, "INVENTORY_DEFAULT_TTL_MS", d.default_ttl_ms, 1),
            low_stock_threshold=_int(e, "INVENTORY_LOW_STOCK_THRESHOLD", d.low_stock_threshold, -1),
            location_priority=_names(e, "INVENTORY_LOCATION_PRIORITY", d.location_priority),
            order_grace_ms=_int(e, "INVENTORY_ORDER_GRACE_MS", d.order_grace_ms, 0),
            saga_resend_after_ms=_int(
                e, "INVENTORY_SAGA_RESEND_AFTER_MS", d.saga_resend_after_ms, 1
            ),
            max_order_lines=_int(e, "INVENTORY_MAX_ORDER_LINES", d.max_order_lines, 1),
            session_timeout_s=_float(
                e, "INVENTORY_SESSION_TIMEOUT_S", d.session_timeout_s, above=0
            ),
            expiry_scan_interval_s=_float(
                e, "INVENTORY_EXPIRY_SCAN_INTERVAL_S", d.expiry_scan_interval_s, above=0
            ),
            expiry_full_scan_s=_float(
                e, "INVENTORY_EXPIRY_FULL_SCAN_S", d.expiry_full_scan_s, above=0
            ),
            commit_interval_s=_float(
                e, "INVENTORY_COMMIT_INTERVAL_S", d.commit_interval_s, above=0
            ),
            ledger_batch_max=_int(e, "INVENTORY_LEDGER_BATCH_MAX", d.ledger_batch_max, 1),
            transaction_timeout_s=_float(
                e, "INVENTORY_TRANSACTION_TIMEOUT_S", d.transaction_timeout_s, above=0
            ),
            max_record_bytes=_int(
                e, "INVENTORY_MAX_RECORD_BYTES", d.max_record_bytes, MIN_RECORD_BYTES
            ),
            ledger_stall_after_s=_float(
                e, "INVENTORY_LEDGER_STALL_AFTER_S", d.ledger_stall_after_s, above=0
            ),
            feed_max_buffered=_int(e, "INVENTORY_FEED_MAX_BUFFERED", d.feed_max_buffered, 1),
            rocksdb_write_buffer_mb=_int(
                e, "INVENTORY_ROCKSDB_WRITE_BUFFER_MB", d.rocksdb_write_buffer_mb, 1
            ),
            rocksdb_max_write_buffers=_int(
                e, "INVENTORY_ROCKSDB_MAX_WRITE_BUFFERS", d.rocksdb_max_write_buffers, 1
            ),
            rocksdb_block_cache_mb=_int(
                e, "INVENTORY_ROCKSDB_BLOCK_CACHE_MB", d.rocksdb_block_cache_mb, 1
            ),
            failpoint_drop_delivery=e.get("INVENTORY_FAILPOINT_DROP_DELIVERY", ""),
            failpoint_relay_kill_after=_int(e, "INVENTORY_FAILPOINT_RELAY_KILL_AFTER", 0, 0),
            changelog_min_compaction_lag_ms=_int(
                e,
                "INVENTORY_CHANGELOG_MIN_COMPACTION_LAG_MS",
                d.changelog_min_compaction_lag_ms,
                0,
            ),
            kafka_security_protocol=_choice(
                e,
                "INVENTORY_KAFKA_SECURITY_PROTOCOL",
                d.kafka_security_protocol,
                KAFKA_SECURITY_PROTOCOLS,
            ),
            kafka_sasl_mechanism=_choice(
                e, "INVENTORY_KAFKA_SASL_MECHANISM", d.kafka_sasl_mechanism, KAFKA_SASL_MECHANISMS
            ),
            kafka_sasl_username=_str(e, "INVENTORY_KAFKA_SASL_USERNAME", ""),
            kafka_sasl_password=_secret(e, "INVENTORY_KAFKA_SASL_PASSWORD"),
            kafka_ssl_cafile=_str(e, "INVENTORY_KAFKA_SSL_CAFILE", ""),
            redis_username=_str(e, "INVENTORY_REDIS_USERNAME", ""),
            redis_password=_secret(e, "INVENTORY_REDIS_PASSWORD"),
            opensearch_username=_str(e, "INVENTORY_OPENSEARCH_USERNAME", ""),
            opensearch_password=_secret(e, "INVENTORY_OPENSEARCH_PASSWORD"),
            opensearch_ca_file=_str(e, "INVENTORY_OPENSEARCH_CA_FILE", ""),
            redis_key_prefix=_str(e, "INVENTORY_REDIS_KEY_PREFIX", d.redis_key_prefix),
            search_index=_str(e, "INVENTORY_SEARCH_INDEX", d.search_index),
            sink_enabled=_bool(e, "INVENTORY_SINK_ENABLED", d.sink_enabled),
            relay_enabled=_bool(e, "INVENTORY_RELAY_ENABLED", d.relay_enabled),
            faust_web_endpoints=_bool(e, "INVENTORY_FAUST_WEB_ENDPOINTS", d.faust_web_endpoints),
            metrics_port=_int(e, "INVENTORY_METRICS_PORT", d.metrics_port, 0, PORT_MAX),
            auditor_metrics_port=_int(
                e, "INVENTORY_AUDITOR_METRICS_PORT", d.auditor_metrics_port, 1, PORT_MAX
            ),
            auditor_grace_s=_float(e, "INVENTORY_AUDITOR_GRACE_S", d.auditor_grace_s, above=0),
            auditor_interval_s=_float(
                e, "INVENTORY_AUDITOR_INTERVAL_S", d.auditor_interval_s, above=0
            ),
            auditor_sample_skus=_int(e, "INVENTORY_AUDITOR_SAMPLE_SKUS", d.auditor_sample_skus, 1),
            auditor_max_skus=_int(e, "INVENTORY_AUDITOR_MAX_SKUS", d.auditor_max_skus, 1),
            auditor_from=_choice(
                e, "INVENTORY_AUDITOR_FROM", d.auditor_from, ("EARLIEST", "LATEST")
            ),
            sink_batch_size=_int(e, "INVENTORY_SINK_BATCH_SIZE", d.sink_batch_size, 1),
            live_max_connections=_int(
                e, "INVENTORY_LIVE_MAX_CONNECTIONS", d.live_max_connections, 1
            ),
            sink_check_interval_s=_float(
                e, "INVENTORY_SINK_CHECK_INTERVAL_S", d.sink_check_interval_s, above=0
            ),
            sink_max_backoff_s=_float(
                e, "INVENTORY_SINK_MAX_BACKOFF_S", d.sink_max_backoff_s, above=0
            ),
            stock_changes_retention_ms=_int(
                e, "INVENTORY_STOCK_CHANGES_RETENTION_MS", d.stock_changes_retention_ms, -1
            ),
            reserve_api_timeout_ms=_int(
                e, "INVENTORY_RESERVE_API_TIMEOUT_MS", d.reserve_api_timeout_ms, 1, 600_000
            ),
            reserve_api_max_body_bytes=_int(
                e, "INVENTORY_RESERVE_API_MAX_BODY_BYTES", d.reserve_api_max_body_bytes, 1024
            ),
        )

    def advertised_url_for(self, web_host: str | None = None, web_port: int | None = None) -> str:
        """The URL other workers send this worker's routed queries to.

        ``INVENTORY_ADVERTISED_URL`` when set, else ``http://{web_host}:{web_port}`` of
        the address the worker binds (Faust's default; ``faust worker --web-port`` and
        ``--web-host`` win over the settings), which is unreachable from elsewhere when
        it binds every interface.
        """
        if self.advertised_url:
            return self.advertised_url
        host = self.web_host if web_host is None else web_host
        port = self.web_port if web_port is None else web_port
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # topic names -------------------------------------------------------
    def redis_stock_key(self, sku: str) -> str:
        """The Redis hash of one SKU's projected stock."""
        return f"{self.redis_key_prefix}stock:{sku}"

    @property
    def redis_channel(self) -> str:
        """The Redis pub/sub channel every applied change is published on (JSON)."""
        return f"{self.redis_key_prefix}stock-changes"

    @property
    def heartbeat_interval_s(self) -> float:
        return min(3.0, self.session_timeout_s / 3)

    @property
    def orders_topic(self) -> str:
        return f"{self.topic_prefix}orders"

    @property
    def returns_topic(self) -> str:
        return f"{self.topic_prefix}returns"

    @property
    def restocks_topic(self) -> str:
        return f"{self.topic_prefix}restocks"

    @property
    def stock_changes_topic(self) -> str:
        return f"{self.topic_prefix}stock-changes"

    @property
    def results_topic(self) -> str:
        return f"{self.topic_prefix}reservation-results"

    @property
    def dead_letters_topic(self) -> str:
        return f"{self.topic_prefix}dead-letters"

    @property
    def checkouts_topic(self) -> str:
        """Order commands (PlaceOrder, CommitOrder, CancelOrder), keyed by order id."""
        return f"{self.topic_prefix}checkouts"

    @property
    def line_results_topic(self) -> str:
        """The ledger's answers to the saga's own commands (internal), keyed by order id."""
        return f"{self.topic_prefix}order-line-results"

    @property
    def order_results_topic(self) -> str:
        """OrderResult answers of the order saga, keyed by order id."""
        return f"{self.topic_prefix}order-results"

    @property
    def input_topics(self) -> tuple[str, str, str]:
        return (self.orders_topic, self.returns_topic, self.restocks_topic)

    def describe(self) -> dict[str, str]:
        """Settings as strings for logs: secrets show as *** (or empty), URLs lose passwords."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Secret):
                out[f.name] = "***" if value else ""
            else:
                out[f.name] = redact_url(str(value))
        return out


def redact_url(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host``."""
    import re

    return re.sub(r"(://[^/:@\s]*:)[^@/\s]+@", r"\1***@", text)


try:
    settings = Settings.from_env()
except SettingsError as _exc:  # every process imports this first: refuse to start, say why
    raise SystemExit(f"refusing to start: {_exc}") from None
