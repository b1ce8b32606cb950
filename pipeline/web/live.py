"""Live stock for product pages: a Server-Sent Events stream and the product page.

``GET /live/stock?sku=A,B`` streams ``text/event-stream`` (at most
:data:`MAX_SKUS` SKUs, comma-separated and/or repeated ``sku`` parameters;
400 with a JSON ``{"error", "detail"}`` on bad input):

* ``retry: 1000`` first; then one ``stock`` event per requested SKU that has a
  Redis hash (the snapshot); then every change published on
  ``settings.redis_channel`` for a requested SKU; a ``: keep-alive`` comment
  after :data:`HEARTBEAT_S` seconds without output.
* At most ``settings.live_max_connections`` (``INVENTORY_LIVE_MAX_CONNECTIONS``) open
  streams per worker: past it ``503`` ``{"error": "too_many_streams", "detail"}``
  with ``Retry-After`` (:data:`RETRY_AFTER_S`), counted in
  ``inventory_live_refused_total{reason="capacity"}``. A stream's handler sleeps until
  its heartbeat is due or an update, resync or close arrives; one reaper task per
  hub closes, every :data:`WAKE_S`, the streams whose client left.
* Every event::

      event: stock
      id: 3f2a9c1b:7,0
      data: {"sku":"A","version":7,"on_hand":10,"reserved":3,"safety_stock":0,
             "available":7,"in_stock":true,"updated_at":...,"occurred_at":...}

  (``data`` is one line). The id is the stream's position: the fingerprint of
  the requested SKU set, then the highest version sent per SKU, in sorted SKU
  order (0 = none yet). A browser that reconnects sends it back as
  ``Last-Event-ID``; the new stream then sends only versions above it.
* On one stream versions only rise per SKU: stale and duplicate messages are
  dropped. Intermediate versions may be skipped (after a Redis outage or when a
  client is too slow, the stream resends the current hashes instead).

One :class:`LiveHub` per worker process holds a single Redis subscription and
fans messages out to every open stream; when Redis drops it reconnects with
backoff, keeps the streams open and, once subscribed again, makes every stream
re-read the hashes so nothing is missed.

``GET /product/{sku}`` serves ``pipeline/web/static/product.html``, a page that
follows one SKU over this stream.

The Faust aiohttp driver hands views the real :class:`aiohttp.web.Request`, so
a view can return an :class:`aiohttp.web.StreamResponse` it has prepared and
written itself: aiohttp accepts any ``StreamResponse`` from a handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Final, cast

import redis.asyncio as aioredis
from aiohttp import web as aioweb
from faust.web import Request, Response, View
from mode import Service
from prometheus_client import Counter, Gauge
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from config.settings import Settings, settings
from pipeline import metrics
from pipeline.clients import redis_kwargs
from pipeline.domain.core import in_stock
from pipeline.runtime import app
from schemas.validation import Invalid, check_sku

log = logging.getLogger("inventory.live")

MAX_SKUS: Final = 50
HEARTBEAT_S: Final = 15.0
RETRY_MS: Final = 1000
MAX_BACKOFF_S: Final = 5.0
PING_INTERVAL_S: Final = 10.0
QUEUE_LIMIT: Final = 256
"""Updates buffered per stream; past this the stream drops them and re-reads the hashes."""
WAKE_S: Final = 1.0
"""How often the hub's one reaper task looks for streams whose client left (aiohttp does
not cancel their handlers); an idle stream itself wakes only to send its heartbeat."""
RETRY_AFTER_S: Final = 5
"""``Retry-After`` of a 503 answered when the worker already has its most streams."""

FIELDS: Final = (
    "sku",
    "version",
    "on_hand",
    "reserved",
    "safety_stock",
    "available",
    "in_stock",
    "updated_at",
    "occurred_at",
    "backorderable",
)
# backorderable: what one more backorder could get (0 in messages and hashes written
# before it existed); a page shows "preorder" when it is above 0 and nothing is in stock
_INT_FIELDS: Final = (
    "on_hand",
    "reserved",
    "safety_stock",
    "available",
    "updated_at",
    "backorderable",
)
_INTEGER: Final = re.compile(r"-?[0-9]+")

STREAMS = Gauge("inventory_live_streams", "Open /live/stock streams.", registry=metrics.REGISTRY)
EVENTS_SENT = Counter(
    "inventory_live_events_total",
    "Stock events written to live streams, by kind (snapshot or live).",
    ["kind"],
    registry=metrics.REGISTRY,
)
DROPPED = Counter(
    "inventory_live_dropped_total",
    "Updates not forwarded: stale (version not newer), invalid message, overflow (slow client).",
    ["reason"],
    registry=metrics.REGISTRY,
)
REFUSED = Counter(
    "inventory_live_refused_total",
    "/live/stock streams refused with 503: the worker had INVENTORY_LIVE_MAX_CONNECTIONS "
    "open (capacity) or was stopping (stopping).",
    ["reason"],
    registry=metrics.REGISTRY,
)
WAKEUPS = Counter(
    "inventory_live_stream_wakeups_total",
    "Times an open stream's handler woke up: for an update or resync (item), for its "
    "heartbeat or a snapshot retry (timer), or because it was closed (closed).",
    ["why"],
    registry=metrics.REGISTRY,
)
SUBSCRIBED = Gauge(
    "inventory_live_redis_subscribed",
    "1 while this worker's Redis subscription for live updates is up.",
    registry=metrics.REGISTRY,
)


# --- pure parts -------------------------------------------------------------


class BadQuery(ValueError):
    """The request names no SKU, too many, or an invalid one."""


@dataclass(frozen=True)
class StockUpdate:
    """One SKU's projected stock at one version, as sent to browsers."""

    sku: str
    version: int
    on_hand: int
    reserved: int
    safety_stock: int
    available: int
    in_stock: bool
    updated_at: int
    occurred_at: int
    backorderable: int = 0

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}


