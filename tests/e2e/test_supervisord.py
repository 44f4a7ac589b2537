"""configs/supervisord.conf under a real supervisord: the production process layout.

Each test starts ``supervisord -c configs/supervisord.conf -n`` with every HQ_* path in a
temporary directory, waits until ``supervisorctl status`` shows the broker and three
workers RUNNING and a ping goes through, and shuts supervisord down afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import psutil
import pytest

from helpers import BIN, script, wait_for
from hq.client import create_client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

CONF = str(pathlib.Path(__file__).resolve().parents[2] / "configs" / "supervisord.conf")
WORKERS = 3
WORKER_NAMES = [f"hq-worker_{n:02d}" for n in range(WORKERS)]
NAMES = ["hq-broker", *WORKER_NAMES, "hq-gateway"]
METHOD = "do_compile"
STOPWAITSECS = 10  # as in configs/supervisord.conf
# Tuning through HQ_CONFIG, as a deployment would: one file, a shared section and one per program.
HQ_CONF = """\
[hq]
heartbeat-interval = 0.2
heartbeat-liveness = 3
log-level = INFO

[hq-broker]
request-timeout = 5

[hq-worker]
synchronous = normal
"""


def h(*parts) -> str:
    """A 64-hex hash from any text."""
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


class Supervisor:
    """A supervisord running configs/supervisord.conf in the foreground."""

    def __init__(self, tmp_path: pathlib.Path, workers: int = WORKERS):
        self.names = ["hq-broker"] + [f"hq-worker_{n:02d}" for n in range(workers)] + ["hq-gateway"]
        # AF_UNIX paths are limited to ~107 bytes: keep the run directory short.
        self.run_dir = tempfile.mkdtemp(prefix="hq-sv-")
        self.log_dir = tmp_path / "log"
        self.log_dir.mkdir()
        self.db = str(tmp_path / "hq.db")
        config_file = tmp_path / "hq.conf"
        config_file.write_text(HQ_CONF)
        self.address = f"ipc://{self.run_dir}/clients.ipc"
        self.endpoint_file = os.path.join(self.run_dir, "hq-broker.endpoints")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HQ_")}
        env.update(
            PATH=BIN + os.pathsep + env.get("PATH", ""),
            HQ_RUN_DIR=self.run_dir,
            HQ_LOG_DIR=str(self.log_dir),
            HQ_DB=self.db,
            HQ_BIND=f"tcp://127.0.0.1:*,{self.address}",
            HQ_BACKEND=f"ipc://{self.run_dir}/backend.ipc",
            HQ_CONFIG=str(config_file),
            HQ_WORKERS=str(workers),
            HQ_LISTEN=f"unix://{self.run_dir}/hashserv.sock",
            HQ_BROKER=self.address,
        )
        self.gateway = f"{self.run_dir}/hashserv.sock"
        self.env = env
        self.output_path = tmp_path / "supervisord.out"
        self.proc = None

    # --- life cycle -------------------------------------------------------------------------
    def start(self) -> Supervisor:
        self._output = open(self.output_path, "ab")
        self.proc = subprocess.Popen(
            [script("supervisord"), "-c", CONF, "-n"],
            stdout=self._output,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        wait_for(self._all_running, timeout=20, interval=0.1, what=f"all RUNNING\n{self.diagnostics()}")
        wait_for(self._pings, timeout=10, interval=0.05, what="a ping through supervisord's broker")
        return self

    def _all_running(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisord exited {self.proc.returncode}\n{self.diagnostics()}")
        status = self.status()
        return sorted(status) == sorted(self.names) and all(
            state == "RUNNING" for state, _ in status.values()
        )

    def _pings(self) -> bool:
        with create_client(self.address, timeout=0.5) as client:
            try:
                return client.ping()["alive"]
            except ConnectionError:
                return False

    def shutdown(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.ctl("shutdown")
                try:
                    self.proc.wait(timeout=STOPWAITSECS + 10)
                except subprocess.TimeoutExpired:
                    for child in psutil.Process(self.proc.pid).children(recursive=True):
                        child.kill()
                    self.proc.kill()
                    self.proc.wait()
                    raise AssertionError(f"supervisord did not shut down\n{self.diagnostics()}") from None
            assert self.proc.returncode == 0, self.diagnostics()
        finally:
            self._output.close()
            self.proc = None
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # --- supervisorctl --------------------------------------------------------------------------
    def ctl(self, *args, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [script("supervisorctl"), "-c", CONF, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict:
        """``supervisorctl status`` as {process name: (state, pid or None)}."""
        out: dict = {}
        for line in self.ctl("status").stdout.splitlines():
            fields = line.split()
            if len(fields) < 2 or not fields[0].startswith("hq:"):
                continue
            match = re.search(r"pid (\d+)", line)
            out[fields[0][len("hq:") :]] = (fields[1], int(match.group(1)) if match else None)
        return out

    # --- files ----------------------------------------------------------------------------------
    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def diagnostics(self) -> str:
        parts = [f"--- supervisord stdout\n{self.output_path.read_text(errors='replace')}"]
        for path in sorted(self.log_dir.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


@pytest.fixture
def supervisor(tmp_path):
    sv = Supervisor(tmp_path)
    try:
        yield sv.start()
    finally:
        sv.shutdown()


def test_report_and_lookup_through_supervised_processes(supervisor):
    t1, t2, t3, outhash = h("task", 1), h("task", 2), h("task", 3), h("out", 1)
    u1, u2 = h("uni", 1), h("uni", 2)
    with create_client(supervisor.address, timeout=5) as client:
        assert client.report_unihash(t1, METHOD, outhash, u1)["unihash"] == u1
        # Same output from another taskhash: it gets the first unihash, not its own.
        assert client.report_unihash(t2, METHOD, outhash, u2)["unihash"] == u1
        assert client.get_unihash_batch([(METHOD, t1), (METHOD, t3), (METHOD, t2)]) == [u1, None, u1]
        assert client.unihash_exists_batch([u1, u2]) == [True, False]
    # The TCP endpoint bound to port * is published in the endpoint file with its real port.
    with open(supervisor.endpoint_file) as fh:
        endpoints = fh.read().split()
    tcp = [e for e in endpoints if e.startswith("tcp://127.0.0.1:")]
    assert len(tcp) == 1 and not tcp[0].endswith(":*"), endpoints
    with create_client(tcp[0], timeout=5) as client:
        assert client.get_unihash(METHOD, t2) == u1
        # Every worker RUNNING under supervisord registers with the broker (one ping went
        # through at start; on a loaded machine the others may still be on their way).
        wait_for(
            lambda: sorted(w["name"] for w in client.get_stats()["workers"]) == WORKER_NAMES,
            timeout=20,
            interval=0.1,
            what="every supervised worker registered with the broker",
        )
    # and through the supervised gateway, in BitBake's protocol
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(supervisor.gateway)
        sock.sendall(f'OEHASHEQUIV 1.1\n\n{{"get": {{"method": "{METHOD}", "taskhash": "{t2}"}}}}\n'.encode())
        answer = json.loads(sock.makefile("rb").readline())
    assert answer == {"taskhash": t2, "method": METHOD, "unihash": u1}


def test_worker_killed_mid_batch_is_restarted_and_no_answer_is_lost(supervisor):
    reported = 500
    lookups = 200_000
    known = [h("known", i) for i in range(reported)]
    unihash = {t: h("uni-of", t) for t in known}
    with create_client(supervisor.address, timeout=10) as client:
        for taskhash in known:
            client.report_unihash(taskhash, METHOD, h("out-of", taskhash), unihash[taskhash])
    # Even positions: a reported taskhash (each looked up many times); odd: never reported.
    query = [(METHOD, known[(i // 2) % reported] if i % 2 == 0 else h("miss", i)) for i in range(lookups)]
    expected = [unihash[t] if i % 2 == 0 else None for i, (_, t) in enumerate(query)]

    rounds: list = []  # (start, end, correct) of each completed batch
    errors: list = []
    stop = threading.Event()

    def lookup_rounds():
        try:
            with create_client(supervisor.address, timeout=20) as client:
                while not stop.is_set():
                    start = time.monotonic()
                    answers = client.get_unihash_batch(query)
                    end = time.monotonic()
                    rounds.append((start, end, answers == expected))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=lookup_rounds, name="lookups", daemon=True)
    thread.start()
    try:
        wait_for(lambda: rounds or errors, timeout=30, what="a first full batch")
        assert not errors, errors
        victim = "hq-worker_01"
        old_pid = supervisor.status()[victim][1]
        done_at_kill = len(rounds)
        os.kill(old_pid, signal.SIGKILL)

        def restarted():
            state, pid = supervisor.status()[victim]
            return state == "RUNNING" and pid not in (None, old_pid) and pid

        new_pid = wait_for(restarted, timeout=20, interval=0.1, what=f"supervisord to restart {victim}")
        # The new process registered with the broker under the same name.
        wait_for(
            lambda: f"worker {victim} registered (pid {new_pid}, restart 1)" in supervisor.log("hq-broker"),
            timeout=10,
            what="the restarted worker to register",
        )
        done_before = len(rounds)
        wait_for(lambda: len(rounds) >= done_before + 2 or errors, timeout=30, what="2 batches after restart")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive(), "lookup thread did not finish"
    assert not errors, errors
    assert len(rounds) > done_at_kill + 1
    assert all(correct for _, _, correct in rounds), [correct for _, _, correct in rounds]
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    with create_client(supervisor.address, timeout=5) as client:
        counters = client.get_stats()["broker"]["counters"]
    print(f"{len(rounds)} batches of {lookups}, kill in batch {done_at_kill + 1}, counters {counters}")
    # The dead worker held work when the broker dropped it, and that work was sent elsewhere.
    assert counters.get("jobs.redispatched", 0) >= 1, counters
    assert f"worker {victim} expired" in supervisor.log("hq-broker")


def test_stop_group_stops_every_process_cleanly_and_logs_each(supervisor):
    before = supervisor.status()
    pids = {name: pid for name, (_, pid) in before.items()}
    started = time.monotonic()
    result = supervisor.ctl("stop", "hq:*")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < STOPWAITSECS, f"stop took {elapsed:.1f} s"
    after = supervisor.status()
    assert {name: state for name, (state, _) in after.items()} == {name: "STOPPED" for name in NAMES}
    for name, pid in pids.items():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, name
    supervisord_log = (supervisor.log_dir / "supervisord.log").read_text()
    for name in NAMES:
        # Exit on TERM, status 0: never SIGKILLed after stopwaitsecs, never FATAL.
        assert f"stopped: {name} (exit status 0)" in supervisord_log, supervisord_log
    assert "FATAL" not in supervisord_log
    broker_log = supervisor.log("hq-broker")
    assert f"hq-broker[{pids['hq-broker']}] INFO hq.broker.main: broker serving clients" in broker_log
    assert f"hq-broker[{pids['hq-broker']}] INFO hq.broker.main: broker stopped" in broker_log
    for name in WORKER_NAMES:
        text = supervisor.log(name)
        assert f"{name}[{pids[name]}] INFO hq.workers.main: worker {name} connecting" in text, text
        assert f"{name}[{pids[name]}] INFO hq.workers.main: worker {name} stopped" in text, text
        assert not any(f"{other}[" in text for other in NAMES if other != name), "shared log file"


def test_absent_broker_is_a_connection_error_within_the_deadline(supervisor):
    result = supervisor.ctl("stop", "hq:hq-broker")
    assert result.returncode == 0, result.stdout + result.stderr
    assert supervisor.status()["hq-broker"][0] == "STOPPED"
    deadline_s = 1.0
    with create_client(supervisor.address, timeout=deadline_s) as client:
        for call in (client.ping, lambda: client.get_unihash(METHOD, h("task", 1))):
            started = time.monotonic()
            with pytest.raises(ConnectionError):
                call()
            elapsed = time.monotonic() - started
            assert elapsed <= deadline_s * 1.1, f"ConnectionError after {elapsed:.2f} s"
    # The workers were left running; they re-register with a restarted broker by themselves.
    assert all(supervisor.status()[name][0] == "RUNNING" for name in WORKER_NAMES)
    assert supervisor.ctl("start", "hq:hq-broker").returncode == 0
    wait_for(supervisor._pings, timeout=10, interval=0.05, what="a ping after the broker restart")


def start_race_once(tmp_path) -> float:
    """supervisord starts the broker and 4 workers at once on a fresh database."""
    sv = Supervisor(tmp_path, workers=4)
    start = time.monotonic()
    try:
        sv.start()  # every process RUNNING (startsecs=3) and a ping answered
        with create_client(sv.address, timeout=5) as client:
            wait_for(lambda: len(client.get_stats()["workers"]) == 4, 5, 0.05, "4 workers registered")
            ready = time.monotonic() - start
            assert client.report_unihash("a" * 64, "M", "b" * 64, "c" * 64)["unihash"] == "c" * 64
        status = sv.status()
        assert all(state == "RUNNING" for state, _ in status.values()), status
        logs = "".join(sv.log(name) for name in sv.names)
        assert "locked" not in logs and "Traceback" not in logs, logs
        assert "FATAL" not in sv.output_path.read_text(errors="replace")
    finally:
        sv.shutdown()
    return ready


def test_startup_race_under_supervisord(tmp_path):
    assert start_race_once(tmp_path) < 5.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_startup_race_under_supervisord_20_times(tmp_path_factory):
    times = [start_race_once(tmp_path_factory.mktemp("race")) for _ in range(20)]
    print("ready after (s):", [round(t, 2) for t in times])
    assert max(times) < 5.0


def test_a_configuration_that_cannot_work_goes_fatal_not_round_and_round(tmp_path):
    """A database path that is a directory and ports already taken: supervisord tries each
    program startretries times (startsecs=3 tells a start from a crash), then marks it FATAL
    and leaves it down. Each try logs one ERROR line saying why, and no traceback."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    sv = Supervisor(tmp_path, workers=2)
    (tmp_path / "dir.db").mkdir()
    taken = f"127.0.0.1:{holder.getsockname()[1]}"
    sv.env.update(HQ_DB=str(tmp_path / "dir.db"), HQ_BIND=f"tcp://{taken}", HQ_LISTEN=taken)
    sv._output = open(sv.output_path, "ab")
    sv.proc = subprocess.Popen(
        [script("supervisord"), "-c", CONF, "-n"], stdout=sv._output, stderr=subprocess.STDOUT, env=sv.env
    )
    try:

        def all_fatal():
            status = sv.status()
            return sorted(status) == sorted(sv.names) and all(
                state == "FATAL" for state, _ in status.values()
            )

        wait_for(all_fatal, timeout=30, interval=0.2, what=f"every program FATAL\n{sv.diagnostics()}")
        expected = {
            "hq-broker": "Address already in use",
            "hq-worker_00": "it is a directory",
            "hq-worker_01": "it is a directory",
            "hq-gateway": "Address already in use",
        }
        for name, reason in expected.items():
            log = sv.log(name)
            errors = [line for line in log.splitlines() if " ERROR " in line]
            assert len(errors) == 4 and all(reason in line for line in errors), log  # startretries=3: 4 tries
            assert len(log.splitlines()) == 4 and "Traceback" not in log, log
    finally:
        holder.close()
        sv.shutdown()
