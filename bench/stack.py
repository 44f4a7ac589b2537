"""A real hq stack for one benchmark repeat: ``hq-server`` on a fresh database.

The stack is driven only through its console script and the public client: the
benchmark sees hq as an operator does. Broker and worker processes are found as psutil
children of ``hq-server`` (by their ``-m hq.broker`` / ``-m hq.workers --name NAME``
command lines) for CPU and memory figures.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import psutil
from hq.client import create_client

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
    """``hq-server --workers N`` on ``workdir/hq.db``, on ipc:// or tcp://127.0.0.1:*."""

    def __init__(self, workdir: str, workers: int, transport: str, server_args=()):
        self.workdir = workdir
        self.db = os.path.join(workdir, "hq.db")
        self.workers = workers
        self.endpoint_file = os.path.join(workdir, "endpoints")
        self.log_path = os.path.join(workdir, "hq-server.log")
        bind = f"ipc://{workdir}/hq.ipc" if transport == "ipc" else "tcp://127.0.0.1:*"
        self.argv = [
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
            "WARNING",
            *server_args,
        ]
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.processes: dict = {}  # name -> psutil.Process: "hq-broker", "hq-worker-00", ...

    # --- life cycle ---------------------------------------------------------------------
    def start(self) -> Stack:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HQ_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        self._wait(lambda: os.path.exists(self.endpoint_file), deadline, "its endpoint file")
        with open(self.endpoint_file, encoding="utf-8") as fh:
            self.address = fh.read().split()[0]
        # hq-server is ready once one worker answered; a benchmark wants all of them.
        with create_client(self.address, timeout=5.0) as client:

            def all_registered():
                try:
                    return len(client.get_stats().get("workers", ())) >= self.workers
                except ConnectionError:
                    return False

            self._wait(all_registered, deadline, f"{self.workers} registered workers")
        self._wait(self._find_processes, deadline, "its broker and worker processes")
        return self

    def _wait(self, predicate, deadline: float, what: str) -> None:
        while not predicate():
            if self.proc.poll() is not None:
                raise StackError(
                    f"hq-server exited with {self.proc.returncode} before {what}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop(check=False)
                raise StackError(f"hq-server: no {what} within {START_TIMEOUT_S:g} s:\n{self.log_tail()}")
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

    def stop(self, check: bool = True) -> None:
        """SIGTERM hq-server and wait; with ``check``, a non-zero exit raises StackError."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                if check:
                    raise StackError(f"hq-server did not stop on SIGTERM:\n{self.log_tail()}") from None
        if check and proc.returncode != 0:
            raise StackError(f"hq-server exited with {proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""

    # --- measurements -------------------------------------------------------------------
    def cpu_seconds(self) -> dict:
        """name -> user + system CPU seconds so far, for the broker and each worker."""
        out = {}
        for name, proc in self.processes.items():
            try:
                t = proc.cpu_times()
                out[name] = t.user + t.system
            except psutil.Error:
                out[name] = float("nan")  # died (and maybe restarted): the figure is void
        return out

    def rss_bytes(self) -> dict:
        out = {}
        for name, proc in self.processes.items():
            try:
                out[name] = proc.memory_info().rss
            except psutil.Error:
                out[name] = float("nan")
        return out

    def restarted(self) -> list:
        """Names of processes that are no longer the ones found at start (crashed)."""
        return [name for name, proc in self.processes.items() if not proc.is_running()]


def database_size(db: str) -> dict:
    """After the stack stopped: checkpoint the WAL into the file, then measure and count.

    ``bytes`` is the database file plus whatever WAL is left (none after TRUNCATE).
    """
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        unihashes = conn.execute("SELECT count(*) FROM unihashes").fetchone()[0]
        outhashes = conn.execute("SELECT count(*) FROM outhashes").fetchone()[0]
    finally:
        conn.close()
    size = os.path.getsize(db)
    if os.path.exists(db + "-wal"):
        size += os.path.getsize(db + "-wal")
    return {"bytes": size, "unihash_rows": unihashes, "outhash_rows": outhashes}
