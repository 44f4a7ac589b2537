"""hq-bench floor, tiny: the libzmq proxy, the bare Python relay and hq each answer every
request right, and each side's CPU is read from its own processes."""

import json
import subprocess

import pytest

from helpers import script

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_three_servers_answer_every_request_and_their_cpu_is_measured(tmp_path):
    out = tmp_path / "floor.json"
    run = subprocess.run(
        [script("hq-bench"), "floor", "--clients", "3", "--requests", "150", "--repeats", "1"]
        + ["--run-timeout", "60", "--json", str(out), "--tmpdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "floor: OK" in run.stdout and "libzmq proxy" in run.stdout
    data = json.loads(out.read_text())
    assert data["ok"]
    sides = {r["side"]: r for r in data["repeats"]}
    assert sorted(sides) == ["hq", "libzmq proxy", "python relay"]
    for side, r in sides.items():
        assert r["ok"] and r["right"] == r["requests"] == 450, side
        # the front process and both workers were measured, and did the work
        assert sorted(r["cpu_s"]) == ["front", "worker-00", "worker-01"], side
        assert r["front_us"] > 0 and r["workers_us"] > 0, side
    assert data["summary"]["hq"]["server_vs_hq"]["median"] == 1.0


def test_an_option_that_does_not_apply_is_one_line(tmp_path):
    run = subprocess.run(
        [script("hq-bench"), "floor", "--corrupt-keys", "3"], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 2
    assert "--corrupt-keys does not apply" in run.stderr and "Traceback" not in run.stderr
