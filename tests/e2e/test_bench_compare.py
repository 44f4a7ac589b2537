"""``hq-bench compare`` end to end against the real ``bitbake-hashserv`` and BitBake's own client.

Tiny runs: nothing here judges a speed. What must hold: both sides really ran (their own
server processes, their own client, the same keys), every answer was checked on both sides
(a corrupted key fails both), and the table and JSON carry both sides and their ratios.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess

import pytest

from helpers import script
from hq.bench import reference

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

TINY = ["--scale", "0.02", "--repeats", "2", "--workers", "1"]


def bench(*args, timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
    argv = [script("hq-bench"), *map(str, args)]
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout, **kwargs)


GATEWAY = ["--gateway", "--workloads", "single,report", "--scale", "0.02", "--repeats", "1", "--workers", "1"]


@pytest.fixture(scope="module")
def runs(bitbake, tmp_path_factory):
    """Two hq-bench compare runs at once (each mostly starts and stops servers): the two
    sides over every workload, and a short one with the third side through hq-gateway."""
    directory = tmp_path_factory.mktemp("compare")

    def run(name: str, *args):
        path = directory / f"{name}.json"
        proc = bench("compare", "--bitbake", bitbake, *args, "--json", path, timeout=170)
        with open(path, encoding="utf-8") as fh:
            return proc, json.load(fh)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        both = pool.submit(run, "compare", *TINY)
        gateway = pool.submit(run, "gateway", *GATEWAY)
    return {"compare": both.result(), "gateway": gateway.result()}


@pytest.fixture(scope="module")
def compared(runs):
    return runs["compare"]


def test_both_sides_run_and_every_answer_is_right(compared):
    proc, data = compared
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert data["ok"] is True and data["bitbake_version"].startswith("2.")
    sides = {(r["workload"], r["side"], r["repeat"]) for r in data["repeats"]}
    names = ("burst", "single", "report")
    assert sides == {(w, s, n) for w in names for s in ("hq", "bitbake-hashserv") for n in (1, 2)}
    for r in data["repeats"]:
        assert r["ok"], r
        processes = set(r["server"]["pids"])
        if r["side"] == "hq":
            assert {"hq-broker", "hq-worker-00"} <= processes
        else:
            assert processes == {"bitbake-hashserv"}
        # The reference's database holds the reports its client made.
        if r["workload"] == "report":
            assert r["db"]["unihash_rows"] == r["metrics"]["reports"]
    # Order alternates: the reference first in odd repeats, hq first in even ones.
    order = [(r["repeat"], r["side"]) for r in data["repeats"] if r["workload"] == "single"]
    assert order == [(1, "bitbake-hashserv"), (1, "hq"), (2, "hq"), (2, "bitbake-hashserv")]


def test_the_table_and_json_give_both_sides_and_the_ratios(compared):
    proc, data = compared
    for name in ("burst", "single", "report"):
        summary = data["workloads"][name]["summary"]
        rate = summary["rate"]
        assert rate["hq"]["median"] > 0 and rate["ref"]["median"] > 0
        pairs = data["workloads"][name]["pairs"]
        ratios = sorted(h["rate"] / r["rate"] for h, r in pairs)
        assert rate["ratio"]["min"] == pytest.approx(ratios[0])
        assert rate["ratio"]["max"] == pytest.approx(ratios[-1])
        assert summary["broker_us"]["ref"]["median"] is None  # hq's own split has no counterpart
    assert "bitbake-hashserv" in proc.stdout and "hq ÷ ref" in proc.stdout
    assert "targets are judged at --scale 1, without --keys or --configs, only" in proc.stdout
    for label in ("rate (/s)", "server CPU per op (µs)", "hq broker (µs)", "p99 latency (ms)"):
        assert label in proc.stdout


def test_a_wrong_answer_fails_on_both_sides(bitbake, tmp_path):
    path = tmp_path / "bad.json"
    proc = bench(
        "compare",
        "--bitbake",
        bitbake,
        "--workloads",
        "single",
        "--scale",
        "0.02",
        "--repeats",
        "1",
        "--corrupt-keys",
        "2",
        "--json",
        path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads(path.read_text(encoding="utf-8"))
    assert {r["side"]: r["counts"]["wrong"] for r in data["repeats"]} == {"hq": 2, "bitbake-hashserv": 2}
    assert "single on bitbake-hashserv, repeat 1 FAILED: wrong 2" in proc.stdout


def test_without_bitbake_one_line_and_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HQ_BITBAKE"}
    proc = bench("compare", "--bitbake", tmp_path, env=env, cwd=tmp_path, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "give --bitbake DIR or set HQ_BITBAKE" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_finding_the_tree(bitbake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ../shared/bitbake from here
    assert reference.find_bitbake(bitbake, environ={}) == os.path.realpath(bitbake)
    assert reference.find_bitbake(None, environ={"HQ_BITBAKE": bitbake}) == os.path.realpath(bitbake)
    assert reference.find_bitbake(str(tmp_path), environ={}) is None
    assert reference.version(bitbake).startswith("2.")


def test_a_third_side_through_the_gateway(runs):
    """--gateway: BitBake's own client through hq-gateway to hq, checked like the others."""
    proc, data = runs["gateway"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sides = {(r["workload"], r["side"]) for r in data["repeats"]}
    assert sides == {(w, s) for w in ("single", "report") for s in ("hq", "bitbake-hashserv", "hq-gateway")}
    for r in data["repeats"]:
        assert r["ok"], r
        if r["side"] == "hq-gateway":
            assert "hq-gateway" in r["server"]["pids"] and "hq-broker" in r["server"]["pids"]
    for name in ("single", "report"):
        assert data["workloads"][name]["gateway"]["rate"]["ratio"]["median"] > 0
    assert "via hq-gateway" in proc.stdout and "gateway ÷ ref" in proc.stdout
