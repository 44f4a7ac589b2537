"""Shared test helpers: waiting on conditions with deadlines, and running real hq stacks."""

from __future__ import annotations

import fcntl
import itertools
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


def maps_psycopg(pid: int) -> bool:
    """Whether process ``pid`` has psycopg's compiled library mapped (psycopg[binary] loaded)."""
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
        return "psycopg" in fh.read()


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

    def __init__(
        self,
        tmp_path,
        workers: int = 2,
        bind: str = "tcp://127.0.0.1:*",
        args=(),
        env=None,
        db=None,
        prefix=(),
    ):
        args = ["--heartbeat-interval", "0.2", *args]
        super().__init__(tmp_path, workers, bind, args, env, db=db, prefix=prefix)
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


#: Where the tests look for PostgreSQL when HQ_POSTGRESQL does not say: its usual place.
POSTGRESQL_DEFAULT = "postgresql://127.0.0.1:5432/postgres"


def find_postgresql() -> str | None:
    """A URL of a PostgreSQL database whose user may create databases: ``$HQ_POSTGRESQL``,
    else the usual place (127.0.0.1:5432, as the OS user) if a server answers there; None
    when none does (or psycopg is missing)."""
    url = os.environ.get("HQ_POSTGRESQL") or POSTGRESQL_DEFAULT
    try:
        import psycopg

        psycopg.connect(url, connect_timeout=3).close()
    except Exception:
        return None
    return url


def postgresql_missing(message: str) -> None:
    """Skip, saying ``message``; fail instead under HQ_REQUIRE_POSTGRESQL (.ci/run sets it
    where a server answers, so the PostgreSQL tests never pass there by skipping)."""
    import pytest

    if os.environ.get("HQ_REQUIRE_POSTGRESQL"):
        pytest.fail(message + " (HQ_REQUIRE_POSTGRESQL is set)")
    pytest.skip(message)


class PostgresqlServer:
    """One database of the tests' own on a real PostgreSQL server, made at the start of the
    session and dropped at its end; each test gets a fresh schema in it (:meth:`new_url`)."""

    def __init__(self, admin_url: str):
        import psycopg

        self.admin_url = admin_url
        self.name = f"hq_test_{os.getpid()}_{random.getrandbits(24):06x}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {self.name}")
        base = admin_url.split("?", 1)[0].rsplit("/", 1)[0]
        self.url = f"{base}/{self.name}"
        self._schemas = 0

    def new_url(self) -> str:
        """A URL whose connections use a new, empty schema (their search_path)."""
        from hq.bench.populate import fresh_schema

        self._schemas += 1
        return fresh_schema(self.url, f"t{self._schemas}")

    def drop_schema(self, url: str) -> None:
        from hq.bench.populate import drop_schema

        drop_schema(self.url, url.rsplit("%3D", 1)[1])

    def close(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


_HOSTS_TAGS = itertools.count()


class Hosts:
    """Separate "hosts" on this machine: one network namespace each (``ip netns``), joined
    to this one by a veth pair (host i is 10.X.i.2, this side 10.X.i.1, X a free /16), as
    root. Where namespaces cannot be made (not root, no ``ip``), distinct loopback
    addresses (127.0.0.2, 127.0.0.3, ...) stand in, and :attr:`why_not` says why.

    A host's programs reach PostgreSQL through its Unix socket (:meth:`database_url`): a
    namespace has its own 127.0.0.1, but the file system is shared."""

    def __init__(self, n: int):
        self.names: list = []
        self.links: list = []
        self.addresses: list = []
        self.why_not = ""
        try:
            self._make(n)
        except (OSError, subprocess.CalledProcessError) as exc:
            self.close()
            self.why_not = getattr(exc, "stderr", b"") or str(exc)
            if isinstance(self.why_not, bytes):
                self.why_not = self.why_not.decode(errors="replace").strip()
            self.addresses = [f"127.0.0.{i + 2}" for i in range(n)]

    def _make(self, n: int) -> None:
        if os.geteuid() != 0:
            raise OSError("not root")
        # Test processes running side by side (pytest -n) must not pick the same free /16.
        with open("/tmp/hq-tests-netns.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._make_locked(n)

    def _make_locked(self, n: int) -> None:
        used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True, check=True).stdout
        second = next(x for x in range(231, 250) if f"10.{x}." not in used)
        # Unique per instance: a namespace deleted by the last test of this process is torn
        # down by the kernel later, and its veth's name stays taken until then.
        tag = f"{os.getpid() % 100000}{next(_HOSTS_TAGS)}"
        for i in range(n):
            name, veth = f"hq{tag}h{i}", f"hq{tag}v{i}"
            run = lambda *argv: subprocess.run(argv, capture_output=True, check=True)  # noqa: E731
            run("ip", "netns", "add", name)
            self.names.append(name)
            run("ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "n")
            self.links.append(veth)
            run("ip", "link", "set", veth + "n", "netns", name)
            run("ip", "addr", "add", f"10.{second}.{i}.1/30", "dev", veth)
            run("ip", "link", "set", veth, "up")
            run("ip", "netns", "exec", name, "ip", "addr", "add", f"10.{second}.{i}.2/30", "dev", veth + "n")
            run("ip", "netns", "exec", name, "ip", "link", "set", veth + "n", "up")
            run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
            self.addresses.append(f"10.{second}.{i}.2")

    @property
    def namespaces(self) -> bool:
        return not self.why_not

    def argv(self, i: int, argv: list) -> list:
        """``argv`` run on host i."""
        return ["ip", "netns", "exec", self.names[i], *argv] if self.namespaces else list(argv)

    @staticmethod
    def database_url(url: str) -> str | None:
        """``url`` (a PostgreSQL server on 127.0.0.1 or localhost) through its Unix socket,
        or None where there is none."""
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            return None
        port = parts.port or 5432
        for directory in ("/var/run/postgresql", "/run/postgresql", "/tmp"):
            if os.path.exists(f"{directory}/.s.PGSQL.{port}"):
                user = f"{parts.username}@" if parts.username else ""
                query = f"host={directory}&port={port}" + (f"&{parts.query}" if parts.query else "")
                return f"postgresql://{user}{parts.path}?{query}"
        return None

    def close(self) -> None:
        for link in self.links:  # at once (either end takes the pair with it)
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.names, self.links = [], []


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
