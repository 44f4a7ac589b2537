"""One repeat of a workload: a fresh database and stack, the clients, the measurements."""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time

import psutil

from hq.client import create_client
from hq.progress import Progress

from .clients import ClientFailure, ClientPool
from .populate import drop_schema, fresh_schema, populate_postgresql
from .stack import Stack, StackError

#: Per-result counters that must all be zero for a run to be correct.
FAILURE_COUNTS = ("wrong", "missing", "derailed", "unanswered")


def hq_stack(opts, workdir: str, db: str | None = None) -> Stack:
    """The server under test by default: ``hq-server`` with the run's options (on ``db``,
    a PostgreSQL URL, instead of a file in ``workdir``)."""
    bind = f"ipc://{workdir}/hq.ipc" if opts.transport == "ipc" else "tcp://127.0.0.1:*"
    return Stack(workdir, opts.workers, bind, opts.server_arg, log_level="WARNING", inherit_env=False, db=db)


def run_repeat(
    workload, opts, template_db: str, number: int, progress: Progress, server=hq_stack, connect=create_client
) -> dict:
    """Run the workload once on a copy of ``template_db``; return the raw result.

    ``server(opts, workdir)`` makes the server (:class:`~hq.bench.stack.Stack`, or
    :class:`~hq.bench.reference.ReferenceServer`: start, stop, address, db, processes,
    cpu_seconds, rss_bytes, restarted, counters, database_size); ``connect(address,
    timeout)`` is the client the client processes use. Never raises for a failed run: a
    stack or client failure is an ``error`` and ``ok: false`` in the result, so the other
    repeats and the report still happen.
    """
    workdir = tempfile.mkdtemp(prefix="hq-bench-", dir=opts.tmpdir)
    result: dict = {"repeat": number, "ok": False, "load_average_before": list(os.getloadavg())}
    postgresql = getattr(opts, "db", None)
    schema_name = f"hq_bench_{os.getpid()}_{number}"
    if postgresql:
        progress.note(f"repeat {number}/{opts.repeats}: pre-populating schema {schema_name}")
        url = fresh_schema(postgresql, schema_name)
        populate_postgresql(url, workload.rows.rows, corrupt=opts.corrupt_keys)
        stack = server(opts, workdir, db=url)
    else:
        stack = server(opts, workdir)
    try:
        if not postgresql:
            shutil.copyfile(template_db, stack.db)
        progress.note(f"repeat {number}/{opts.repeats}: starting hq-server")
        try:
            stack.start()
            _measure(workload, opts, stack, progress, number, result, connect)
        except BaseException:
            stack.stop(check=False)
            raise
        stack.stop(check="error" not in result)
        result["db"] = stack.database_size()
        _finish_figures(result)
    except (StackError, ClientFailure, OSError) as exc:
        result.setdefault("error", f"{type(exc).__name__}: {exc}")
    finally:
        progress.close()
        if opts.keep:
            result["workdir"] = workdir
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            if postgresql:
                drop_schema(postgresql, schema_name)
    result["ok"] = _is_ok(result)
    return result


