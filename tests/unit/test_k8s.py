"""The Kubernetes manifests of ``deploy/k8s/``, checked against the app without a cluster.

* every environment variable they set (the container's ``env`` and the ConfigMap it
  reads with ``envFrom``) is one ``Settings.from_env`` reads, and together they parse
  with the real settings (the passwords' files stand in for the mounted Secret);
* the probe and scrape paths are routes the app serves, liveness on ``/livez`` and
  readiness on ``/readyz``;
* the container command is the image's and parses with Faust's CLI (shared with the
  Docker test: ``unit.deploy_checks``), its ``--datadir`` is the RocksDB volume;
* one port everywhere: ``--web-port``, ``INVENTORY_WEB_PORT``, the container port, the
  probes, the Services, the scrape annotations and the advertised URL;
* selectors match the pods, the volume and Secret files exist where settings point,
  the stop grace period outlasts a transaction, the replication survives a broker.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from config.settings import Settings
from unit.deploy_checks import (
    dockerfile_instructions,
    image_command,
    parse_worker_command,
    run_faust_help,
)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[dict[str, Any]]:
    return [
        d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in load(p)
    ]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    (worker,) = [c for c in pod["containers"] if c["name"] == "worker"]
    return worker


class Recorder(dict):
    """An environment that records every name looked up in it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def settings_names() -> set[str]:
    """Every variable Settings.from_env reads (including each password's NAME_FILE)."""
    env = Recorder()
    Settings.from_env(env)
    return env.read


def test_the_recorder_sees_every_setting():
    names = settings_names()
    assert {"INVENTORY_KAFKA_BOOTSTRAP", "INVENTORY_ADVERTISED_URL"} <= names
    assert {"INVENTORY_REPLICATION_FACTOR", "INVENTORY_MIN_INSYNC_REPLICAS"} <= names
    assert "INVENTORY_KAFKA_SASL_PASSWORD_FILE" in names
    assert "INVENTORY_KAFKA_BOOTSTRAPS" not in names


def env_of(docs: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, str]]:
    """(plain values, helper variables from the downward API) of the worker container:
    the ConfigMaps it reads with envFrom first, then its env, as the kubelet does."""
    c = container(docs)
    values: dict[str, str] = {}
    for source in c.get("envFrom", []):
        cm = one(docs, "ConfigMap", source["configMapRef"]["name"])
        values.update({k: str(v) for k, v in cm["data"].items()})
    downward = {}
    for e in c.get("env", []):
        if "value" in e:
            values[e["name"]] = str(e["value"])
        else:
            downward[e["name"]] = "from " + next(iter(e["valueFrom"]))
    return values, downward


def env_problems(docs: list[dict[str, Any]]) -> list[str]:
    known = settings_names()
    values, downward = env_of(docs)
    referenced = {m for v in values.values() for m in re.findall(r"\$\((\w+)\)", v)}
    problems = [f"{name} is not a setting" for name in values if name not in known]
    problems += [
        f"{name} is neither a setting nor used in another variable"
        for name in downward
        if name not in known and name not in referenced
    ]
    problems += [f"$({name}) is not defined before use" for name in referenced - set(downward)]
    return problems


def test_every_variable_the_manifests_set_is_a_setting():
    assert env_problems(manifests()) == []


def test_a_misspelt_variable_is_caught():
    docs = manifests()
    one(docs, "ConfigMap")["data"]["INVENTORY_KAFKA_BOOTSTRAPS"] = "kafka:9092"
    container(docs)["env"].append({"name": "POD_IP", "valueFrom": {"fieldRef": {}}})
    assert env_problems(docs) == [
        "INVENTORY_KAFKA_BOOTSTRAPS is not a setting",
        "POD_IP is neither a setting nor used in another variable",
    ]


def expanded(value: str) -> str:
    fake = {"POD_NAME": "inventory-0", "POD_NAMESPACE": "shop"}
    return re.sub(r"\$\((\w+)\)", lambda m: fake.get(m.group(1), m.group(1).lower()), value)


