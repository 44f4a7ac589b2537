"""The reference side of ``hq-bench compare``: BitBake's ``bitbake-hashserv`` and BitBake's own
client, from a BitBake source tree the user points at (``--bitbake``, ``$HQ_BITBAKE``).

BitBake is GPL-2.0: hq runs its server as a separate program and imports its client only
inside the benchmark's client processes, from that tree, at run time. Nothing of it is
copied into hq or shipped with it.

:class:`ReferenceServer` has the interface of :class:`hq.bench.stack.Stack` that the runner
uses, so one repeat of a workload runs the same client jobs, with the same keys and the same
expected answers, against either server.
"""

from __future__ import annotations

import datetime
import functools
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time

import psutil

from .keys import METHOD
from .populate import corrupted
from .stack import START_TIMEOUT_S, StackError, cpu_seconds, database_size, free_port, rss_bytes, terminate

NAME = "bitbake-hashserv"
POLL_S = 0.02
DEFAULT_TREE = os.path.join(os.pardir, "shared", "bitbake")


def is_bitbake_tree(path) -> bool:
    """A BitBake source tree: ``bin/bitbake-hashserv`` and ``lib/hashserv``."""
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "bin", NAME))
        and os.path.isdir(os.path.join(path, "lib", "hashserv"))
    )


def find_bitbake(explicit: str | None = None, environ=os.environ, default: str = DEFAULT_TREE) -> str | None:
    """``explicit``, else ``$HQ_BITBAKE``, else ``default`` (``../shared/bitbake`` from the
    current directory): the first that is a BitBake tree, or None."""
    for candidate in (explicit, environ.get("HQ_BITBAKE"), default):
        if is_bitbake_tree(candidate):
            return os.path.realpath(candidate)
    return None


def version(tree: str) -> str:
    """BitBake's ``__version__`` (read from ``lib/bb/__init__.py``, not imported)."""
    try:
        with open(os.path.join(tree, "lib", "bb", "__init__.py"), encoding="utf-8") as fh:
            match = re.search(r'^__version__\s*=\s*"([^"]+)"', fh.read(), re.M)
    except OSError:
        return "unknown"
    return match.group(1) if match else "unknown"


def _connect(lib: str, address: str, timeout: float = 30.0):
    """In a client process: BitBake's ``hashserv.create_client`` (its own 30 s timeout)."""
    if lib not in sys.path:
        sys.path.insert(0, lib)
    import hashserv  # noqa: PLC0415 - BitBake's, from the tree, in the client process only

    return hashserv.create_client(address)


def connector(tree: str):
    """``connect(address, timeout)`` for :class:`hq.bench.clients.ClientPool`."""
    return functools.partial(_connect, os.path.join(tree, "lib"))


class ReferenceServer:
    """``bitbake-hashserv -b 127.0.0.1:PORT -d workdir/hashserv.db``, one process (asyncio,
    SQLite), run by this interpreter."""

    def __init__(self, workdir: str, tree: str, args=(), env=None):
        self.workdir = str(workdir)
        self.tree = tree
        self.args = list(args)  # more bitbake-hashserv options (the tests: --admin-user ...)
        self.env = env
        self.db = os.path.join(self.workdir, "hashserv.db")
        self.log_path = os.path.join(self.workdir, "bitbake-hashserv.log")
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.processes: dict = {}

    def start(self, timeout: float = START_TIMEOUT_S) -> ReferenceServer:
        port = free_port()
        argv = [sys.executable, os.path.join(self.tree, "bin", NAME), "-b", f"127.0.0.1:{port}"]
        argv += ["-d", self.db, "-l", "WARNING", *self.args]
        env = None if self.env is None else {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while not self._answers_ping(port):
            if self.proc.poll() is not None:
                raise StackError(f"{NAME} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(f"{NAME} did not answer on port {port} in time:\n{self.log_tail()}")
            time.sleep(POLL_S)
        self.address = f"127.0.0.1:{port}"
        self.processes = {NAME: psutil.Process(self.proc.pid)}
        return self

    @staticmethod
    def _answers_ping(port: int) -> bool:
        """The server binds before it creates its database; it answers only after."""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                sock.sendall(b'OEHASHEQUIV 1.1\n\n{"ping": {}}\n')
                return sock.makefile("rb").readline().startswith(b'{"alive": true}')
        except OSError:
            return False

    def stop(self, check: bool = False) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if not terminate(proc) and check:
            raise StackError(f"{NAME} did not stop on SIGTERM:\n{self.log_tail()}")
        return proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""

    def _tree_processes(self) -> dict:
        """The server and any process it started (it starts none today; counted if it does)."""
        found = {}
        for name, proc in self.processes.items():
            found[name] = proc
            try:
                for child in proc.children(recursive=True):
                    found[f"{name}-child-{child.pid}"] = child
            except psutil.Error:
                pass
        return found

    def cpu_seconds(self) -> dict:
        return cpu_seconds(self._tree_processes())

    def rss_bytes(self) -> dict:
        return rss_bytes(self._tree_processes())

    def restarted(self) -> list:
        return [name for name, proc in self.processes.items() if not proc.is_running()]

    def counters(self) -> dict:
        return {}

    def database_size(self) -> dict:
        return database_size(self.db, ("unihashes_v3", "outhashes_v2"))


def populate(path: str, rows, tree: str, method: str = METHOD, corrupt: int = 0) -> int:
    """The known keys in a new ``bitbake-hashserv`` database: the server creates its own
    schema (started once on ``path`` and stopped), then the rows a new report of each key
    would have written go in with one transaction: a ``unihashes_v3`` row and an
    ``outhashes_v2`` row (``created`` in the server's ISO 8601 UTC form). Returns the keys.
    ``corrupt``: as :func:`hq.bench.populate.populate`, the first rows get a wrong unihash."""
    workdir = os.path.dirname(os.path.abspath(path))
    server = ReferenceServer(workdir, tree)
    server.db = path
    server.start()
    server.stop()
    created = datetime.datetime.now(datetime.timezone.utc)
    seen: set = set()
    mappings, outhashes = [], []
    for n, (taskhash, outhash, unihash) in enumerate(rows):
        if taskhash in seen:
            continue
        seen.add(taskhash)
        if n < corrupt:
            unihash = corrupted(unihash)
        mappings.append((method, taskhash, unihash))
        stamp = (created + datetime.timedelta(microseconds=n)).isoformat()
        outhashes.append((method, taskhash, outhash, stamp))
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT OR IGNORE INTO unihashes_v3 (method, taskhash, unihash, gc_mark) VALUES (?, ?, ?, '')",
            mappings,
        )
        conn.executemany(
            "INSERT OR IGNORE INTO outhashes_v2 (method, taskhash, outhash, created) VALUES (?, ?, ?, ?)",
            outhashes,
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    return len(mappings)
