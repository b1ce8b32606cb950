"""The checkout order saga's pure core: many-line orders, all or nothing, over the ledger.

An order's lines live on different SKU partitions, so no single decision can
hold them all. The saga keeps one :class:`Saga` per order (keyed by order id)
and drives the ledger with ordinary, idempotent ledger commands
(:class:`pipeline.domain.core.ReserveStock`, ``CommitReservation``,
``ReleaseReservation``) whose ``event_id`` is a function of (order, sku,
action), so a re-send is answered by the ledger with the original outcome.

Like :mod:`pipeline.domain.core` this module is plain data and plain functions: no
Faust, Kafka or Avro. :func:`decide` takes the order's state (None for an order
never seen) and one input, and returns a :class:`SagaDecision`: the new state,
the ledger commands to send and the :class:`OrderResult` to publish, if any.
Time comes only from the inputs (``occurred_at`` of the order commands, the
Kafka timestamp of a ledger answer, the time the sweeper saw for an expiry).

How it works: the saga has a *goal* (HOLD every line, COMMIT every line, or
RELEASE every line) and each line has the ledger state the saga last learnt
(PENDING: reserve sent, no answer yet; RESERVED; REJECTED; COMMITTED; RELEASED,
which also covers a ledger-side expiry). :func:`outstanding` derives the ledger
commands still needed from (goal, line states) alone:

* a PENDING line needs its ReserveStock, whatever the goal (a line is released
  or committed only after the ledger said RESERVED, so a release can never
  overtake its reserve and leave a hold behind, and the ledger never sees a
  commit or release of an order it does not know);
* a RESERVED line needs CommitReservation under COMMIT, ReleaseReservation
  under RELEASE, nothing under HOLD.

A decision sends exactly the commands that became outstanding; the agent's
sweeper re-sends everything outstanding of a saga that made no progress for a
few seconds (a crash between the table write and the sends). The order settles
when nothing is outstanding: HOLD with every line RESERVED -> ORDER_RESERVED;
HOLD with any line REJECTED switches to RELEASE (reason ``rejected``) at once,
and ORDER_REJECTED is answered only once every reserved line is RELEASED.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from enum import Enum

from pipeline.domain import core

DEFAULT_GRACE_MS = 60_000
"""Ledger holds last ttl + this, so the saga (not the ledger) decides an order's expiry."""
DEFAULT_MAX_LINES = 100
MAX_ORDER_ID_LEN = 100  # leaves room for the derived ledger event ids (128 max)
MAX_EVENT_ID_LEN = 128


class Goal(str, Enum):
    HOLD = "HOLD"
    COMMIT = "COMMIT"
    RELEASE = "RELEASE"


class LineState(str, Enum):
    PENDING = "PENDING"
    RESERVED = "RESERVED"
    REJECTED = "REJECTED"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"

    @property
    def final(self) -> bool:
        return self in (LineState.REJECTED, LineState.COMMITTED, LineState.RELEASED)


class OrderStatus(str, Enum):
    RESERVING = "RESERVING"  # HOLD, some line not answered yet
    RESERVED = "RESERVED"  # HOLD, every line held: at rest until commit/cancel/expiry
    COMMITTING = "COMMITTING"
    RELEASING = "RELEASING"
    COMMITTED = "COMMITTED"
    COMMIT_FAILED = "COMMIT_FAILED"  # a line's hold was gone when committed (see README)
    REJECTED = "REJECTED"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"

    @property
    def final(self) -> bool:
        return self not in (
            OrderStatus.RESERVING,
            OrderStatus.RESERVED,
            OrderStatus.COMMITTING,
            OrderStatus.RELEASING,
        )


class OrderOutcome(str, Enum):
    ORDER_RESERVED = "ORDER_RESERVED"
    ORDER_REJECTED = "ORDER_REJECTED"
    ORDER_COMMITTED = "ORDER_COMMITTED"
    ORDER_COMMIT_FAILED = "ORDER_COMMIT_FAILED"
    ORDER_CANCELLED = "ORDER_CANCELLED"
    ORDER_EXPIRED = "ORDER_EXPIRED"
    ORDER_UNKNOWN = "ORDER_UNKNOWN"  # commit/cancel of an order never placed
    ORDER_INVALID_STATE = "ORDER_INVALID_STATE"  # e.g. commit of a cancelled order


