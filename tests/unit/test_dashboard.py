"""Every query in the Grafana dashboard and the alert rules names a series a worker exports.

The queries are parsed with a real PromQL parser (promql-parser). The set of
exported series is built from ``pipeline.metrics.REGISTRY`` (which also holds
``pipeline.web.live``'s metrics and Faust's sensor metrics) the way prometheus_client
exposes it: a counter family ``x`` as ``x_total`` (+ ``x_created``), a histogram
``h`` as ``h_bucket``/``h_sum``/``h_count`` (+ ``h_created``), a gauge as itself;
plus ``up``, which Prometheus adds per target. Names are compared as exposed,
suffix included, so ``inventory_sink_degraded_total`` or a bare histogram name
is as wrong as a typo. The compose file and Grafana provisioning are checked for
consistency here too (no Docker on this machine).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import promql_parser as pp
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "inventory.json"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
PROMETHEUS_YML = DOCKER / "prometheus" / "prometheus.yml"
COMPOSE = DOCKER / "compose.yml"

# Grafana's interval variables stand where PromQL wants a duration literal.
GRAFANA_DURATIONS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
# Functions whose argument must be a counter (or a histogram's counters).
COUNTER_FUNCTIONS = frozenset({"rate", "irate", "increase", "resets"})
# Never a label: these are unbounded.
UNBOUNDED_LABELS = frozenset({"sku", "order_id", "event_id"})


@dataclass(frozen=True)
class Series:
    kind: str  # counter | gauge | histogram | summary | ... (of the family)
    part: str  # "" for a counter/gauge value, else bucket/sum/count/created
    labels: frozenset[str]


@cache
def exported() -> dict[str, Series]:
    """Sample name -> what it is, for every series GET /metrics can expose."""
    import pipeline.web.live  # noqa: F401 - registers inventory_live_* (imports the whole app)
    from pipeline import metrics

    metrics.faust_metrics()  # Faust's sensor metrics, as install_faust_sensor registers them

    # the worker's registry and the auditor's (its own process and /metrics port)
    registries = (metrics.REGISTRY, metrics.AUDITOR_REGISTRY)
    labels_of: dict[str, frozenset[str]] = {}
    # prometheus_client keeps no public map from a family to its label names
    for registry in registries:
        for collector in list(registry._collector_to_names):
            if isinstance(collector, MetricWrapperBase):
                for name in registry._collector_to_names[collector]:
                    labels_of[name] = frozenset(collector._labelnames)

    out: dict[str, Series] = {"up": Series("gauge", "", TARGET_LABELS)}
    for family in (f for registry in registries for f in registry.collect()):
        base = family.name
        parts = {
            "counter": {f"{base}_total": "", f"{base}_created": "created"},
            "histogram": {
                f"{base}_bucket": "bucket",
                f"{base}_sum": "sum",
                f"{base}_count": "count",
                f"{base}_created": "created",
            },
            "summary": {
                base: "",
                f"{base}_sum": "sum",
                f"{base}_count": "count",
                f"{base}_created": "created",
            },
            "info": {f"{base}_info": ""},
        }.get(family.type, {base: ""})
        for sample in family.samples:  # whatever the family really emitted, too
            parts.setdefault(sample.name, "")
        for name, part in parts.items():
            labels = labels_of.get(name, frozenset())
            if part == "bucket":
                labels |= {"le"}
            out[name] = Series(family.type, part, labels | TARGET_LABELS)
    return out


# --- collecting the queries -----------------------------------------------------


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash["panels"]):
        if p["type"] == "row":
            continue
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t.get("expr"), f"panel {p['title']!r} target {t.get('refId')} has no expr"
            yield f"panel {p['title']!r} {t['refId']}", t["expr"]
    for var in dash.get("templating", {}).get("list", []):
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\)\s*", query)
        assert m, f"variable {var['name']}: only label_values(<expr>, <label>) is checked: {query}"
        yield f"variable {var['name']}", f"count by ({m.group(2)}) ({m.group(1)})"


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_queries() -> Iterator[tuple[str, str]]:
    for rule in alert_rules():
        yield f"alert {rule.get('alert') or rule.get('record')}", rule["expr"]


def all_queries() -> list[tuple[str, str]]:
    return [*dashboard_queries(), *alert_queries()]


# --- checking one query ---------------------------------------------------------


def parse(expr: str) -> Any:
    for var, duration in GRAFANA_DURATIONS.items():
        expr = expr.replace(var, duration)
    return pp.parse(expr)


def children(node: Any) -> list[Any]:
    if isinstance(node, pp.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, pp.AggregateExpr):
        return [node.expr] + ([node.param] if node.param is not None else [])
    if isinstance(node, pp.Call):
        return [a for a in node.args if a is not None]
    if isinstance(node, pp.MatrixSelector):
        return [node.vector_selector]
    if isinstance(node, pp.ParenExpr | pp.UnaryExpr | pp.SubqueryExpr):
        return [node.expr]
    return []


def walk(node: Any) -> Iterator[Any]:
    yield node
    for child in children(node):
        yield from walk(child)


def selector_name(sel: Any) -> str | None:
    if sel.name:
        return str(sel.name)
    for m in sel.matchers.matchers:
        if m.name == "__name__" and m.op == pp.MatchOp.Equal:
            return str(m.value)
    return None


def matcher_labels(sel: Any) -> set[str]:
    ms = list(sel.matchers.matchers)
    for group in sel.matchers.or_matchers:
        ms.extend(group)
    return {m.name for m in ms} - {"__name__"}


@dataclass
class Problems:
    items: list[str] = field(default_factory=list)

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")


def check_query(where: str, expr: str, series: dict[str, Series]) -> list[str]:
    """Every problem of one query: unknown series, wrong label, wrong function."""
    problems = Problems()
    try:
        tree = parse(expr)
    except ValueError as exc:
        return [f"{where}: does not parse ({exc}): {expr}"]
    for node in walk(tree):
        if isinstance(node, pp.VectorSelector):
            name = selector_name(node)
            if name is None:
                problems.add(where, f"a selector names no metric: {node}")
                continue
            if name not in series:
                problems.add(where, f"{name} is not exported by the worker")
                continue
            for label in sorted(matcher_labels(node) - series[name].labels):
                problems.add(where, f"{name} has no label {label!r}")
            for label in sorted(matcher_labels(node) & UNBOUNDED_LABELS):
                problems.add(where, f"selects on unbounded label {label!r}")
        elif isinstance(node, pp.Call) and node.func.name in COUNTER_FUNCTIONS:
            for sel in (n for n in walk(node) if isinstance(n, pp.VectorSelector)):
                s = series.get(selector_name(sel) or "")
                if s and not (s.kind == "counter" or s.part in ("bucket", "sum", "count")):
                    problems.add(where, f"{node.func.name}() over {s.kind} {selector_name(sel)}")
        elif isinstance(node, pp.Call) and node.func.name == "histogram_quantile":
            inner = [n for n in walk(node.args[1]) if isinstance(n, pp.VectorSelector)]
            for sel in inner:
                s = series.get(selector_name(sel) or "")
                if s and s.part != "bucket":
                    problems.add(
                        where, f"histogram_quantile over {selector_name(sel)}, not _bucket"
                    )
            for agg in (n for n in walk(node.args[1]) if isinstance(n, pp.AggregateExpr)):
                if agg.modifier is None or agg.modifier.type != pp.AggModifierType.By:
                    problems.add(where, "histogram_quantile needs an aggregation by (le, ...)")
                elif "le" not in agg.modifier.labels:
                    problems.add(where, "histogram_quantile's aggregation drops le")
        elif isinstance(node, pp.AggregateExpr) and node.modifier is not None:
            names = [selector_name(n) for n in walk(node.expr) if isinstance(n, pp.VectorSelector)]
            # an unknown name is reported above; check labels only over known series
            check = bool(names) and all(n in series for n in names)
            known = set().union(*(series[n].labels for n in names if n in series))
            for label in node.modifier.labels:
                if label in UNBOUNDED_LABELS:
                    problems.add(where, f"aggregates by unbounded label {label!r}")
                elif check and label not in known:
                    problems.add(where, f"{node.op} by/without {label!r}: no such label in {expr}")
    return problems.items


# --- the tests ------------------------------------------------------------------


def test_the_dashboard_and_the_rules_have_queries():
    dash = list(dashboard_queries())
    rules = list(alert_queries())
    assert len(dash) >= 20
    assert len(rules) >= 6


@pytest.mark.parametrize("where,expr", all_queries(), ids=[w for w, _ in all_queries()])
def test_every_query_names_only_series_the_worker_exports(where, expr):
    assert check_query(where, expr, exported()) == []


def test_the_check_catches_typos_wrong_suffixes_and_wrong_labels():
    series = exported()
    bad = {
        "rate(inventory_comands_total[5m])": "inventory_comands_total is not exported",
        "inventory_decision_seconds": "inventory_decision_seconds is not exported",
        "inventory_sink_degraded_total": "inventory_sink_degraded_total is not exported",
        "inventory_commands": "inventory_commands is not exported",
        "faust_messages_received": "faust_messages_received is not exported",
        'inventory_sink_lag_records{reason="x"}': "has no label 'reason'",
        "sum by (reason) (rate(inventory_commands_total[1m]))": "no such label",
        "sum by (sku) (rate(inventory_commands_total[1m]))": "unbounded label 'sku'",
        "rate(inventory_sink_lag_records[5m])": "rate() over gauge",
        "histogram_quantile(0.9, sum by (le) (rate(inventory_decision_seconds_sum[5m])))": (
            "not _bucket"
        ),
        "histogram_quantile(0.9, sum(rate(inventory_decision_seconds_bucket[5m])))": (
            "by (le, ...)"
        ),
        "rate(inventory_commands_total[$__rate_intervl])": "does not parse",
    }
    for expr, expected in bad.items():
        problems = check_query("t", expr, series)
        assert any(expected in p for p in problems), (expr, problems)
    good = (
        'sum by (outcome) (rate(inventory_commands_total{job=~"$job"}[$__rate_interval]))',
        "histogram_quantile(0.99, sum by (le, target) "
        "(rate(inventory_sink_freshness_seconds_bucket[5m])))",
        "faust_topic_partition_end_offset - faust_topic_partition_offset_commited",
        'up{job="inventory-worker"} == 0',
    )
    for expr in good:
        assert check_query("t", expr, series) == [], expr


def test_the_exported_set_holds_ours_faust_and_live_metrics():
    series = exported()
    for name in (
        "inventory_commands_total",
        "inventory_decision_seconds_bucket",
        "inventory_sink_freshness_seconds_count",
        "inventory_live_streams",
        "faust_messages_received_total",
        "faust_topic_partition_end_offset",
        "faust_events_runtime_ms_bucket",
    ):
        assert name in series, name
    assert series["inventory_commands_total"].labels >= {"type", "outcome", "channel"}


def test_no_exported_metric_has_an_unbounded_label():
    assert {
        name: sorted(s.labels & UNBOUNDED_LABELS)
        for name, s in exported().items()
        if s.labels & UNBOUNDED_LABELS
    } == {}


def test_the_worker_app_records_faust_metrics_into_our_registry():
    from faust.sensors.prometheus import PrometheusMonitor

    from pipeline import metrics
    from pipeline.app import app

    monitor = getattr(app, "_monitor", None)
    assert isinstance(monitor, PrometheusMonitor), (
        "pipeline/app.py must call pipeline.metrics.install_faust_sensor(app)"
    )
    assert monitor._metrics is metrics.faust_metrics()
    # one /metrics page: ours (Faust's setup_prometheus_sensors would add another)
    routes = [r for r in app.web.web_app.router.routes() if r.resource.canonical == "/metrics"]
    assert len({r.handler for r in routes if r.method == "GET"}) == 1


def test_install_faust_sensor_is_idempotent_and_refuses_a_started_app():
    from types import SimpleNamespace

    from faust.sensors.monitor import Monitor
    from faust.sensors.prometheus import PrometheusMonitor

    from pipeline import metrics

    app = SimpleNamespace(_monitor=None, sensors=set())
    app.monitor = None
    metrics.install_faust_sensor(app)
    first = app.monitor
    assert isinstance(first, PrometheusMonitor)
    app._monitor = first
    metrics.install_faust_sensor(app)
    assert app.monitor is first  # a second call is a no-op

    default = Monitor()
    started = SimpleNamespace(_monitor=default, sensors={default}, monitor=default)
    with pytest.raises(RuntimeError, match="before the app starts"):
        metrics.install_faust_sensor(started)


def test_every_alert_has_for_severity_summary_and_description():
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "InventoryConsumerLagHigh",
        "InventorySinkDegraded",
        "InventorySinkFreshnessP99High",
        "InventoryDeadLettersRate",
        "InventoryShortfall",
        "InventoryWorkerDown",
    }
    for r in rules:
        assert re.fullmatch(r"\d+[smh]", str(r.get("for", ""))), r["alert"]
        assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_the_invariant_violations_have_a_panel_an_alert_and_a_scrape_job():
    from pipeline import metrics

    exprs = [e for _, e in dashboard_queries()]
    assert any("inventory_invariant_violations_total" in e and "invariant" in e for e in exprs)
    (violated,) = [r for r in alert_rules() if r["alert"] == "InventoryInvariantViolated"]
    assert "inventory_invariant_violations_total" in violated["expr"]
    assert "invariant" in violated["expr"]
    (down,) = [r for r in alert_rules() if r["alert"] == "InventoryAuditorDown"]
    jobs = {c["job_name"] for c in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]}
    assert re.search(r'up\{job="([^"]+)"\}', down["expr"]).group(1) in jobs
    # every label value is exported from the start (0), so increase() sees the first one
    samples = {
        s.labels["invariant"]: s.value
        for f in metrics.AUDITOR_REGISTRY.collect()
        if f.name == "inventory_invariant_violations"
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert set(samples) == set(metrics.INVARIANTS) and len(metrics.INVARIANTS) == 4
    # the auditor's metrics are not on a worker's page (nothing there would count them)
    assert not any(f.name.startswith("inventory_auditor") for f in metrics.REGISTRY.collect())


def test_the_worker_down_alert_matches_the_scrape_job():
    jobs = {c["job_name"] for c in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]}
    (down,) = [r for r in alert_rules() if r["alert"] == "InventoryWorkerDown"]
    assert re.search(r'up\{job="([^"]+)"\}', down["expr"]).group(1) in jobs


def test_compose_runs_prometheus_and_grafana_on_the_shipped_files():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"kafka", "redis", "opensearch", "worker", "prometheus", "grafana"} <= set(services)
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
            assert target.startswith("/"), vol
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"

    prom = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    # Prometheus scrapes the worker's web port under the compose service name
    worker_port = services["worker"]["environment"]["INVENTORY_WEB_PORT"]
    targets = [
        t
        for c in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]
        for sc in c["static_configs"]
        for t in sc["targets"]
    ]
    assert f"worker:{worker_port}" in targets
    assert yaml.safe_load(PROMETHEUS_YML.read_text())["rule_files"] == ["alerts.yml"]

    grafana = services["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load(
        (DOCKER / "grafana/provisioning/dashboards/inventory.yml").read_text()
    )["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    (ds,) = yaml.safe_load(
        (DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"


def test_dashboard_panels_use_the_datasource_variable_and_do_not_overlap():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    cells: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
