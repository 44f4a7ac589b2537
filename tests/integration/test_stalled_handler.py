"""A handler that blocks for 10 s (a failpoint in one real worker): the broker stops routing
to that worker within ~liveness, re-runs its chunk elsewhere, and takes it back later.

ZeroMQ's own heartbeats would not notice: the worker's I/O thread keeps the connection alive
while its Python thread is stuck. Only the broker's application-level heartbeats do.
"""

import os
import subprocess
import sys
import threading
import time

import pytest

from helpers import Stack, seed_known, wait_for
from hq.client import create_client

M = "TestMethod"


# 12 s of a 10 s stall: in tox -e faults. The default suite has the same routing-around with
# a frozen (SIGSTOP) worker in test_frozen_worker.py.
@pytest.mark.slow
def test_a_handler_blocked_for_10s_is_routed_around(tmp_path):
    backend = f"ipc://{tmp_path}/backend.ipc"
    with Stack(tmp_path, workers=1, args=["--backend", backend]) as stack:
        known = seed_known(stack.address, 200, 3)
        log_path = tmp_path / "stuck.log"
        with open(log_path, "wb") as log:
            stuck = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hq.workers",
                    "--backend",
                    backend,
                    "--db",
                    stack.db,
                    "--name",
                    "stuck",
                    "--heartbeat-interval",
                    "0.2",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HQ_FAILPOINTS": "worker.request=sleep(10)*1"},
            )
        try:
            stats = create_client(stack.address, timeout=10)

            def names():
                return sorted(w["name"] for w in stats.get_stats()["workers"])

            wait_for(lambda: names() == ["hq-worker-00", "stuck"], 10, 0.05, "both workers")
            queries = list(known) + ["%064x" % (i + 1) for i in range(200)]
            answers, done = [], threading.Event()

            def lookups():  # batches back to back until told to stop; one reaches the stuck worker
                with create_client(stack.address, timeout=30) as c:
                    while not done.is_set():
                        answers.append(c.get_unihash_batch([(M, t) for t in queries]))

            thread = threading.Thread(target=lookups)
            thread.start()
            try:
                wait_for(
                    lambda: "failpoint worker.request" in log_path.read_text(errors="replace"),
                    10,
                    0.005,
                    "a request stalls the worker",
                )
                stalled = time.monotonic()
                wait_for(lambda: names() == ["hq-worker-00"], 5, 0.02, "stuck worker dropped")
                detected = time.monotonic() - stalled
                # The chunk the stuck worker held is re-run: lookups go on meanwhile.
                n = len(answers)
                wait_for(lambda: len(answers) >= n + 3, 10, 0.01, "lookups go on without it")
            finally:
                done.set()
                thread.join(30)
            assert not thread.is_alive()
            assert all(a == [known.get(t) for t in queries] for a in answers)
            assert detected < 1.5, detected  # liveness is 3 x 0.2 s here
            # After its 10 s the worker answers (stale, dropped), registers again and serves.
            wait_for(lambda: names() == ["hq-worker-00", "stuck"], 20, 0.1, "stuck worker back")
            assert stuck.poll() is None and stack.proc.poll() is None
            counters = stats.get_stats()["broker"]["counters"]
            stats.close()
            assert counters["workers.dropped"] >= 1
            assert counters.get("jobs.redispatched", 0) >= 1
        finally:
            stuck.terminate()
            assert stuck.wait(10) == 0