# the final status a RELEASE goal ends in, by its reason
_RELEASE_END = {
    "rejected": OrderStatus.REJECTED,
    "cancelled": OrderStatus.CANCELLED,
    "expired": OrderStatus.EXPIRED,
}
_OUTCOME_OF = {
    OrderStatus.RESERVED: OrderOutcome.ORDER_RESERVED,
    OrderStatus.COMMITTED: OrderOutcome.ORDER_COMMITTED,
    OrderStatus.COMMIT_FAILED: OrderOutcome.ORDER_COMMIT_FAILED,
    OrderStatus.REJECTED: OrderOutcome.ORDER_REJECTED,
    OrderStatus.CANCELLED: OrderOutcome.ORDER_CANCELLED,
    OrderStatus.EXPIRED: OrderOutcome.ORDER_EXPIRED,
}


# --------------------------------------------------------------------------
# inputs (times are epoch milliseconds)


@dataclass(frozen=True)
class PlaceOrder:
    event_id: str
    order_id: str
    lines: tuple[tuple[str, int], ...]  # (sku, qty) as sent; same-SKU lines are summed
    occurred_at: int
    channel: str = "web"
    ttl_ms: int = 15 * 60 * 1000
    customer_id: str = ""  # passed to every line's ReserveStock (per-customer caps)
    location: str = ""  # passed to every line's ReserveStock ("" = by priority)
    split: bool = False  # passed to every line's ReserveStock


@dataclass(frozen=True)
class CommitOrder:
    event_id: str
    order_id: str
    occurred_at: int
    channel: str = "web"


@dataclass(frozen=True)
class CancelOrder:
    event_id: str
    order_id: str
    occurred_at: int
    reason: str = "cancelled"
    channel: str = "web"


@dataclass(frozen=True)
class ExpireOrder:
    """Internal: the saga sweeper saw the order past its expiry at ``occurred_at``."""

    event_id: str
    order_id: str
    occurred_at: int


@dataclass(frozen=True)
class PruneOrder:
    """Internal: the saga sweeper saw, at ``occurred_at``, a finished order whose
    retention was over; the agent deletes it if :func:`prune_due` agrees. On the wire a
    ``CancelOrder`` with ``expire: true`` and reason :data:`PRUNE_REASON`."""

    event_id: str
    order_id: str
    occurred_at: int


PRUNE_REASON = "pruned"


@dataclass(frozen=True)
class LineResult:
    """A ledger ReservationResult for this order; ``at`` is its Kafka timestamp."""

    event_id: str
    order_id: str
    sku: str
    outcome: str
    qty: int
    available: int
    at: int
    reason: str = ""
    duplicate: bool = False


OrderCommand = PlaceOrder | CommitOrder | CancelOrder | ExpireOrder | PruneOrder
SagaInput = OrderCommand | LineResult


# --------------------------------------------------------------------------
# state and outputs


@dataclass(frozen=True)
class Line:
    sku: str
    qty: int
    state: LineState = LineState.PENDING
    available: int = -1  # the ledger's available count when it rejected the line
    reason: str = ""


@dataclass(frozen=True)
class OrderResult:
    event_id: str  # the order command this answers
    order_id: str
    outcome: OrderOutcome
    status: OrderStatus | None  # the order's status when answered (None: unknown order)
    lines: tuple[Line, ...] = ()
    reason: str = ""
    duplicate: bool = False
    expires_at: int = 0


@dataclass(frozen=True)
class Saga:
    order_id: str
    channel: str
    lines: tuple[Line, ...]
    placed_at: int
    expires_at: int
    hold_ttl_ms: int  # ttl of the ledger holds: order ttl + grace
    place_event_id: str
    goal: Goal = Goal.HOLD
    status: OrderStatus = OrderStatus.RESERVING
    close_reason: str = ""  # rejected / cancelled / expired, under RELEASE
    goal_at: int = 0  # occurred_at stamped on the commits or releases (re-sends are identical)
    goal_event_id: str = ""  # the command whose answer the current goal owes
    first_result: OrderResult | None = None
    customer_id: str = ""
    location: str = ""  # every line's ReserveStock holds there ("" = by priority)
    split: bool = False

    @property
    def settled(self) -> bool:
        return self.status.final or self.status is OrderStatus.RESERVED

    def line(self, sku: str) -> Line | None:
        for line in self.lines:
            if line.sku == sku:
                return line
        return None


