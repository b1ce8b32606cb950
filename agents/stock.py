"""Thin agents over the three input topics: decode, guard, decide, store.

Per input record, in this order (no ``await`` between reading the table and
writing it, so the three agents never interleave on a SKU):

0. :mod:`pipeline.sequencing` admits only the next offset of its partition
   (nothing is applied past a record Faust failed to deliver);
1. decode and validate; bad input goes to the dead-letter topic;
2. a record on a partition that is not its key's partition is re-sent to the
   right partition (never applied out of place);
3. if the SKU record's watermark for this topic already covers the offset, the
   record is a Kafka redelivery whose effect is in the table: skip it;
4. :func:`pipeline.core.decide`, then write the order's reservation (if it
   changed) and the SKU record carrying the new watermark and the effects.

Outputs (StockChanged, ReservationResult) are not sent here: the relay derives
them from the changelog (see :mod:`tables.stock`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from config.settings import Settings, settings
from pipeline import core, metrics
from pipeline.app import (
    INPUT_TOPICS,
    app,
    dead_letters_topic,
    input_guard,
    open_reservations,
    stock_table,
)
from pipeline.logs import bind_log_context, log_context
from pipeline.partitioning import partition_for
from pipeline.validation import Invalid, to_command
from schemas.codec import AvroCodec, DecodeError, codec_from_settings
from schemas.registry import RegistryError
from tables.stock import (
    OpenReservations,
    StoredReservation,
    StoredStock,
    effects_of,
    reservation_key,
    stock_key,
)

log = logging.getLogger("inventory.agents")


def now_ms() -> int:
    return int(time.time() * 1000)


class CommandHandler:
    """Applies one input event to the stock table; see the module docstring."""

    def __init__(
        self,
        table: Any,
        codec: AvroCodec,
        cfg: Settings,
        app: Any = None,
        open_reservations: OpenReservations | None = None,
    ) -> None:
        self.table = table
        self.codec = codec
        self.cfg = cfg
        self.app = app
        self.open_reservations = open_reservations

    async def handle(self, event: Any) -> None:
        msg = event.message
        with log_context(topic=msg.topic, partition=msg.partition, offset=msg.offset):
            await self._handle(event)

    async def _handle(self, event: Any) -> None:
        msg = event.message
        topic, partition, offset = msg.topic, msg.partition, msg.offset
        key: bytes | None = event.key
        value: bytes = event.value if event.value is not None else b""
        delay = 0.5
        while True:
            try:
                name, rec = self.codec.decode(value)
                command = to_command(topic, key, name, rec, self.cfg)
                break
            except (DecodeError, Invalid) as exc:
                await self.dead_letter(exc.reason, exc.detail, topic, partition, offset, key, value)
                return
            except RegistryError as exc:
                # the registry is down, not the record bad: wait, never dead-letter good input
                log.warning("schema registry unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        assert key is not None  # to_command checked key == sku
        bind_log_context(
            event_id=command.event_id, sku=command.sku, order_id=getattr(command, "order_id", None)
        )
        expected = partition_for(key, self.cfg.partitions)
        if expected != partition:
            # a producer with another partitioner (librdkafka's consistent_random): applying
            # it here would split the SKU's state across two partitions
            await INPUT_TOPICS[topic].send(key=key, value=value, partition=expected)
            metrics.REROUTED.labels(topic).inc()
            log.info(
                "rerouted %s %s/%d@%d to partition %d",
                command.event_id,
                topic,
                partition,
                offset,
                expected,
            )
            return
        started = time.perf_counter()
        outcome = self.apply(command, topic, offset)
        metrics.DECISION_SECONDS.observe(time.perf_counter() - started)
        if outcome is core.Outcome.UNKNOWN_RESERVATION and isinstance(
            command, (core.CommitReservation, core.ReleaseReservation)
        ):
            await self.dead_letter(
                "unknown_reservation",
                f"no reservation for order {command.order_id}",
                topic,
                partition,
                offset,
                key,
                value,
            )

    def apply(self, command: core.Command, topic: str, offset: int) -> core.Outcome | None:
        """Decide and store; returns the outcome, or None for a skipped redelivery."""
        skey = stock_key(command.sku)
        raw = self.table.get(skey)
        stored = StoredStock.from_bytes(raw) if raw is not None else None
        if stored is not None and stored.applied(topic, offset):
            metrics.REDELIVERED.labels(topic).inc()
            return None
        reservation = None
        stored_res = None
        rkey = b""
        if isinstance(command, core.ORDER_COMMANDS):
            rkey = reservation_key(command.sku, command.order_id)
            rraw = self.table.get(rkey)
            if rraw is not None:
                stored_res = StoredReservation.from_bytes(rraw)
                reservation = stored_res.valid(stored)
        now = now_ms()
        decision = core.decide(
            stored.record if stored else None,
            command,
            now,
            reservation,
            dedupe_window=self.cfg.dedupe_window,
            low_stock_threshold=self.cfg.low_stock_threshold,
        )
        if decision.reservation is not None:
            new_res = (
                stored_res.updated(decision.reservation, topic, offset, stored)
                if stored_res is not None
                else StoredReservation.new(decision.reservation, topic, offset)
            )
            # written before the SKU record: see tables.stock for why the order matters
            self.table[rkey] = new_res.to_bytes()
            if self.open_reservations is not None:
                self.open_reservations.note(rkey, new_res.current)
        watermarks = dict(stored.watermarks) if stored else {}
        watermarks[topic] = offset
        version_at = stored.version_at if stored else 0
        if stored is None or decision.record.version != stored.record.version:
            version_at = command.occurred_at
        self.table[skey] = StoredStock(
            decision.record, watermarks, effects_of(decision.events), version_at
        ).to_bytes()
        self._count(decision, command, now)
        return decision.outcome

    def _count(self, decision: core.Decision, command: core.Command, now: int) -> None:
        metrics.COMMAND_AGE_SECONDS.observe(max(0, now - command.occurred_at) / 1000)
        res = decision.reservation
        if res is not None and decision.outcome is core.Outcome.RESERVED:
            if res.from_allocation:
                metrics.CHANNEL_UNITS_RESERVED.labels(res.channel, "allocation").inc(
                    res.from_allocation
                )
            if res.qty > res.from_allocation:
                metrics.CHANNEL_UNITS_RESERVED.labels(res.channel, "shared").inc(
                    res.qty - res.from_allocation
                )
        for e in decision.events:
            if isinstance(e, core.LowStockCrossed):
                metrics.LOW_STOCK.labels(e.direction).inc()
            if isinstance(e, core.CommandApplied):
                metrics.COMMANDS.labels(e.command_type, e.outcome.value, e.channel).inc()
                if e.outcome is core.Outcome.REJECTED:
                    metrics.REJECTIONS.labels(e.channel).inc()
                if e.outcome is core.Outcome.SHORTFALL:
                    metrics.SHORTFALLS.inc()
                    log.warning(
                        "shortfall on %s: %s",
                        e.sku,
                        e.reason,
                        extra={"sku": e.sku, "event_id": e.event_id},
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
        record = {
            "reason": reason,
            "detail": detail[:1000],
            "source_topic": topic,
            "source_partition": partition,
            "source_offset": offset,
            "key": key,
            "value": value,
            "dead_at": now_ms(),
        }
        await dead_letters_topic.send(key=key, value=self.codec.encode("DeadLetter", record))


handler = CommandHandler(
    stock_table, codec_from_settings(settings), settings, app, open_reservations
)


# One agent per input topic, concurrency 1: records of a partition are applied in
# offset order, and only in it (pipeline.sequencing); the guard commits the offsets.


@app.agent(INPUT_TOPICS[settings.orders_topic], concurrency=1)
async def orders(stream: Any) -> None:
    async for event in stream.events():
        if await input_guard.admit(event):
            await handler.handle(event)
            input_guard.done(event)


@app.agent(INPUT_TOPICS[settings.restocks_topic], concurrency=1)
async def restocks(stream: Any) -> None:
    async for event in stream.events():
        if await input_guard.admit(event):
            await handler.handle(event)
            input_guard.done(event)


@app.agent(INPUT_TOPICS[settings.returns_topic], concurrency=1)
async def returns(stream: Any) -> None:
    async for event in stream.events():
        if await input_guard.admit(event):
            await handler.handle(event)
            input_guard.done(event)
