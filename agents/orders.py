"""The checkout order saga on Faust: one thin agent, a sweeper and a relay.

* **Agent** ``order_saga`` (concurrency 1) reads ``inventory.checkouts``
  (PlaceOrder, CommitOrder, CancelOrder, keyed by order id) *and*
  ``inventory.order-line-results`` (the ledger's answers to the saga's own commands, keyed by order id).
  Both topics have the same partition count and key bytes, so partition p of
  each lands on the same worker, which owns partition p of the saga table: one
  agent sees an order's commands and its lines' answers, serially. Per record:
  decode and validate (bad input -> dead letter, like :mod:`agents.stock`),
  re-route a checkouts record found on the wrong partition, skip a Kafka
  redelivery (the saga value's watermark for that topic covers the offset),
  :func:`pipeline.domain.saga.decide`, write the saga (state + watermark + the
  OrderResult it caused, one changelog record), then send the ledger commands
  that became outstanding. Answers for orders that are not sagas (plain
  ReserveStock traffic) are skipped after one table lookup, undecoded.
* **Sweeper** (timer, every worker, own partitions only, never writes the
  table): re-sends every outstanding ledger command of a saga that made no
  progress for ``RESEND_AFTER_MS`` (this heals a crash between the table write
  and the sends: the ledger answers a re-send with the original outcome, the
  event ids being per (order, sku, action)); and sends an expiry
  (``CancelOrder{expire: true}``) stamped with the time it saw for a held order
  past its expiry, to the checkouts topic, where the agent applies it.
* **Pruning** (timer ``prune_sagas``): a finished saga (committed, commit failed,
  rejected, cancelled, expired) is kept ``INVENTORY_ORDER_RETENTION_MS`` after the
  latest of its expiry, placement and last goal (:func:`pipeline.domain.saga.prune_due`),
  then the sweeper sends it a prune command (``CancelOrder`` with ``expire`` and
  reason ``pruned``) and the agent deletes it: a tombstone in the changelog. A later
  CommitOrder/CancelOrder for it is an unknown order (``ORDER_UNKNOWN`` answer and an
  ``unknown_order`` dead letter); a PlaceOrder with its id is a new order.
* **Relay** (task): publishes the OrderResults carried by the saga table's
  changelog to ``inventory.order-results`` (keyed by order id), so an answer is
  never lost once its state landed. At-least-once: a crash may re-publish one
  (identical) answer. Only the answer to a commit/cancel of an *unknown* order
  is sent directly (nothing is stored for it; a redelivery answers it again).
  Its loop is :class:`pipeline.relay.OrderRelay`; ``GET /orders/{order_id}`` is in
  :mod:`pipeline.web.views`, the saga's metrics in :mod:`pipeline.metrics`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from agents.ledger import REPLY_HEADER
from config.settings import Settings, settings
from pipeline import metrics
from pipeline.clock import now_ms
from pipeline.dead_letters import dead_letter
from pipeline.domain import core
from pipeline.domain import saga as sg
from pipeline.kafka.consuming import run_forever
from pipeline.kafka.indexing import IndexRefresher, settled
from pipeline.kafka.partitioning import partition_for
from pipeline.kafka.topics import durability_config
from pipeline.relay import OrderRelay
from pipeline.runtime import (
    _raw_topic,
    app,
    dead_letters_topic,
    input_guard,
    orders_topic,
    table_options,
)
from schemas import validation
from schemas.codec import AvroCodec, DecodeError, codec_from_settings, retry_while_registry_down
from schemas.validation import Invalid
from tables.orders import FinishedSagas, OpenSagas, StoredSaga, order_key, result_to_dict

log = logging.getLogger("inventory.orders")

CHECKOUTS_TOPIC: str = settings.checkouts_topic
ORDER_RESULTS_TOPIC: str = settings.order_results_topic
GRACE_MS: int = settings.order_grace_ms
RESEND_AFTER_MS: int = settings.saga_resend_after_ms
PRUNE_STEP = 500  # prune commands the sweeper sends per tick at most

checkouts_topic = _raw_topic(CHECKOUTS_TOPIC)
order_results_topic = _raw_topic(ORDER_RESULTS_TOPIC)
# the checkouts and the ledger's answers to the saga's own commands (asked for with the
# reply header, so the saga never reads the public answers of plain ReserveStock traffic)
saga_inputs = _raw_topic(CHECKOUTS_TOPIC, settings.line_results_topic, acks=False, guarded=True)

orders_table = app.Table(
    "orders",
    help="Checkout sagas by order id: state, input watermarks and the OrderResult to publish.",
    key_type=bytes,
    value_type=bytes,
    partitions=settings.partitions,
    options=table_options(settings),
    extra_topic_configs={
        **durability_config(settings),
        "min.compaction.lag.ms": str(settings.changelog_min_compaction_lag_ms),
    },
)


@dataclass(frozen=True, slots=True)
class SagaOutputs:
    """The topics a :class:`SagaHandler` sends to, each with Faust's ``Topic.send``
    signature (tests/agents passes in-memory fakes)."""

    checkouts: Any  # re-routed checkouts records
    ledger: Any  # the ledger commands (the orders topic)
    order_results: Any  # answers to commands of unknown orders
    dead_letters: Any


class SagaHandler:
    """Applies one checkouts record or ledger answer to the saga table."""

    def __init__(
        self,
        table: Any,
        codec: AvroCodec,
        cfg: Settings,
        open_sagas: OpenSagas | None = None,
        finished: FinishedSagas | None = None,
        outputs: SagaOutputs | None = None,
    ) -> None:
        self.table = table
        self.codec = codec
        self.cfg = cfg
        self.outputs = outputs or SagaOutputs(
            checkouts_topic, orders_topic, order_results_topic, dead_letters_topic
        )
        self.limits = validation.Limits.of(cfg)
        self.max_bytes = validation.max_checkout_bytes(self.limits)
        self.open_sagas = open_sagas
        self.finished = finished

    async def handle(self, event: Any) -> None:
        # once, off the loop: encoding the saga's commands must not wait on HTTP
        await self.codec.ensure_registered(metrics.registry_wait)
        msg = event.message
        if msg.topic == self.cfg.line_results_topic:
            await self._answer(event)
        else:
            await self._command(event)

    async def _decode(self, value: bytes) -> tuple[str, dict[str, Any]]:
        """Decode, fetching an unknown writer schema off the event loop first (waiting
        while the registry is down: good input is never dead-lettered for it)."""
        if self.codec.registry is not None:
            await retry_while_registry_down(
                lambda: self.codec.prepare([value], None), metrics.registry_wait
            )
        return self.codec.decode(value)

    async def _command(self, event: Any) -> None:
        msg = event.message
        topic, partition, offset = msg.topic, msg.partition, msg.offset
        key: bytes | None = event.key
        value: bytes = event.value if event.value is not None else b""
        if len(value) > self.max_bytes:
            await self.dead_letter(
                "record_too_large",
                f"{len(value)} bytes; no valid checkouts record exceeds {self.max_bytes} "
                f"(INVENTORY_MAX_ORDER_LINES={self.limits.max_lines}); not decoded",
                topic,
                partition,
                offset,
                key,
                value,
            )
            return
        try:
            name, rec = await self._decode(value)
            cmd = validation.to_order_command(key, name, rec, self.limits)
        except (DecodeError, Invalid) as exc:
            await self.dead_letter(exc.reason, exc.detail, topic, partition, offset, key, value)
            return
        assert key is not None  # to_order_command checked key == order_id
        expected = partition_for(key, self.cfg.partitions)
        if expected != partition:
            await self.outputs.checkouts.send(key=key, value=value, partition=expected)
            metrics.REROUTED.labels(topic).inc()
            return
        decision = self.apply(cmd, topic, offset)
        if decision is None:
            return
        if decision.unknown_order:
            assert decision.result is not None
            await self.publish(decision.result)
            await self.dead_letter(
                "unknown_order",
                f"no order {cmd.order_id}",
                topic,
                partition,
                offset,
                key,
                value,
            )
        await self.send(decision.sends)

    async def _answer(self, event: Any) -> None:
        msg = event.message
        key: bytes | None = event.key
        if key is None or event.value is None or self.table.get(key) is None:
            return  # not a saga's order: plain ledger traffic
        if partition_for(key, self.cfg.partitions) != msg.partition:
            log.error(
                "ledger answer for %r on partition %d: not co-partitioned", key, msg.partition
            )
            return
        try:
            name, rec = await self._decode(event.value)
        except DecodeError as exc:
            # never skipped in silence: the line stays pending and the saga asks again
            await self.dead_letter(
                exc.reason, exc.detail, msg.topic, msg.partition, msg.offset, key, event.value
            )
            return
        if name != "ReservationResult":
            return
        inp = sg.LineResult(
            event_id=rec["event_id"],
            order_id=rec["order_id"],
            sku=rec["sku"],
            outcome=rec["outcome"],
            qty=rec["qty"],
            available=rec["available"],
            at=int((msg.timestamp or time.time()) * 1000),
            reason=rec.get("reason", ""),
            duplicate=rec.get("duplicate", False),
        )
        if inp.order_id.encode("utf-8") != key:
            return
        decision = self.apply(inp, msg.topic, msg.offset)
        if decision is not None:
            await self.send(decision.sends)

    def apply(self, inp: sg.SagaInput, topic: str, offset: int) -> sg.SagaDecision | None:
        """Decide and store (no ``await`` in here); None for a skipped redelivery."""
        key = order_key(inp.order_id)
        raw = self.table.get(key)
        stored = StoredSaga.from_bytes(raw) if raw is not None else None
        if stored is not None and stored.applied(topic, offset):
            metrics.REDELIVERED.labels(topic).inc()
            return None
        if isinstance(inp, sg.ExpireOrder | sg.PruneOrder) and inp.occurred_at > now_ms():
            # these come from the public topic too: capped by this worker's clock, a forged
            # one ends or deletes nothing before its time (as the ledger does for expiry)
            inp = replace(inp, occurred_at=now_ms())
        decision = sg.decide(
            stored.saga if stored else None,
            inp,
            grace_ms=GRACE_MS,
            retention_ms=self.cfg.order_retention_ms,
        )
        if decision.prune:
            # a tombstone in the changelog: compaction drops the order, a restore does
            # not bring it back; a later command for it is an unknown order
            del self.table[key]
            if self.open_sagas is not None:
                self.open_sagas.put(key, None)
            if self.finished is not None:
                self.finished.forget(key)
            metrics.SAGAS_PRUNED.inc()
            return decision
        if decision.saga is not None and (decision.changed or decision.result is not None):
            watermarks = dict(stored.watermarks) if stored else {}
            watermarks[topic] = offset
            effects = [result_to_dict(decision.result)] if decision.result is not None else []
            value = StoredSaga(decision.saga, watermarks, effects, now_ms()).to_bytes()
            self.table[key] = value
            if self.open_sagas is not None:
                self.open_sagas.note(key, value, decision.saga)
            if self.finished is not None:
                self.finished.note(key, decision.saga, self.cfg.order_retention_ms)
        if decision.result is not None:
            metrics.ORDER_OUTCOMES.labels(decision.result.outcome.value).inc()
        return decision

    async def send(self, commands: tuple[core.OrderCommand, ...]) -> None:
        for cmd in commands:
            name, fields = validation.to_record(cmd)
            key = cmd.sku.encode("utf-8")
            await self.outputs.ledger.send(
                key=key,
                value=self.codec.encode(name, fields),
                partition=partition_for(key, self.cfg.partitions),
                headers=[(REPLY_HEADER, b"saga")],
            )

    async def publish(self, result: sg.OrderResult) -> None:
        key = order_key(result.order_id)
        await self.outputs.order_results.send(
            key=key,
            value=self.codec.encode("OrderResult", result_to_dict(result)),
            partition=partition_for(key, self.cfg.partitions),
        )

    async def dead_letter(
        self,
        reason: str,
        detail: str,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes,
    ) -> None:
        metrics.DEAD_LETTERS.labels(reason).inc()
        log.warning("dead letter %s from %s/%d@%d: %s", reason, topic, partition, offset, detail)
        key, record = dead_letter(
            reason=reason,
            detail=detail,
            topic=topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value,
            dead_at=now_ms(),
            max_bytes=settings.max_record_bytes,
        )
        await self.outputs.dead_letters.send(key=key, value=self.codec.encode("DeadLetter", record))


# the sagas of this worker's partitions that are not final, for the sweeper
open_sagas = OpenSagas()
# the finished ones and when each may be pruned, for the pruning sweeper
finished_sagas = FinishedSagas()
handler = SagaHandler(
    orders_table, codec_from_settings(settings), settings, open_sagas, finished_sagas
)


def _scanned(key: bytes, value: bytes) -> bytes | None:
    """One saga of a full scan: noted for pruning when finished; the index entry if open."""
    saga = StoredSaga.from_bytes(value).saga
    if saga.status.final:
        finished_sagas.note(key, saga, settings.order_retention_ms)
        return None
    return value


saga_index = IndexRefresher(
    "saga",
    app,
    lambda: orders_table.data.items(),
    open_sagas,
    _scanned,
    settings.expiry_full_scan_s,
)


@app.agent(saga_inputs, concurrency=1)
async def order_saga(stream: Any) -> None:
    """Checkout orders: reserves all lines or none, settles and expires them."""
    async for event in stream.events():
        if await input_guard.admit(event):
            await handler.handle(event)
            input_guard.done(event)


# --------------------------------------------------------------------------
# sweeper

_resent: dict[bytes, int] = {}


@app.timer(interval=settings.expiry_scan_interval_s)
async def sweep_sagas() -> None:
    # reads only the open sagas (the index), not every order ever seen
    if not settled(app) or not await saga_index.refresh():
        return
    now = now_ms()
    waiting = 0
    for key, value in list(open_sagas.items()):
        stored = StoredSaga.from_bytes(value)
        saga = stored.saga
        if saga.status.final:
            continue
        pending = sg.outstanding(saga)
        waiting += bool(pending)
        expire = sg.due_for_expiry(saga, now)
        if not expire and not pending:
            continue
        if now - stored.updated_at < RESEND_AFTER_MS and not expire:
            continue
        if now - _resent.get(key, 0) < RESEND_AFTER_MS:
            continue
        _resent[key] = now
        if expire:
            await _send_internal_cancel(key, saga.order_id, "expire", "expired", now)
            metrics.SAGA_EXPIRY_SENT.inc()
        if pending and now - stored.updated_at >= RESEND_AFTER_MS:
            log.info("re-sending %d ledger commands of order %s", len(pending), saga.order_id)
            await handler.send(pending)
            metrics.SAGA_RESENT.inc(len(pending))
    metrics.SAGAS_OPEN.set(waiting)
    for key, at in list(_resent.items()):
        if now - at > 10 * RESEND_AFTER_MS:
            del _resent[key]


async def _send_internal_cancel(key: bytes, order_id: str, tag: str, reason: str, now: int) -> None:
    """The sweepers' CancelOrder{expire} (an expiry, or a prune when ``reason`` says so),
    stamped with the time seen; its event id is per order and purpose, so re-sends dedupe."""
    record = {
        "event_id": f"{order_id}:{tag}",
        "order_id": order_id,
        "reason": reason,
        "channel": "system",
        "occurred_at": now,
        "expire": True,
    }
    await checkouts_topic.send(
        key=key,
        value=handler.codec.encode("CancelOrder", record),
        partition=partition_for(key, settings.partitions),
    )


@app.timer(interval=settings.expiry_scan_interval_s)
async def prune_sagas() -> None:
    """Finished sagas past ``INVENTORY_ORDER_RETENTION_MS``: send each a prune command
    (``CancelOrder`` with ``expire`` and reason ``pruned``, stamped with the time seen)
    on the checkouts topic, at most :data:`PRUNE_STEP` a tick. The agent deletes the
    saga (a tombstone) if it is still finished and due by that time; a timer cannot
    write a Faust table, and the agent's own order of inputs decides."""
    # (the index refresh, whose full scans also note finished sagas, is sweep_sagas's)
    if settings.order_retention_ms <= 0 or not settled(app):
        return
    now = now_ms()
    for key in finished_sagas.take_due(now, PRUNE_STEP):
        await _send_internal_cancel(key, key.decode("utf-8"), "prune", sg.PRUNE_REASON, now)
        metrics.SAGA_PRUNE_SENT.inc()


# --------------------------------------------------------------------------
# relay: OrderResults from the saga changelog


order_relay = OrderRelay(settings, codec_from_settings(settings))  # pipeline.relay


@app.task
async def run_order_relay() -> None:
    await run_forever(order_relay.run, "order relay")
