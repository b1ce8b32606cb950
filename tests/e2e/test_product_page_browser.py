"""End to end in a real browser: Kafka command -> worker -> Redis sink -> SSE -> product page.

Runs headless Chromium (the system's ``/usr/bin/chromium``, driven by
Playwright) against a real worker that runs the Redis sink itself. Screenshots
land in ``test-output/<test name>/``.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from config.settings import settings
from harness import OUT, Namespace, Worker
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000

# records every version the page shows, to check it never goes backwards
RECORD_VERSIONS = """
window.__versions = [];
document.addEventListener("DOMContentLoaded", () => {
  const el = document.getElementById("version");
  new MutationObserver(() => window.__versions.push(el.textContent))
    .observe(el, {childList: true, characterData: true, subtree: true});
});
"""


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install the system browser (apt-get install -y chromium)",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]'", pytrace=False)
    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def test_the_product_page_follows_restocks_and_reservations_live(
    kafka, redis_service, browser, request
):
    from playwright.sync_api import expect

    shots = OUT / request.node.name
    shots.mkdir(parents=True, exist_ok=True)
    run = uuid.uuid4().hex[:8]
    prefix = f"e2e-{run}:"
    index = f"inventory-stock-e2e-{run}"
    ns = Namespace.fresh("e2e", INVENTORY_REDIS_KEY_PREFIX=prefix, INVENTORY_SEARCH_INDEX=index)
    cfg = replace(settings, redis_key_prefix=prefix)
    sku = f"E2E-{run}"
    worker = Worker(ns).start()
    page = None
    try:
        producer = CommandProducer(ns.settings)
        producer.send("RestockReceived", {"sku": sku, "qty": 10})
        producer.flush()

        page = browser.new_page(viewport={"width": 640, "height": 480})
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on(
            "console",
            lambda msg: (
                problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None
            ),
        )
        page.add_init_script(RECORD_VERSIONS)
        page.goto(f"{worker.url}/product/{sku}")
        expect(page.locator("#sku")).to_have_text(sku)
        page.screenshot(path=str(shots / "0-opened.png"))

        def shows(available: int, status: str, step: str) -> None:
            try:
                expect(page.locator("#available")).to_have_text(str(available), timeout=TIMEOUT_MS)
                expect(page.locator("#status")).to_have_text(status, timeout=5_000)
            except AssertionError as exc:
                page.screenshot(path=str(shots / f"failed-{step}.png"))
                raise AssertionError(
                    f"{step}: the page did not show available={available} / {status!r}.\n"
                    f"page: #available={page.text_content('#available')!r} "
                    f"#status={page.text_content('#status')!r} "
                    f"#connection={page.text_content('#connection')!r}\n"
                    f"worker /stock/{sku}: {worker.get_json(f'/stock/{sku}')}\n"
                    f"redis {cfg.redis_stock_key(sku)}: {redis_hash(cfg, sku)}\n"
                    f"(is the Redis sink running in the worker?)\n{worker.tail(20)}"
                ) from exc

        shows(10, "In stock", "restock")
        page.screenshot(path=str(shots / "1-restocked.png"))

        producer.send("ReserveStock", {"order_id": f"o-{run}-1", "sku": sku, "qty": 3})
        producer.flush()
        shows(7, "In stock", "first reservation")
        page.screenshot(path=str(shots / "2-reserved.png"))

        producer.send("ReserveStock", {"order_id": f"o-{run}-2", "sku": sku, "qty": 7})
        producer.flush()
        shows(0, "Sold out", "the rest reserved")
        page.screenshot(path=str(shots / "3-sold-out.png"))

        # a purchase order and a backorder cap: still nothing available, but preorderable
        producer.send("BackorderCapSet", {"sku": sku, "max_units": 5})
        producer.send(
            "IncomingStock",
            {"sku": sku, "po_id": "po-1", "qty": 20, "expected_at": 1_800_000_000_000},
        )
        producer.flush()
        expect(page.locator("#version")).to_have_text("5", timeout=TIMEOUT_MS)
        shows(0, "Preorder", "a purchase order with backorders")
        page.screenshot(path=str(shots / "4-preorder.png"))

        shown = [int(v) for v in page.evaluate("window.__versions") if v.isdigit()]
        assert shown == sorted(set(shown)) and shown[-1] == 5, shown
        assert page.text_content("#connection") == "live"
        assert problems == []
    finally:
        if page is not None:
            page.close()
        worker.stop()
        cleanup(cfg, index)
    assert worker.proc is not None and worker.proc.returncode == 0, worker.tail()


def redis_hash(cfg: Any, sku: str) -> dict[str, str]:
    r = redis.Redis.from_url(cfg.redis_url, decode_responses=True)
    try:
        return r.hgetall(cfg.redis_stock_key(sku))
    finally:
        r.close()


def cleanup(cfg: Any, index: str) -> None:
    """Drop this test's Redis keys and search index (best effort)."""
    r = redis.Redis.from_url(cfg.redis_url)
    try:
        keys = list(r.scan_iter(match=f"{cfg.redis_key_prefix}*", count=500))
        if keys:
            r.delete(*keys)
    finally:
        r.close()
    req = urllib.request.Request(f"{cfg.opensearch_url}/{index}", method="DELETE")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            json.loads(resp.read() or b"{}")
    except OSError:
        pass
