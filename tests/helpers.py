"""Shared test helpers: waiting on conditions with deadlines, and running real hq stacks."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time

from hq.bench.stack import Stack as BenchStack

BIN = os.path.dirname(sys.executable)


def script(name: str) -> str:
    """Path of an installed console script (hq-server, hq-broker, hq-worker, ...)."""
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} is not installed next to {sys.executable}")
    return path


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Stack(BenchStack):
    """hq-bench's stack (``hq-server`` on a temporary SQLite file) with the tests' settings:
    quick heartbeats, so a lost worker is noticed in 0.6 s."""

    def __init__(self, tmp_path, workers: int = 2, bind: str = "tcp://127.0.0.1:*", args=(), env=None):
        super().__init__(tmp_path, workers, bind, ["--heartbeat-interval", "0.2", *args], env)
        self.tmp_path = tmp_path


class Gateway:
    """hq-gateway in front of ``broker``: on TCP (a free port by default), a unix socket and
    ws:// (a free port)."""

    def __init__(self, tmp_path, broker: str, *args, unix_path=None, tcp="127.0.0.1:0", name="gateway"):
        self.unix = f"unix://{unix_path or tmp_path / (name + '.sock')}"
        endpoints = tmp_path / f"{name}.endpoints"
        self.log_path = tmp_path / f"{name}.log"
        argv = [script("hq-gateway"), "--broker", broker, "--listen", tcp, "--listen", self.unix]
        argv += ["--listen", "ws://127.0.0.1:0"]
        argv += ["--endpoint-file", str(endpoints), "--timeout", "3", *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: endpoints.exists() or self.proc.poll() is not None, what="the gateway's endpoints")
        assert self.proc.poll() is None, self.log()
        self.tcp, _, self.ws = endpoints.read_text().split()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(10)


def connect(address: str, timeout: float = 10.0, rcvbuf: int | None = None):
    """A TCP socket connected to a gateway's ``HOST:PORT``; ``rcvbuf`` set before connecting
    (so the window the peer sees is that small)."""
    import socket

    host, port = address.rsplit(":", 1)
    sock = socket.socket()
    sock.settimeout(timeout)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    return sock


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_bitbake() -> str | None:
    """BitBake's source tree (bin/, lib/): ``$HQ_BITBAKE``, else ``../shared/bitbake`` next to
    this repository; None when neither holds one."""
    from hq.bench.reference import find_bitbake as find

    return find(default=os.path.join(REPO, os.pardir, "shared", "bitbake"))


def bitbake_missing(message: str) -> None:
    """Skip, saying ``message``; fail instead under HQ_REQUIRE_BITBAKE (.ci/run sets it where
    BitBake is present, so its tests never pass there by skipping)."""
    import pytest

    if os.environ.get("HQ_REQUIRE_BITBAKE"):
        pytest.fail(message + " (HQ_REQUIRE_BITBAKE is set)")
    pytest.skip(message)


def seed_known(address: str, n: int, seed: int, method: str = "TestMethod") -> dict:
    """Map n random taskhashes to random unihashes on a running stack; return them."""
    from hq.client import create_client

    rng = random.Random(seed)
    known = {"%064x" % rng.getrandbits(256): "%064x" % rng.getrandbits(256) for _ in range(n)}
    with create_client(address, timeout=30) as client:
        for taskhash, unihash in known.items():
            client.report_unihash_equiv(taskhash, method, unihash)
    return known


class Statements:
    """The SQL statements a peewee database runs inside the block (SQLite trace callback)."""

    def __init__(self, db):
        self.db = db
        self.sql = []

    def __enter__(self):
        self.db.connection().set_trace_callback(self.sql.append)
        return self.sql

    def __exit__(self, *exc):
        self.db.connection().set_trace_callback(None)


class LineServer:
    """A stand-in for a bad OEHASHEQUIV server, on 127.0.0.1: it takes the handshake (three
    lines), then answers each request line with ``reply(line)`` (bytes; None: nothing, and
    hold the connection open until closed); with ``once``, it closes after one answer."""

    def __init__(self, reply, once: bool = False):
        self.reply, self.once = reply, once
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.connections = 0
        self.stopped = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn) -> None:
        with conn, conn.makefile("rb") as reader:
            for _ in range(3):  # protocol line, needs-headers, the empty line
                reader.readline()
            while not self.stopped.is_set():
                line = reader.readline()
                if not line:
                    return
                answer = self.reply(line)
                if answer is None:
                    self.stopped.wait()
                    return
                conn.sendall(answer)
                if self.once:
                    return

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
