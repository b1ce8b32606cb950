"""Fault injection for tests: a private redis-server and a TCP proxy that can fail.

Both act on real sockets: the proxy's "refuse" mode closes its listener
(connection refused, as when a server is down) and "blackhole" accepts
connections but forwards nothing (a hung server: clients hit their timeouts).
"""

from __future__ import annotations

import queue
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from harness import free_port


class PrivateRedis:
    """A redis-server of the test's own on a free port (never the shared one): with an
    append-only file so a restart keeps data, or with ``persist=False`` none, so a
    restart (``kill()`` then ``start()``) comes back empty on the same port."""

    def __init__(self, workdir: Path, *, persist: bool = True) -> None:
        self.port = free_port()
        self.dir = workdir
        self.persist = persist
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        exe = shutil.which("redis-server")
        if exe is None:
            raise AssertionError("redis-server is not installed: apt-get install -y redis-server")
        self.dir.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else []
        with open(self.dir / "redis.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen([exe, *args], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"private redis-server on {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        """kill -9: what it had not written to its file is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``mode`` switches between up/refuse/blackhole.

    ``delay_s`` > 0 holds every byte the target sends back for that long before
    passing it on (order kept, throughput not capped): a slow server, e.g. a broker
    whose produce responses take a few hundred ms.
    """

    def __init__(self, target_host: str, target_port: int, delay_s: float = 0.0) -> None:
        self.port = free_port()
        self.target = (target_host, target_port)
        self.mode = "up"
        self.delay_s = delay_s
        self._listener: socket.socket | None = None
        self._reserved: socket.socket | None = None  # bound, not listening: refuses
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> TcpProxy:
        self._listen()
        return self

    def _bound(self) -> socket.socket:
        deadline = time.monotonic() + 5
        while True:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", self.port))
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # the old listener is released when its accept returns

    def _listen(self) -> None:
        # the port stays reserved while refusing: free, the kernel may hand it to an
        # outgoing connection as its local port, and listening again would then fail
        sock, self._reserved = self._reserved or self._bound(), None
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(client)
            if self.mode == "blackhole":
                continue  # hold the connection open, never answer
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.append(upstream)
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            if self.delay_s > 0:
                threading.Thread(
                    target=self._slow_pipe, args=(upstream, client), daemon=True
                ).start()
            else:
                threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while self.mode == "up":
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src, dst)

    def _slow_pipe(self, src: socket.socket, dst: socket.socket) -> None:
        """Like _pipe, each chunk passed on ``delay_s`` after it arrived."""
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def deliver() -> None:
            try:
                while True:
                    at, data = chunks.get()
                    if not data:
                        break
                    wait = at + self.delay_s - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                _close(src, dst)

        threading.Thread(target=deliver, daemon=True).start()
        try:
            while self.mode == "up":
                data = src.recv(65536)
                if not data:
                    break
                chunks.put((time.monotonic(), data))
        except OSError:
            pass
        finally:
            chunks.put((time.monotonic(), b""))

    def _drop_connections(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def set_mode(self, mode: str) -> None:
        """``up``, ``refuse`` (listener closed) or ``blackhole`` (accept, never answer)."""
        assert mode in ("up", "refuse", "blackhole")
        self.mode = mode
        self._drop_connections()
        if mode == "refuse":
            if self._listener is not None:
                # close() alone leaves a thread blocked in accept() holding the socket,
                # still listening; shutdown wakes it (EINVAL) so the socket really goes
                try:
                    self._listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._listener.close()
                self._listener = None
                if not self._closed:
                    self._reserved = self._bound()
        elif self._listener is None:
            self._listen()

    def close(self) -> None:
        self._closed = True
        self.set_mode("refuse")
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
