"""Shared test helpers: waiting on conditions with deadlines, and running real hq stacks."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import psutil

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


class Stack:
    """An ``hq-server`` process (broker + N workers) on a temporary SQLite file."""

    def __init__(self, tmp_path, workers: int = 2, bind: str = "tcp://127.0.0.1:*", args=(), env=None):
        self.tmp_path = tmp_path
        self.db = str(tmp_path / "hq.db")
        self.endpoint_file = str(tmp_path / "endpoints")
        self.log_path = tmp_path / "hq-server.log"
        self.argv = [
            script("hq-server"),
            "--bind", bind,
            "--db", self.db,
            "--workers", str(workers),
            "--endpoint-file", self.endpoint_file,
            "--heartbeat-interval", "0.2",
            *args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.start_new_session = False  # True: its own process group, for a test's Ctrl-C
        self.proc = None
        self.address = None

    def start(self, timeout: float = 20.0) -> "Stack":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=self.start_new_session)
        wait_for(lambda: os.path.exists(self.endpoint_file) or self.proc.poll() is not None, timeout, what="hq-server ready")
        if self.proc.poll() is not None:
            raise AssertionError(f"hq-server exited {self.proc.returncode}:\n{self.log()}")
        with open(self.endpoint_file) as fh:
            self.address = fh.read().split()[0]
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> dict:
        """name -> psutil.Process for the broker and workers hq-server runs."""
        out = {}
        for child in psutil.Process(self.proc.pid).children():
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if "hq.broker" in cmd:
                out["broker"] = child
            elif "hq.workers" in cmd:
                out[cmd[cmd.index("--name") + 1]] = child
        return out

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"hq-server did not stop on SIGTERM:\n{self.log()}")
        self._log.close()
        code = self.proc.returncode
        self.proc = None
        return code

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_bitbake() -> str | None:
    """BitBake's source tree (bin/, lib/): ``$HQ_BITBAKE``, else ``../shared/bitbake`` next to
    this repository; None when neither holds one."""
    for candidate in (os.environ.get("HQ_BITBAKE"), os.path.join(REPO, os.pardir, "shared", "bitbake")):
        if candidate and os.path.isfile(os.path.join(candidate, "bin", "bitbake-hashserv")):
            return os.path.realpath(candidate)
    return None


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
