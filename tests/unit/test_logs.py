"""Structured JSON logs: fields, extras, context, redaction and the Faust hook."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline import logs
from pipeline.logs import JsonFormatter, bind_log_context, log_context, redact_text


def record(msg: str = "hello %s", args: Any = ("world",), **extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("inventory.test")
    rec = logger.makeRecord(
        "inventory.test", logging.WARNING, __file__, 10, msg, args, None, extra=extra or None
    )
    rec.created = 1_700_000_000.123456
    return rec


def fmt(rec: logging.LogRecord) -> dict[str, Any]:
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    out: dict[str, Any] = json.loads(line)
    return out


def test_fixed_fields():
    out = fmt(record())
    assert out == {
        "ts": "2023-11-14T22:13:20.123Z",
        "level": "WARNING",
        "logger": "inventory.test",
        "message": "hello world",
    }


def test_context_extras_come_first_in_a_fixed_order_then_the_others():
    out = fmt(
        record(
            offset=41,
            color="blue",
            order_id="o-1",
            sku="SKU-1",
            event_id="e-1",
            topic="t.orders",
            partition=3,
        )
    )
    assert list(out)[4:] == [
        "event_id",
        "sku",
        "order_id",
        "topic",
        "partition",
        "offset",
        "color",
    ]
    assert (out["partition"], out["offset"]) == (3, 41)


def test_absent_or_empty_extras_are_left_out():
    out = fmt(record(sku="S", order_id=""))
    assert out["sku"] == "S" and "order_id" not in out and "event_id" not in out


def test_log_context_binds_ids_and_extra_wins():
    with log_context(event_id="ctx-e", sku="ctx-sku", order_id=None):
        with log_context(order_id="ctx-o"):
            inner = fmt(record(sku="explicit"))
        outer = fmt(record())
    after = fmt(record())
    assert (inner["event_id"], inner["sku"], inner["order_id"]) == ("ctx-e", "explicit", "ctx-o")
    assert "order_id" not in outer and outer["sku"] == "ctx-sku"
    assert "event_id" not in after


def test_bind_adds_to_the_innermost_block_only():
    assert bind_log_context(sku="nowhere") is False
    assert "sku" not in fmt(record())
    with log_context(topic="t.orders", partition=1, offset=7):
        with log_context():
            assert bind_log_context(event_id="e-9", sku="S", order_id=None)
            inner = fmt(record())
        outer = fmt(record())
    assert (inner["topic"], inner["offset"], inner["event_id"], inner["sku"]) == (
        "t.orders",
        7,
        "e-9",
        "S",
    )
    assert "order_id" not in inner
    assert "event_id" not in outer and outer["partition"] == 1


async def _task_logs(n: int) -> dict[str, Any]:
    import asyncio

    with log_context(sku=f"S{n}"):
        await asyncio.sleep(0.01 * (3 - n))
        bind_log_context(event_id=f"e{n}")
        await asyncio.sleep(0.01 * n)
        return fmt(record())


def test_context_is_per_asyncio_task():
    import asyncio

    async def main() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(_task_logs(n) for n in range(3))))

    outs = asyncio.run(main())
    assert [(o["sku"], o["event_id"]) for o in outs] == [("S0", "e0"), ("S1", "e1"), ("S2", "e2")]


def test_multiline_message_and_traceback_stay_on_one_line():
    try:
        raise RuntimeError("boom\nwith redis://u:pw@h:6379")
    except RuntimeError:
        rec = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed\nbadly", None, sys.exc_info()
        )
    line = JsonFormatter().format(rec)
    assert line.count("\n") == 0
    out = json.loads(line)
    assert out["message"] == "failed\nbadly"
    assert out["exc"].startswith("Traceback") and "RuntimeError: boom" in out["exc"]
    assert "pw" not in out["exc"] and "redis://u:***@h:6379" in out["exc"]


def test_non_json_extras_become_strings():
    out = fmt(record(obj=object(), data=b"bytes", nums=(1, 2)))
    assert out["obj"].startswith("<object object") and out["data"] == "bytes"
    assert out["nums"] == [1, 2]


# ---------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://app:hunter2@localhost:6379/0", "redis://app:***@localhost:6379/0"),
        ("redis://:hunter2@localhost:6379", "redis://:***@localhost:6379"),
        ("https://u:p@ss@host/x", "https://u:***@host/x"),
        (
            "sasl_ssl://bob:s3cr3t@broker:9093 and http://al:pw@os:9200",
            "sasl_ssl://bob:***@broker:9093 and http://al:***@os:9200",
        ),
        ("kafka://127.0.0.1:9092", "kafka://127.0.0.1:9092"),
        ("http://host:9200/a@b", "http://host:9200/a@b"),
        ("password=hunter2 user=bob", "password=*** user=bob"),
        ("{'sasl.password': 'abc', 'x': 1}", "{'sasl.password': '***', 'x': 1}"),
        ('{"api_token": "t0k", "sku": "A"}', '{"api_token": "***", "sku": "A"}'),
        ("client_secret: xyz", "client_secret: ***"),
        ('password="two words" x=1', 'password="***" x=1'),
        ("sasl.password=''", "sasl.password='***'"),
        ("password=*** again", "password=*** again"),
        ("shortfall on SKU-1: counted 4", "shortfall on SKU-1: counted 4"),
    ],
)
def test_redact_text(text, expected):
    assert redact_text(text) == expected


def test_message_args_are_redacted_after_formatting():
    out = fmt(record("connecting to %s with password=%s", ("redis://a:b@h", "hunter2")))
    assert out["message"] == "connecting to redis://a:***@h with password=***"


def test_extras_with_secret_keys_are_masked_recursively():
    out = fmt(
        record(
            sku="A",
            sasl_password="x1",
            api_token="x2",
            Secret="x3",
            config={"sasl.username": "bob", "ssl": {"key_password": "x4"}, "acks": "all"},
            url="http://bob:x5@opensearch:9200",
        )
    )
    assert out["sasl_password"] == out["api_token"] == out["Secret"] == "***"
    assert out["config"] == {"sasl.username": "***", "ssl": {"key_password": "***"}, "acks": "all"}
    assert out["url"] == "http://bob:***@opensearch:9200"
    assert not re.search(r"x[1-5]", json.dumps(out))


def test_secret_settings_values_never_show():
    from config.settings import Secret

    out = fmt(record("pw %s %r", (Secret("s3"), Secret("s3")), conn=Secret("s3"), pair=["x"]))
    assert "s3" not in json.dumps(out)
    assert out["conn"] == "***"


def test_context_secret_is_masked_too():
    with log_context(sku="A"):
        out = fmt(record(token="abc"))
    assert out["token"] == "***" and out["sku"] == "A"


# ---------------------------------------------------------------- configuration


@pytest.fixture()
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_configure_logging_writes_json_lines_at_the_level(capsys, restore_logging):
    logs.configure_logging("warning")
    log = logging.getLogger("inventory.cfg")
    log.info("not shown")
    log.warning("shown for %s", "A", extra={"sku": "A", "event_id": "e"})
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    out = json.loads(err[0])
    assert (out["level"], out["message"], out["sku"], out["event_id"]) == (
        "WARNING",
        "shown for A",
        "A",
        "e",
    )


def test_level_names_are_checked():
    assert logs.logging_config("warn")["root"]["level"] == "WARNING"
    assert logs.logging_config(logging.DEBUG)["root"]["level"] == logging.DEBUG
    with pytest.raises(ValueError, match="unknown log level"):
        logs.logging_config("LOUD")


def test_the_level_filter_outlives_a_handler_level_reset(restore_logging):
    stream = io.StringIO()
    logging.config.dictConfig(logs.logging_config("INFO", stream=stream))
    handler = logging.getLogger().handlers[0]
    handler.setLevel(logging.DEBUG)
    logging.getLogger().setLevel(logging.DEBUG)  # what Faust's spinner setup does
    logging.getLogger("inventory.f").debug("hidden")
    logging.getLogger("inventory.f").info("visible")
    assert [json.loads(x)["message"] for x in stream.getvalue().splitlines()] == ["visible"]


def test_mode_setup_logging_takes_the_faust_config(capsys, restore_logging):
    from mode.utils.logging import setup_logging

    # what faust.Worker does with app.conf.logging_config (a copy: mode pops keys from it)
    setup_logging(loglevel="WARN", logging_config=dict(logs.faust_logging_config("INFO")))
    logging.getLogger("faust.test").info("from faust", extra={"topic": "t", "partition": 1})
    out = json.loads(capsys.readouterr().err.splitlines()[-1])
    assert (out["logger"], out["message"], out["topic"], out["partition"]) == (
        "faust.test",
        "from faust",
        "t",
        1,
    )


def test_faust_app_accepts_the_config_and_the_worker_class(restore_logging):
    import faust
    from faust.worker import Worker

    app = faust.App(
        "logs-unit-test",
        logging_config=logs.faust_logging_config("INFO"),
        Worker="pipeline.logs:JsonLoggingWorker",
    )
    assert app.conf.Worker is logs.JsonLoggingWorker
    assert issubclass(logs.JsonLoggingWorker, Worker)
    assert app.conf.logging_config["root"] == {"level": "INFO", "handlers": ["json"]}
    worker = logs.JsonLoggingWorker(app, loglevel="WARN", quiet=True)
    root = logging.getLogger()
    before = (root.level, [h.level for h in root.handlers])
    worker.on_setup_root_logger(root, logging.WARNING)
    assert worker.spinner is None
    assert (root.level, [h.level for h in root.handlers]) == before


def test_logs_module_does_not_import_faust():
    import subprocess

    code = "import sys, pipeline.logs; print('faust' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
