"""Faust web views: health, stock queries routed to the owning worker, metrics."""

from __future__ import annotations

from typing import Any

from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline import metrics
from pipeline.app import app, stock_table
from pipeline.sinks.worker import sink_states
from tables.stock import StoredStock, stock_key


def ready() -> bool:
    """True once table recovery has finished and no rebalance is under way."""
    done = app.tables.recovery.completed.is_set() and not app.rebalancing
    metrics.RECOVERY_COMPLETE.set(1 if done else 0)
    return done


@app.page("/healthz")
class Health(View):
    async def get(self, request: Request) -> Response:
        if not ready():
            return self.json({"status": "recovering"}, status=503)
        sinks = sink_states()
        # a failing projection target degrades the worker but the ledger still serves
        status = "degraded" if "degraded" in sinks.values() else "ok"
        return self.json({"status": status, "sinks": sinks})


@app.page("/stock/{sku}")
class StockView(View):
    @app.table_route(table=stock_table, match_info="sku")
    async def get(self, request: Request, sku: str) -> Response:
        if not ready():
            return self.json({"error": "recovering"}, status=503)
        raw: Any = stock_table.get(stock_key(sku))
        if raw is None:
            return self.json({"error": "unknown sku", "sku": sku}, status=404)
        return self.json(StoredStock.from_bytes(raw).view())


@app.page("/metrics")
class Metrics(View):
    async def get(self, request: Request) -> Response:
        ready()
        # aiohttp refuses a charset inside content_type; the exposition format is ASCII
        body = generate_latest(metrics.REGISTRY)
        return self.bytes(body, content_type=CONTENT_TYPE_LATEST.split(";")[0])
