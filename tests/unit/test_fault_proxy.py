"""The fault proxy (tests/faults.py) that the outage tests and the chaos harness use:
"refuse" must really refuse, and going back "up" must always be possible, even while a
client still holds a connection from before (the chaos run that hit EADDRINUSE)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from faults import TcpProxy


@pytest.fixture()
def upstream() -> Iterator[socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    yield srv
    srv.close()


def connect(port: int) -> str:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
        return "connected"
    except ConnectionRefusedError:
        return "refused"
    finally:
        s.close()


def test_refuse_and_up_cycles_with_a_connection_held_open(upstream):
    proxy = TcpProxy("127.0.0.1", upstream.getsockname()[1]).start()
    held = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    try:
        assert connect(proxy.port) == "connected"
        for _ in range(20):
            proxy.set_mode("refuse")
            # the first attempt of a window too (the accept thread used to keep it alive)
            assert connect(proxy.port) == "refused"
            proxy.set_mode("up")
            assert connect(proxy.port) == "connected"
    finally:
        held.close()
        proxy.close()
    assert connect(proxy.port) == "refused"
    # closed for good: the port is free again
    again = socket.socket()
    again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    again.bind(("127.0.0.1", proxy.port))
    again.close()