@dataclass(frozen=True)
class SagaDecision:
    saga: Saga | None
    sends: tuple[core.OrderCommand, ...] = ()
    result: OrderResult | None = None
    changed: bool = False  # the saga must be stored (it differs from the input state)
    unknown_order: bool = False  # a commit/cancel of an order never placed (dead-letter it)
    prune: bool = False  # the finished order's retention is over: delete it (a tombstone)
    note: str = ""  # why nothing happened, for logs and metrics


# --------------------------------------------------------------------------
# ledger event ids


def line_event_id(order_id: str, sku: str, action: str) -> str:
    """The deterministic ledger event id of ``action`` (reserve/commit/release) of one line."""
    eid = f"{order_id}:{sku}:{action}"
    if len(eid) <= MAX_EVENT_ID_LEN:
        return eid
    digest = hashlib.sha256(sku.encode("utf-8")).hexdigest()[:16]
    return f"{order_id}:#{digest}:{action}"


def outstanding(saga: Saga) -> tuple[core.OrderCommand, ...]:
    """The ledger commands the saga still needs answered (see the module docstring)."""
    out: list[core.OrderCommand] = []
    for line in saga.lines:
        if line.state is LineState.PENDING:
            out.append(
                core.ReserveStock(
                    event_id=line_event_id(saga.order_id, line.sku, "reserve"),
                    order_id=saga.order_id,
                    sku=line.sku,
                    qty=line.qty,
                    occurred_at=saga.placed_at,
                    channel=saga.channel,
                    ttl_ms=saga.hold_ttl_ms,
                    customer_id=saga.customer_id,
                    location=saga.location,
                    split=saga.split,
                )
            )
        elif line.state is LineState.RESERVED and saga.goal is Goal.COMMIT:
            out.append(
                core.CommitReservation(
                    event_id=line_event_id(saga.order_id, line.sku, "commit"),
                    order_id=saga.order_id,
                    sku=line.sku,
                    occurred_at=saga.goal_at,
                    channel=saga.channel,
                )
            )
        elif line.state is LineState.RESERVED and saga.goal is Goal.RELEASE:
            out.append(
                core.ReleaseReservation(
                    event_id=line_event_id(saga.order_id, line.sku, "release"),
                    order_id=saga.order_id,
                    sku=line.sku,
                    occurred_at=saga.goal_at,
                    reason=f"order {saga.close_reason}",
                    channel=saga.channel,
                )
            )
    return tuple(out)


def due_for_expiry(saga: Saga, now: int) -> bool:
    """True when the sweeper should send an ExpireOrder seen at ``now``."""
    return saga.goal is Goal.HOLD and now >= saga.expires_at


# --------------------------------------------------------------------------
# the function


def prune_due(saga: Saga, retention_ms: int) -> int | None:
    """When a finished saga may be deleted: ``retention_ms`` after the latest of its
    expiry, placement and last goal (times of its own commands, never a clock), so a
    retry of its commands within the retention gets the same answer. None while it is
    not final or when ``retention_ms`` is 0 (kept forever). After that a PlaceOrder with
    its id is a new order and a CommitOrder/CancelOrder an unknown one."""
    if retention_ms <= 0 or not saga.status.final:
        return None
    return max(saga.expires_at, saga.placed_at, saga.goal_at) + retention_ms


def decide(
    saga: Saga | None,
    inp: SagaInput,
    *,
    grace_ms: int = DEFAULT_GRACE_MS,
    retention_ms: int = 0,
) -> SagaDecision:
    """Apply one input to one order's saga; see the module docstring. ``retention_ms``
    is how long a finished saga is kept (:func:`prune_due`; 0 = forever)."""
    if saga is not None and saga.order_id != inp.order_id:
        raise ValueError(f"input for {inp.order_id!r} applied to saga of {saga.order_id!r}")
    if isinstance(inp, PlaceOrder):
        if saga is None:
            return _progress(None, _new_saga(inp, grace_ms))
        return _duplicate_place(saga, inp)
    if saga is None:
        if isinstance(inp, (CommitOrder, CancelOrder)):
            return SagaDecision(
                None,
                result=OrderResult(
                    inp.event_id,
                    inp.order_id,
                    OrderOutcome.ORDER_UNKNOWN,
                    None,
                    reason="no order with this id",
                ),
                unknown_order=True,
                note="unknown order",
            )
        return SagaDecision(None, note="no saga for this order")
    if isinstance(inp, LineResult):
        return _line_result(saga, inp)
    if isinstance(inp, CommitOrder):
        return _commit(saga, inp)
    if isinstance(inp, CancelOrder):
        return _close(saga, inp, "cancelled")
    if isinstance(inp, PruneOrder):
        due = prune_due(saga, retention_ms)
        if due is None or inp.occurred_at < due:
            return SagaDecision(saga, note="not due for pruning")
        return SagaDecision(saga, prune=True, note="pruned")
    assert isinstance(inp, ExpireOrder)
    if not due_for_expiry(saga, inp.occurred_at):
        return SagaDecision(saga, note="not expired")
    return _close(saga, inp, "expired")


