"""hq-bench end to end: tiny runs of each workload, their JSON, the summary, and a run
that must fail because the database does not hold what the clients expect.

Nothing here looks at a speed: only that the tool runs, checks every answer and says so.
"""

from __future__ import annotations

import concurrent.futures
import json
import sqlite3
import subprocess

import pytest

from helpers import script
from hq.bench import keys, populate
from hq.workers.schema import open_database
from hq.workers.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

#: Each a few seconds at most, whatever the speed of hq.
TINY = {
    "burst": ["--clients", "3", "--tasks", "300", "--waves", "3"],
    "single": ["--clients", "3", "--requests", "100", "--transport", "tcp"],
    "report": ["--clients", "3", "--requests", "100", "--equiv", "0.3", "--workers", "1"],
    "mixed": ["--clients", "2", "--tasks", "200", "--waves", "2", "--reporters", "2", "--reports", "50"],
    "fairness": ["--clients", "3", "--requests", "20", "--interval-ms", "5", "--batch", "200"],
}
COUNTS = ("wrong", "missing", "derailed", "unanswered", "client_errors")


def bench(*args, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [script("hq-bench"), *map(str, args)], check=False, capture_output=True, text=True, timeout=timeout
    )


def run_tiny(workload: str, json_path, *extra) -> tuple:
    result = bench(workload, *TINY[workload], "--repeats", "1", "--json", json_path, *extra)
    with open(json_path, encoding="utf-8") as fh:
        return result, json.load(fh)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """workload -> (CompletedProcess, parsed JSON), all written into one directory."""
    directory = tmp_path_factory.mktemp("bench-results")
    # Two at a time: each run is mostly its stack starting and stopping.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = {name: pool.submit(run_tiny, name, directory / f"{name}.json") for name in TINY}
    return directory, {name: run.result() for name, run in runs.items()}


@pytest.mark.parametrize("workload", sorted(TINY))
def test_tiny_run_is_correct_and_complete(results, workload):
    proc, data = results[1][workload]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert data["ok"] is True
    assert data["workload"] == workload
    assert {"workers", "transport", "repeats", "seed", "batch", "timeout"} <= data["config"].keys()
    assert {"cpu_model", "cpu_count_logical", "python", "pyzmq", "libzmq", "sqlite", "load_average"} <= data[
        "machine"
    ].keys()
    assert isinstance(data["hq_version"], str)
    (repeat,) = data["repeats"]
    assert repeat["ok"] is True
    assert all(repeat["counts"][name] == 0 for name in COUNTS), repeat["counts"]
    metrics = repeat["metrics"]
    assert metrics["bad_answers"] == 0
    workers = data["config"]["workers"]
    assert sum(1 for name in metrics if name.startswith("cpu_s[hq-worker-")) == workers
    assert "rss_mb[hq-broker]" in metrics and metrics["rss_mb_total"] > 0
    assert metrics["db_bytes_per_row"] > 0
    for name in data["key_metrics"]:
        assert set(data["summary"][name]) == {"min", "median", "max"}
        assert data["summary"][name]["median"] is not None
    assert "every answer was right" in proc.stdout
    assert "median" in proc.stdout  # the table
    # A tiny run says nothing about the targets, which are set for the default size.
    assert data["targets_judged"] is False
    assert "(missed)" not in proc.stdout and "(met)" not in proc.stdout
    assert "judged only at the workload's default size" in proc.stdout


def test_targets_are_judged_at_the_default_size_only():
    from hq.bench.cli import build_parser, judged

    assert judged(build_parser().parse_args(["burst", "--workers", "4", "--repeats", "5", "--quiet"]))
    assert not judged(build_parser().parse_args(["burst", "--clients", "3"]))
    assert not judged(build_parser().parse_args(["report", "--requests", "50"]))


