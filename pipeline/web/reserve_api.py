"""The synchronous reserve API for checkouts, served by any worker's Faust web.

``POST /reservations`` (ReserveStock), ``POST /reservations/{order_id}/commit`` and
``/cancel`` (CommitReservation, ReleaseReservation), ``POST /orders`` (PlaceOrder),
``POST /orders/{order_id}/commit`` and ``/cancel`` (CommitOrder, CancelOrder). Each
needs an ``Idempotency-Key`` header. The worker checks the request like the Kafka path
checks its command (:mod:`pipeline.web.reserve_rules`), sends the command to its topic (the
ledger and the saga stay the only writers) and waits for its answer on
``reservation-results`` / ``order-results``:

* the answer within ``INVENTORY_RESERVE_API_TIMEOUT_MS``: 200 (RESERVED, BACKORDERED
  with ``po_id`` and ``expected_at``, COMMITTED, RELEASED, ORDER_RESERVED...), 409
  (REJECTED with ``available``, EXPIRED, INVALID_STATE...), 404 (no such reservation or
  order);
* none by then: 202 with a ``status_url`` (``GET /reservations/{order_id}?sku=`` from the
  ledger, ``GET /orders/{order_id}`` from the saga table, both routed to the owner) and
  ``Location``; a retry with the same key sends the same command again and gets the
  original outcome;
* bad JSON, a missing key, a field the Kafka path would dead-letter: 400/422 at once;
  a body over ``INVENTORY_RESERVE_API_MAX_BODY_BYTES``: 413; the answer reader not
  positioned yet: 503.

The answer waiter (:class:`AnswerWaiter`) is one consumer per worker, without a
consumer group, assigned every partition of both answer topics (read-committed) and
positioned at their ends *before* the worker serves a request, so an answer produced
after a request registered (it registers before it sends its command) is never missed.
It decodes only records whose key (the order id) a request is waiting for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.web import Request, Response, View
from prometheus_client import Counter, Gauge, Histogram

from agents.ledger import PartitionLedger
from agents.orders import checkouts_topic
from config.settings import Settings, settings
from pipeline import metrics
from pipeline.clients import aiokafka_kwargs
from pipeline.clock import now_ms
from pipeline.kafka.partitioning import partition_for
from pipeline.runtime import app, orders_topic
from pipeline.web import reserve_rules as rr
from pipeline.web.routing import owner_route
from pipeline.web.views import answering_ledger
from schemas.codec import AvroCodec, DecodeError, codec_from_settings, retry_while_registry_down
from tables.stock import StoredReservation, reservation_key

log = logging.getLogger("inventory.reserve_api")

API_REQUESTS = Counter(
    "inventory_reserve_api_requests_total",
    "Synchronous reserve API requests, by endpoint and HTTP status.",
    ["endpoint", "code"],
    registry=metrics.REGISTRY,
)
API_SECONDS = Histogram(
    "inventory_reserve_api_seconds",
    "From a checked reserve API request to its answer (or its 202), by endpoint.",
    ["endpoint"],
    buckets=(0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=metrics.REGISTRY,
)
API_WAITING = Gauge(
    "inventory_reserve_api_waiting",
    "Reserve API requests waiting for their answer on this worker.",
    registry=metrics.REGISTRY,
)


class AnswerWaiter:
    """Futures of requests waiting for their answers, fed by one group-less consumer."""

    def __init__(self, cfg: Settings, codec: AvroCodec) -> None:
        self.cfg = cfg
        self.codec = codec
        self.topics = (cfg.results_topic, cfg.order_results_topic)
        # (answer topic, order key) -> event_id -> futures of the requests waiting for it
        self._waiting: dict[tuple[str, bytes], dict[str, list[asyncio.Future[Any]]]] = {}
        self.ready = asyncio.Event()

    def register(self, req: rr.Request) -> asyncio.Future[Any]:
        """Call before sending the command: its answer resolves the returned future."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        slot = self._waiting.setdefault((req.answer_topic, req.order_id.encode("utf-8")), {})
        slot.setdefault(req.event_id, []).append(fut)
        API_WAITING.inc()
        return fut

    def unregister(self, req: rr.Request, fut: asyncio.Future[Any]) -> None:
        where = (req.answer_topic, req.order_id.encode("utf-8"))
        slot = self._waiting.get(where, {})
        futures = slot.get(req.event_id, [])
        if fut in futures:
            futures.remove(fut)
            API_WAITING.dec()
        if not futures:
            slot.pop(req.event_id, None)
        if not slot:
            self._waiting.pop(where, None)

    async def deliver(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        """One answer record: resolve the requests waiting for its order and event id."""
        if key is None or value is None:
            return
        slot = self._waiting.get((topic, key))
        if not slot:
            return  # nobody here waits for this order: not even decoded
        try:
            if self.codec.registry is not None:
                await retry_while_registry_down(
                    lambda: self.codec.prepare([value], None), metrics.registry_wait
                )
            _, answer = self.codec.decode(value)
        except DecodeError as exc:
            log.warning("unreadable answer on %s skipped: %s", topic, exc)
            return
        for fut in slot.get(str(answer.get("event_id", "")), []):
            if not fut.done():
                fut.set_result(answer)

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            **aiokafka_kwargs(self.cfg),
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="latest",
            fetch_max_wait_ms=20,
            max_poll_records=5000,
        )
        await consumer.start()
        try:
            parts = [TopicPartition(t, p) for t in self.topics for p in range(self.cfg.partitions)]
            consumer.assign(parts)
            await consumer.seek_to_end(*parts)
            for tp in parts:  # resolved now, not lazily at the first fetch
                await consumer.position(tp)
            self.ready.set()
            log.info("reserve API answer reader positioned on %d partitions", len(parts))
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=5000)
                for tp, records in batches.items():
                    for rec in records:
                        await self.deliver(tp.topic, rec.key, rec.value)
        finally:
            self.ready.clear()
            await consumer.stop()