def _new_saga(cmd: PlaceOrder, grace_ms: int) -> Saga:
    summed: dict[str, int] = {}
    for sku, qty in cmd.lines:
        summed[sku] = summed.get(sku, 0) + qty
    return Saga(
        order_id=cmd.order_id,
        channel=cmd.channel,
        lines=tuple(Line(sku, qty) for sku, qty in summed.items()),
        placed_at=cmd.occurred_at,
        expires_at=cmd.occurred_at + cmd.ttl_ms,
        hold_ttl_ms=cmd.ttl_ms + grace_ms,
        place_event_id=cmd.event_id,
        goal_event_id=cmd.event_id,
        customer_id=cmd.customer_id,
        location=cmd.location,
        split=cmd.split,
    )


def _duplicate_place(saga: Saga, cmd: PlaceOrder) -> SagaDecision:
    if saga.first_result is None:
        # still deciding: the first outcome is published when it is known
        return SagaDecision(saga, note="duplicate PlaceOrder while reserving")
    return SagaDecision(
        saga,
        result=replace(
            saga.first_result, event_id=cmd.event_id, status=saga.status, duplicate=True
        ),
        changed=False,
        note="duplicate PlaceOrder",
    )


def _answer(
    saga: Saga, event_id: str, outcome: OrderOutcome, reason: str, dup: bool
) -> OrderResult:
    return OrderResult(
        event_id,
        saga.order_id,
        outcome,
        saga.status,
        saga.lines,
        reason,
        duplicate=dup,
        expires_at=saga.expires_at,
    )


def _commit(saga: Saga, cmd: CommitOrder) -> SagaDecision:
    if saga.goal is Goal.HOLD:
        if cmd.occurred_at >= saga.expires_at:
            # a commit that arrives after the expiry finds the order already due back
            return _close(saga, cmd, "expired")
        if saga.status is not OrderStatus.RESERVED:
            return SagaDecision(
                saga,
                result=_answer(
                    saga,
                    cmd.event_id,
                    OrderOutcome.ORDER_INVALID_STATE,
                    "order is not reserved yet",
                    False,
                ),
                note="commit while reserving",
            )
        new = replace(
            saga,
            goal=Goal.COMMIT,
            status=OrderStatus.COMMITTING,
            goal_at=cmd.occurred_at,
            goal_event_id=cmd.event_id,
        )
        return _progress(saga, new)
    return _again(saga, cmd.event_id, Goal.COMMIT, "")


def _close(saga: Saga, cmd: CommitOrder | CancelOrder | ExpireOrder, reason: str) -> SagaDecision:
    if saga.goal is not Goal.HOLD:
        return _again(saga, cmd.event_id, Goal.RELEASE, reason)
    new = replace(
        saga,
        goal=Goal.RELEASE,
        status=OrderStatus.RELEASING,
        close_reason=reason,
        goal_at=cmd.occurred_at,
        goal_event_id=cmd.event_id,
    )
    return _progress(saga, new)


def _again(saga: Saga, event_id: str, goal: Goal, reason: str) -> SagaDecision:
    """A commit/cancel/expiry of an order already committing or closing."""
    same = saga.goal is goal and (goal is Goal.COMMIT or saga.close_reason == reason)
    if same and not saga.status.final:
        return SagaDecision(saga, note="already in progress; answered when settled")
    if same:
        outcome = _OUTCOME_OF[saga.status]
        return SagaDecision(
            saga,
            result=_answer(saga, event_id, outcome, "", True),
            note="duplicate",
        )
    target = OrderStatus.COMMITTED if saga.goal is Goal.COMMIT else _RELEASE_END[saga.close_reason]
    return SagaDecision(
        saga,
        result=_answer(
            saga,
            event_id,
            OrderOutcome.ORDER_INVALID_STATE,
            f"order is {target.value}",
            False,
        ),
        note="invalid state",
    )


