"""HQ_FAILPOINTS parsing and firing (the live use is tests/integration/test_stalled_handler.py)."""

import os
import subprocess
import sys

import pytest

from hq import failpoints


def test_parse_actions_and_counts():
    points = failpoints.parse(" worker.request = sleep(0.01)*2 ; other=exit(3)")
    assert set(points) == {"worker.request", "other"}
    assert (
        points["worker.request"].action,
        points["worker.request"].arg,
        points["worker.request"].remaining,
    ) == ("sleep", 0.01, 2)
    assert (points["other"].action, points["other"].remaining) == ("exit", None)
    assert failpoints.parse("") == {}


@pytest.mark.parametrize("bad", ["x", "x=sleep", "x=sleep(a)", "x=crash(1)", "x=sleep(1)*", "=sleep(1)"])
def test_bad_specs_are_refused(bad):
    with pytest.raises(ValueError, match="bad failpoint"):
        failpoints.parse(bad)


def test_a_counted_point_acts_only_count_times():
    point = failpoints.parse("p=sleep(0)*2")["p"]
    point.fire()
    point.fire()
    assert point.remaining == 0
    point.fire()
    assert point.remaining == 0


def test_unset_means_a_no_op_and_exit_leaves_the_process():
    code = "from hq import failpoints; failpoints.hit('p'); print(failpoints.hit.__name__)"
    env = {k: v for k, v in os.environ.items() if k != "HQ_FAILPOINTS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "_nothing"
    env["HQ_FAILPOINTS"] = "p=exit(7)"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == 7