def _measure(workload, opts, stack, progress: Progress, number: int, result: dict, connect) -> None:
    pool = ClientPool(stack.address, workload.jobs, opts.timeout, workload.events, connect)
    try:
        progress.note(f"repeat {number}/{opts.repeats}: starting {len(workload.jobs)} clients")
        pool.start()
        total = workload.total_items()
        progress.begin(f"{workload.name} {number}/{opts.repeats}")
        cpu_before = stack.cpu_seconds()
        deadline = time.monotonic() + opts.run_timeout
        every = getattr(opts, "kill_workers_every", None)
        killer = WorkerKiller(stack, every) if every else None
        try:
            by_index = workload.drive(pool, deadline, lambda: progress.update(pool.done(), total))
        finally:
            if killer:
                result["kills"] = killer.stop()
        # The clients are done but still connected: measure the server now.
        cpu_after = stack.cpu_seconds()
        rss = stack.rss_bytes()
        crashed = stack.restarted()
        if killer:  # the workers we killed are expected to be gone; the broker is not
            crashed = [name for name in crashed if not name.startswith("hq-worker")]
        result["broker_counters"] = stack.counters()
    finally:
        pool.finish()
    results = [by_index[i] for i in range(len(workload.jobs))]
    metrics, items = workload.metrics(results, pool.released_at)
    result["counts"] = {name: sum(r.get(name, 0) for r in results) for name in FAILURE_COUNTS}
    result["counts"]["client_errors"] = sum(1 for r in results if r.get("error"))
    metrics["bad_answers"] = sum(result["counts"][name] for name in FAILURE_COUNTS)
    cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_before}
    server_cpu = sum(cpu.values())
    metrics["server_cpu_s"] = server_cpu
    metrics["server_cpu_us_per_item"] = server_cpu / items * 1e6 if items else float("nan")
    metrics["client_cpu_s"] = sum(r["cpu_s"] for r in results)
    metrics["release_skew_ms"] = (max(r["started"] for r in results) - pool.released_at) * 1e3
    for name, seconds in cpu.items():
        metrics[f"cpu_s[{name}]"] = seconds
    if killer:
        metrics["worker_kills"] = len(result["kills"])
    metrics["rss_mb_total"] = sum(rss.values()) / 2**20
    for name, size in rss.items():
        metrics[f"rss_mb[{name}]"] = size / 2**20
    result["metrics"] = metrics
    result["server"] = {
        "pids": {name: proc.pid for name, proc in stack.processes.items()},
        "cpu_s": cpu,
        "rss_bytes": rss,
        "crashed": crashed,
    }
    result["client_errors"] = [f"client {i}: {r['error']}" for i, r in enumerate(results) if r.get("error")][
        :10
    ]
    result["wrong_samples"] = [s for r in results for s in r.get("samples", ())][:10]
    result["clients"] = [
        {
            "role": job.role,
            "items": r["items"],
            "calls": r["calls"],
            "cpu_s": r["cpu_s"],
            "started_ms": (r["started"] - pool.released_at) * 1e3,
            "finished_ms": (r["finished"] - pool.released_at) * 1e3,
        }
        for job, r in zip(workload.jobs, results)
    ]
    if crashed:
        result["error"] = f"server processes died during the run: {', '.join(crashed)}"


class WorkerKiller:
    """Kill -9 a random hq-server worker S/4 s from now and every S s after that, each time
    once the broker has every worker registered again: killing before the last kill is
    survived would starve the clients on a slow machine, not test recovery."""

    def __init__(self, stack: Stack, every_s: float, seed: int = 7):
        self.stack = stack
        self.every_s = every_s
        self.rng = random.Random(seed)
        self.kills: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wait = self.every_s / 4
        while not self._stop.wait(wait):
            wait = self.every_s
            while self.stack.workers_registered() < self.stack.workers:
                if self._stop.wait(0.05):
                    return
            workers = [proc for name, proc in self.stack.children().items() if name != "hq-broker"]
            if workers:
                victim = self.rng.choice(workers)
                try:
                    victim.send_signal(signal.SIGKILL)
                    self.kills.append(victim.pid)
                except psutil.Error:
                    pass

    def stop(self) -> list:
        self._stop.set()
        self._thread.join(5)
        return self.kills


def _finish_figures(result: dict) -> None:
    if "metrics" not in result:
        return
    db = result["db"]
    result["metrics"]["db_bytes_per_row"] = (
        db["bytes"] / db["unihash_rows"] if db["unihash_rows"] else float("nan")
    )


def _is_ok(result: dict) -> bool:
    if "error" in result or "metrics" not in result:
        return False
    counts = result["counts"]
    return all(counts[name] == 0 for name in (*FAILURE_COUNTS, "client_errors"))


def json_safe(value):
    """NaN and infinity are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
