"""Structured JSON logs: one object per line, with the command's ids and no secrets.

Every line is a JSON object::

    {"ts": "2025-01-31T12:00:00.123Z", "level": "WARNING", "logger": "inventory.agents",
     "message": "shortfall on SKU-1: counted 4 below reserved 6",
     "event_id": "...", "sku": "SKU-1", "order_id": "o-1",
     "topic": "inventory.restocks", "partition": 3, "offset": 41}

``event_id``, ``sku``, ``order_id``, ``topic``, ``partition`` and ``offset`` come
from ``extra=`` or from :func:`log_context` (a context variable, so an agent can
bind them once per command); any other ``extra=`` key is written after them.
``exc`` holds a formatted traceback, ``stack`` a ``stack_info``.

Secrets never reach the output: the value of any key containing ``password``,
``secret``, ``token`` or ``sasl`` (in extras, nested mappings, and ``key=value``
or ``'key': 'value'`` text in messages and tracebacks) becomes ``***``, and so
does the password of a URL's userinfo (``redis://user:pw@host`` ->
``redis://user:***@host``).

Faust configures logging itself: its worker passes ``app.conf.logging_config``
to mode's ``setup_logging``, which hands it to :func:`logging.config.dictConfig`
in place of its own colour console setup. :func:`faust_logging_config` is that
dict. Mode then calls ``Worker.on_setup_root_logger``, where Faust installs its
terminal spinner when the CLI's ``-l`` is WARN or above (the default): that
resets the first root handler's level to the CLI's and writes terminal escapes
to stdout. :class:`JsonLoggingWorker` (``App(Worker="pipeline.logs:JsonLoggingWorker")``)
skips the spinner, so the level is the configured one whatever ``-l`` says.
Processes without Faust call :func:`configure_logging`.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import json
import logging
import logging.config
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

CONTEXT_FIELDS: tuple[str, ...] = ("event_id", "sku", "order_id", "topic", "partition", "offset")
"""The extras written right after the fixed fields, in this order, when present."""

REDACTED = "***"

# attributes every LogRecord has; anything else on a record came from ``extra=``
_RECORD_ATTRS = frozenset(logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

_SECRET_KEY = re.compile(r"password|passwd|secret|token|sasl", re.IGNORECASE)
# scheme://user:password@host -> scheme://user:***@host (user may be empty: redis://:pw@host)
_URL_USERINFO = re.compile(
    r"(?P<head>\b[a-zA-Z][a-zA-Z0-9_+.\-]*://[^\s:/?#@]*):(?P<pw>[^\s/?#]+)@"
)
# password=hunter2, "sasl.password": "x", 'token': 'x', api_token: x ...
_SECRET_PAIR = re.compile(
    r"(?P<key>[\w.\-]*(?:password|passwd|secret|token|sasl)[\w.\-]*)"
    r"(?P<sep>['\"]?\s*[:=]\s*)"
    r"(?:(?P<q>['\"])(?P<quoted>[^'\"]*)(?P=q)|(?!//)(?P<value>[^\s'\",;}&)\]]+))",
    re.IGNORECASE,
)

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "inventory_log_context", default=None
)


def is_secret_key(key: str) -> bool:
    """True for a key whose value must never be logged (password, secret, token, sasl...)."""
    return bool(_SECRET_KEY.search(key))


def redact_text(text: str) -> str:
    """``text`` with URL passwords and ``secret-key=value`` pairs replaced by ``***``."""
    if not text:
        return text
    text = _URL_USERINFO.sub(lambda m: f"{m['head']}:{REDACTED}@", text)
    return _SECRET_PAIR.sub(_mask_pair, text)


def _mask_pair(m: re.Match[str]) -> str:
    q = m["q"] or ""
    return f"{m['key']}{m['sep']}{q}{REDACTED}{q}"


def redact(value: Any, key: str = "") -> Any:
    """A JSON-ready copy of ``value``: secret keys masked, URL passwords masked in strings."""
    if key and is_secret_key(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        # str() first: a str subclass such as config.settings.Secret shows only "***"
        return redact_text(str(value))
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, bytes):
        return redact_text(value.decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {str(k): redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v) for v in value]
    return redact_text(str(value))


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add ``fields`` (e.g. event_id, sku, order_id) to every record logged inside the block.

    Context variables follow asyncio tasks, so an agent can bind a command's ids
    around its handling; ``extra=`` on a call wins over the context. ``None``
    values are left out.
    """
    merged = dict(_context.get() or {})
    merged.update({k: v for k, v in fields.items() if v is not None})
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**fields: Any) -> bool:
    """Add ``fields`` to the innermost :func:`log_context` block, until that block ends.

    For ids known only part-way through (an agent binds topic/partition/offset
    around a record, then the command's event_id, sku and order_id once it is
    decoded). Outside any block it does nothing and returns False.
    """
    current = _context.get()
    if current is None:
        return False
    current.update({k: v for k, v in fields.items() if v is not None})
    return True


