"""Metrics, alert rules and a real Prometheus against a real worker.

promtool and prometheus are Debian's ``prometheus`` package. The test runs its
own Prometheus (own free port, own TSDB under test-output/), never the packaged
service, scraping one worker every second with docker/prometheus/alerts.yml
loaded, and reads the flash sale back through Prometheus's HTTP API.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness import OUT, REPO, Namespace, Worker, free_port, wait_for
from pipeline.clock import now_ms
from pipeline.produce import CommandProducer
from schemas.codec import AvroCodec

pytestmark = pytest.mark.integration

PROM_DIR = REPO / "docker" / "prometheus"
INSTALL_HINT = (
    "needs promtool and prometheus from Debian's `prometheus` package: "
    "apt-get install -y --no-install-recommends prometheus "
    "(the test starts its own server; the packaged service is not needed)"
)
ALERT_GROUPS = {"inventory-ledger", "inventory-projections", "inventory-availability"}
# `promtool check metrics` lint findings we accept, exactly: Faust's sensor names
# this histogram in milliseconds (faust/sensors/prometheus.py) and its name is not
# ours to change. Anything else, in particular on inventory_* metrics, fails.
ACCEPTED_LINT = {
    "faust_events_runtime_ms metric names should not contain abbreviated units",
    "faust_events_runtime_ms_created metric names should not contain abbreviated units",
}
NO_SENSOR = "no Faust sensor metrics: pipeline/app.py must call metrics.install_faust_sensor(app)"
SKU = "FLASH-OBS-1"
# Grafana variables, as a user who picked every job would have them
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m", "$job": ".+"}
UNITS = {"on_hand": 5, "reserved": 0, "safety_stock": 0, "available": 5, "version": 1}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: {INSTALL_HINT}", pytrace=False)
    return path


def run(cmd: list[str], *, cwd: Path = REPO, stdin: bytes | None = None) -> tuple[int, str]:
    proc = subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, timeout=60)
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


# --- the rules, offline -----------------------------------------------------------


def test_promtool_accepts_the_rules_the_rule_tests_and_the_compose_config():
    promtool = tool("promtool")
    rc, out = run([promtool, "check", "rules", "alerts.yml"], cwd=PROM_DIR)
    assert rc == 0, out
    rc, out = run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROM_DIR)
    assert rc == 0 and "SUCCESS" in out, out
    rc, out = run([promtool, "check", "config", "prometheus.yml"], cwd=PROM_DIR)
    assert rc == 0, out


# --- one worker, a flash sale and a real Prometheus ------------------------------


class Prometheus:
    """A prometheus subprocess on its own port and TSDB, scraping ``targets`` every 1 s."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = workdir
        self.log_path = workdir / "prometheus.log"
        config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
        config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]]
        # the worker's job only: the auditor's (inventory-auditor) has no target here
        (job,) = [c for c in config["scrape_configs"] if c["job_name"] == "inventory-worker"]
        config["scrape_configs"] = [job]
        job["static_configs"] = [{"targets": targets}]
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                "--storage.tsdb.retention.time=1h",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        atexit.register(self.stop)  # a test run that dies must not leave it running
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready in 30 s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, query: str) -> float | None:
        """The single value of an instant query, None while it returns nothing."""
        result = self.api("query", query=query)["result"]
        assert len(result) <= 1, (query, result)
        return float(result[0]["value"][1]) if result else None