def _ledger_state(inp: LineResult) -> LineState | None:
    """The line state a ledger answer implies, or None if it says nothing new."""
    outcome = inp.outcome
    if outcome == "RESERVED":
        return LineState.RESERVED
    if outcome == "REJECTED":
        return LineState.REJECTED
    if outcome == "COMMITTED":
        return LineState.COMMITTED
    if outcome in ("RELEASED", "EXPIRED"):
        return LineState.RELEASED
    if outcome == "INVALID_STATE":
        # "reservation is X": the hold was already closed by someone else (ledger expiry)
        closed = inp.reason.rsplit(" ", 1)[-1]
        if closed == "COMMITTED":
            return LineState.COMMITTED
        return LineState.RELEASED
    if outcome == "UNKNOWN_RESERVATION":
        return LineState.REJECTED if "rejected" in inp.reason else LineState.RELEASED
    return None


def _line_result(saga: Saga, inp: LineResult) -> SagaDecision:
    line = saga.line(inp.sku)
    if line is None or inp.event_id not in {
        line_event_id(saga.order_id, inp.sku, a) for a in ("reserve", "commit", "release")
    }:
        return SagaDecision(saga, note="not an answer to this saga")
    state = _ledger_state(inp)
    if state is None or line.state.final or state is line.state:
        return SagaDecision(saga, note="stale or repeated answer")
    if line.state is LineState.RESERVED and state in (LineState.REJECTED, LineState.PENDING):
        return SagaDecision(saga, note="stale answer")
    new_line = replace(
        line,
        state=state,
        available=inp.available if state is LineState.REJECTED else line.available,
        reason=inp.reason if state is not LineState.RESERVED else line.reason,
    )
    lines = tuple(new_line if x.sku == inp.sku else x for x in saga.lines)
    new = replace(saga, lines=lines)
    if new.goal is Goal.HOLD and state is not LineState.RESERVED:
        # all or nothing: give back whatever is held now, not when the last answer is in.
        # A hold found closed by someone else (the ledger's own expiry after a long outage)
        # cannot be part of a reserved order either: the order expires.
        new = replace(
            new,
            goal=Goal.RELEASE,
            status=OrderStatus.RELEASING,
            close_reason="rejected" if state is LineState.REJECTED else "expired",
            goal_at=inp.at,
            goal_event_id=saga.place_event_id,
        )
    return _progress(saga, new)


def _progress(old: Saga | None, new: Saga) -> SagaDecision:
    """Settle ``new`` if nothing is outstanding; send what became outstanding."""
    pending = outstanding(new)
    result = None
    if not pending and not new.settled:
        states = {line.state for line in new.lines}
        if new.goal is Goal.HOLD:
            status = OrderStatus.RESERVED
        elif new.goal is Goal.COMMIT:
            status = (
                OrderStatus.COMMITTED
                if states == {LineState.COMMITTED}
                else OrderStatus.COMMIT_FAILED
            )
        else:
            status = _RELEASE_END[new.close_reason]
        new = replace(new, status=status)
        result = _answer(new, new.goal_event_id, _OUTCOME_OF[status], _reason(new), False)
        if new.first_result is None:
            new = replace(new, first_result=result)
    before = set(outstanding(old)) if old is not None else set()
    sends = tuple(c for c in pending if c not in before)
    return SagaDecision(new, sends=sends, result=result, changed=new != old)


def _reason(saga: Saga) -> str:
    if saga.status is OrderStatus.REJECTED:
        rejected = [x for x in saga.lines if x.state is LineState.REJECTED]
        capped = [x for x in rejected if x.reason == core.CUSTOMER_LIMIT_REASON]
        failed = [f"{x.sku} (wanted {x.qty}, available {x.available})" for x in rejected]
        if capped:
            # a per-customer cap refused a line: ``available`` is the customer's allowance
            return "customer_limit: " + ", ".join(
                f"{x.sku} (wanted {x.qty}, allowance {x.available})" for x in capped
            )
        return "insufficient stock: " + ", ".join(failed)
    if saga.status is OrderStatus.COMMIT_FAILED:
        failed = [f"{x.sku}: {x.reason}" for x in saga.lines if x.state is not LineState.COMMITTED]
        return "hold gone before commit: " + ", ".join(failed)
    return ""


def failed_lines(result: OrderResult) -> list[Line]:
    """The lines an ORDER_REJECTED names (those the ledger refused)."""
    return [x for x in result.lines if x.state is LineState.REJECTED]
