"""Per-customer caps against a simple model, over random interleavings.

Hypothesis drives reserves (with and without ``allow_partial``) by several customers on
several channels, commits, releases, expiries, cap changes and new sales, producer
re-sends of earlier commands (same event id) and Kafka redeliveries of earlier input
records (same offset), through :func:`pipeline.batch.fold` over in-memory stores of
the SKU record, reservation and per-customer usage keys, as the ledger stores them
(their bytes round-trip through ``to_bytes``/``from_bytes``). After every step: no
grant ever took a customer past the cap in force, and every stored usage is exactly
what the customer holds plus bought in that sale.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pipeline import batch
from pipeline.domain import core
from pipeline.domain.core import Outcome
from tables.stock import StoredReservation, StoredStock, StoredUsage, usage_key

T0 = 1_700_000_000_000
TTL = 10_000
SKU = "FLASH-1"
CUSTOMERS = ("alice", "bob", "carol", "")  # "" = a reserve without a customer
CHANNELS = ("web", "mobile", "marketplace")
ORDERS = "orders"
STOCK = "restocks"


@dataclass
class Order:
    customer: str
    qty: int
    status: str  # RESERVED COMMITTED RELEASED EXPIRED REJECTED
    expires_at: int
    counted_in: str | None  # the sale whose usage holds its units, None: not counted


class CapMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.kv: dict[bytes, bytes] = {}
        self.now = T0
        self.offsets = {ORDERS: 0, STOCK: 0}
        self.inputs: list[batch.Input] = []
        self.orders: dict[str, Order] = {}
        self.cap = 0
        self.sale = ""
        self.n = 0

    # -- plumbing -------------------------------------------------------
    def _load_stock(self, sku: str) -> StoredStock | None:
        raw = self.kv.get(sku.encode())
        return StoredStock.from_bytes(raw) if raw is not None else None

    def _load_res(self, key: bytes) -> StoredReservation | None:
        raw = self.kv.get(key)
        return StoredReservation.from_bytes(raw) if raw is not None else None

    def _load_use(self, key: bytes) -> StoredUsage | None:
        raw = self.kv.get(key)
        return StoredUsage.from_bytes(raw) if raw is not None else None

    def _fold(self, inp: batch.Input) -> core.Decision | None:
        result = batch.fold(
            [inp], self._load_stock, self._load_res, self.now, load_usage=self._load_use
        )
        for key, stored in batch.stock_writes(result):
            self.kv[key] = stored.to_bytes()
        for key, res in result.reservations.items():
            self.kv[key] = res.to_bytes()
        for key, use in result.usages.items():
            self.kv[key] = use.to_bytes()
        return result.decisions[0]

    def _send(self, topic: str, cmd: core.Command) -> core.Decision:
        inp = batch.Input(topic, self.offsets[topic], cmd)
        self.offsets[topic] += 1
        self.inputs.append(inp)
        d = self._fold(inp)
        assert d is not None
        return d

    def _eid(self) -> str:
        self.n += 1
        return f"e{self.n}"

    def usage(self, sale: str, customer: str) -> int:
        return sum(
            o.qty
            for o in self.orders.values()
            if o.customer == customer
            and o.counted_in == sale
            and o.status in ("RESERVED", "COMMITTED")
        )

    @staticmethod
    def _result(d: core.Decision) -> core.ReservationResult:
        return next(e for e in d.events if isinstance(e, core.ReservationResult))

    # -- rules ----------------------------------------------------------
    @rule(qty=st.integers(1, 30))
    def restock(self, qty: int) -> None:
        self._send(STOCK, core.RestockReceived(self._eid(), SKU, qty, self.now))

    @rule(cap=st.integers(0, 4), new_sale=st.booleans())
    def set_cap(self, cap: int, new_sale: bool) -> None:
        sale = f"sale-{self.n}" if new_sale else self.sale
        d = self._send(STOCK, core.CustomerLimitSet(self._eid(), SKU, cap, self.now, sale))
        assert d.outcome is Outcome.CUSTOMER_LIMIT_SET
        self.cap, self.sale = cap, sale

    @rule(
        customer=st.sampled_from(CUSTOMERS),
        channel=st.sampled_from(CHANNELS),
        qty=st.integers(1, 4),
        partial=st.booleans(),
    )
    def reserve(self, customer: str, channel: str, qty: int, partial: bool) -> None:
        order = f"o{self.n}"
        stored = self._load_stock(SKU)
        avail = stored.record.available_for(channel) if stored is not None else 0
        capped = bool(customer) and self.cap > 0
        used = self.usage(self.sale, customer) if capped else 0
        cmd = core.ReserveStock(
            self._eid(), order, SKU, qty, self.now, channel, TTL, partial, customer_id=customer
        )
        r = self._result(self._send(ORDERS, cmd))
        room = max(0, self.cap - used) if capped else qty
        want = min(qty, avail, room) if partial else qty
        if 0 < want <= min(avail, room):
            assert (r.outcome, r.qty) == (Outcome.RESERVED, want)
            if capped:
                assert used + r.qty <= self.cap  # the cap is never passed by a grant
            self.orders[order] = Order(
                customer, r.qty, "RESERVED", self.now + TTL, self.sale if capped else None
            )
        else:
            assert r.outcome is Outcome.REJECTED
            if capped and room < qty and (room == 0 or not partial):
                assert (r.reason, r.available) == (core.CUSTOMER_LIMIT_REASON, min(avail, room))
            else:
                assert r.reason != core.CUSTOMER_LIMIT_REASON
            self.orders[order] = Order(customer, qty, "REJECTED", self.now, None)

    @precondition(lambda self: self.orders)
    @rule(data=st.data(), commit=st.booleans())
    def settle(self, data: st.DataObject, commit: bool) -> None:
        order = data.draw(st.sampled_from(sorted(self.orders)))
        o = self.orders[order]
        cls = core.CommitReservation if commit else core.ReleaseReservation
        r = self._result(self._send(ORDERS, cls(self._eid(), order, SKU, self.now)))
        if o.status != "RESERVED":
            return
        if self.now >= o.expires_at:
            assert r.outcome is Outcome.EXPIRED
            o.status = "EXPIRED"
        else:
            o.status = "COMMITTED" if commit else "RELEASED"
            assert r.outcome is Outcome(o.status)

    @rule(ms=st.integers(1, 2 * TTL))
    def time_passes_and_sweeper_runs(self, ms: int) -> None:
        self.now += ms
        for order, o in sorted(self.orders.items()):
            if o.status == "RESERVED" and self.now >= o.expires_at:
                d = self._send(ORDERS, core.ExpireReservation(self._eid(), order, SKU, self.now))
                assert d.outcome is Outcome.EXPIRED
                o.status = "EXPIRED"

    @precondition(lambda self: self.inputs)
    @rule(data=st.data())
    def producer_resends_an_earlier_command(self, data: st.DataObject) -> None:
        """The same command (same event id, same order) as a new input record."""
        inp = data.draw(st.sampled_from(self.inputs))
        if isinstance(inp.command, core.ExpireReservation):
            return  # a late expiry may legitimately expire: covered by the sweeper rule
        before = dict(self.kv)
        d = self._send(inp.topic, inp.command)
        if isinstance(inp.command, core.ReserveStock):
            assert self._result(d).duplicate
        changed = {k for k in set(before) | set(self.kv) if before.get(k) != self.kv.get(k)}
        # only the SKU record's watermark moved: no reservation nor usage changed
        assert changed <= {SKU.encode()}

    @precondition(lambda self: self.inputs)
    @rule(data=st.data())
    def kafka_redelivers_an_input_record(self, data: st.DataObject) -> None:
        """An input record already applied comes again (same offset): skipped."""
        inp = data.draw(st.sampled_from(self.inputs))
        before = dict(self.kv)
        assert self._fold(inp) is None
        assert self.kv == before

    # -- invariants -----------------------------------------------------
    @invariant()
    def stored_usage_is_what_the_customer_holds_plus_bought(self) -> None:
        sales = {o.counted_in for o in self.orders.values() if o.counted_in is not None}
        for sale in sales | {self.sale}:
            for customer in CUSTOMERS[:-1]:
                stored = self._load_use(usage_key(SKU, sale, customer))
                units = stored.current["units"] if stored is not None else 0
                assert units == self.usage(sale, customer), (sale, customer)

    @invariant()
    def reserved_equals_open_reservations(self) -> None:
        stored = self._load_stock(SKU)
        if stored is not None:
            held = sum(o.qty for o in self.orders.values() if o.status == "RESERVED")
            assert stored.record.reserved == held
            assert stored.record.reserved <= stored.record.on_hand

    @invariant()
    def the_sku_record_holds_no_per_customer_state(self) -> None:
        raw = self.kv.get(SKU.encode())
        if raw is not None:
            for customer in CUSTOMERS[:-1]:
                assert customer.encode() not in raw


CapMachine.TestCase.settings = hyp_settings(max_examples=200, stateful_step_count=40, deadline=None)
TestCustomerCapsAgainstModel = CapMachine.TestCase