waiter = AnswerWaiter(settings, codec_from_settings(settings))


@app.task
async def run_answer_waiter() -> None:
    while True:
        try:
            await waiter.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the API must outlive broker hiccups
            log.exception("reserve API answer reader failed; restarting in 1 s")
            await asyncio.sleep(1.0)


# --------------------------------------------------------------------------
# serving one request


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (413 beyond, without reading it all)."""
    raw: Any = request
    length = raw.content_length
    if length is not None and length > limit:
        raise rr.ApiError(413, "body_too_large", f"body of {length} bytes, at most {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in raw.content.iter_chunked(16384):
        total += len(chunk)
        if total > limit:
            raise rr.ApiError(413, "body_too_large", f"body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def send(req: rr.Request, cfg: Settings) -> None:
    """Send the request's command keyed and partitioned like the Kafka path; waits for
    the broker's acknowledgement."""
    topic = checkouts_topic if req.saga else orders_topic
    fut = await topic.send(
        key=req.key, value=req.value, partition=partition_for(req.key, cfg.partitions)
    )
    await fut


def _log_failed_send(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("reserve API send failed: %s", task.exception())


async def serve(
    view: View,
    request: Request,
    endpoint: str,
    build: Any,
    cfg: Settings = settings,
) -> Response:
    """Check, send and answer one command request (see the module docstring)."""
    started = time.perf_counter()
    code = 500
    try:
        try:
            key = rr.check_key(request.headers.get(rr.IDEMPOTENCY_HEADER))
            obj = rr.parse_object(await read_body(request, cfg.reserve_api_max_body_bytes))
            req: rr.Request = build(obj, key, now_ms())
        except rr.ApiError as exc:
            code = exc.status
            return view.json(exc.body(), status=exc.status)
        if not waiter.ready.is_set():
            code = 503
            return view.json(
                {"error": "starting", "detail": "the answer reader is not positioned yet"},
                status=503,
            )
        await waiter.codec.ensure_registered(metrics.registry_wait)
        deadline = started + cfg.reserve_api_timeout_ms / 1000
        fut = waiter.register(req)
        try:
            # shielded: a request that times out must not cancel a send under way
            sending = asyncio.ensure_future(send(req, cfg))
            sending.add_done_callback(_log_failed_send)
            try:
                await asyncio.wait_for(
                    asyncio.shield(sending), max(0.001, deadline - time.perf_counter())
                )
            except TimeoutError:
                pass  # still sending: the answer may come in time, else 202
            except Exception as exc:  # noqa: BLE001 - Kafka refused the send
                log.warning("reserve API could not send %s: %s", req.type_name, exc)
                code = 503
                return view.json(
                    {
                        "error": "unavailable",
                        "detail": f"could not send the command ({exc}); retry with the same "
                        f"{rr.IDEMPOTENCY_HEADER}",
                    },
                    status=503,
                )
            try:
                answer = await asyncio.wait_for(
                    asyncio.shield(fut), max(0.0, deadline - time.perf_counter())
                )
            except TimeoutError:
                code = 202
                body = rr.pending_body(req)
                return view.json(body, status=202, headers={"Location": body["status_url"]})
        finally:
            waiter.unregister(req, fut)
        code, body = rr.response_for(req, answer)
        headers = {"Idempotent-Replayed": "true"} if answer.get("duplicate") else None
        return view.json(body, status=code, headers=headers)
    finally:
        API_REQUESTS.labels(endpoint, str(code)).inc()
        API_SECONDS.labels(endpoint).observe(time.perf_counter() - started)


def _stock(type_name: str, order_id: str | None = None) -> Any:
    def build(obj: dict[str, Any], key: str, now: int) -> rr.Request:
        return rr.stock_request(type_name, obj, key, now, settings, waiter.codec, order_id=order_id)

    return build


def _order(type_name: str, order_id: str | None = None) -> Any:
    def build(obj: dict[str, Any], key: str, now: int) -> rr.Request:
        return rr.order_request(type_name, obj, key, now, settings, waiter.codec, order_id=order_id)

    return build


@app.page("/reservations")
class Reservations(View):
    async def post(self, request: Request) -> Response:
        return await serve(self, request, "reserve", _stock("ReserveStock"))


@app.page("/reservations/{order_id}/commit")
class CommitReservationView(View):
    async def post(self, request: Request, order_id: str) -> Response:
        return await serve(
            self, request, "commit_reservation", _stock("CommitReservation", order_id)
        )


@app.page("/reservations/{order_id}/cancel")
class CancelReservationView(View):
    async def post(self, request: Request, order_id: str) -> Response:
        return await serve(
            self, request, "cancel_reservation", _stock("ReleaseReservation", order_id)
        )


@app.page("/orders")
class Orders(View):
    async def post(self, request: Request) -> Response:
        return await serve(self, request, "place_order", _order("PlaceOrder"))


@app.page("/orders/{order_id}/commit")
class CommitOrderView(View):
    async def post(self, request: Request, order_id: str) -> Response:
        return await serve(self, request, "commit_order", _order("CommitOrder", order_id))


@app.page("/orders/{order_id}/cancel")
class CancelOrderView(View):
    async def post(self, request: Request, order_id: str) -> Response:
        return await serve(self, request, "cancel_order", _order("CancelOrder", order_id))


# --------------------------------------------------------------------------
# GET /reservations/{order_id}?sku=...: the status URL of a 202, from the ledger


@app.page("/reservations/{order_id}")
class ReservationStatus(View):
    async def get(self, request: Request, order_id: str) -> Response:
        if not request.query.get("sku"):
            return self.json({"error": "missing_sku", "detail": "add ?sku=..."}, status=400)
        return await self._owned(request, order_id)

    @owner_route(app, orders_topic, query_param="sku")
    async def _owned(self, request: Request, order_id: str) -> Response:
        # answered by the owner of the SKU's partition, like GET /stock/{sku}
        sku = request.query["sku"]
        ledger = await answering_ledger(self, sku)
        if not isinstance(ledger, PartitionLedger):
            return ledger
        raw = ledger.store.get(reservation_key(sku, order_id))
        res = StoredReservation.from_bytes(raw).valid(ledger.lookup(sku)) if raw else None
        if res is None:
            return self.json(
                {"error": "unknown reservation", "order_id": order_id, "sku": sku}, status=404
            )
        return self.json(
            {
                "order_id": res.order_id,
                "sku": res.sku,
                "status": res.status.value,
                "qty": res.qty,
                "channel": res.channel,
                "expires_at": res.expires_at,
                "reason": res.reason,
                "available_at_decision": res.available_at_decision,
                **({"customer_id": res.customer_id} if res.customer_id else {}),
            }
        )
