"""Per-channel allocations in the pure core (issue 7, item 3)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.domain import core
from pipeline.domain.core import Outcome

T0 = 1_700_000_000_000


class Sku:
    """One SKU's record and its reservations, driven through core.decide."""

    def __init__(self, on_hand: int = 100) -> None:
        self.rec = core.decide(None, core.RestockReceived("r0", "A", on_hand, T0), T0).record
        self.res: dict[str, core.Reservation] = {}
        self.n = 0

    def _eid(self) -> str:
        self.n += 1
        return f"e{self.n}"

    def allocate(self, channel: str, qty: int, use_shared: bool = False) -> core.Decision:
        cmd = core.ChannelAllocationSet(self._eid(), "A", channel, qty, T0, use_shared)
        d = core.decide(self.rec, cmd, T0)
        self.rec = d.record
        return d

    def order(self, cmd: core.OrderCommand) -> core.Decision:
        d = core.decide(self.rec, cmd, T0, self.res.get(cmd.order_id))
        self.rec = d.record
        if d.reservation is not None:
            self.res[cmd.order_id] = d.reservation
        return d

    def reserve(self, order: str, qty: int, channel: str) -> core.Decision:
        return self.order(core.ReserveStock(self._eid(), order, "A", qty, T0, channel, 60_000))

    def commit(self, order: str) -> core.Decision:
        return self.order(core.CommitReservation(self._eid(), order, "A", T0))

    def release(self, order: str) -> core.Decision:
        return self.order(core.ReleaseReservation(self._eid(), order, "A", T0, "cancelled"))


def answer(d: core.Decision) -> core.ReservationResult:
    return next(e for e in d.events if isinstance(e, core.ReservationResult))


def test_a_channel_exhausts_its_quota_while_the_shared_pool_remains():
    s = Sku(100)
    s.allocate("marketplace", 20)
    assert s.rec.available_for("marketplace") == 20
    assert s.rec.available_for("web") == 80  # the marketplace's 20 are ring-fenced
    assert s.reserve("m1", 20, "marketplace").outcome is Outcome.RESERVED
    refused = s.reserve("m2", 1, "marketplace")
    assert refused.outcome is Outcome.REJECTED
    assert answer(refused).reason == "channel_allocation_exhausted"
    assert answer(refused).available == 0
    assert s.rec.available == 80 and s.rec.available_for("web") == 80
    assert s.reserve("w1", 80, "web").outcome is Outcome.RESERVED
    assert s.rec.available == 0


def test_the_shared_pool_runs_out_while_a_quota_remains():
    s = Sku(100)
    s.allocate("marketplace", 20)
    assert s.reserve("w1", 80, "web").outcome is Outcome.RESERVED
    refused = s.reserve("w2", 1, "web")
    assert refused.outcome is Outcome.REJECTED
    assert answer(refused).reason == "reserved_for_other_channels"
    assert s.rec.available == 20  # still sellable, but only by the marketplace
    assert s.reserve("m1", 20, "marketplace").outcome is Outcome.RESERVED
    assert s.rec.available == 0
    assert answer(s.reserve("m2", 1, "marketplace")).reason == "insufficient_stock"


def test_a_channel_allowed_the_shared_pool_uses_its_quota_first():
    s = Sku(100)
    s.allocate("store", 10, use_shared=True)
    assert s.rec.available_for("store") == 100
    d = s.reserve("s1", 15, "store")
    assert d.outcome is Outcome.RESERVED
    assert d.reservation is not None and d.reservation.from_allocation == 10
    assert s.rec.allocation("store") == core.ChannelAllocation("store", 10, 10, True)
    assert s.rec.available_for("web") == 85


def test_commit_takes_sold_units_out_of_the_allocation_and_release_gives_them_back():
    s = Sku(100)
    s.allocate("marketplace", 20)
    s.reserve("m1", 5, "marketplace")
    s.reserve("m2", 3, "marketplace")
    s.commit("m1")
    assert s.rec.allocation("marketplace") == core.ChannelAllocation("marketplace", 15, 3)
    assert (s.rec.on_hand, s.rec.reserved) == (95, 3)
    s.release("m2")
    assert s.rec.allocation("marketplace") == core.ChannelAllocation("marketplace", 15, 0)
    assert s.rec.available_for("marketplace") == 15
    assert s.rec.available_for("web") == 80


def test_allocation_changes_are_versioned_and_published_with_the_channels():
    s = Sku(100)
    v = s.rec.version
    d = s.allocate("marketplace", 20)
    changed = [e for e in d.events if isinstance(e, core.StockChanged)]
    assert [c.version for c in changed] == [v + 1]
    assert changed[0].channels == (core.ChannelStock("marketplace", 20, 0, 20, False),)
    assert d.outcome is Outcome.ALLOCATION_SET
    # setting the same allocation again changes nothing
    assert not [e for e in s.allocate("marketplace", 20).events if isinstance(e, core.StockChanged)]
    # zero removes it once nothing is held against it
    s.allocate("marketplace", 0)
    assert s.rec.channels == ()


def test_lowering_an_allocation_below_its_holds_keeps_them_until_they_close():
    s = Sku(100)
    s.allocate("marketplace", 20)
    s.reserve("m1", 12, "marketplace")
    s.allocate("marketplace", 0)
    assert s.rec.allocation("marketplace") == core.ChannelAllocation("marketplace", 0, 12)
    assert s.rec.available_for("marketplace") == 0
    assert s.rec.available_for("web") == 88
    s.release("m1")
    assert s.rec.allocation("marketplace") == core.ChannelAllocation("marketplace", 0, 0)
    assert s.rec.available_for("web") == 100


CHANNELS = ("web", "marketplace", "store")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(("alloc", "reserve", "commit", "release", "count")),
            st.sampled_from(CHANNELS),
            st.integers(0, 30),
            st.booleans(),
            st.integers(0, 9),
        ),
        max_size=60,
    )
)
def test_allocations_never_oversell_and_stay_consistent(steps):
    s = Sku(40)
    for kind, channel, qty, flag, order_no in steps:
        order = f"o{order_no}"
        if kind == "alloc":
            s.allocate(channel, qty, flag)
        elif kind == "reserve":
            before = s.rec.available_for(channel)
            d = s.reserve(order, max(qty, 1), channel)
            if d.outcome is Outcome.RESERVED and not answer(d).duplicate:
                assert max(qty, 1) <= before
        elif kind == "commit":
            s.commit(order)
        elif kind == "release":
            s.release(order)
        else:
            s.rec = core.decide(s.rec, core.StockCounted(s._eid(), "A", qty + 20, T0), T0).record
        r = s.rec
        open_res = [x for x in s.res.values() if x.status is core.ReservationStatus.RESERVED]
        assert r.reserved == sum(x.qty for x in open_res)
        for a in r.channels:
            held = sum(x.from_allocation for x in open_res if x.channel == a.channel)
            assert a.reserved == held
        for ch in CHANNELS:
            assert 0 <= r.available_for(ch) <= r.available
        # a count may fall below what is held (a shortfall), but no reservation ever
        # takes more than the channel could have at the time (checked above)