def scrape(worker: Worker) -> str:
    with urllib.request.urlopen(worker.url + "/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def sample_sum(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(scope="module")
def stack(kafka, redis_service, opensearch) -> Iterator[tuple[Namespace, Worker, Prometheus]]:
    """One worker (with its Redis and search sinks) and a Prometheus scraping it."""
    ns = Namespace.fresh("obs", partitions=2)
    CommandProducer(ns.settings).flush()  # creates the input topics before the worker joins
    worker = Worker(ns)
    prom = Prometheus(OUT / ns.name / "prometheus", [f"127.0.0.1:{worker.port}"]).start()
    try:
        worker.start()
        yield ns, worker, prom
    finally:
        worker.stop()
        prom.stop()


@pytest.fixture(scope="module")
def flash_sale(stack) -> str:
    """5 units, 20 single-unit reserves (5 RESERVED, 15 REJECTED), 2 bad records.

    Returns the worker's /metrics text once it shows all of them.
    """
    ns, worker, _ = stack
    s = ns.settings
    codec = AvroCodec()
    with CommandProducer(s) as producer:
        # restocks and orders are different topics: let the units land first
        producer.send("RestockReceived", {"sku": SKU, "qty": 5})
        producer.flush()
        wait_for(
            lambda: UNITS.items() <= (worker.get_json(f"/stock/{SKU}")[1] or {}).items(),
            60,
            f"{SKU} restocked",
        )
        for i in range(20):
            producer.send("ReserveStock", {"order_id": f"obs-{i}", "sku": SKU, "qty": 1})
        producer.send_raw(s.restocks_topic, SKU.encode(), b"not avro at all")
        bad_qty = {"event_id": "obs-bad", "sku": SKU, "qty": 0, "occurred_at": now_ms()}
        producer.send_raw(s.restocks_topic, SKU.encode(), codec.encode("RestockReceived", bad_qty))

    expected = {"RESERVED": 5.0, "REJECTED": 15.0, "dead letters": 2.0}
    seen: dict[str, float] = {}

    def done() -> bool:
        text = scrape(worker)
        seen["RESERVED"] = sample_sum(text, "inventory_commands_total", outcome="RESERVED")
        seen["REJECTED"] = sample_sum(text, "inventory_commands_total", outcome="REJECTED")
        seen["dead letters"] = sample_sum(text, "inventory_dead_letters_total")
        return seen == expected

    try:
        wait_for(done, 30, "the flash sale in the worker's /metrics")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {seen} != {expected}\n{worker.tail()}") from None
    return scrape(worker)


def test_the_worker_metrics_pass_promtool_check_metrics(flash_sale):
    rc, out = run([tool("promtool"), "check", "metrics"], stdin=flash_sale.encode())
    findings = {line.strip() for line in out.splitlines() if line.strip()}
    assert rc in (0, 3), f"promtool check metrics failed ({rc}):\n{out}"  # 3: lint findings
    assert findings - ACCEPTED_LINT == set(), out
    assert not any(f.startswith("inventory_") for f in findings), out


def test_the_scrape_holds_the_sale_and_faust_sensor_metrics_on_one_page(stack, flash_sale):
    ns, _, _ = stack
    text = flash_sale
    assert sample_sum(text, "inventory_rejections_total") == 15
    reasons = {
        s.labels["reason"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "inventory_dead_letters_total" and s.value > 0
    }
    assert reasons == {"undecodable", "qty_not_positive"}
    # the sinks export their reason at 0 from the start (so the alert sees the first one)
    assert 'inventory_dead_letters_total{reason="unreadable_changelog_record"} 0.0' in text
    assert sample_sum(text, "inventory_decision_seconds_count") >= 21
    # Faust's sensor records into the same REGISTRY, served by the same page
    assert "# TYPE faust_messages_received_total counter" in text, NO_SENSOR
    orders = sample_sum(
        text, "faust_messages_received_per_topic_total", topic=ns.settings.orders_topic
    )
    assert orders >= 20
    # the ledger is not a Faust table: its batches have their own metrics
    assert sample_sum(text, "inventory_batch_commands_sum") >= 20
    assert sample_sum(text, "inventory_batch_commit_seconds_count") >= 1
    assert "# TYPE faust_topic_partition_end_offset gauge" in text
    assert "sku=" not in text  # no per-SKU label anywhere


def test_a_real_prometheus_scrapes_the_sale_and_evaluates_the_alert_rules(stack, flash_sale):
    ns, worker, prom = stack

    def reaches(query: str, expected: float) -> bool:
        return prom.value(query) == expected

    for query, expected in [
        ('up{job="inventory-worker"}', 1),
        ('sum(inventory_commands_total{outcome="RESERVED"})', 5),
        ('sum(inventory_commands_total{outcome="REJECTED"})', 15),
        ("sum(inventory_dead_letters_total)", 2),
    ]:
        try:
            wait_for(lambda q=query, e=expected: reaches(q, e), 20, f"{query} == {expected}")
        except AssertionError:
            raise AssertionError(f"{query} = {prom.value(query)}:\n{prom.tail()}") from None
    orders = prom.value(
        f'sum(faust_messages_received_per_topic_total{{topic="{ns.settings.orders_topic}"}})'
    )
    assert orders is not None, NO_SENSOR
    assert orders >= 20
    assert prom.value('sum(inventory_dead_letters_total{reason="undecodable"})') == 1

    def rules_evaluated() -> bool:
        groups = prom.api("rules")["groups"]
        return {g["name"] for g in groups} >= ALERT_GROUPS and all(
            r["health"] == "ok" for g in groups for r in g["rules"]
        )

    wait_for(rules_evaluated, 15, "every alert rule evaluated without error")
    rules = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
    assert {
        "InventoryConsumerLagHigh",
        "InventoryRelayLagHigh",
        "InventoryDeadLettersRate",
        "InventoryShortfall",
        "InventorySinkDegraded",
        "InventorySinkFreshnessP99High",
        "InventorySinkLagHigh",
        "InventoryWorkerDown",
    } <= set(rules)
    assert all(r["type"] == "alerting" for r in rules.values())
    # a healthy worker after a small sale: these stay quiet (freshness is left
    # out: the first changes of a just-started sink may well take over 2 s)
    quiet = {
        "InventoryWorkerDown",
        "InventoryConsumerLagHigh",
        "InventoryRelayLagHigh",
        "InventoryDeadLettersRate",
        "InventoryShortfall",
        "InventorySinkDegraded",
        "InventorySinkLagHigh",
    }

    def states() -> dict[str, str]:
        groups = prom.api("rules")["groups"]
        return {r["name"]: r["state"] for g in groups for r in g["rules"] if r["name"] in quiet}

    wait_for(lambda: set(states().values()) == {"inactive"}, 15, "quiet alerts inactive")


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads((REPO / "docker" / "grafana" / "dashboards" / "inventory.json").read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((f"{panel['title']} {target['refId']}", expr))
    return out


def test_every_dashboard_query_runs_on_the_real_prometheus(stack, flash_sale):
    _, _, prom = stack
    exprs = dict(dashboard_exprs())

    def empty() -> set[str]:
        out = set()
        for where, expr in exprs.items():
            try:
                if not prom.api("query", query=expr)["result"]:
                    out.add(where)
            except urllib.error.HTTPError as exc:
                raise AssertionError(f"{where}: {expr}: {exc.read().decode()}") from None
        return out

    # after the sale these have data once two scrapes hold it (rates need two
    # samples); the rest may stay empty: no shortfall, no live stream, ...
    must = {
        "Decisions/s by outcome A",
        "Rejections/s (out of stock) by channel A",
        "Dead letters/s by reason A",
        "Decision latency p50 / p99 B",
        "Consumer lag by topic A",
        "Messages received/s by topic (Faust) A",
        "Workers up / tables recovered A",
    }
    assert must <= set(exprs)
    wait_for(lambda: not must & empty(), 15, "the sale on the dashboard's panels")


def test_the_worker_down_alert_goes_pending_when_the_worker_stops(stack, flash_sale):
    _, worker, prom = stack
    instance = f"127.0.0.1:{worker.port}"
    worker.stop()
    assert worker.proc.returncode == 0, worker.tail()

    def pending() -> bool:
        return any(
            a["labels"].get("alertname") == "InventoryWorkerDown"
            and a["labels"].get("instance") == instance
            and a["state"] == "pending"
            for a in prom.api("alerts")["alerts"]
        )

    wait_for(pending, 15, "InventoryWorkerDown pending for the stopped worker")
