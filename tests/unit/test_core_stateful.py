"""The core against a deliberately simple model, over random command sequences.

Hypothesis drives reserves, commits, releases, expiries (by moving the clock),
restocks, counts, returns (resellable or damaged), damaged units put back on hand
or written off, safety stock and re-sends of earlier commands, and
checks after every step that the core agrees with the model and that the
invariants of DESIGN.md s.4 hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pipeline.domain import core
from pipeline.domain.core import Outcome

T0 = 1_700_000_000_000
TTL = 10_000


@dataclass
class Model:
    on_hand: int = 0
    reserved: int = 0
    safety: int = 0
    # order -> [qty, status, expires_at]
    orders: dict[str, list] = field(default_factory=dict)
    applied_event_ids: set[str] = field(default_factory=set)
    changes: int = 0
    baseline: int = 0  # on_hand set by the last count (conservation base)
    restocked: int = 0
    returned: int = 0
    committed: int = 0
    shortfall_seen: bool = False
    damaged: int = 0
    damaged_in: int = 0  # units returned not resellable (never reset: a count is of on_hand)
    damaged_restocked: int = 0  # of them, put back on hand since the last count
    damaged_restocked_total: int = 0
    written_off: int = 0

    @property
    def available(self) -> int:
        return max(0, self.on_hand - self.reserved - self.safety)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.record: core.StockRecord | None = None
        self.reservations: dict[str, core.Reservation] = {}
        self.model = Model()
        self.now = T0
        self.sent: list[core.Command] = []
        self.versions: list[int] = []
        self.n = 0

    # -- plumbing -------------------------------------------------------
    def _eid(self) -> str:
        self.n += 1
        return f"e{self.n}"

    def _apply(self, cmd: core.Command) -> core.Decision:
        res = (
            self.reservations.get(getattr(cmd, "order_id", ""))
            if isinstance(cmd, core.ORDER_COMMANDS)
            else None
        )
        before = self.record
        d = core.decide(self.record, cmd, self.now, res, dedupe_window=10_000)
        self.record = d.record
        if d.reservation is not None:
            self.reservations[d.reservation.order_id] = d.reservation
        for e in d.events:
            if isinstance(e, core.StockChanged):
                self.versions.append(e.version)
                assert (e.on_hand, e.reserved, e.available, e.damaged) == (
                    d.record.on_hand,
                    d.record.reserved,
                    d.record.available,
                    d.record.damaged,
                )
        if before is not None and d.record.version == before.version:
            assert (before.on_hand, before.reserved, before.safety_stock, before.damaged) == (
                d.record.on_hand,
                d.record.reserved,
                d.record.safety_stock,
                d.record.damaged,
            )
        self.sent.append(cmd)
        return d

    def _result(self, d: core.Decision) -> core.ReservationResult | None:
        return next((e for e in d.events if isinstance(e, core.ReservationResult)), None)

    # -- rules ----------------------------------------------------------
    @rule(qty=st.integers(1, 20))
    def restock(self, qty: int) -> None:
        d = self._apply(core.RestockReceived(self._eid(), "A", qty, self.now))
        self.model.on_hand += qty
        self.model.restocked += qty
        self.model.changes += 1
        assert d.outcome is Outcome.RESTOCKED

    @rule(on_hand=st.integers(0, 30))
    def count(self, on_hand: int) -> None:
        d = self._apply(core.StockCounted(self._eid(), "A", on_hand, self.now))
        if on_hand != self.model.on_hand:
            self.model.changes += 1
        if on_hand < self.model.reserved:
            self.model.shortfall_seen = True
            assert d.outcome is Outcome.SHORTFALL
        self.model.on_hand = on_hand
        self.model.baseline, self.model.restocked = on_hand, 0
        self.model.returned = self.model.committed = self.model.damaged_restocked = 0

    @rule(qty=st.integers(1, 5), resellable=st.booleans())
    def return_units(self, qty: int, resellable: bool) -> None:
        self._apply(core.ReturnReceived(self._eid(), "ret", "A", qty, resellable, self.now))
        if resellable:
            self.model.on_hand += qty
            self.model.returned += qty
        else:
            self.model.damaged += qty
            self.model.damaged_in += qty
        self.model.changes += 1  # either is published (damaged is in StockChanged)

    @rule(qty=st.integers(1, 6), restock=st.booleans())
    def resolve_damaged(self, qty: int, restock: bool) -> None:
        action = core.DamagedAction.RESTOCK if restock else core.DamagedAction.WRITE_OFF
        d = self._apply(core.DamagedStockResolved(self._eid(), "A", qty, action, self.now))
        if qty > self.model.damaged:
            assert d.outcome is Outcome.INSUFFICIENT_DAMAGED
            return
        self.model.damaged -= qty
        self.model.changes += 1
        if restock:
            assert d.outcome is Outcome.DAMAGED_RESTOCKED
            self.model.on_hand += qty
            self.model.damaged_restocked += qty
            self.model.damaged_restocked_total += qty
        else:
            assert d.outcome is Outcome.DAMAGED_WRITTEN_OFF
            self.model.written_off += qty

    @rule(qty=st.integers(0, 5))
    def safety(self, qty: int) -> None:
        self._apply(core.SafetyStockSet(self._eid(), "A", qty, self.now))
        if qty != self.model.safety:
            self.model.changes += 1
        self.model.safety = qty

    @rule(qty=st.integers(1, 8))
    def reserve(self, qty: int) -> None:
        order = f"o{self.n}"
        avail = self.model.available
        d = self._apply(core.ReserveStock(self._eid(), order, "A", qty, self.now, "web", TTL))
        r = self._result(d)
        if avail >= qty:
            assert r.outcome is Outcome.RESERVED
            self.model.reserved += qty
            self.model.orders[order] = [qty, "RESERVED", self.now + TTL]
            self.model.changes += 1
        else:
            assert (r.outcome, r.available) == (Outcome.REJECTED, avail)
            self.model.orders[order] = [qty, "REJECTED", self.now]

    def _open(self) -> list[str]:
        return sorted(o for o, v in self.model.orders.items() if v[1] == "RESERVED")

    @precondition(lambda self: self.model.orders)
    @rule(data=st.data(), commit=st.booleans())
    def settle(self, data: st.DataObject, commit: bool) -> None:
        order = data.draw(st.sampled_from(sorted(self.model.orders)))
        qty, status, expires = self.model.orders[order]
        if commit:
            d = self._apply(core.CommitReservation(self._eid(), order, "A", self.now))
        else:
            d = self._apply(core.ReleaseReservation(self._eid(), order, "A", self.now))
        r = self._result(d)
        if status == "RESERVED":
            self.model.reserved -= qty
            self.model.changes += 1
            if self.now >= expires:
                assert r.outcome is Outcome.EXPIRED
                self.model.orders[order][1] = "EXPIRED"
            elif commit:
                assert r.outcome is Outcome.COMMITTED
                self.model.on_hand -= qty
                self.model.committed += qty
                self.model.orders[order][1] = "COMMITTED"
            else:
                assert r.outcome is Outcome.RELEASED
                self.model.orders[order][1] = "RELEASED"
        elif status == "REJECTED":
            assert r.outcome is Outcome.UNKNOWN_RESERVATION
        else:
            assert r.outcome in (Outcome(status), Outcome.INVALID_STATE)

    @rule(ms=st.integers(1, 2 * TTL))
    def time_passes_and_sweeper_runs(self, ms: int) -> None:
        self.now += ms
        for order in self._open():
            qty, _, expires = self.model.orders[order]
            d = self._apply(core.ExpireReservation(self._eid(), order, "A", self.now))
            if self.now >= expires:
                assert self._result(d).outcome is Outcome.EXPIRED
                self.model.reserved -= qty
                self.model.changes += 1
                self.model.orders[order][1] = "EXPIRED"
            else:
                assert d.outcome is Outcome.NOT_EXPIRED

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def producer_resends_an_earlier_command(self, data: st.DataObject) -> None:
        cmd = data.draw(st.sampled_from(self.sent))
        before = self.record
        d = self._apply(cmd)
        if isinstance(cmd, core.ExpireReservation):
            return  # an expiry re-sent later may legitimately expire a reservation: covered above
        assert d.record.on_hand == before.on_hand and d.record.reserved == before.reserved
        assert d.record.damaged == before.damaged
        assert d.record.version == before.version
        r = self._result(d)
        if r is not None and isinstance(cmd, core.ReserveStock):
            assert r.duplicate

    # -- invariants -----------------------------------------------------
    @invariant()
    def agrees_with_model(self) -> None:
        if self.record is None:
            return
        m = self.model
        assert (
            self.record.on_hand,
            self.record.reserved,
            self.record.safety_stock,
            self.record.damaged,
        ) == (m.on_hand, m.reserved, m.safety, m.damaged)
        assert self.record.version == m.changes

    @invariant()
    def no_oversell(self) -> None:
        if self.record is not None and not self.model.shortfall_seen:
            assert self.record.reserved <= self.record.on_hand

    @invariant()
    def conservation(self) -> None:
        if self.record is not None:
            m = self.model
            assert self.record.on_hand == (
                m.baseline + m.restocked + m.returned + m.damaged_restocked - m.committed
            )
            # every damaged unit is still damaged, back on hand or written off
            assert self.record.damaged == m.damaged_in - m.damaged_restocked_total - m.written_off
            assert self.record.damaged >= 0

    @invariant()
    def versions_are_gapless(self) -> None:
        assert self.versions == list(range(1, len(self.versions) + 1))

    @invariant()
    def reserved_equals_open_reservations(self) -> None:
        if self.record is not None:
            open_qty = sum(
                r.qty
                for r in self.reservations.values()
                if r.status is core.ReservationStatus.RESERVED
            )
            assert self.record.reserved == open_qty


LedgerMachine.TestCase.settings = hyp_settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
TestLedgerAgainstModel = LedgerMachine.TestCase
