"""INVENTORY_ADVERTISED_URL: the URL a worker advertises for routed /stock queries is
its own setting, apart from the address it binds (0.0.0.0 in a container)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from yarl import URL

from config.settings import Settings, SettingsError


def test_unset_it_is_derived_from_host_and_port_as_before():
    s = Settings.from_env({})
    assert s.advertised_url == ""
    assert s.advertised_url_for() == "http://127.0.0.1:6066"
    s = Settings.from_env({"INVENTORY_WEB_HOST": "10.1.2.3", "INVENTORY_WEB_PORT": "7000"})
    assert s.advertised_url_for() == "http://10.1.2.3:7000"
    # the port and host the worker really serves on (the CLI's --web-port wins)
    assert s.advertised_url_for("10.1.2.3", 7001) == "http://10.1.2.3:7001"
    assert Settings(web_host="::1").advertised_url_for() == "http://[::1]:6066"


@pytest.mark.parametrize(
    "raw",
    [
        "http://127.0.0.1:6067",
        "http://inventory-0.inventory-headless.shop.svc.cluster.local:6066",
        "https://inventory-1.example:443/",
        "http://[fd00::5]:6066",
    ],
)
def test_a_reachable_url_with_host_and_port_is_advertised_whatever_the_bind(raw):
    s = Settings.from_env(
        {
            "INVENTORY_WEB_HOST": "0.0.0.0",
            "INVENTORY_WEB_PORT": "6066",
            "INVENTORY_ADVERTISED_URL": raw,
        }
    )
    assert s.web_host == "0.0.0.0"
    assert s.advertised_url == raw.rstrip("/")
    assert s.advertised_url_for("0.0.0.0", 6066) == raw.rstrip("/")


@pytest.mark.parametrize(
    "raw",
    [
        "inventory-0:6066",  # no scheme
        "ftp://inventory-0:6066",
        "http://inventory-0",  # no port
        "http://:6066",  # no host
        "http://inventory-0:0",
        "http://inventory-0:70000",
        "http://inventory-0:port",
        "http://inventory-0:6066/stock",  # only host and port are used
        "http://inventory-0:6066?x=1",
        "http://inventory-0:6066#x",
        "http://0.0.0.0:6066",  # a bind address, not a reachable one
        "http://[::]:6066",
    ],
)
def test_anything_else_is_refused_naming_the_variable(raw):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"INVENTORY_ADVERTISED_URL": raw})
    assert str(err.value).startswith(f"INVENTORY_ADVERTISED_URL={raw!r}: ")
    assert "http:// or https:// URL" in str(err.value)


def test_credentials_in_the_url_are_refused_without_printing_the_password():
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"INVENTORY_ADVERTISED_URL": "http://admin:hunter2@inventory-0:6066"})
    assert "hunter2" not in str(err.value) and "INVENTORY_ADVERTISED_URL" in str(err.value)


def conf(host: str, port: int) -> SimpleNamespace:
    # what `faust worker --web-port P` leaves: canonical_url rebuilt from host and port
    return SimpleNamespace(web_host=host, web_port=port, canonical_url=f"http://{host}:{port}")


def test_advertise_puts_the_setting_in_fausts_canonical_url():
    from pipeline.runtime import advertise

    c = conf("0.0.0.0", 6066)
    advertise(c, Settings(web_host="0.0.0.0", advertised_url="http://inventory-1.inv:6066"))
    assert c.canonical_url == "http://inventory-1.inv:6066"
    c = conf("127.0.0.1", 7007)  # unset: Faust's own default, with the CLI's port
    advertise(c, Settings())
    assert c.canonical_url == "http://127.0.0.1:7007"


def test_advertising_a_bind_address_is_warned_about(caplog):
    from pipeline.runtime import advertise

    with caplog.at_level("WARNING", logger="inventory.app"):
        advertise(conf("0.0.0.0", 6066), Settings(web_host="0.0.0.0"))
    assert "INVENTORY_ADVERTISED_URL" in caplog.text and "http://0.0.0.0:6066" in caplog.text


def test_the_app_advertises_the_setting_when_it_starts_after_the_cli_reset_it(
    monkeypatch, tmp_path
):
    """The worker command sets canonical_url from --web-host/--web-port after the app
    module built the app; the app's start must put the advertised URL back before it
    joins the group (here it stops right after, at the topic check)."""
    import pipeline.app  # noqa: F401 - the whole app, as the CLI loads it
    import pipeline.runtime as appmod
    from pipeline.kafka.topics import KafkaUnreachable

    app = appmod.app
    monkeypatch.setattr(
        appmod,
        "settings",
        Settings(web_host="0.0.0.0", advertised_url="http://inventory-2.inv:6066"),
    )
    monkeypatch.setattr(app.conf, "datadir", str(tmp_path))
    monkeypatch.setattr(app.conf, "web_host", "0.0.0.0")
    monkeypatch.setattr(app.conf, "web_port", 6066)
    monkeypatch.setattr(app.conf, "canonical_url", "http://0.0.0.0:6066")  # as the CLI does

    def unreachable(_settings: Settings) -> None:
        raise KafkaUnreachable("no Kafka in unit tests")

    monkeypatch.setattr(appmod, "ensure_topics", unreachable)
    with pytest.raises(SystemExit):
        asyncio.run(app.on_first_start())
    assert app.conf.canonical_url == URL("http://inventory-2.inv:6066")
