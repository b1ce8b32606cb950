"""Redis projection: one hash per SKU and a pub/sub channel of applied changes.

Layout (all names come from :class:`config.settings.Settings`):

* ``cfg.redis_stock_key(sku)`` (``<prefix>stock:<sku>``) is a hash with the fields
  ``on_hand``, ``reserved``, ``safety_stock``, ``available``, ``in_stock`` (``1``/``0``),
  ``version``, ``updated_at``, ``occurred_at``, ``shared_available`` (what a channel
  without an allocation can reserve) and ``damaged`` (returned units that cannot be
  sold; 0 for a change published before StockChanged carried it), plus, per channel with an allocation,
  ``channel:<name>:available``, ``channel:<name>:allocated`` and
  ``channel:<name>:reserved``, and, per location of a SKU that has locations (see
  StockChanged ``locations``), ``location:<name>:on_hand``, ``location:<name>:reserved``,
  ``location:<name>:damaged``, ``location:<name>:available`` and
  ``location:<name>:inbound``; all are decimal integers, times in
  epoch milliseconds. ``updated_at`` is the Redis server's clock (``TIME``) at the
  moment the script wrote the hash, so freshness is measured on the target's clock.
* ``cfg.redis_channel`` (``<prefix>stock-changes``) carries one compact JSON message
  per *applied* change (never for a stale one)::

      {"sku":"SKU-1","version":7,"on_hand":10,"reserved":2,"safety_stock":1,
       "available":7,"in_stock":true,"updated_at":1767225600123,"occurred_at":1767225600000}

  ``in_stock`` is a JSON boolean; the numbers are JSON integers.

Every write goes through one Lua script (:data:`APPLY_SCRIPT`), so the
compare-on-version, the hash write and the publish happen atomically: a version
at or below the stored one changes nothing and publishes nothing. Needs
Redis >= 5 (scripts replicate their effects, which allows ``TIME`` before writes).
Versions are compared as Lua numbers, exact up to 2**53.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from config.settings import Settings
from pipeline.clients import redis_kwargs
from pipeline.clock import now_ms
from pipeline.domain.core import INCOMING_FIELDS, free_units, in_stock, shared_pool
from pipeline.sinks.base import ApplyReport, Projection, StockChange, TargetUnavailable

CONNECT_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 2.0

# KEYS[1] = the SKU's hash.
# ARGV = version, on_hand, reserved, safety_stock, available, in_stock (1/0), occurred_at,
#        channel, message head (JSON up to and including '"updated_at":'), message tail
#        (',"occurred_at":N}'), shared_available, damaged, incoming, promised,
#        backorderable, staged (INCOMING_FIELDS), then field/value pairs of the
#        channels and the locations.
# Returns {1, now_ms} when applied, {0, now_ms} when the stored version is >= ARGV[1].
APPLY_SCRIPT = """
local held = tonumber(redis.call('HGET', KEYS[1], 'version'))
local t = redis.call('TIME')
-- built as a string: a Lua number would print 14 significant digits at most
local now = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
if held and held >= tonumber(ARGV[1]) then
  return {0, now}
end
redis.call('HSET', KEYS[1],
  'on_hand', ARGV[2], 'reserved', ARGV[3], 'safety_stock', ARGV[4],
  'available', ARGV[5], 'in_stock', ARGV[6], 'version', ARGV[1],
  'updated_at', now, 'occurred_at', ARGV[7], 'shared_available', ARGV[11],
  'damaged', ARGV[12], 'incoming', ARGV[13], 'promised', ARGV[14],
  'backorderable', ARGV[15], 'staged', ARGV[16])
-- the channel and location fields are replaced as a whole: a removed allocation
-- leaves none behind
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 8) == 'channel:' or string.sub(f, 1, 9) == 'location:' then
    redis.call('HDEL', KEYS[1], f)
  end
end
for i = 17, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PUBLISH', ARGV[8], ARGV[9] .. now .. ARGV[10])
return {1, now}
"""

_LOCATION_FIELDS = ("on_hand", "reserved", "damaged", "available", "inbound")

# The connection / protocol / server-state errors that mean "retry later".
_UNAVAILABLE = (RedisError, OSError, asyncio.TimeoutError)


def _redacted(url: str) -> str:
    """``scheme://host:port/db`` of a Redis URL, without user or password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis SCAN MATCH pattern."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