def effective_settings(tmp_path: Path, docs: list[dict[str, Any]] | None = None) -> Settings:
    """The manifests' environment through the real settings, the Secret's files
    stood in for by temporary files."""
    values, _ = env_of(manifests() if docs is None else docs)
    env = {k: expanded(v) for k, v in values.items()}
    for name, path in list(env.items()):
        if name.endswith("_FILE"):
            stand_in = tmp_path / PurePosixPath(path).name
            stand_in.write_text("not-a-real-password\n")
            env[name] = str(stand_in)
    return Settings.from_env(env)


def test_the_manifests_environment_parses_with_the_real_settings(tmp_path):
    s = effective_settings(tmp_path)
    assert s.web_host == "0.0.0.0"
    assert s.advertised_url == "http://inventory-0.inventory-headless.shop.svc.cluster.local:6066"
    assert s.kafka_security_protocol == "SASL_SSL"
    assert s.kafka_sasl_password.reveal() == "not-a-real-password"
    assert s.redis_password and s.opensearch_password
    # a real cluster: one broker can be lost without losing a write or refusing one
    assert s.replication_factor >= 3
    assert 2 <= s.min_insync_replicas < s.replication_factor


def test_no_password_is_in_the_environment_or_the_configmap():
    values, _ = env_of(manifests())
    assert not [n for n in values if n.endswith("_PASSWORD")], values


def routes() -> set[str]:
    from pipeline.app import app

    return {r.resource.canonical for r in app.web.web_app.router.routes() if r.method == "GET"}


