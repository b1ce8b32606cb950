"""The expiry sweeper: finds overdue reservations and sends ExpireReservation.

It does not scan the table every second: the agent notes each reservation it
writes in ``open_reservations``; the sweeper rebuilds that set from the table
once recovery has finished after every rebalance (a restore writes the table
without the agent) and every ``INVENTORY_EXPIRY_FULL_SCAN_S`` as a backstop, in
slices that let the agents run, and checks only the open ones.

It never writes the table (Faust forbids writes outside stream iteration):
every worker scans the reservations of its own active partitions and sends an
ExpireReservation command, keyed by SKU, to ``inventory.orders``; the agent
that owns the SKU's partition applies it. The command carries the time the
sweeper saw, so the decision is deterministic on replay, and a duplicate or a
command that races a commit is answered without effect. No leader is needed,
so a stale leadership during a rebalance cannot stop expiry.
"""

from __future__ import annotations

import logging
import uuid

from agents.stock import engine
from config.settings import settings
from pipeline import metrics
from pipeline.clock import now_ms
from pipeline.kafka.indexing import IndexRefresher, settled
from pipeline.kafka.partitioning import partition_for
from pipeline.runtime import app, open_reservations, orders_topic
from schemas.codec import codec_from_settings
from tables.stock import RESERVATION_SEP, OpenReservations

log = logging.getLogger("inventory.expiry")

RESEND_AFTER_MS = 5_000
_codec = codec_from_settings(settings)
_sent: dict[bytes, int] = {}


index = IndexRefresher(
    "reservation",
    app,
    engine.items,
    open_reservations,
    OpenReservations.entry_of,
    settings.expiry_full_scan_s,
    token=lambda: engine.ready_token,
)


def overdue(now: int) -> list[tuple[str, str]]:
    """(sku, order_id) of open reservations past their expiry in this worker's partitions."""
    found = open_reservations.overdue(now)
    metrics.RESERVATIONS_PENDING.set(len(open_reservations))
    metrics.RESERVATIONS_OVERDUE.set(len(found))
    return found


@app.timer(interval=settings.expiry_scan_interval_s)
async def sweep_expired() -> None:
    if not settled(app) or not engine.ready() or not await index.refresh():
        return
    await _codec.ensure_registered(metrics.registry_wait)
    now = now_ms()
    for sku, order_id in overdue(now):
        key = sku.encode()
        mark = key + RESERVATION_SEP + order_id.encode()
        if now - _sent.get(mark, 0) < RESEND_AFTER_MS:
            continue
        _sent[mark] = now
        value = _codec.encode(
            "ExpireReservation",
            {
                "event_id": f"expire-{uuid.uuid4()}",
                "order_id": order_id,
                "sku": sku,
                "occurred_at": now,
                "channel": "system",
            },
        )
        await orders_topic.send(
            key=key, value=value, partition=partition_for(key, settings.partitions)
        )
        metrics.EXPIRY_SENT.inc()
    for mark, at in list(_sent.items()):
        if now - at > 10 * RESEND_AFTER_MS:
            del _sent[mark]
