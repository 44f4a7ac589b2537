"""hq-bench secure, tiny: every configuration runs, its clients really log in (or not), and
every answer is right."""

import json
import subprocess

import pytest

from helpers import script

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_every_configuration_runs_and_the_logins_are_real(tmp_path):
    out = tmp_path / "secure.json"
    run = subprocess.run(
        [script("hq-bench"), "secure", "--workloads", "single", "--scale", "0.05", "--repeats", "1"]
        + ["--quiet", "--json", str(out), "--tmpdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert data["ok"] and not data["targets_judged"]
    repeats = {r["config"]: r for r in data["repeats"]}
    assert sorted(repeats) == sorted(["plain", "login", "curve", "login+curve"])
    clients = len(repeats["plain"]["clients"])
    for config, result in repeats.items():
        assert result["ok"] and result["metrics"]["lookups_per_s"] > 0, config
        logins = result["broker_counters"].get("auth.logins", 0)
        # the bench's own stats reader logs in too: one more than the clients
        assert logins == (clients + 1 if "login" in config else 0), (config, logins)
    ratios = data["workloads"]["single"]["summary"]
    assert ratios["plain"]["ratio"]["median"] == 1.0