def parse_skus(values: Iterable[str], cfg: Settings = settings) -> tuple[str, ...]:
    """The SKUs of ``sku`` query values (each comma-separated), deduplicated, in order.

    Raises :class:`BadQuery` for none, more than :data:`MAX_SKUS`, or one that
    :func:`schemas.validation.check_sku` refuses (an empty item included).
    A SKU that itself contains a comma cannot be requested.
    """
    out: dict[str, None] = {}
    for value in values:
        for sku in value.split(","):
            try:
                check_sku(sku, cfg)
            except Invalid as exc:
                raise BadQuery(f"{exc.reason}: {sku!r}") from None
            except UnicodeEncodeError:  # a lone surrogate
                raise BadQuery(f"invalid_sku: {sku!r}") from None
            out[sku] = None
            if len(out) > MAX_SKUS:
                raise BadQuery(f"too many skus: at most {MAX_SKUS}")
    if not out:
        raise BadQuery("no sku: use ?sku=A,B")
    return tuple(out)


def fingerprint(skus: Iterable[str]) -> str:
    """8 hex digits naming a SKU set (order and duplicates do not matter)."""
    # SKUs never contain control characters, so "\n" cannot be part of one
    joined = "\n".join(sorted(set(skus)))
    return hashlib.sha256(joined.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def encode_event_id(skus: Iterable[str], last: Mapping[str, int]) -> str:
    """``<fingerprint>:<v>,<v>,...``: the version last sent per SKU, in sorted SKU order."""
    ordered = sorted(set(skus))
    return f"{fingerprint(ordered)}:" + ",".join(str(last.get(s, 0)) for s in ordered)


def decode_event_id(raw: str | None, skus: Iterable[str]) -> dict[str, int]:
    """The versions already sent per SKU according to a ``Last-Event-ID``.

    Returns ``{}`` (send everything) for no header, another SKU set or a
    malformed id; SKUs at version 0 are left out.
    """
    if not raw:
        return {}
    ordered = sorted(set(skus))
    head, sep, tail = raw.strip().partition(":")
    if not sep or head != fingerprint(ordered):
        return {}
    parts = tail.split(",")
    if len(parts) != len(ordered) or not all(p.isascii() and p.isdigit() for p in parts):
        return {}
    return {sku: int(p) for sku, p in zip(ordered, parts, strict=True) if int(p) > 0}


def _int(value: Any) -> int:
    if isinstance(value, bool):  # True is an int to Python, not to this contract
        raise ValueError("boolean where a number was expected")
    if isinstance(value, int):
        return value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        return int(value)
    raise ValueError(f"not an integer: {value!r}")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and value.strip().lower() in ("1", "0", "true", "false"):
        return value.strip().lower() in ("1", "true")
    raise ValueError(f"not a boolean: {value!r}")


def parse_update(fields: Mapping[str, Any], sku: str | None = None) -> StockUpdate | None:
    """A :class:`StockUpdate` from a pub/sub message or a Redis hash; ``None`` if invalid.

    Numbers may be JSON integers or decimal strings; ``in_stock`` true/false,
    1/0 or their strings (``available > 0`` when absent). ``sku`` names the
    SKU of a hash, which does not store it. Needs ``sku`` and ``version`` >= 1.
    """
    if not fields:
        return None
    try:
        name = sku if sku is not None else fields.get("sku")
        if not isinstance(name, str) or not name:
            return None
        version = _int(fields["version"])
        if version < 1:
            return None
        ints = {f: _int(fields.get(f, 0)) for f in _INT_FIELDS}
        raw_in_stock = fields.get("in_stock")
        stocked = in_stock(ints["available"]) if raw_in_stock is None else _bool(raw_in_stock)
        occurred_at = _int(fields.get("occurred_at", 0))
    except (KeyError, ValueError, TypeError):
        return None
    return StockUpdate(
        sku=name,
        version=version,
        in_stock=stocked,
        occurred_at=occurred_at,
        **ints,
    )


def parse_message(data: str | bytes) -> StockUpdate | None:
    """A :class:`StockUpdate` from one pub/sub payload (a JSON object); ``None`` if invalid."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return parse_update(obj) if isinstance(obj, dict) else None


def is_newer(update: StockUpdate, last: Mapping[str, int]) -> bool:
    """True when ``update`` is above the version already sent for its SKU."""
    return update.version > last.get(update.sku, 0)


def format_event(update: StockUpdate, event_id: str) -> bytes:
    """One SSE ``stock`` event (terminated by the blank line)."""
    data = json.dumps(update.to_json(), separators=(",", ":"), ensure_ascii=False)
    return f"event: stock\nid: {event_id}\ndata: {data}\n\n".encode()


class StreamState:
    """What one stream has sent: the filter every outgoing update goes through.

    >>> s = StreamState(("A", "B"))
    >>> frame = s.accept(StockUpdate("A", 2, 5, 0, 0, 5, True, 1, 1))
    >>> s.accept(StockUpdate("A", 1, 6, 0, 0, 6, True, 1, 1)) is None  # older: dropped
    True
    """

    def __init__(self, skus: Sequence[str], last: Mapping[str, int] | None = None) -> None:
        self.skus = tuple(skus)
        wanted = set(self.skus)
        self.last: dict[str, int] = {k: v for k, v in (last or {}).items() if k in wanted}

    @property
    def event_id(self) -> str:
        return encode_event_id(self.skus, self.last)

    def wants(self, sku: str) -> bool:
        return sku in self.skus

    def accept(self, update: StockUpdate) -> bytes | None:
        """The event to send for ``update``, or ``None`` (other SKU, or not newer)."""
        if not self.wants(update.sku) or not is_newer(update, self.last):
            return None
        self.last[update.sku] = update.version
        return format_event(update, self.event_id)


# --- the shared subscription and the streams --------------------------------


class _Resync:
    """Queue marker: re-read the SKUs' hashes (after (re)subscribing or an overflow)."""


RESYNC: Final = _Resync()


class Subscriber:
    """One open stream's inbox: updates for its SKUs and resync markers."""

    def __init__(self, skus: Sequence[str], transport: asyncio.BaseTransport | None = None) -> None:
        self.skus = frozenset(skus)
        self.transport = transport  # the client's connection; None in unit tests
        self.closed = False
        self._items: deque[StockUpdate | _Resync] = deque()
        self._wake = asyncio.Event()

    def offer(self, update: StockUpdate) -> None:
        if len(self._items) >= QUEUE_LIMIT:
            # a slow client: the hashes hold the latest state, re-read them instead
            DROPPED.labels("overflow").inc(len(self._items))
            self._items.clear()
            self._items.append(RESYNC)
        else:
            self._items.append(update)
        self._wake.set()

    def resync(self) -> None:
        if not self._items or self._items[-1] is not RESYNC:
            self._items.append(RESYNC)
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def next(self, timeout: float) -> StockUpdate | _Resync | None:
        """The next item, or ``None`` after ``timeout`` seconds or when closed."""
        if not self._items and not self.closed:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        return self._items.popleft() if self._items and not self.closed else None


SSE_HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-store",
    "X-Accel-Buffering": "no",  # let reverse proxies pass events through at once
}


