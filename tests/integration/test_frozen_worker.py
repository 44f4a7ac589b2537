"""A worker that stops answering (SIGSTOP) is dropped within ~liveness and its work re-run."""

import random
import signal
import threading
import time

from helpers import Stack, seed_known, wait_for
from hq.client import create_client

M = "TestMethod"


def test_stopped_worker_is_dropped_and_its_chunks_redispatched(tmp_path):
    # hq-server's test stacks heartbeat every 0.2 s: liveness 3 x 0.2 = 0.6 s.
    with Stack(tmp_path, workers=2) as stack:
        known = seed_known(stack.address, 300, 5)
        rng = random.Random("queries")
        with create_client(stack.address, timeout=20) as c:
            wait_for(lambda: len(c.get_stats()["workers"]) == 2, 10, what="both workers")
        queries = (list(known) + ["%064x" % rng.getrandbits(256) for _ in range(300)]) * 100
        victim = stack.children()["hq-worker-00"]
        result = {}

        def run():
            with create_client(stack.address, timeout=30) as c:
                result["answers"] = c.get_unihash_batch([(M, t) for t in queries])

        stats = create_client(stack.address, timeout=10)
        thread = threading.Thread(target=run)
        thread.start()
        wait_for(lambda: stats.get_stats()["broker"]["inflight_jobs"] > 0, 10, 0.001, "batch in flight")
        victim.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            wait_for(lambda: len(stats.get_stats()["workers"]) == 1, 5, 0.02, "frozen worker dropped")
            detected = time.monotonic() - stopped
            thread.join(30)
            assert not thread.is_alive()
            assert result["answers"] == [known.get(t) for t in queries]
        finally:
            victim.send_signal(signal.SIGCONT)
        # Broker liveness is 0.6 s here; allow for a loaded machine.
        assert detected < 1.5, detected
        # Woken up, the worker finds itself unknown, registers again and serves.
        wait_for(lambda: len(stats.get_stats()["workers"]) == 2, 10, 0.05, "worker back")
        counters = stats.get_stats()["broker"]["counters"]
        stats.close()
        assert counters["workers.dropped"] >= 1
        assert counters.get("jobs.redispatched", 0) >= 1
