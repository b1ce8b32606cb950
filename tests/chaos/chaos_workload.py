"""One round's traffic: the flash-sale shoppers and the SKUs they buy."""

from __future__ import annotations

import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chaos_observe import QuietProducer, flush
from chaos_plan import OrderInfo
from pipeline.clock import now_ms
from pipeline.kafka.partitioning import partition_for
from pipeline.produce import CommandProducer

if TYPE_CHECKING:
    from chaos import ChaosRun

# --------------------------------------------------------------------------
# one round's traffic


@dataclass
class Pending:
    order: OrderInfo
    stage: str  # reserve, think, wait, close
    event_id: str  # the command whose answer we wait for
    type_name: str
    fields: dict[str, Any]
    last_sent: float
    retries: int = 0
    at: float = 0.0  # think/wait: when to send the close (time.time())
    fast: dict[str, Any] | None = None  # the commit sent right after the reserve


@dataclass
class RoundCtx:
    number: int
    prefix: str
    hot: list[str]
    cold: list[str]
    stop_traffic: threading.Event = field(default_factory=threading.Event)
    stopped_at: float = 0.0  # time.time() when the sale stopped

    @property
    def skus(self) -> list[str]:
        return self.hot + self.cold


class Shopper(threading.Thread):
    """One client of the flash sale, with its own idempotent producer."""

    def __init__(self, run: ChaosRun, rnd: RoundCtx, idx: int, seed: int) -> None:
        super().__init__(daemon=True, name=f"shopper-{rnd.number}-{idx}")
        self.run_ = run
        self.rnd = rnd
        self.idx = idx
        self.rng = random.Random(seed)
        self.pending: dict[str, Pending] = {}
        self.error: str | None = None
        self.unfinished: list[str] = []

    def run(self) -> None:
        try:
            self._run()
        except BaseException:  # noqa: BLE001 - surfaced by the round
            self.error = traceback.format_exc()

    def _run(self) -> None:
        cfg = self.run_.cfg
        ledger = self.run_.ledger
        p = QuietProducer(self.run_.ns.settings, on_delivery=ledger.on_delivery)
        interval = cfg.shoppers / cfg.rate
        next_at = time.monotonic()
        i = 0
        while not self.rnd.stop_traffic.is_set():
            self.step(p, i)
            i += 1
            self.tick(p, draining=False)
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        deadline = time.monotonic() + cfg.drain_timeout_s
        while self.pending and time.monotonic() < deadline:
            self.tick(p, draining=True)
            time.sleep(0.05)
        self.unfinished = sorted(self.pending)
        flush(p, ledger)

    def send(self, p: CommandProducer, type_name: str, fields: dict[str, Any]) -> None:
        self.run_.ledger.send(p, type_name, fields, self.rnd.number)

    def step(self, p: CommandProducer, i: int) -> None:
        cfg = self.run_.cfg
        rng = self.rng
        hot = rng.random() < cfg.hot_share
        sku = rng.choice(self.rnd.hot if hot else self.rnd.cold)
        tag = f"{self.rnd.prefix}-{self.idx}-{i}"
        if rng.random() < cfg.restock_share:
            qty = rng.randint(1, 3)
            fields = {"sku": sku, "qty": qty, "event_id": f"rs-{tag}", "occurred_at": now_ms()}
            self.run_.ledger.add_restock(fields["event_id"], sku, qty)
            self.send(p, "RestockReceived", fields)
            if rng.random() < cfg.resend_share:
                self.send(p, "RestockReceived", fields)
            return
        oid = f"o-{tag}"
        qty = rng.randint(1, 2) if hot else rng.randint(1, 3)
        short = rng.random() < cfg.short_ttl_share
        if short:
            plan = "late_commit" if rng.random() < cfg.late_commit_share else "abandon"
            ttl = rng.randint(*cfg.short_ttl_ms)
        else:
            plan = "commit" if rng.random() < cfg.commit_share else "release"
            ttl = 0
        fields = {"event_id": f"r-{oid}", "order_id": oid, "sku": sku, "qty": qty}
        fields["occurred_at"] = now_ms()
        if ttl:
            fields["ttl_ms"] = ttl
        info = OrderInfo(oid, sku, qty, fields["occurred_at"], ttl, plan, self.rnd.number)
        self.run_.ledger.add_order(info)
        self.send(p, "ReserveStock", fields)
        if rng.random() < cfg.resend_share:
            self.send(p, "ReserveStock", fields)  # a producer re-send of the same event
        pend = Pending(
            info, "reserve", fields["event_id"], "ReserveStock", fields, time.monotonic()
        )
        if plan == "commit" and rng.random() < cfg.fast_checkout_share:
            # pay at once, before the answer: a rejected order gets UNKNOWN_RESERVATION
            pend.fast = self._close_fields(info, "commit")
            self.send(p, "CommitReservation", pend.fast)
        self.pending[oid] = pend

    def _close_fields(self, info: OrderInfo, kind: str) -> dict[str, Any]:
        f: dict[str, Any] = {
            "event_id": f"{'c' if kind == 'commit' else 'x'}-{info.order_id}",
            "order_id": info.order_id,
            "sku": info.sku,
            "occurred_at": now_ms(),
        }
        if kind == "release":
            f["reason"] = "cancelled"
        return f

    def _close(self, p: CommandProducer, pend: Pending, kind: str) -> None:
        type_name = "CommitReservation" if kind == "commit" else "ReleaseReservation"
        fields = self._close_fields(pend.order, kind)
        self.send(p, type_name, fields)
        pend.stage, pend.event_id, pend.type_name, pend.fields = (
            "close",
            fields["event_id"],
            type_name,
            fields,
        )
        pend.last_sent, pend.retries = time.monotonic(), 0

    def tick(self, p: CommandProducer, draining: bool) -> None:
        cfg = self.run_.cfg
        tail = self.run_.tail
        now = time.monotonic()
        for oid, pend in list(self.pending.items()):
            if pend.stage in ("reserve", "close"):
                ans = tail.first_answer(pend.event_id)
                if ans is None:
                    if now - pend.last_sent > cfg.retry_after_s and pend.retries < cfg.max_retries:
                        self.send(p, pend.type_name, pend.fields)  # the client retries
                        pend.retries += 1
                        pend.last_sent = now
                    continue
                if pend.stage == "close":
                    del self.pending[oid]
                    continue
                plan = pend.order.plan
                if pend.fast is not None:  # now wait for the answer of that commit
                    pend.stage, pend.event_id, pend.type_name, pend.fields = (
                        "close",
                        pend.fast["event_id"],
                        "CommitReservation",
                        pend.fast,
                    )
                    pend.last_sent, pend.retries = now, 0
                elif ans["outcome"] != "RESERVED" or plan == "abandon":
                    del self.pending[oid]
                elif plan == "late_commit":
                    pend.stage = "wait"
                    pend.at = pend.order.expires_at / 1000 + self.rng.uniform(0.2, 2.0)
                else:
                    pend.stage = "think"
                    pend.at = time.time() + self.rng.uniform(*cfg.think_s)
            elif pend.stage == "think" and (draining or time.time() >= pend.at):
                self._close(p, pend, pend.order.plan)
            elif pend.stage == "wait" and time.time() >= pend.at:
                self._close(p, pend, "commit")


def pick_skus(prefix: str, n: int, partitions: int, start_part: int) -> list[str]:
    """``n`` SKU names spread over distinct partitions (as far as they go)."""
    out: list[str] = []
    i = 0
    want = [(start_part + k) % partitions for k in range(n)]
    while len(out) < n:
        sku = f"{prefix}-{i}"
        if partition_for(sku.encode(), partitions) == want[len(out)] or i > 200 * n:
            out.append(sku)
        i += 1
    return out
