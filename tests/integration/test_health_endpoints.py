"""/livez, /readyz and /healthz on real workers: a starting or rebalancing worker is
alive but not ready, and once ready the two workers' ledger partitions split the topic."""

from __future__ import annotations

import time

import pytest

from harness import Namespace, Worker, wait_for

pytestmark = pytest.mark.integration


def sample(w: Worker) -> tuple[int | None, int | None, object]:
    live = w.status("/livez")
    try:
        ready, body = w.get_json("/readyz")
    except OSError:  # not listening yet
        ready, body = None, None
    return live, ready, body


def watch_start(w: Worker, timeout: float = 90.0) -> list[tuple[int | None, int | None, object]]:
    """Start ``w`` and sample its endpoints every 50 ms until /readyz is 200."""
    w.start(wait=False)
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert w.proc is not None and w.proc.poll() is None, w.tail()
        seen.append(sample(w))
        if seen[-1][1] == 200:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"{w.name} never ready; last {seen[-1:]}\n{w.tail()}")


def test_starting_and_rebalancing_workers_are_alive_before_they_are_ready(kafka):
    ns = Namespace.fresh("health", partitions=4)
    w1, w2 = Worker(ns, "w1"), Worker(ns, "w2")
    try:
        for w in (w1, w2):
            seen = watch_start(w)
            # alive but not ready: answered /livez 200 while /readyz said why not
            not_ready = [body for live, ready, body in seen if live == 200 and ready == 503]
            assert not_ready, (w.name, seen[:5])
            for body in not_ready:
                assert body["status"] == "not ready" and body["reasons"], body
                assert all(
                    r in ("tables recovering", "rebalancing")
                    or r.startswith("ledger partitions not caught up")
                    for r in body["reasons"]
                ), body
            # /livez never failed once it answered
            assert {live for live, _, _ in seen if live is not None} == {200}, seen
            assert w.status("/livez") == 200

        # once both are ready their ledger partitions split the topic, and /healthz agrees
        def split() -> bool:
            s1, b1 = w1.get_json("/readyz")
            s2, b2 = w2.get_json("/readyz")
            if (s1, s2) != (200, 200):
                return False
            p1, p2 = set(b1["partitions"]), set(b2["partitions"])
            return p1 | p2 == {"0", "1", "2", "3"} and not p1 & p2 and bool(p1) and bool(p2)

        wait_for(split, 90, "both workers ready with the partitions split")
        for w in (w1, w2):
            status, body = w.get_json("/readyz")
            assert set(body["partitions"].values()) == {"ready"}, body
            assert body["reasons"] == []
            assert w.get_json("/healthz")[0] == 200
            assert w.get_json("/livez") == (200, {"status": "alive"})
            # Faust's own views of table values and the assignment are off by default
            for path in ("/table/", "/table/orders/", "/router/", "/router/orders/SKU-1/"):
                assert w.status(path) == 404, path
    finally:
        w2.stop()
        w1.stop()
