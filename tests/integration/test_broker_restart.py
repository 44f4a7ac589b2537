"""The broker dies or restarts in the middle of a burst: no wrong answer, quick resumption."""

import random
import signal
import threading
import time

import pytest

from helpers import seed_known, wait_for
from hq.client import create_client

M = "TestMethod"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_broker_restart_mid_burst(any_stack, how):
    stack = any_stack
    known = seed_known(stack.address, 500, 3)
    rng = random.Random("misses")
    queries = list(known) + ["%064x" % rng.getrandbits(256) for _ in range(500)]
    expected = [known.get(t) for t in queries]
    done = []  # (finish time, wrong answers) per batch
    errors = []
    stop = threading.Event()

    def builds():
        with create_client(stack.address, timeout=20) as c:
            while not stop.is_set():
                try:
                    answers = c.get_unihash_batch([(M, t) for t in queries])
                except ConnectionError as exc:
                    errors.append(exc)
                    continue
                done.append((time.monotonic(), sum(a != e for a, e in zip(answers, expected))))

    thread = threading.Thread(target=builds)
    thread.start()
    try:
        wait_for(lambda: len(done) >= 3, 20, what="batches flowing")
        broker = stack.children()["hq-broker"]
        broker.send_signal(how)
        wait_for(
            lambda: getattr(stack.children().get("hq-broker"), "pid", broker.pid) != broker.pid,
            10,
            what="broker restarted",
        )
        back = time.monotonic()
        before = len(done)
        wait_for(lambda: len(done) >= before + 3, 10, what="batches after the restart")
        # The first batch answered by the new broker came within 2 s of it being started.
        first_after = next(t for t, _ in done[before:])
        assert first_after - back < 2.0, first_after - back
    finally:
        stop.set()
        thread.join(30)
    assert sum(wrong for _, wrong in done) == 0
    assert errors == []  # the client's deadline (20 s) covered the restart: no ConnectionError
