"""Faust web views: health, stock queries routed to the owning worker, metrics.

Health has three endpoints (what each means: :mod:`pipeline.web.health`): ``/livez``
(alive: the event loop serves, nothing crashed), ``/readyz`` (every assigned
partition caught up, no rebalance) and ``/healthz`` (readiness plus the sinks' state,
unchanged).
"""

from __future__ import annotations

from typing import Any

from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agents.ledger import PartitionLedger
from agents.orders import orders_table
from agents.stock import engine
from pipeline import metrics
from pipeline.runtime import app, orders_topic
from pipeline.sinks.worker import sink_states
from pipeline.web.health import liveness, readiness
from pipeline.web.routing import owner_route
from tables.orders import StoredSaga, order_key


def ready() -> bool:
    """True once table recovery has finished, every ledger partition of this worker has
    taken ownership and caught up, and no rebalance is under way."""
    done = readiness(app, engine).ready
    metrics.RECOVERY_COMPLETE.set(1 if done else 0)
    return done


@app.page("/healthz")
class Health(View):
    async def get(self, request: Request) -> Response:
        state = readiness(app, engine)
        metrics.RECOVERY_COMPLETE.set(1 if state.ready else 0)
        if not state.ready:
            # a halted partition needs an operator; anything else passes by itself
            if "halted" in state.partitions.values():
                return self.json({"status": "halted", "reasons": state.reasons}, status=503)
            return self.json({"status": "recovering"}, status=503)
        sinks = sink_states()
        # a failing projection target degrades the worker but the ledger still serves
        # (so does one being re-applied after it lost data: it is not whole until done)
        status = "ok" if all(s == "ok" for s in sinks.values()) else "degraded"
        return self.json({"status": status, "sinks": sinks})


@app.page("/livez")
class Live(View):
    async def get(self, request: Request) -> Response:
        reasons = liveness(app)
        if reasons:
            return self.json({"status": "dead", "reasons": reasons}, status=503)
        return self.json({"status": "alive"})


@app.page("/readyz")
class Ready(View):
    async def get(self, request: Request) -> Response:
        state = readiness(app, engine)
        metrics.RECOVERY_COMPLETE.set(1 if state.ready else 0)
        return self.json(state.body(), status=200 if state.ready else 503)


async def answering_ledger(view: View, sku: str) -> PartitionLedger | Response:
    """The ledger of ``sku``'s partition when this worker may answer from it now, else
    the 503 to answer: never from state another worker may have changed since (a
    worker that was paused past its session, say); only the SKU's own partition must
    be ready (a halted one stops no other)."""
    settled = app.tables.recovery.completed.is_set() and not app.rebalancing
    ledger = engine.ledger_for(sku) if settled else None
    if ledger is not None and ledger.halted:
        return view.json({"error": "halted", "reason": ledger.halted}, status=503)
    if ledger is None or not await ledger.fresh():
        return view.json({"error": "recovering"}, status=503)
    return ledger


@app.page("/stock/{sku}")
class StockView(View):
    @owner_route(app, orders_topic, match_info="sku")
    async def get(self, request: Request, sku: str) -> Response:
        ledger = await answering_ledger(self, sku)
        if not isinstance(ledger, PartitionLedger):
            return ledger
        stored: Any = ledger.lookup(sku)
        if stored is None:
            return self.json({"error": "unknown sku", "sku": sku}, status=404)
        return self.json(stored.view())


@app.page("/metrics")
class Metrics(View):
    async def get(self, request: Request) -> Response:
        ready()
        # aiohttp refuses a charset inside content_type; the exposition format is ASCII
        body = generate_latest(metrics.REGISTRY)
        return self.bytes(body, content_type=CONTENT_TYPE_LATEST.split(";")[0])


# --------------------------------------------------------------------------
# GET /orders/{order_id}: the checkout saga's state, from the worker that owns the order


@app.page("/orders/{order_id}")
class OrderView(View):
    @app.table_route(table=orders_table, match_info="order_id")
    async def get(self, request: Request, order_id: str) -> Response:
        if not app.tables.recovery.completed.is_set() or app.rebalancing:
            return self.json({"error": "recovering"}, status=503)
        raw: Any = orders_table.get(order_key(order_id))
        if raw is None:
            return self.json({"error": "unknown order", "order_id": order_id}, status=404)
        return self.json(StoredSaga.from_bytes(raw).view())