def test_probes_and_scrapes_use_routes_the_app_serves():
    docs = manifests()
    c = container(docs)
    served = routes()
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    paths = [c[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe", "startupProbe")]
    pod = one(docs, "StatefulSet")["spec"]["template"]
    paths.append(pod["metadata"]["annotations"]["prometheus.io/path"])
    paths += [e["path"] for e in one(docs, "ServiceMonitor")["spec"]["endpoints"]]
    for path in paths:
        assert path in served, (path, sorted(served))
    assert "/nope" not in served  # the check can fail


def test_the_container_runs_the_image_command_and_it_parses_with_fausts_cli(tmp_path):
    c = container(manifests())
    argv = c["command"]
    assert argv == image_command()
    assert "args" not in c
    root, worker = parse_worker_command(argv)
    assert root["app"] == "pipeline.app"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert root["datadir"] == mounts["data"]  # RocksDB on the claimed volume
    values, _ = env_of(manifests())
    assert values["INVENTORY_DATA_DIR"] == mounts["data"]
    run_faust_help(argv, tmp_path)


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (found,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return int(found)


def ports_used(docs: list[dict[str, Any]], tmp_path: Path) -> dict[str, int]:
    """Every place that names the worker's web port, and the port it names."""
    c = container(docs)
    _, worker = parse_worker_command(c["command"])
    s = effective_settings(tmp_path, docs)
    used = {"--web-port": worker["web_port"], "INVENTORY_WEB_PORT": s.web_port}
    used.update({f"containerPort {p['name']}": p["containerPort"] for p in c["ports"]})
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        used[probe] = port_number(c, c[probe]["httpGet"]["port"])
    for svc in (d for d in docs if d["kind"] == "Service"):
        for p in svc["spec"]["ports"]:
            used[f"Service {svc['metadata']['name']} targetPort"] = port_number(c, p["targetPort"])
    headless = one(docs, "Service", "inventory-headless")
    used.update(
        {f"headless Service port {p['name']}": p["port"] for p in headless["spec"]["ports"]}
    )
    pod = one(docs, "StatefulSet")["spec"]["template"]
    used["prometheus.io/port"] = int(pod["metadata"]["annotations"]["prometheus.io/port"])
    # the headless Service maps it 1:1, so the advertised URL names it too
    used["INVENTORY_ADVERTISED_URL"] = urlsplit(s.advertised_url).port or 0
    return used


def test_one_port_everywhere(tmp_path):
    used = ports_used(manifests(), tmp_path)
    assert set(used.values()) == {6066}, used
    assert len(used) >= 10


def test_a_changed_port_is_caught(tmp_path):
    docs = manifests()
    container(docs)["readinessProbe"]["httpGet"]["port"] = 8080
    used = ports_used(docs, tmp_path)
    assert {k for k, v in used.items() if v != 6066} == {"readinessProbe"}


def test_the_advertised_url_is_the_pods_name_on_the_headless_service():
    docs = manifests()
    sts = one(docs, "StatefulSet")
    headless = one(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    # a worker forwards to an owner that is not ready yet too; it answers 503 itself
    assert headless["spec"]["publishNotReadyAddresses"] is True
    values, downward = env_of(docs)
    host = urlsplit(values["INVENTORY_ADVERTISED_URL"]).hostname
    assert host == f"$(pod_name).{headless['metadata']['name']}.$(pod_namespace).svc.cluster.local"
    assert downward == {"POD_NAME": "from fieldRef", "POD_NAMESPACE": "from fieldRef"}
    env = {e["name"]: e for e in container(docs)["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_services_the_budget_and_the_monitor_select_the_workers():
    docs = manifests()
    sts = one(docs, "StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert selects(sts["spec"]["selector"]["matchLabels"], labels)
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert selects(svc["spec"]["selector"], labels), svc["metadata"]["name"]
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"]["maxUnavailable"] == 1 < sts["spec"]["replicas"]
    monitor = one(docs, "ServiceMonitor")
    scraped = [
        d
        for d in docs
        if d["kind"] == "Service"
        and selects(monitor["spec"]["selector"]["matchLabels"], d["metadata"]["labels"])
    ]
    assert [d["metadata"]["name"] for d in scraped] == ["inventory-headless"]  # once per pod
    names = {p["name"] for p in scraped[0]["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= names
    assert sts["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_the_rocksdb_volume_is_claimed_per_pod():
    docs = manifests()
    sts = one(docs, "StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod_volumes = {v["name"] for v in sts["spec"]["template"]["spec"].get("volumes", [])}
    assert "data" not in pod_volumes  # not an emptyDir: the files outlive the pod


def secret_files(docs: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    """(mount path/file, secret name) of every file the container's Secret volumes hold."""
    c = container(docs)
    volumes = {
        v["name"]: v for v in one(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
    }
    for m in c["volumeMounts"]:
        secret = volumes.get(m["name"], {}).get("secret")
        if secret:
            for item in secret["items"]:
                yield f"{m['mountPath']}/{item['path']}", secret["secretName"]


def test_every_file_a_setting_names_is_in_a_mounted_secret():
    docs = manifests()
    files = dict(secret_files(docs))
    values, _ = env_of(docs)
    named = {k: v for k, v in values.items() if k.endswith(("_FILE", "_CAFILE", "_CA_FILE"))}
    assert len(named) == 5, named
    for name, path in named.items():
        assert path in files, (name, path, sorted(files))
    example = one(docs, "Secret", "inventory-credentials")
    for path, secret in files.items():
        if secret == "inventory-credentials":
            assert PurePosixPath(path).name in example["stringData"], path


def test_the_pod_runs_as_the_images_user_and_stops_cleanly():
    docs = manifests()
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    run = [a for i, a in dockerfile_instructions() if i == "RUN" and "useradd" in a]
    uid = re.search(r"--uid (\d+)", run[0])
    gid = re.search(r"--gid (\d+)", run[0])
    assert uid and gid, run
    ctx = pod["securityContext"]
    assert (ctx["runAsUser"], ctx["runAsGroup"], ctx["fsGroup"]) == (
        int(uid.group(1)),
        int(gid.group(1)),
        int(gid.group(1)),
    )
    assert ctx["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert pod["terminationGracePeriodSeconds"] > Settings().transaction_timeout_s


def test_kustomization_lists_the_manifests_but_not_the_example_secret_or_crds():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    for name in listed:
        assert (K8S / name).is_file(), name
    assert listed == {"configmap.yaml", "service.yaml", "statefulset.yaml", "pdb.yaml"}


@pytest.mark.parametrize("path", sorted(p.name for p in K8S.glob("*.yaml")))
def test_every_manifest_names_its_kind(path):
    for doc in load(K8S / path):
        if path == "kustomization.yaml":
            assert doc["kind"] == "Kustomization"
            continue
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "inventory"