def test_quiet_prints_one_line(tmp_path):
    proc = bench(
        "report",
        "--clients",
        "2",
        "--requests",
        "20",
        "--repeats",
        "1",
        "--quiet",
        "--json",
        tmp_path / "q.json",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == "report: OK: every answer was right\n" and proc.stderr == ""


def test_every_item_was_asked(results):
    data = results[1]
    assert data["burst"][1]["repeats"][0]["metrics"]["lookups"] == 3 * 300
    assert data["single"][1]["repeats"][0]["metrics"]["lookups"] == 3 * 100
    report = data["report"][1]["repeats"][0]
    assert report["metrics"]["reports"] == 3 * 100
    assert report["db"]["unihash_rows"] == 3 * 100  # one mapping per new report


def test_summary_over_the_results(results):
    directory, data = results
    proc = bench("summary", directory)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for workload, (_, result) in data.items():
        assert workload in proc.stdout
        for metric in result["key_metrics"]:
            assert metric in proc.stdout


@pytest.mark.parametrize("workload,detected", [("burst", "derailed"), ("single", "wrong")])
def test_a_wrong_answer_fails_the_run(tmp_path, workload, detected):
    proc, data = run_tiny(workload, tmp_path / "bad.json", "--corrupt-keys", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert data["ok"] is False
    counts = data["repeats"][0]["counts"]
    assert counts["wrong"] == 1, counts
    if workload == "burst":
        assert counts["derailed"] > 0, counts  # every later wave asked the wrong taskhashes
    assert "FAILED" in proc.stdout
    summary = bench("summary", tmp_path)
    assert summary.returncode == 1 and "NO" in summary.stdout


def test_bad_options_exit_2():
    assert bench("burst", "--tasks", "2", "--waves", "3").returncode == 2
    assert bench("single", "--hit-ratio", "2").returncode == 2


def _rows(path: str) -> dict:
    conn = sqlite3.connect(path)
    try:
        return {
            "methods": conn.execute("SELECT id, name FROM methods ORDER BY id").fetchall(),
            "unihashes": conn.execute("SELECT * FROM unihashes ORDER BY method, taskhash").fetchall(),
            "outhashes": conn.execute(
                "SELECT method, taskhash, outhash, owner, PN, PV, PR, task, outhash_siginfo "
                "FROM outhashes ORDER BY method, taskhash"
            ).fetchall(),
        }
    finally:
        conn.close()


def test_populate_writes_what_store_report_writes(tmp_path):
    rows = keys.Rows()
    keys.lookup_keys(keys.rng(7, "populate-test"), 200, 1.0, rows)
    rows.add("not-hex-taskhash", "ABCDEF", "ab" * 32)  # keys that are not canonical hex stay text
    bulk = str(tmp_path / "bulk.db")
    assert populate.populate(bulk, rows.rows) == len(rows)
    reported = str(tmp_path / "reported.db")
    db = open_database(reported)
    try:
        store = Store(db)
        for taskhash, outhash, unihash in rows.rows:
            assert store.report(keys.METHOD, taskhash, outhash, unihash) == unihash
    finally:
        db.close()
    assert _rows(bulk) == _rows(reported)
    created = sqlite3.connect(bulk).execute("SELECT min(created) > 0 FROM outhashes").fetchone()[0]
    assert created == 1


def test_worker_kills_during_a_burst_lose_nothing(tmp_path):
    """Fault injection: workers killed -9 mid-burst; hq-server restarts them; all answers right."""
    out = tmp_path / "kill.json"
    proc = bench(
        "burst",
        "--clients",
        "4",
        "--tasks",
        "20000",
        "--waves",
        "20",
        "--repeats",
        "1",
        "--quiet",
        "--kill-workers-every",
        "0.4",
        "--server-arg=--heartbeat-interval=0.2",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (repeat,) = json.loads(out.read_text())["repeats"]
    assert repeat["ok"] and repeat["metrics"]["bad_answers"] == 0
    assert repeat["metrics"]["worker_kills"] >= 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_burst_with_a_worker_kill_every_2s_keeps_half_the_throughput(tmp_path):
    """Issue 4's first fault test: 40 x 9,000 lookups, a worker killed -9 every 2 s."""
    rates = {}
    for name, extra in (("calm", []), ("kills", ["--kill-workers-every", "2"])):
        out = tmp_path / f"{name}.json"
        proc = bench(
            "burst",
            "--repeats",
            "3",
            "--quiet",
            "--server-arg=--heartbeat-interval=0.2",
            "--json",
            str(out),
            *extra,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        data = json.loads(out.read_text())
        assert all(r["ok"] for r in data["repeats"])
        rates[name] = data["summary"]["lookups_per_s"]["median"]
        if name == "kills":
            assert all(r["metrics"]["worker_kills"] >= 1 for r in data["repeats"])
    print("median lookups/s:", rates)
    assert rates["kills"] >= 0.5 * rates["calm"]


@pytest.mark.parametrize("workload,corrupt", [("burst", 0), ("report", 0), ("single", 1)])
def test_a_run_on_postgresql(tmp_path, postgresql_server, workload, corrupt):
    """--db: each repeat on a fresh schema of that database, filled as the SQLite file would
    be (a corrupted key is caught there too), and dropped after."""
    extra = ["--db", postgresql_server.url, "--corrupt-keys", corrupt]
    proc, data = run_tiny(workload, tmp_path / "pg.json", *extra)
    assert proc.returncode == (1 if corrupt else 0), proc.stdout + proc.stderr
    assert data["config"]["db"] == postgresql_server.url
    assert data["repeats"][0]["counts"]["wrong"] == corrupt
    if not corrupt:
        assert data["repeats"][0]["db"]["unihash_rows"] > 0
    import psycopg

    with psycopg.connect(postgresql_server.url) as conn:
        left = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'hq_bench_%'").fetchone()
    assert left == (0,)