class LiveHub:
    """One Redis subscription per process, fanned out to every open stream.

    The subscription starts with the first stream. When Redis drops, the hub
    reconnects with exponential backoff (up to :data:`MAX_BACKOFF_S`) and, once
    subscribed again, tells every stream to re-read its hashes. Streams stay
    open meanwhile.
    """

    def __init__(self, cfg: Settings = settings) -> None:
        self.cfg = cfg
        self.subscribed = False
        self._subs: set[Subscriber] = set()
        self._by_sku: dict[str, set[Subscriber]] = {}
        self._task: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._reader: aioredis.Redis | None = None
        self._stopping = False

    # streams --------------------------------------------------------------
    @property
    def full(self) -> bool:
        """True when this worker already serves its most streams."""
        return len(self._subs) >= self.cfg.live_max_connections

    def open(
        self, skus: Sequence[str], transport: asyncio.BaseTransport | None = None
    ) -> Subscriber:
        sub = Subscriber(skus, transport)
        self._subs.add(sub)
        for sku in sub.skus:
            self._by_sku.setdefault(sku, set()).add(sub)
        STREAMS.set(len(self._subs))
        if self.subscribed:
            sub.resync()  # else the (re)subscription will ask for it
        self._ensure_running()
        if transport is not None and (self._reaper is None or self._reaper.done()):
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="live-reap")
        return sub

    async def _reap(self) -> None:
        """Every :data:`WAKE_S` while streams are open: close those whose client left.
        One task for every stream, so an idle stream costs no wake-up of its own."""
        while self._subs and not self._stopping:
            await asyncio.sleep(WAKE_S)
            for sub in list(self._subs):
                if sub.transport is not None and sub.transport.is_closing():
                    sub.close()  # its handler wakes, ends and releases the slot

    def close(self, sub: Subscriber) -> None:
        sub.close()
        self._subs.discard(sub)
        for sku in sub.skus:
            subs = self._by_sku.get(sku)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_sku[sku]
        STREAMS.set(len(self._subs))

    def dispatch(self, update: StockUpdate) -> None:
        for sub in self._by_sku.get(update.sku, ()):
            sub.offer(update)

    async def snapshot(self, skus: Sequence[str]) -> dict[str, StockUpdate]:
        """The current hash of each SKU that has one. Raises RedisError/OSError when down."""
        if self._reader is None:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.cfg.redis_url,
                max_connections=16,
                timeout=5,
                decode_responses=True,
                socket_timeout=5,
                socket_connect_timeout=5,
                **redis_kwargs(self.cfg),
            )
            self._reader = aioredis.Redis(connection_pool=pool)
        async with self._reader.pipeline(transaction=False) as pipe:
            for sku in skus:
                pipe.hgetall(self.cfg.redis_stock_key(sku))
            rows = await pipe.execute()
        out = {}
        for sku, row in zip(skus, rows, strict=True):
            update = parse_update(row, sku=sku)
            if update is not None:
                out[sku] = update
            elif row:
                DROPPED.labels("invalid").inc()
        return out

    async def serve(self, request: aioweb.Request, skus: Sequence[str]) -> aioweb.StreamResponse:
        """Stream ``skus`` to ``request`` until the client leaves or the hub stops."""
        if self._stopping:
            REFUSED.labels("stopping").inc()
            return aioweb.json_response({"error": "shutting down"}, status=503)
        if self.full:
            REFUSED.labels("capacity").inc()
            return aioweb.json_response(
                {
                    "error": "too_many_streams",
                    "detail": f"this worker serves its most live streams "
                    f"({self.cfg.live_max_connections}); retry later or elsewhere",
                },
                status=503,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        state = StreamState(skus, decode_event_id(request.headers.get("Last-Event-ID"), skus))
        response = aioweb.StreamResponse(headers=SSE_HEADERS)
        # the slot is taken before the first await, so concurrent requests cannot pass
        # the cap together
        sub = self.open(state.skus, request.transport)
        loop = asyncio.get_running_loop()
        retry_at: float | None = None
        retry_delay = 0.5
        try:
            await response.prepare(request)
            await response.write(f"retry: {RETRY_MS}\n\n".encode())
            last_write = loop.time()
            while not sub.closed:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break  # the client left; aiohttp does not cancel the handler
                now = loop.time()
                if retry_at is not None and now >= retry_at:
                    retry_at = None
                    if self.subscribed:  # else the resubscription resyncs every stream
                        sub.resync()
                # sleep until the heartbeat is due (or a snapshot retry); an update,
                # a resync or a close (client gone: the hub's reaper) wakes it sooner
                wait = last_write + HEARTBEAT_S - now
                if retry_at is not None:
                    wait = min(wait, retry_at - now)
                item = await sub.next(max(0.0, wait))
                WAKEUPS.labels(
                    "closed" if sub.closed else "timer" if item is None else "item"
                ).inc()
                now = loop.time()
                frames: list[bytes] = []
                if isinstance(item, StockUpdate):
                    frame = state.accept(item)
                    if frame is None:
                        DROPPED.labels("stale").inc()
                    else:
                        frames.append(frame)
                        EVENTS_SENT.labels("live").inc()
                elif item is RESYNC:
                    try:
                        current = await self.snapshot(state.skus)
                    except (RedisError, OSError, TimeoutError) as exc:
                        log.info("live: snapshot failed (%s), retrying in %.1fs", exc, retry_delay)
                        retry_at = now + retry_delay
                        retry_delay = min(retry_delay * 2, MAX_BACKOFF_S)
                    else:
                        retry_delay = 0.5
                        for sku in state.skus:
                            frame = state.accept(current[sku]) if sku in current else None
                            if frame is not None:
                                frames.append(frame)
                                EVENTS_SENT.labels("snapshot").inc()
                if frames:
                    await response.write(b"".join(frames))
                    last_write = loop.time()
                elif loop.time() - last_write >= HEARTBEAT_S - 0.01:  # timers may fire early
                    await response.write(b": keep-alive\n\n")
                    last_write = loop.time()
        except ConnectionError:
            pass  # the client left while we wrote
        finally:
            self.close(sub)
        return response

    # the subscription -----------------------------------------------------
    @property
    def client_name(self) -> str:
        """The subscription's Redis client name (``CLIENT LIST``): ``live:<channel>``."""
        return "live:" + "".join("_" if c.isspace() else c for c in self.cfg.redis_channel)

    def _ensure_running(self) -> None:
        if self._stopping or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="live-hub")

    async def _run(self) -> None:
        backoff = 0.25
        was_down = False
        while not self._stopping:
            client: aioredis.Redis | None = None
            try:
                # no silent retries: a lost connection must surface, because the
                # messages published meanwhile are gone and streams must resync
                client = aioredis.Redis.from_url(
                    self.cfg.redis_url,
                    decode_responses=True,
                    retry=Retry(NoBackoff(), 0),
                    client_name=self.client_name,
                    **redis_kwargs(self.cfg),
                    socket_connect_timeout=5,
                    socket_keepalive=True,
                )
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.cfg.redis_channel)
                    await self._confirmed(pubsub)
                    self._set_subscribed(True)
                    if was_down:
                        log.warning("live: Redis subscription is back; streams resync")
                    was_down = False
                    backoff = 0.25
                    for sub in list(self._subs):
                        sub.resync()
                    await self._pump(pubsub)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if not was_down:
                    log.warning("live: Redis subscription lost (%s); reconnecting", exc)
                was_down = True
            except Exception:  # a bug must not end live updates for every open stream
                log.exception("live: subscription loop failed; restarting it")
                was_down = True
            finally:
                self._set_subscribed(False)
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.aclose()
            if not self._stopping:
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    @staticmethod
    async def _confirmed(pubsub: PubSub) -> None:
        # only after Redis confirmed the subscription is every later PUBLISH ours,
        # so only then may the streams read their snapshots
        async with asyncio.timeout(5):
            while True:
                msg = await pubsub.get_message(timeout=1.0)
                if msg is not None and msg["type"] == "subscribe":
                    return

    async def _pump(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        last_seen = last_ping = loop.time()
        while not self._stopping:
            msg = await pubsub.get_message(timeout=1.0)
            now = loop.time()
            if msg is not None:
                last_seen = now
                if msg["type"] == "message":
                    update = parse_message(msg["data"])
                    if update is None:
                        DROPPED.labels("invalid").inc()
                        log.debug("live: ignoring invalid message %r", msg["data"])
                    else:
                        self.dispatch(update)
            elif now - last_seen > 3 * PING_INTERVAL_S:
                raise TimeoutError("Redis did not answer PING")
            if now - max(last_seen, last_ping) >= PING_INTERVAL_S:
                await pubsub.ping()
                last_ping = now

    def _set_subscribed(self, up: bool) -> None:
        self.subscribed = up
        SUBSCRIBED.set(1 if up else 0)

    async def stop(self) -> None:
        """Close every stream and the Redis connections."""
        self._stopping = True
        for sub in list(self._subs):
            sub.close()
        for task in (self._task, self._reaper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.aclose()
                await self._reader.connection_pool.disconnect()
            self._reader = None


HUB = LiveHub(settings)


@app.service
class LiveHubService(Service):
    """Closes the live streams when the worker stops.

    Without it aiohttp would wait up to a minute for the open streams at
    shutdown. Started after table recovery, so it is stopped before the web
    server (mode stops children in reverse order).
    """

    async def on_stop(self) -> None:
        await HUB.stop()


# --- views -------------------------------------------------------------------


@app.page("/live/stock")
class LiveStock(View):
    async def get(self, request: Request) -> Any:
        req = cast(aioweb.Request, request)
        try:
            skus = parse_skus(req.query.getall("sku", []))
        except BadQuery as exc:
            return self.json({"error": "bad_request", "detail": str(exc)}, status=400)
        return await HUB.serve(req, skus)

    async def head(self, request: Request) -> Response:
        return self.bytes(b"", content_type="text/event-stream")


@cache
def product_html() -> str:
    """The product page, read once from the package data."""
    return resources.files("pipeline.web").joinpath("static/product.html").read_text("utf-8")


PAGE_HEADERS: Final = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


@app.page("/product/{sku}")
class ProductPage(View):
    async def get(self, request: Request, sku: str) -> Response:
        try:
            check_sku(sku, settings)
        except Invalid as exc:
            return self.json({"error": exc.reason, "detail": exc.detail}, status=400)
        if "," in sku:
            return self.json(
                {"error": "invalid_sku", "detail": "live pages need a sku without commas"},
                status=400,
            )
        return self.html(product_html(), headers=dict(PAGE_HEADERS))