def _timestamp(created: float) -> str:
    # isoformat, not strftime: strftime imports lazily and fails while Python shuts down
    t = _dt.datetime.fromtimestamp(created, _dt.UTC)
    return t.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (no newline inside it): see the module docstring."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": redact_text(record.getMessage()),
        }
        extras = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}
        ctx = _context.get() or {}
        for name in CONTEXT_FIELDS:
            if name in extras:
                value = extras.pop(name)
            elif name in ctx:
                value = ctx[name]
            else:
                continue
            if value is not None and value != "":
                out[name] = redact(value, name)
        for name, value in extras.items():
            if name.startswith("_") or name in out:
                continue
            out[name] = redact(value, name)
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = redact_text(record.exc_text)
        if record.stack_info:
            out["stack"] = redact_text(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=str)


class _LevelFilter(logging.Filter):
    """Drops records below ``level``; kept on the handler so a later setLevel cannot undo it."""

    def __init__(self, level: str | int = logging.NOTSET) -> None:
        super().__init__()
        lvl = _level(level)
        self.level = lvl if isinstance(lvl, int) else logging.getLevelNamesMapping()[lvl]

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


def _level(level: str | int) -> str | int:
    if isinstance(level, int):
        return level
    name = level.strip().upper()
    if name == "WARN":
        return "WARNING"
    if name not in logging.getLevelNamesMapping():
        raise ValueError(f"unknown log level {level!r} (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    return name


def logging_config(level: str | int = "INFO", stream: Any = "ext://sys.stderr") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` dict: JSON lines on ``stream`` at ``level``.

    ``stream`` is an ``ext://`` name or a file object.
    Existing loggers stay enabled (``disable_existing_loggers`` false).
    """
    lvl = _level(level)
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "filters": {"level": {"()": f"{__name__}._LevelFilter", "level": lvl}},
        "handlers": {
            "json": {
                "class": "logging.StreamHandler",
                "stream": stream,
                "formatter": "json",
                "filters": ["level"],
            }
        },
        "root": {"level": lvl, "handlers": ["json"]},
    }


def faust_logging_config(level: str | int) -> dict[str, Any]:
    """The dict for ``faust.App(logging_config=...)`` (mode applies it with dictConfig).

    It replaces mode's own console configuration entirely, so the CLI's ``-l``
    does not set the level; ``level`` (``settings.log_level``) does.
    """
    return logging_config(level)


def configure_logging(level: str | int = "INFO") -> None:
    """Send every log record of this process to stderr as JSON lines at ``level``."""
    logging.config.dictConfig(logging_config(level))


def _worker_class() -> type:
    from faust.worker import Worker

    def on_setup_root_logger(self: Any, logger: logging.Logger, level: int) -> None:
        # Faust installs its terminal spinner here when -l is WARN or above: it resets the
        # first root handler to the CLI's level and writes terminal escapes to stdout
        self.spinner = None

    # built with its final module and name: mode registers a service's tasks by both
    # when the class is created
    namespace = {
        "__module__": __name__,
        "__qualname__": "JsonLoggingWorker",
        "__doc__": "faust.Worker that keeps the configured logging (no terminal spinner).",
        "on_setup_root_logger": on_setup_root_logger,
    }
    cls: type = type(Worker)("JsonLoggingWorker", (Worker,), namespace)
    return cls


def __getattr__(name: str) -> Any:
    # imported lazily: processes without Faust (sinks, CLIs) should not pay for importing it
    if name == "JsonLoggingWorker":
        cls = _worker_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # pragma: no cover - manual check: python -m pipeline.logs
    configure_logging("DEBUG")
    logging.getLogger("inventory.demo").info(
        "connecting to redis://app:hunter2@localhost:6379/0",
        extra={"sku": "SKU-1", "event_id": "e-1", "sasl_password": "x"},
    )
    sys.exit(0)
