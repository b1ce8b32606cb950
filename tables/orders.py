"""How the order saga table stores state, and why the layout makes effects exactly-once.

One Faust table (RocksDB, changelog in Kafka), key = the order id's UTF-8
bytes, value = :class:`StoredSaga` as JSON:

* ``s``: the saga (:class:`pipeline.domain.saga.Saga`): lines with their ledger
  state, goal, status, expiry, the first answer given;
* ``w``: the highest input offset applied per source topic (the checkouts
  topic and the reservation-results topic; both are keyed by order id and
  co-partitioned, so one saga only ever sees one partition of each). A Kafka
  redelivery at or below the watermark is skipped: its effect is in the value;
* ``fx``: the OrderResults caused by the input that wrote this value (Avro-ready
  dicts). The order relay publishes them from the changelog, so an answer is
  never lost when the state landed, nor published when it did not;
* ``t``: wall-clock time of the write. Only the sweeper reads it (to re-send
  the outstanding ledger commands of a saga that made no progress for a few
  seconds); decisions never do.

The saga's ledger commands are *not* stored: :func:`pipeline.domain.saga.outstanding`
derives them from the state, deterministically, so a re-send is byte-identical
up to framing and the ledger answers it with the original outcome.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.domain import saga as sg
from tables.index import LiveIndex


def order_key(order_id: str) -> bytes:
    return order_id.encode("utf-8")


def _line_to(x: sg.Line) -> dict[str, Any]:
    return {"sku": x.sku, "qty": x.qty, "st": x.state.value, "av": x.available, "r": x.reason}


def _line_from(d: dict[str, Any]) -> sg.Line:
    return sg.Line(d["sku"], d["qty"], sg.LineState(d["st"]), d.get("av", -1), d.get("r", ""))


def result_to_dict(r: sg.OrderResult) -> dict[str, Any]:
    """An OrderResult as the Avro record ``OrderResult`` (schemas/OrderResult.avsc)."""
    return {
        "event_id": r.event_id,
        "order_id": r.order_id,
        "outcome": r.outcome.value,
        "status": r.status.value if r.status is not None else "UNKNOWN",
        "lines": [
            {"sku": x.sku, "qty": x.qty, "outcome": x.state.value, "available": x.available}
            for x in r.lines
        ],
        "reason": r.reason,
        "duplicate": r.duplicate,
        "expires_at": r.expires_at,
    }


def _result_from_dict(d: dict[str, Any]) -> sg.OrderResult:
    status = None if d["status"] == "UNKNOWN" else sg.OrderStatus(d["status"])
    return sg.OrderResult(
        event_id=d["event_id"],
        order_id=d["order_id"],
        outcome=sg.OrderOutcome(d["outcome"]),
        status=status,
        lines=tuple(
            sg.Line(x["sku"], x["qty"], sg.LineState(x["outcome"]), x["available"])
            for x in d["lines"]
        ),
        reason=d.get("reason", ""),
        duplicate=d.get("duplicate", False),
        expires_at=d.get("expires_at", 0),
    )


def saga_to_dict(s: sg.Saga) -> dict[str, Any]:
    return {
        "order_id": s.order_id,
        "channel": s.channel,
        "lines": [_line_to(x) for x in s.lines],
        "placed_at": s.placed_at,
        "expires_at": s.expires_at,
        "hold_ttl_ms": s.hold_ttl_ms,
        "place_event_id": s.place_event_id,
        "goal": s.goal.value,
        "status": s.status.value,
        "close_reason": s.close_reason,
        "goal_at": s.goal_at,
        "goal_event_id": s.goal_event_id,
        "first": result_to_dict(s.first_result) if s.first_result is not None else None,
        **({"cust": s.customer_id} if s.customer_id else {}),
        **({"loc": [s.location, s.split]} if s.location or s.split else {}),
    }


def saga_from_dict(d: dict[str, Any]) -> sg.Saga:
    first = d.get("first")
    return sg.Saga(
        order_id=d["order_id"],
        channel=d["channel"],
        lines=tuple(_line_from(x) for x in d["lines"]),
        placed_at=d["placed_at"],
        expires_at=d["expires_at"],
        hold_ttl_ms=d["hold_ttl_ms"],
        place_event_id=d["place_event_id"],
        goal=sg.Goal(d["goal"]),
        status=sg.OrderStatus(d["status"]),
        close_reason=d.get("close_reason", ""),
        goal_at=d.get("goal_at", 0),
        goal_event_id=d.get("goal_event_id", ""),
        first_result=_result_from_dict(first) if first else None,
        customer_id=d.get("cust", ""),
        location=d.get("loc", ("", False))[0],
        split=bool(d.get("loc", ("", False))[1]),
    )


@dataclass(frozen=True)
class StoredSaga:
    saga: sg.Saga
    watermarks: dict[str, int] = field(default_factory=dict)
    effects: list[dict[str, Any]] = field(default_factory=list)  # OrderResult dicts
    updated_at: int = 0

    def applied(self, topic: str, offset: int) -> bool:
        """True when the input at ``topic``/``offset`` (of this order's partition) is applied."""
        return self.watermarks.get(topic, -1) >= offset

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "s": saga_to_dict(self.saga),
                "w": self.watermarks,
                "fx": self.effects,
                "t": self.updated_at,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> StoredSaga:
        d = orjson.loads(data)
        return cls(saga_from_dict(d["s"]), d.get("w", {}), d.get("fx", []), d.get("t", 0))

    def view(self) -> dict[str, Any]:
        """The public JSON of ``GET /orders/{order_id}``."""
        s = self.saga
        return {
            "order_id": s.order_id,
            "status": s.status.value,
            "goal": s.goal.value,
            "close_reason": s.close_reason,
            "expires_at": s.expires_at,
            "lines": [
                {"sku": x.sku, "qty": x.qty, "state": x.state.value, "available": x.available}
                for x in s.lines
            ],
            "outstanding": len(sg.outstanding(s)),
        }


class OpenSagas(LiveIndex[bytes]):
    """The sagas of a worker's partitions that are not final, by table key, with their
    stored value: all the saga sweeper reads (see :mod:`tables.index`)."""

    @staticmethod
    def entry_of(key: bytes, value: bytes) -> bytes | None:
        """The stored value if the saga is still open, else None."""
        return value if not StoredSaga.from_bytes(value).saga.status.final else None

    def note(self, key: bytes, value: bytes, saga: sg.Saga) -> None:
        """Record the saga value just written under ``key``."""
        self.put(key, None if saga.status.final else value)


PRUNE_PENDING_MAX = 100_000  # finished sagas remembered for pruning (about 150 bytes each)


class FinishedSagas:
    """Finished sagas of this worker's partitions and when each may be pruned
    (:func:`pipeline.domain.saga.prune_due`), for the sweeper: key -> due (epoch ms).

    Noted by the agent when a saga it writes is final and by every full scan of the
    table (the saga index's rebuild), at most :data:`PRUNE_PENDING_MAX` at once:
    the others are found by a later scan once these are pruned, so memory stays
    bounded however many orders finish within the retention."""

    def __init__(self, limit: int = PRUNE_PENDING_MAX) -> None:
        self.limit = limit
        self._due: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []  # (due, key); stale entries skipped

    def __len__(self) -> int:
        return len(self._due)

    def note(self, key: bytes, saga: sg.Saga, retention_ms: int) -> None:
        due = sg.prune_due(saga, retention_ms)
        if due is None:
            self._due.pop(key, None)
        elif self._due.get(key) != due and (key in self._due or len(self._due) < self.limit):
            self._due[key] = due
            heapq.heappush(self._heap, (due, key))

    def forget(self, key: bytes) -> None:
        self._due.pop(key, None)

    def take_due(self, now: int, most: int) -> list[bytes]:
        """Up to ``most`` keys due at ``now``, earliest first, forgotten here (a later
        scan finds any whose prune did not happen)."""
        out: list[bytes] = []
        while self._heap and self._heap[0][0] <= now and len(out) < most:
            due, key = heapq.heappop(self._heap)
            if self._due.get(key) == due:
                del self._due[key]
                out.append(key)
        if len(self._heap) > 2 * len(self._due) + 1000:  # stale entries: rebuild
            self._heap = [(due, key) for key, due in self._due.items()]
            heapq.heapify(self._heap)
        return out
