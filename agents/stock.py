"""The ledger agent: the three input topics, decided in batches by :mod:`agents.ledger`.

The agent exists so that Faust subscribes to the input topics and assigns their
partitions (co-partitioned: partition ``p`` of orders, restocks and returns goes
to one worker). Their records never reach its stream: the worker's consumer
hands them to the ledger feed in batches (:mod:`pipeline.kafka.feed`), and the
agent runs the engine that decides them, one task per assigned partition.
"""

from __future__ import annotations

import logging
from typing import Any

from agents.ledger import LedgerEngine
from config.settings import settings
from pipeline.runtime import INPUT_TOPICS, _raw_topic, app, ledger_feed, open_reservations
from schemas.codec import codec_from_settings

log = logging.getLogger("inventory.agents")

engine = LedgerEngine(app, settings, ledger_feed, codec_from_settings(settings), open_reservations)

# one topic object over the three inputs, raw bytes; Faust never commits them (acks=False)
ledger_inputs = _raw_topic(*INPUT_TOPICS, acks=False)


@app.agent(ledger_inputs, concurrency=1)
async def ledger(stream: Any) -> None:
    """Subscribes the input topics; the records go to the engine, never to this stream."""
    async for event in stream.events():  # pragma: no cover - the feed takes them all
        log.error(
            "input record %s/%d@%d reached the agent stream instead of the ledger feed",
            event.message.topic,
            event.message.partition,
            event.message.offset,
        )


@app.timer(interval=settings.commit_interval_s)
async def _ledger_group_offsets() -> None:
    await engine.commit_group_offsets()


@app.on_partitions_revoked.connect
async def _stop_ledger_partitions(sender: Any, revoked: set[Any], **_: Any) -> None:
    await engine.on_revoked(revoked)


@app.on_partitions_assigned.connect
async def _start_ledger_partitions(sender: Any, assigned: set[Any], **_: Any) -> None:
    await engine.on_assigned(assigned)


@app.on_before_shutdown.connect
async def _stop_ledger(sender: Any, **_: Any) -> None:
    await engine.stop()
