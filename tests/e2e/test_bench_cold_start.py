"""``hq-bench cold-start`` end to end: a real upstream (bitbake-hashserv), local servers with
empty databases, the delaying relay. Tiny runs: no speed is judged here. What must hold: every
side really ran with every answer checked (a corrupted key on the upstream fails the run), hq
made no upstream request in the second burst, and the table and JSON carry it all."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import script

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

TINY = ["--scale", "0.02", "--repeats", "1", "--workers", "1", "--delay-ms", "10"]
SIDES = ["bitbake-hashserv --upstream", "hq --upstream, gateway", "hq --upstream"]
LOCAL = "hq, all local"


def bench(*args) -> subprocess.CompletedProcess:
    argv = [script("hq-bench"), "cold-start", *map(str, args)]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=170)


def test_every_side_runs_cold_then_warm_with_every_answer_right(bitbake, tmp_path):
    """With an hq upstream (the default), and a relay adding 10 ms."""
    path = tmp_path / "cold.json"
    upstream = "hq"
    proc = bench("--bitbake", bitbake, *TINY, "--json", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(path.read_text())
    assert data["ok"] is True
    runs = {(r["side"], r.get("delay_ms")) for r in data["repeats"]}
    assert runs == {(LOCAL, None)} | {(side, d) for side in SIDES for d in (0.0, 10.0)}
    for run in data["repeats"]:
        assert run["cold"]["metrics"]["bad_answers"] == 0
        if run["side"] != LOCAL:
            assert run["second"]["metrics"]["lookups"] == run["cold"]["metrics"]["lookups"] > 0
        if run["side"].startswith("hq --upstream"):
            assert run["second"]["upstream_lookups"] == 0, run["side"]  # backfilled, misses kept
    assert all(r["cold"]["upstream_lookups"] > 0 for r in data["repeats"] if r["side"] != LOCAL)
    # The upstream's CPU in each cold burst (it shares this machine's cores), beside the local
    # one's: measured for every side (a tiny burst may take it less than a clock tick).
    cold = [r["cold"] for r in data["repeats"] if r["side"] != LOCAL]
    for cpu in ([c["upstream_cpu_s"] for c in cold], [c["metrics"]["server_cpu_s"] for c in cold]):
        assert all(v >= 0 for v in cpu) and sum(cpu) > 0, cpu
    for sides in data["summary"]["delays"].values():
        for v in sides.values():
            assert v["cold_upstream_cpu_s"]["median"] >= 0 and v["cold_server_cpu_s"]["median"] >= 0
    assert "upstream's CPU" in proc.stdout
    for side in SIDES:
        assert side in proc.stdout
    assert "cold-start: OK" in proc.stdout and f"upstream: {upstream}" in proc.stdout


def test_a_wrong_answer_from_the_upstream_fails_the_run(bitbake, tmp_path):
    """With a bitbake-hashserv upstream holding 5 wrong unihashes: every side gets them (the
    two hq sides here: --sides leaves the reference out)."""
    path = tmp_path / "cold.json"
    args = [*TINY, "--delay-ms", "0", "--corrupt-keys", "5", "--upstream-server", "bitbake-hashserv"]
    proc = bench("--bitbake", bitbake, *args, "--sides", "hq,gateway", "--json", path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads(path.read_text())
    assert data["ok"] is False
    assert {r["side"] for r in data["repeats"]} == {LOCAL, "hq --upstream, gateway", "hq --upstream"}
    assert all(r["cold"]["metrics"]["bad_answers"] > 0 for r in data["repeats"] if r["side"] != LOCAL)
    assert "FAILED" in proc.stdout


@pytest.mark.parametrize("sides", ["hq,nothing", ","])
def test_unknown_sides_are_one_line_and_exit_2(bitbake, sides):
    proc = bench("--bitbake", bitbake, "--sides", sides)
    assert proc.returncode == 2 and "--sides" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr  # usage line + the error


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--upstream-cpus needs 2 CPUs or more")
def test_upstream_cpus_put_the_upstream_on_its_own_cpus(bitbake, tmp_path):
    """The upstream (and relay) on the last CPU, every local server on the others."""
    path = tmp_path / "cold.json"
    mine = sorted(os.sched_getaffinity(0))
    args = [*TINY, "--sides", "hq", "--upstream-cpus", str(mine[-1])]
    proc = bench("--bitbake", bitbake, *args, "--json", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(path.read_text())
    assert data["ok"] is True and data["upstream_cpus"] == [mine[-1]]
    assert {r["side"] for r in data["repeats"]} == {LOCAL, "hq --upstream"}
    assert all(r["cpus"] == mine[:-1] for r in data["repeats"]), [r["cpus"] for r in data["repeats"]]
    assert f"the upstream and the relay on CPU {mine[-1]}" in proc.stdout


@pytest.mark.parametrize("cpus", ["x", "0-", "999", "0-999"])
def test_bad_upstream_cpus_are_one_line_and_exit_2(bitbake, cpus):
    proc = bench("--bitbake", bitbake, "--upstream-cpus", cpus)
    assert proc.returncode == 2 and "--upstream-cpus" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
