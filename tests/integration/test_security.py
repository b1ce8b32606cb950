"""SASL/SCRAM over TLS to Kafka: the pipeline authenticates; a wrong password fails clearly.

The test starts a broker of its own (the local stack's script, another
STACK_DIR and ports) with a SASL_SSL listener, a self-signed certificate made
with openssl, and a SCRAM user created when the storage is formatted. A worker,
the relay, the CLI producer and a reader all connect through that listener.
Secrets must not appear in logs, errors or /metrics.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from harness import OUT, REPO, Namespace, Worker, free_port, read_topic, wait_for
from pipeline.produce import CommandProducer

pytestmark = pytest.mark.integration

USER = "inventory-app"
PASSWORD = f"pw-{uuid.uuid4().hex[:12]}"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


@pytest.fixture(scope="module")
def secure_broker(kafka):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is missing: apt-get install -y openssl", pytrace=False)
    root = OUT / f"secure-{uuid.uuid4().hex[:6]}"
    stack = root / "stack"
    stack.mkdir(parents=True)
    main_libs = REPO / ".stack" / "kafka-libs"
    if main_libs.is_dir():  # reuse the jars the main stack fetched
        (stack / "kafka-libs").symlink_to(main_libs)
    cert, key, p12 = root / "cert.pem", root / "key.pem", root / "server.p12"
    made = _run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ]
    )
    assert made.returncode == 0, made.stderr
    made = _run(
        [
            "openssl",
            "pkcs12",
            "-export",
            "-in",
            str(cert),
            "-inkey",
            str(key),
            "-out",
            str(p12),
            "-passout",
            "pass:keystore-pw",
        ]
    )
    assert made.returncode == 0, made.stderr
    plain, ctl, sasl = free_port(), free_port(), free_port()
    extra = root / "secure.properties"
    extra.write_text(
        "\n".join(
            [
                f"listeners=PLAINTEXT://127.0.0.1:{plain},CONTROLLER://127.0.0.1:{ctl},"
                f"SASL_SSL://127.0.0.1:{sasl}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{plain},SASL_SSL://127.0.0.1:{sasl}",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,"
                "SASL_SSL:SASL_SSL",
                "sasl.enabled.mechanisms=SCRAM-SHA-512",
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                f"ssl.keystore.location={p12}",
                "ssl.keystore.type=PKCS12",
                "ssl.keystore.password=keystore-pw",
                "ssl.key.password=keystore-pw",
                "",
            ]
        )
    )
    env = dict(
        os.environ,
        STACK_DIR=str(stack),
        STACK_SERVICES="kafka",
        KAFKA_PORT=str(plain),
        KAFKA_CONTROLLER_PORT=str(ctl),
        KAFKA_EXTRA_CONFIG=str(extra),
        KAFKA_SCRAM_USERS=f"{USER}:{PASSWORD}",
    )
    up = _run([str(REPO / "scripts" / "stack.sh"), "up", "kafka"], env=env, timeout=300)
    if up.returncode != 0:
        pytest.fail(f"secured broker did not start:\n{up.stdout}\n{up.stderr}", pytrace=False)
    password_file = root / "kafka-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    yield {"bootstrap": f"127.0.0.1:{sasl}", "cafile": str(cert), "password_file": password_file}
    _run([str(REPO / "scripts" / "stack.sh"), "down", "kafka"], env=env, timeout=120)


def secure_env(broker: dict, password_file: Path) -> dict[str, str]:
    return {
        "INVENTORY_KAFKA_BOOTSTRAP": broker["bootstrap"],
        "INVENTORY_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "INVENTORY_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "INVENTORY_KAFKA_SASL_USERNAME": USER,
        "INVENTORY_KAFKA_SASL_PASSWORD_FILE": str(password_file),
        "INVENTORY_KAFKA_SSL_CAFILE": broker["cafile"],
        "INVENTORY_SINK_ENABLED": "0",
    }


def test_worker_relay_and_producer_authenticate_with_scram_over_tls(secure_broker):
    from dataclasses import replace

    from config.settings import Settings

    env = secure_env(secure_broker, secure_broker["password_file"])
    ns = Namespace.fresh("secure", **env)
    cfg = replace(ns.settings, **vars_of(Settings.from_env(env)))
    worker = Worker(ns).start(timeout=120)
    try:
        with CommandProducer(cfg) as producer:
            producer.send("RestockReceived", {"sku": "SEC-1", "qty": 4})
        wait_for(lambda: worker.get_json("/stock/SEC-1")[0] == 200, 60, "SEC-1 applied")
        assert worker.get_json("/stock/SEC-1")[1]["on_hand"] == 4
        changes = read_topic(cfg, cfg.stock_changes_topic, until=lambda rs: len(rs) >= 1)
        assert [(r.name, r.value["version"]) for r in changes] == [("StockChanged", 1)]
        with open(worker.log_path) as log:
            assert PASSWORD not in log.read()
        status, _ = worker.get_json("/healthz")
        assert status == 200
        import urllib.request

        with urllib.request.urlopen(worker.url + "/metrics", timeout=5) as resp:
            assert PASSWORD.encode() not in resp.read()
    finally:
        worker.stop()


def test_wrong_password_fails_with_a_clear_message_and_no_secret(secure_broker, tmp_path):
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password")
    env = dict(os.environ, **secure_env(secure_broker, wrong))
    env["INVENTORY_TOPIC_PREFIX"] = f"wrong-{uuid.uuid4().hex[:6]}."
    done = _run(
        [
            sys.executable,
            "-m",
            "pipeline.produce",
            "send",
            "RestockReceived",
            '{"sku": "SEC-2", "qty": 1}',
        ],
        cwd=REPO,
        env=env,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "authentication" in out.lower(), out
    assert "not-the-password" not in out


def vars_of(s) -> dict:
    """The security fields of a Settings, to overlay on a namespace's settings."""
    keys = [
        "kafka_bootstrap",
        "kafka_security_protocol",
        "kafka_sasl_mechanism",
        "kafka_sasl_username",
        "kafka_sasl_password",
        "kafka_ssl_cafile",
    ]
    return {k: getattr(s, k) for k in keys}
