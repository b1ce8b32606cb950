"""Table routing as in containers: two workers bound on 0.0.0.0 advertise reachable URLs
(INVENTORY_ADVERTISED_URL) and answer ``GET /stock`` for each other's SKUs.

Each worker advertises a TCP proxy in front of it (as a Kubernetes Service maps a port
to the container's), so the test sees that routed queries go to the advertised URL and
not to the bind address: with the owner's proxy refusing, the other worker cannot
answer for the owner's SKUs, while the owner itself still does.
"""

from __future__ import annotations

import pytest

from faults import TcpProxy
from harness import FAUST, Namespace, Worker, wait_for, wait_stock
from pipeline.kafka.partitioning import partition_for
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration


class ContainerWorker(Worker):
    """A worker bound on 0.0.0.0 (INVENTORY_WEB_HOST, no ``--web-host``), advertising
    ``advertised`` (INVENTORY_ADVERTISED_URL)."""

    advertised = ""

    def command(self) -> list[str]:
        return [str(FAUST), "-A", "pipeline.app", "--datadir", str(self.data_dir), "worker"] + [
            "--web-port",
            str(self.port),
            "-l",
            "info",
        ]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.update(INVENTORY_WEB_HOST="0.0.0.0", INVENTORY_ADVERTISED_URL=self.advertised)
        return env


def owned(w: Worker) -> set[int]:
    status, body = w.get_json("/readyz")
    return {int(p) for p in body["partitions"]} if status == 200 else set()


def test_two_workers_bound_on_0_0_0_0_answer_for_each_others_skus(kafka):
    ns = Namespace.fresh("advertise", partitions=4)
    w1, w2 = ContainerWorker(ns, "w1"), ContainerWorker(ns, "w2")
    proxies = {}
    for w in (w1, w2):
        proxies[w.name] = TcpProxy("127.0.0.1", w.port).start()
        w.advertised = f"http://127.0.0.1:{proxies[w.name].port}"
        assert w.advertised != f"http://0.0.0.0:{w.port}"  # what Faust derives from the bind
    skus = [f"ADV-{i}" for i in range(24)]
    by_partition = {p: [s for s in skus if partition_for(s.encode(), 4) == p] for p in range(4)}
    assert all(by_partition.values())
    try:
        w1.start()
        w2.start()
        with CommandProducer(ns.settings) as p:
            for i, sku in enumerate(skus):
                p.send("RestockReceived", {"sku": sku, "qty": 10 + i})

        def split() -> bool:
            a, b = owned(w1), owned(w2)
            return bool(a) and bool(b) and not a & b and a | b == {0, 1, 2, 3}

        wait_for(split, 90, "the partitions split between the two workers")
        parts = {w1.name: owned(w1), w2.name: owned(w2)}

        for asked, owner in ((w1, w2), (w2, w1)):
            theirs = [s for p in parts[owner.name] for s in by_partition[p]]
            for sku in theirs:
                body = wait_stock(asked, sku, timeout=60, on_hand=10 + skus.index(sku))
                assert body["sku"] == sku

            # the routed query goes to the owner's advertised URL: refused there, the
            # asking worker cannot answer, while the owner still answers itself
            proxies[owner.name].set_mode("refuse")
            try:
                sku = theirs[0]
                assert asked.status(f"/stock/{sku}") != 200, (asked.name, sku)
                assert owner.get_json(f"/stock/{sku}")[0] == 200
            finally:
                proxies[owner.name].set_mode("up")
            wait_stock(asked, theirs[0], timeout=30, on_hand=10 + skus.index(theirs[0]))
    finally:
        w2.stop()
        w1.stop()
        for proxy in proxies.values():
            proxy.close()
