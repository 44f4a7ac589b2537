"""Broker and four workers started at once on a fresh database, again and again."""

import time

import pytest

from helpers import Stack, wait_for
from hq.client import create_client


def start_once(tmp_path):
    start = time.monotonic()
    with Stack(tmp_path, workers=4) as stack:
        with create_client(stack.address, timeout=10) as c:
            wait_for(lambda: len(c.get_stats()["workers"]) == 4, 5, 0.02, "4 workers registered")
            ready_s = time.monotonic() - start
            # Every worker answers: spread a batch over all of them.
            assert c.get_unihash_batch([("M", "%064x" % i) for i in range(8000)]) == [None] * 8000
            assert c.report_unihash("a" * 64, "M", "b" * 64, "c" * 64)["unihash"] == "c" * 64
        log = stack.log()
    assert "locked" not in log and "Traceback" not in log, log
    assert "exited with" not in log, log  # no worker died and was restarted
    return ready_s


@pytest.mark.parametrize("run", range(3))
def test_startup_race(tmp_path, run):
    assert start_once(tmp_path) < 5.0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_startup_race_20_times(tmp_path_factory):
    times = [start_once(tmp_path_factory.mktemp("race")) for _ in range(20)]
    assert max(times) < 5.0, times
