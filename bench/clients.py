"""Client processes: fork them, let them connect and build their data, release them at
once, collect what they measured.

Each job runs in its own forked process (the hq client is fork-safe and each process
makes its own connection). The sequence per process is: connect and ping, ``job.setup``,
post *ready*, wait for the release, ``job.run``, post the result, then stay
connected until the parent has measured the server (RSS with the clients connected) and
sets the done event. The release is the parent closing the write end of a pipe every
client blocks reading: the kernel makes all readers runnable at once (a
``multiprocessing.Event`` wakes its waiters one after the other, measured 180 ms from
the first to the 40th client on this machine, against ~25 ms with the pipe). Timestamps
are ``time.perf_counter()``, CLOCK_MONOTONIC on Linux, hence comparable between processes.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import resource
import time
import traceback

from hq.client import create_client

READY_TIMEOUT_S = 120.0
DONE_TIMEOUT_S = 60.0
JOIN_TIMEOUT_S = 10.0


class ClientFailure(RuntimeError):
    """A client process failed outside its measured work (setup, crash, deadline)."""


class Control:
    """What a job sees of the pool inside its process."""

    def __init__(self, pool: ClientPool, index: int):
        self._pool = pool
        self.index = index
        self.progress = pool.progress  # RawArray: slot ``index`` is this client's item count
        self.events = pool.events

    def post(self, kind: str, payload=None) -> None:
        self._pool.messages.put((kind, self.index, payload))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class ClientPool:
    def __init__(self, address: str, jobs: list, call_timeout_s: float, events=(), connect=create_client):
        ctx = multiprocessing.get_context("fork")
        self.address = address
        self.connect = connect  # (address, timeout) -> a client with BitBake's client's methods
        self.jobs = jobs
        self.call_timeout_s = call_timeout_s
        self.messages = ctx.Queue()
        self._release_r, self._release_w = os.pipe()
        self.done_event = ctx.Event()
        self.events = {name: ctx.Event() for name in events}
        self.progress = ctx.RawArray("q", len(jobs))
        self.processes = [ctx.Process(target=self._child, args=(i,), daemon=True) for i in range(len(jobs))]
        self.released_at = None
        self.pending: list = []  # messages read while waiting for something else

    # --- in the child ---------------------------------------------------------------------
    def _child(self, index: int) -> None:
        os.close(self._release_w)  # else the pipe never reaches end of file
        control = Control(self, index)
        job = self.jobs[index]
        try:
            client = self.connect(self.address, timeout=self.call_timeout_s)
            client.ping()
            job.setup()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the run
            control.post("failed", f"setup: {type(exc).__name__}: {exc}")
            return
        control.post("ready")
        os.read(self._release_r, 1)  # returns b"" when the parent closes the write end
        if self.done_event.is_set():  # the run was abandoned before the release
            client.close()
            return
        cpu0 = cpu_seconds()
        started = time.perf_counter()
        try:
            result = job.run(client, control)
        except BaseException:  # noqa: BLE001
            control.post("failed", traceback.format_exc())
            return
        result["started"] = started
        result["cpu_s"] = cpu_seconds() - cpu0
        control.post("result", result)
        self.done_event.wait(DONE_TIMEOUT_S)
        client.close()

    # --- in the parent --------------------------------------------------------------------
    def start(self) -> None:
        """Fork every client and wait until all are connected and ready."""
        for proc in self.processes:
            proc.start()
        self.wait_for("ready", range(len(self.jobs)), time.monotonic() + READY_TIMEOUT_S)

    def release(self) -> float:
        self.released_at = time.perf_counter()
        self._close_release()
        return self.released_at

    def _close_release(self) -> None:
        if self._release_w is not None:
            os.close(self._release_w)
            self._release_w = None

    def wait_for(self, kind: str, indexes, deadline: float, on_tick=None) -> dict:
        """index -> payload of a ``kind`` message from each of ``indexes``.

        Raises ClientFailure if a client reports a failure, dies, or the deadline passes.
        """
        wanted = set(indexes)
        got: dict = {}
        keep = []
        for message in self.pending:
            if message[0] == kind and message[1] in wanted:
                got[message[1]] = message[2]
            else:
                keep.append(message)
        self.pending = keep
        while not wanted <= got.keys():
            try:
                message = self.messages.get(timeout=0.2)
            except queue.Empty:
                message = None
            if message is not None:
                k, index, payload = message
                if k == "failed":
                    raise ClientFailure(f"client {index}: {payload}")
                if k == kind and index in wanted:
                    got[index] = payload
                else:
                    self.pending.append(message)
                continue
            if on_tick is not None:
                on_tick()
            for i in wanted - got.keys():
                if self.processes[i].exitcode is not None:
                    # Its message may still be in the pipe: look once more before failing.
                    self._drain_into(got, kind, wanted)
                    if i not in got:
                        raise ClientFailure(
                            f"client {i} exited with {self.processes[i].exitcode} before '{kind}'"
                        )
            if time.monotonic() > deadline:
                missing = sorted(wanted - got.keys())
                raise ClientFailure(f"timed out waiting for '{kind}' from clients {missing[:10]}")
        return got

    def _drain_into(self, got: dict, kind: str, wanted: set) -> None:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                k, index, payload = self.messages.get(timeout=0.1)
            except queue.Empty:
                return
            if k == "failed":
                raise ClientFailure(f"client {index}: {payload}")
            if k == kind and index in wanted:
                got[index] = payload
            else:
                self.pending.append((k, index, payload))

    def done(self) -> int:
        return sum(self.progress)

    def finish(self) -> None:
        """Let the clients disconnect and exit; kill any that does not within the deadline."""
        self.done_event.set()  # first: a client released now leaves without running
        for event in self.events.values():
            event.set()  # nobody stays blocked on a phase that will not come
        self._close_release()
        end = time.monotonic() + JOIN_TIMEOUT_S
        for proc in self.processes:
            if proc.pid is None:
                continue
            proc.join(max(0.0, end - time.monotonic()))
            if proc.exitcode is None:
                os.kill(proc.pid, 9)
                proc.join()
        if self._release_r is not None:
            os.close(self._release_r)
            self._release_r = None
        self.messages.close()
        self.messages.join_thread()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()
