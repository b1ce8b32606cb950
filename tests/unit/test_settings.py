"""Settings from the environment: booleans, ranges and choices are checked, defaults kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import (
    KAFKA_SASL_MECHANISMS,
    KAFKA_SECURITY_PROTOCOLS,
    Settings,
    SettingsError,
)

REPO = Path(__file__).resolve().parents[2]


def test_an_empty_environment_gives_the_documented_defaults():
    assert Settings.from_env({}) == Settings()
    s = Settings.from_env({})
    assert (s.sink_enabled, s.relay_enabled, s.partitions, s.web_port) == (True, True, 8, 6066)
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert s.kafka_sasl_mechanism == "SCRAM-SHA-512"


@pytest.mark.parametrize("raw", ["0", "false", "False", "FALSE", "no", "NO", "off", "Off", " 0 "])
@pytest.mark.parametrize("name", ["INVENTORY_SINK_ENABLED", "INVENTORY_RELAY_ENABLED"])
def test_booleans_turn_off_the_usual_ways(name, raw):
    s = Settings.from_env({name: raw})
    assert getattr(s, name.removeprefix("INVENTORY_").lower()) is False


@pytest.mark.parametrize("raw", ["1", "true", "True", "YES", "on", "ON"])
@pytest.mark.parametrize("name", ["INVENTORY_SINK_ENABLED", "INVENTORY_RELAY_ENABLED"])
def test_booleans_turn_on_the_usual_ways(name, raw):
    assert getattr(Settings.from_env({name: raw}), name.removeprefix("INVENTORY_").lower()) is True


@pytest.mark.parametrize("raw", ["maybe", "2", "-1", "enabled", "nope", "t"])
def test_anything_else_is_not_a_boolean(raw):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"INVENTORY_SINK_ENABLED": raw})
    msg = str(err.value)
    assert "INVENTORY_SINK_ENABLED" in msg and repr(raw) in msg
    for word in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        assert word in msg


@pytest.mark.parametrize(
    ("name", "raw", "accepted"),
    [
        ("INVENTORY_PARTITIONS", "-3", ">= 1"),
        ("INVENTORY_PARTITIONS", "0", ">= 1"),
        ("INVENTORY_PARTITIONS", "eight", ">= 1"),
        ("INVENTORY_WEB_PORT", "0", "from 1 to 65535"),
        ("INVENTORY_WEB_PORT", "70000", "from 1 to 65535"),
        ("INVENTORY_METRICS_PORT", "-1", "from 0 to 65535"),
        ("INVENTORY_AUDITOR_METRICS_PORT", "0", "from 1 to 65535"),
        ("INVENTORY_AUDITOR_GRACE_S", "0", "> 0"),
        ("INVENTORY_AUDITOR_INTERVAL_S", "-1", "> 0"),
        ("INVENTORY_AUDITOR_SAMPLE_SKUS", "0", ">= 1"),
        ("INVENTORY_AUDITOR_MAX_SKUS", "0", ">= 1"),
        ("INVENTORY_LEDGER_BATCH_MAX", "0", ">= 1"),
        ("INVENTORY_SINK_BATCH_SIZE", "0", ">= 1"),
        ("INVENTORY_FEED_MAX_BUFFERED", "0", ">= 1"),
        ("INVENTORY_MAX_QTY", "0", "from 1 to 2147483647"),
        ("INVENTORY_MAX_QTY", "2147483648", "from 1 to 2147483647"),
        ("INVENTORY_MAX_SKU_LEN", "0", ">= 1"),
        ("INVENTORY_MAX_ORDER_LINES", "0", ">= 1"),
        ("INVENTORY_DEFAULT_TTL_MS", "0", ">= 1"),
        ("INVENTORY_DEDUPE_WINDOW", "-1", ">= 0"),
        ("INVENTORY_LOW_STOCK_THRESHOLD", "-2", ">= -1"),
        ("INVENTORY_STOCK_CHANGES_RETENTION_MS", "-2", ">= -1"),
        ("INVENTORY_MAX_RECORD_BYTES", "10", ">= 1000"),
        ("INVENTORY_ROCKSDB_WRITE_BUFFER_MB", "0", ">= 1"),
        ("INVENTORY_SESSION_TIMEOUT_S", "0", "> 0"),
        ("INVENTORY_SESSION_TIMEOUT_S", "-1.5", "> 0"),
        ("INVENTORY_SESSION_TIMEOUT_S", "nan", "> 0"),
        ("INVENTORY_TRANSACTION_TIMEOUT_S", "0", "> 0"),
        ("INVENTORY_COMMIT_INTERVAL_S", "0", "> 0"),
        ("INVENTORY_EXPIRY_SCAN_INTERVAL_S", "soon", "> 0"),
        ("INVENTORY_SINK_MAX_BACKOFF_S", "0", "> 0"),
    ],
)
def test_numbers_out_of_range_are_refused_naming_the_variable_and_the_range(name, raw, accepted):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: raw})
    msg = str(err.value)
    assert msg.startswith(f"{name}={raw!r}"), msg
    assert accepted in msg, msg


def test_numbers_at_the_edges_of_their_range_are_accepted():
    s = Settings.from_env(
        {
            "INVENTORY_PARTITIONS": "1",
            "INVENTORY_WEB_PORT": "65535",
            "INVENTORY_METRICS_PORT": "0",
            "INVENTORY_DEDUPE_WINDOW": "0",
            "INVENTORY_LOW_STOCK_THRESHOLD": "-1",
            "INVENTORY_STOCK_CHANGES_RETENTION_MS": "-1",
            "INVENTORY_SESSION_TIMEOUT_S": "0.5",
            "INVENTORY_ORDER_GRACE_MS": "0",
        }
    )
    assert (s.partitions, s.web_port, s.metrics_port, s.dedupe_window) == (1, 65535, 0, 0)
    assert (s.low_stock_threshold, s.stock_changes_retention_ms) == (-1, -1)
    assert (s.session_timeout_s, s.order_grace_ms) == (0.5, 0)


def test_the_auditor_starts_from_earliest_or_latest_only():
    assert Settings.from_env({}).auditor_from == "EARLIEST"
    assert Settings.from_env({"INVENTORY_AUDITOR_FROM": "latest"}).auditor_from == "LATEST"
    with pytest.raises(SettingsError, match="INVENTORY_AUDITOR_FROM='now'"):
        Settings.from_env({"INVENTORY_AUDITOR_FROM": "now"})


def test_metric_channels_are_a_bounded_comma_separated_list():
    assert "web" in Settings.from_env({}).metric_channels
    got = Settings.from_env({"INVENTORY_METRIC_CHANNELS": " web, pos ,,web,kiosk "})
    assert got.metric_channels == ("web", "pos", "kiosk")
    with pytest.raises(SettingsError, match="INVENTORY_METRIC_CHANNELS"):
        Settings.from_env({"INVENTORY_METRIC_CHANNELS": "x" * 65})
    with pytest.raises(SettingsError, match="INVENTORY_METRIC_CHANNELS"):
        Settings.from_env({"INVENTORY_METRIC_CHANNELS": ",".join(map(str, range(101)))})


@pytest.mark.parametrize("raw", ["plaintext", "SASL_SSL", "sasl_plaintext", "Ssl"])
def test_security_protocols_are_the_four_kafka_knows(raw):
    s = Settings.from_env({"INVENTORY_KAFKA_SECURITY_PROTOCOL": raw})
    assert s.kafka_security_protocol == raw.upper()
    assert s.kafka_security_protocol in KAFKA_SECURITY_PROTOCOLS


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("INVENTORY_KAFKA_SECURITY_PROTOCOL", "TLS"),
        ("INVENTORY_KAFKA_SECURITY_PROTOCOL", "SASL"),
        ("INVENTORY_KAFKA_SASL_MECHANISM", "SCRAM-SHA-1"),
        ("INVENTORY_KAFKA_SASL_MECHANISM", "GSSAPI"),
        ("INVENTORY_LOG_LEVEL", "LOUD"),
    ],
)
def test_unknown_choices_are_refused_listing_the_accepted_ones(name, raw):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({name: raw})
    msg = str(err.value)
    assert name in msg and repr(raw) in msg
    choices = {
        "INVENTORY_KAFKA_SECURITY_PROTOCOL": KAFKA_SECURITY_PROTOCOLS,
        "INVENTORY_KAFKA_SASL_MECHANISM": KAFKA_SASL_MECHANISMS,
        "INVENTORY_LOG_LEVEL": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
    }[name]
    for choice in choices:
        assert choice in msg


def test_sasl_mechanism_and_log_level_are_normalised_to_upper_case():
    s = Settings.from_env({"INVENTORY_KAFKA_SASL_MECHANISM": "scram-sha-256"})
    assert s.kafka_sasl_mechanism == "SCRAM-SHA-256"
    assert Settings.from_env({"INVENTORY_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    assert Settings.from_env({"INVENTORY_LOG_LEVEL": "warn"}).log_level == "WARN"  # logging's alias


def test_a_process_with_a_bad_setting_refuses_to_start_with_a_message_not_a_traceback():
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    env["INVENTORY_PARTITIONS"] = "-3"
    proc = subprocess.run(
        [sys.executable, "-c", "import config.settings"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "refusing to start: INVENTORY_PARTITIONS='-3': must be an integer >= 1" in proc.stderr