class RedisProjection(Projection):
    """Keeps one Redis hash per SKU at its highest version and publishes each change.

    Contract (see :class:`pipeline.sinks.base.Projection`): ``apply`` runs the
    compare-on-version script once per change, in the order given, in one pipeline;
    a change whose version is not above the stored one is counted as stale and
    neither writes nor publishes. Any connection, timeout, loading, read-only or
    script error raises :class:`TargetUnavailable` (cause chained, no credentials
    in the message); changes of the batch that ran before the failure stay applied,
    which is harmless because a retry of the same batch is idempotent.

    The client has 2 s connect and read timeouts and no retries of its own: a dead
    or hung Redis fails the call within about 2 s and the runner decides when to
    retry.
    """

    name = "redis"

    def __init__(self, cfg: Settings, client: aioredis.Redis | None = None) -> None:
        self._cfg = cfg
        self._owns_client = client is None
        self._client: aioredis.Redis = client or aioredis.from_url(
            cfg.redis_url,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
            **redis_kwargs(cfg),
        )
        # register_script only hashes the text; the server learns it in setup()
        # or on the first NOSCRIPT.
        self._script = self._client.register_script(APPLY_SCRIPT)
        self._replay_from: dict[int, str] = {}  # per partition: server state at its replay

    def _unavailable(self, what: str, exc: BaseException) -> TargetUnavailable:
        detail = f"{type(exc).__name__}: {exc}"
        password = urlsplit(self._cfg.redis_url).password
        if password:
            detail = detail.replace(password, "***")
        return TargetUnavailable(
            f"redis {_redacted(self._cfg.redis_url)}: {what} failed ({detail})"
        )

    async def setup(self) -> None:
        """Load the script (SCRIPT LOAD); idempotent. Raises TargetUnavailable when down."""
        try:
            self._script.sha = await self._client.script_load(APPLY_SCRIPT)
        except _UNAVAILABLE as exc:
            raise self._unavailable("SCRIPT LOAD", exc) from exc

    def _marker(self, partition: int) -> str:
        return f"{self._cfg.redis_key_prefix}sink-marker:{partition}"

    async def _server_state(self) -> str:
        """``<run_id>:<evicted_keys>``: which server this is and how many keys it has
        evicted since it started (``INFO server`` and ``INFO stats``, one round trip)."""
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.info("server")
            pipe.info("stats")
            server, stats = await pipe.execute()
        return f"{server['run_id']}:{int(stats.get('evicted_keys', 0))}"

    async def lost(self, partitions: Sequence[int]) -> set[int]:
        """Per changelog partition a marker key ``<prefix>sink-marker:<p>`` holds
        ``<run_id>:<evicted_keys>`` of the server as it was when that partition's last
        full apply began. A partition is lost when its marker is missing (FLUSHALL, a
        restart without persistence, the marker itself evicted), names another
        ``run_id`` (a restarted server), or the server has evicted keys since
        (``maxmemory`` with an ``allkeys-*`` or ``volatile-*`` policy may have evicted a
        single SKU's hash, which no marker would show; ``evicted_keys`` counts every
        eviction of the server, so evictions of other applications' keys on a shared
        Redis cause replays too: harmless, but give the sink's Redis ``noeviction``).
        ``expired_keys`` is not watched: the sink sets no TTLs. ``CONFIG RESETSTAT``
        causes one replay."""
        wanted = list(partitions)
        if not wanted:
            return set()
        try:
            state = await self._server_state()
            markers = await self._client.mget([self._marker(p) for p in wanted])
        except _UNAVAILABLE as exc:
            raise self._unavailable("marker check", exc) from exc
        held = [m.decode() if isinstance(m, bytes) else m for m in markers]
        return {p for p, m in zip(wanted, held, strict=True) if m != state}

    async def repair(self, partitions: Sequence[int]) -> None:
        """Nothing to repair; remembers the server's state as the replay begins, so a
        loss during the replay still shows at the next check."""
        try:
            state = await self._server_state()
        except _UNAVAILABLE as exc:
            raise self._unavailable("marker check", exc) from exc
        for p in partitions:
            self._replay_from[p] = state

    async def mark_intact(self, partitions: Sequence[int]) -> None:
        """Write each partition's marker: the server state :meth:`repair` saw (or the
        current one without a repair)."""
        try:
            current = None
            values: dict[str, str] = {}
            for p in partitions:
                state = self._replay_from.get(p)
                if state is None:
                    current = current or await self._server_state()
                    state = current
                values[self._marker(p)] = state
            if values:
                await self._client.mset(values)
        except _UNAVAILABLE as exc:
            raise self._unavailable("marker write", exc) from exc
        for p in partitions:
            self._replay_from.pop(p, None)

    def _script_args(self, change: StockChange) -> tuple[str, list[str | bytes]]:
        sku = str(change["sku"])
        version = int(change["version"])
        on_hand = int(change["on_hand"])
        reserved = int(change["reserved"])
        safety_stock = int(change["safety_stock"])
        available = int(change["available"])
        occurred_at = int(change["occurred_at"])
        stocked = in_stock(available)
        head = (
            orjson.dumps(
                {
                    "sku": sku,
                    "version": version,
                    "on_hand": on_hand,
                    "reserved": reserved,
                    "safety_stock": safety_stock,
                    "available": available,
                    "in_stock": stocked,
                    "backorderable": int(change.get("backorderable") or 0),
                }
            )[:-1]
            + b',"updated_at":'
        )
        tail = b',"occurred_at":%d}' % occurred_at
        args: list[str | bytes] = [
            str(version),
            str(on_hand),
            str(reserved),
            str(safety_stock),
            str(available),
            "1" if stocked else "0",
            str(occurred_at),
            self._cfg.redis_channel,
            head,
            tail,
        ]
        channels = change.get("channels") or []
        free = sum(free_units(int(c["allocated"]), int(c["reserved"])) for c in channels)
        args.append(str(shared_pool(available, free)))
        args.append(str(int(change.get("damaged") or 0)))
        args += [str(int(change.get(f) or 0)) for f in INCOMING_FIELDS]
        for c in channels:
            name = str(c["channel"])
            for field in ("available", "allocated", "reserved"):
                args += [f"channel:{name}:{field}", str(int(c[field]))]
        for x in change.get("locations") or ():
            name = str(x["location"])
            for field in _LOCATION_FIELDS:
                args += [f"location:{name}:{field}", str(int(x[field]))]
        return self._cfg.redis_stock_key(sku), args

    async def _run(self, calls: Sequence[tuple[str, list[str | bytes]]]) -> list[Any]:
        """One pipeline of EVALSHAs; per-command errors come back as exception values."""
        async with self._client.pipeline(transaction=False) as pipe:
            for key, args in calls:
                pipe.evalsha(self._script.sha, 1, key, *args)
            return await pipe.execute(raise_on_error=False)

    async def apply(self, changes: Sequence[StockChange]) -> ApplyReport:
        """Apply a batch; returns applied/stale counts and the latest Redis ``TIME`` seen.

        Raises TargetUnavailable when Redis is unreachable, slow, loading, read-only
        or rejects the script. An empty batch does not touch Redis and reports the
        local clock.
        """
        if not changes:
            return ApplyReport(applied=0, stale=0, applied_at_ms=now_ms())
        calls = [self._script_args(c) for c in changes]
        try:
            results = await self._run(calls)
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                # Redis restarted, failed over or ran SCRIPT FLUSH since the script was
                # loaded. A NOSCRIPT EVALSHA did nothing, so re-running only those is exact;
                # running them after the rest is fine because the script compares versions.
                self._script.sha = await self._client.script_load(APPLY_SCRIPT)
                rerun = await self._run([calls[i] for i in missing])
                for i, r in zip(missing, rerun, strict=True):
                    results[i] = r
        except _UNAVAILABLE as exc:
            raise self._unavailable("apply", exc) from exc
        applied = stale = 0
        applied_at = 0
        for r in results:
            if isinstance(r, ResponseError):
                raise self._unavailable("apply", r) from r
            flag, now = r
            applied_at = max(applied_at, int(now))
            if int(flag):
                applied += 1
            else:
                stale += 1
        return ApplyReport(applied=applied, stale=stale, applied_at_ms=applied_at)

    async def versions(self, skus: Sequence[str]) -> dict[str, int]:
        """The ``version`` field of each SKU's hash (one pipelined HGET each); absent if none."""
        wanted = list(dict.fromkeys(skus))
        if not wanted:
            return {}
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for sku in wanted:
                    pipe.hget(self._cfg.redis_stock_key(sku), "version")
                values = await pipe.execute()
        except _UNAVAILABLE as exc:
            raise self._unavailable("versions", exc) from exc
        return {sku: int(v) for sku, v in zip(wanted, values, strict=True) if v is not None}

    async def wipe(self) -> None:
        """Delete every stock hash under the prefix (SCAN + UNLINK).

        For a full rebuild. Keys the sink writes while this runs may survive, which
        is harmless: they hold current versions. Raises TargetUnavailable when down.
        """
        pattern = _glob_escape(self._cfg.redis_stock_key("")) + "*"
        try:
            chunk: list[bytes] = []
            async for key in self._client.scan_iter(match=pattern, count=1000):
                chunk.append(key)
                if len(chunk) >= 500:
                    await self._client.unlink(*chunk)
                    chunk = []
            if chunk:
                await self._client.unlink(*chunk)
        except _UNAVAILABLE as exc:
            raise self._unavailable("wipe", exc) from exc

    async def ping(self) -> bool:
        """True when Redis answers PING now; never raises."""
        try:
            return bool(await self._client.ping())
        except _UNAVAILABLE:
            return False

    async def close(self) -> None:
        """Close the client's connections (only when this projection created the client)."""
        if self._owns_client:
            await self._client.aclose()
