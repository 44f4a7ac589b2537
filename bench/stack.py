"""A real hq stack: ``hq-server`` on a database in a work directory, for one benchmark repeat
and for the tests.

The stack is driven only through its console script and the public client: it sees hq as
an operator does. Broker and worker processes are found as psutil children of ``hq-server``
(by their ``-m hq.broker`` / ``-m hq.workers --name NAME`` command lines) for CPU and memory
figures and for fault injection.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import psutil

from hq import databases

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
POLL_S = 0.02


class StackError(RuntimeError):
    """The stack did not start, or did not stop cleanly; carries the tail of its log."""


def script(name: str) -> str:
    """An installed console script next to this interpreter, else from PATH."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    return path if os.path.exists(path) else (shutil.which(name) or name)


class Stack:
    """``hq-server --workers N`` on ``workdir/hq.db`` (or ``db``: a file or a PostgreSQL URL),
    listening on ``bind``.

    ``env`` is added to the environment (``inherit_env=False``: the HQ_* variables of this
    process are left out, so a benchmark runs with hq's defaults). hq-server reports ready
    once every worker has registered and a request went through.
    """

    def __init__(
        self,
        workdir,
        workers: int = 2,
        bind: str = "tcp://127.0.0.1:*",
        args=(),
        env=None,
        log_level: str = "INFO",
        inherit_env: bool = True,
        db: str | None = None,
        prefix=(),
    ):
        self.workdir = str(workdir)
        self.db = db or os.path.join(self.workdir, "hq.db")
        self.workers = workers
        self.endpoint_file = os.path.join(self.workdir, "endpoints")
        self.log_path = os.path.join(self.workdir, "hq-server.log")
        self.argv = [
            *prefix,  # e.g. ip netns exec NAME: the stack on another "host"
            script("hq-server"),
            "--bind",
            bind,
            "--db",
            self.db,
            "--workers",
            str(workers),
            "--endpoint-file",
            self.endpoint_file,
            "--log-level",
            log_level,
            *args,
        ]
        base = os.environ if inherit_env else {k: v for k, v in os.environ.items() if not k.startswith("HQ_")}
        self.env = {**base, **(env or {})}
        self.start_new_session = False  # True: its own process group, for a test's Ctrl-C
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None  # hq-server's, once stopped
        self.address: str | None = None
        self.processes: dict = {}  # name -> psutil.Process: "hq-broker", "hq-worker-00", ...
        self.client_kwargs: dict = {}  # what a client needs to read the stats (log-in, key)

    # --- life cycle ---------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_S) -> Stack:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=self.start_new_session,
            )
        deadline = time.monotonic() + timeout
        self._wait(lambda: os.path.exists(self.endpoint_file), deadline, "ready (its endpoint file)")
        with open(self.endpoint_file, encoding="utf-8") as fh:
            self.address = fh.read().split()[0]
        self._wait(self._find_processes, deadline, "its broker and worker processes")
        return self

    def _wait(self, predicate, deadline: float, what: str) -> None:
        while not predicate():
            if self.proc.poll() is not None:
                raise StackError(
                    f"hq-server exited with {self.proc.returncode} before {what}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(f"hq-server: not {what} in time:\n{self.log_tail()}")
            time.sleep(POLL_S)

    def children(self) -> dict:
        """name -> psutil.Process of hq-server's broker ("hq-broker") and workers, now."""
        found = {}
        for child in psutil.Process(self.proc.pid).children():
            try:
                argv = child.cmdline()
            except psutil.Error:
                continue
            if "hq.broker" in argv:
                found["hq-broker"] = child
            elif "hq.workers" in argv and "--name" in argv:
                found[argv[argv.index("--name") + 1]] = child
        return found

    def _find_processes(self) -> bool:
        found = self.children()
        if len(found) < self.workers + 1:
            return False
        self.processes = dict(sorted(found.items()))
        return True

    def stop(self, check: bool = False) -> int | None:
        """SIGTERM hq-server and wait; its exit status. With ``check``, a status other than 0
        or a stop that needed SIGKILL raises StackError."""
        if self.proc is None:
            return self.returncode  # stopped before (or never started: None)
        proc, self.proc = self.proc, None
        if not terminate(proc) and check:
            raise StackError(f"hq-server did not stop on SIGTERM:\n{self.log_tail()}")
        self.returncode = proc.returncode
        if check and proc.returncode != 0:
            raise StackError(f"hq-server exited with {proc.returncode}:\n{self.log_tail()}")
        return proc.returncode

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "".join(self.log().splitlines(keepends=True)[-lines:])

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- measurements -------------------------------------------------------------------
    def cpu_seconds(self) -> dict:
        """name -> user + system CPU seconds so far, for the broker and each worker."""
        return cpu_seconds(self.processes)

    def rss_bytes(self) -> dict:
        return rss_bytes(self.processes)

    def restarted(self) -> list:
        """Names of processes that are no longer the ones found at start (crashed)."""
        return [name for name, proc in self.processes.items() if not proc.is_running()]

    @property
    def broker_address(self) -> str:
        """Where hq's own client reaches the broker (for the statistics)."""
        return self.address

    def workers_registered(self) -> int:
        """How many workers the broker has registered now (0 when it cannot be asked)."""
        from hq.client import InvokeError, create_client

        with create_client(self.broker_address, timeout=2.0, **self.client_kwargs) as client:
            try:
                return len(client.get_stats().get("workers", []))
            except (ConnectionError, InvokeError):
                return 0

    def counters(self) -> dict:
        """The broker's raw counters (hashserv's get-stats, hq's part), or {"error": ...}."""
        from hq.client import InvokeError, create_client

        with create_client(self.address, timeout=5.0, **self.client_kwargs) as client:
            try:
                return client.get_stats().get("broker", {}).get("counters", {})
            except (ConnectionError, InvokeError) as exc:
                return {"error": str(exc)}

    def database_size(self) -> dict:
        """After :meth:`stop`: see :func:`database_size`."""
        return database_size(self.db)


def terminate(proc: subprocess.Popen) -> bool:
    """SIGTERM a server and wait for it; False if it had to be killed after STOP_TIMEOUT_S."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False
    return True


def cpu_seconds(processes: dict) -> dict:
    """name -> user + system CPU seconds so far of each psutil.Process (NaN once it died:
    the figure is void)."""
    out = {}
    for name, proc in processes.items():
        try:
            t = proc.cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = float("nan")
    return out


def rss_bytes(processes: dict) -> dict:
    out = {}
    for name, proc in processes.items():
        try:
            out[name] = proc.memory_info().rss
        except psutil.Error:
            out[name] = float("nan")
    return out


def database_size(db: str, tables: tuple = ("unihashes", "outhashes")) -> dict:
    """After the server stopped: checkpoint the WAL into the file, then measure and count.

    ``bytes`` is the database file plus whatever WAL is left (none after TRUNCATE), or on
    PostgreSQL the two tables with their indexes; ``tables`` are the mapping and outhash
    tables (hq's by default).
    """
    mappings, outhash_rows = tables
    if databases.is_postgresql(db):
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            counted = [
                conn.execute(f"SELECT count(*), pg_total_relation_size('{t}') FROM {t}").fetchone()
                for t in tables
            ]
        (unihashes, size_u), (outhashes, size_o) = counted
        return {"bytes": size_u + size_o, "unihash_rows": unihashes, "outhash_rows": outhashes}
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        unihashes = conn.execute(f"SELECT count(*) FROM {mappings}").fetchone()[0]
        outhashes = conn.execute(f"SELECT count(*) FROM {outhash_rows}").fetchone()[0]
    finally:
        conn.close()
    size = os.path.getsize(db)
    if os.path.exists(db + "-wal"):
        size += os.path.getsize(db + "-wal")
    return {"bytes": size, "unihash_rows": unihashes, "outhash_rows": outhashes}


def free_port() -> int:
    """A TCP port on 127.0.0.1 free now (for servers that take a port, not a port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GatewayStack(Stack):
    """hq-server with ``--oehashequiv 127.0.0.1:PORT``: its ``address`` is the gateway's, for
    BitBake's own client; the broker's stays ``hq_address`` (statistics). The gateway's CPU
    counts with the broker's and the workers'."""

    def __init__(self, workdir: str, workers: int, args=()):
        self.port = free_port()
        super().__init__(
            workdir,
            workers,
            "tcp://127.0.0.1:*",
            [*args, "--oehashequiv", f"127.0.0.1:{self.port}"],
            log_level="WARNING",
            inherit_env=False,
        )
        self.hq_address = None

    def start(self, timeout: float = START_TIMEOUT_S) -> GatewayStack:
        super().start(timeout)
        self.hq_address, self.address = self.address, f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        self._wait(lambda: "hq-gateway" in self.children(), deadline, "its gateway process")
        self.processes = dict(sorted(self.children().items()))
        return self

    @property
    def broker_address(self) -> str:
        return self.hq_address

    def children(self) -> dict:
        found = super().children()
        for child in psutil.Process(self.proc.pid).children():
            try:
                if "hq.gateway" in child.cmdline():
                    found["hq-gateway"] = child
            except psutil.Error:
                continue
        return found

    def counters(self) -> dict:
        from hq.client import create_client

        with create_client(self.hq_address, timeout=5.0) as client:
            try:
                return client.get_stats().get("broker", {}).get("counters", {})
            except ConnectionError as exc:
                return {"error": str(exc)}
