"""hq-admin as an operator and a health probe use it: stats, reset-stats, workers, top,
ping and health against a real stack, through the installed console script."""

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from helpers import Stack, script, wait_for
from hq.client import InvokeError, create_client

M = "TestMethod"


def admin(address, *args, timeout=30):
    return subprocess.run(
        [script("hq-admin"), *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "HQ_ADDRESS"},
    )


def h(i):
    return "%064x" % i


@pytest.fixture(scope="module")
def busy_stack(tmp_path_factory):
    """A stack with known traffic: 20 reports (10 new, 10 equivalent), 1000 lookups, 1 error."""
    s = Stack(tmp_path_factory.mktemp("admin"), env={"HQ_STATS_ROWS_INTERVAL": "0"}).start()
    with create_client(s.address, timeout=10) as c:
        for i in range(20):
            c.report_unihash(h(i), M, h(10_000 + i % 10), h(20_000 + i))
        assert c.get_unihash_batch([(M, h(i)) for i in range(1000)]).count(None) == 980
        with pytest.raises(InvokeError):
            c.report_unihash(h(1), M, h(1), "A" * 64)
    yield s
    assert s.stop() == 0, s.log()


def stats_json(address):
    result = admin(address, "stats", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def worker_totals(data, name):
    return sum(w["counters"].get(name, 0) for w in data["workers"])


def test_stats_counts_what_the_clients_did(busy_stack):
    # Workers send their counters every heartbeat interval (0.2 s here).
    wait_for(
        lambda: worker_totals(stats_json(busy_stack.address), "lookups") == 1000, 5, 0.05, "worker counters"
    )
    data = stats_json(busy_stack.address)
    counters = data["broker"]["counters"]
    assert counters["requests.report"] == 21 and counters["errors.422"] == 1
    assert worker_totals(data, "lookups.hit") == 20 and worker_totals(data, "lookups.miss") == 980
    assert worker_totals(data, "reports.new") == 10 and worker_totals(data, "reports.equivalent") == 10
    report = data["broker"]["latency"]["report"]
    assert report["count"] == 21 and 0 < report["p50_s"] <= report["p99_s"] <= report["max_s"] < 5
    for w in data["workers"]:
        assert w["settings"]["journal_mode"] == "wal" and w["settings"]["synchronous"] == "normal"
        assert w["settings"]["busy_timeout"] == 200
    wait_for(
        lambda: max(w["db"]["rows"]["unihashes"] for w in stats_json(busy_stack.address)["workers"]) == 20,
        5,
        0.05,
        "row counts",
    )

    table = admin(busy_stack.address, "stats")
    assert table.returncode == 0, table.stderr
    text = table.stdout
    for expected in (
        "Summary",
        "Per command",
        "Per worker",
        "hq-worker-00",
        "hq-worker-01",
        "journal_mode=wal",
    ):
        assert expected in text
    assert "1,000 (2.0%)" in text  # lookups and hit rate
    assert "10 / 10 / 0" in text  # reports new / equivalent / existing
    assert "WARNING" not in text


def heartbeat_rows(data: dict) -> int:
    """Mappings as the freshest worker's heartbeat counted them (what top and /metrics show)."""
    dbs = [w["db"] for w in data["workers"] if w.get("db", {}).get("rows_age_s") is not None]
    return min(dbs, key=lambda db: db["rows_age_s"])["rows"]["unihashes"] if dbs else None


def test_polling_the_service_does_not_starve_the_row_counts(tmp_path):
    """An operator's loop (hq-admin stats, top, a health check) every 50 ms, whatever the speed
    of the machine it runs on: workers still count their rows (issue 9: the counts waited for
    0.5 s without any request, and each poll was one)."""
    with Stack(tmp_path, env={"HQ_STATS_ROWS_INTERVAL": "0"}) as stack:
        with create_client(stack.address, timeout=10) as c:
            for i in range(20):
                c.report_unihash(h(i), M, h(100 + i), h(200 + i))

            def counted():
                c.ping()
                return heartbeat_rows(c.get_stats()) == 20

            wait_for(counted, 5, 0.05, "the workers' row counts while the service is polled")


def test_top_shows_the_row_counts_stats_just_printed(tmp_path):
    """stats counts exactly (db-usage); top shows the workers' periodic counts. With counts
    an hour apart, top must still not contradict what stats printed a moment before."""
    with Stack(tmp_path, env={"HQ_STATS_ROWS_INTERVAL": "3600"}) as stack:
        with create_client(stack.address, timeout=10) as c:
            wait_for(lambda: heartbeat_rows(c.get_stats()) == 0, 5, 0.05, "the first row count")
            for i in range(20):
                c.report_unihash(h(i), M, h(100 + i), h(200 + i))
        assert stats_json(stack.address)["db_usage"]["unihashes"]["rows"] == 20

        def top_rows():
            result = admin(stack.address, "top", "-n", "1", "--interval", "0.3", "--format", "json")
            assert result.returncode == 0, result.stderr
            return heartbeat_rows(json.loads(result.stdout)["stats"]) == 20

        wait_for(top_rows, 5, 0.05, "top to show stats' row counts")


def test_workers_and_ping(busy_stack):
    result = admin(busy_stack.address, "workers", "--format", "json")
    assert result.returncode == 0
    workers = json.loads(result.stdout)
    pids = {w["name"]: w["pid"] for w in workers}
    assert pids == {n: p.pid for n, p in busy_stack.children().items() if n != "hq-broker"}
    result = admin(busy_stack.address, "ping", "--count", "3", "--format", "json")
    assert result.returncode == 0
    ping = json.loads(result.stdout)
    assert ping["count"] == 3 and 0 < ping["min_s"] <= ping["median_s"] <= ping["max_s"] < 5


def test_top_refreshes_with_rates(busy_stack):
    result = admin(busy_stack.address, "top", "--iterations", "2", "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("hq-admin top") == 2
    assert "lookups/s" in result.stdout and "hq-worker-01" in result.stdout
    assert "\x1b[2J" not in result.stdout  # no screen control codes when not on a terminal
    result = admin(busy_stack.address, "top", "-n", "1", "--interval", "0.05", "--format", "json")
    assert set(json.loads(result.stdout)) == {"rates", "stats"}


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_top_stops_cleanly_on_ctrl_c(busy_stack):
    # As from a terminal: a suite started in the background by a non-interactive shell
    # inherits SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt.
    proc = subprocess.Popen(
        [script("hq-admin"), "top", "--interval", "0.05", "--address", busy_stack.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    first = proc.stdout.readline()
    assert "hq-admin top" in first
    proc.send_signal(signal.SIGINT)
    # Read what it still writes: a screen every 50 ms fills an unread pipe in a second or two,
    # and a process blocked flushing stdout at exit is the test's doing, not top's.
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert "Traceback" not in err


def test_reset_stats_zeroes_what_stats_reports(tmp_path):
    with Stack(tmp_path) as stack:
        with create_client(stack.address, timeout=10) as c:
            c.get_unihash_batch([(M, h(i)) for i in range(100)])
        wait_for(lambda: worker_totals(stats_json(stack.address), "lookups") == 100, 5, 0.05, "counted")
        result = admin(stack.address, "reset-stats", "--format", "json")
        assert result.returncode == 0
        assert json.loads(result.stdout)["broker"]["counters"]["items.get"] == 100  # before
        after = stats_json(stack.address)
        assert "items.get" not in after["broker"]["counters"]
        assert worker_totals(after, "lookups") == 0 and after["requests"]["num"] == 0
        with create_client(stack.address, timeout=10) as c:
            c.get_unihash_batch([(M, h(i)) for i in range(7)])
        wait_for(
            lambda: worker_totals(stats_json(stack.address), "lookups") == 7, 5, 0.05, "counted after reset"
        )


def test_health_exit_codes(tmp_path):
    with Stack(tmp_path, workers=1) as stack:
        result = admin(stack.address, "health")
        assert result.returncode == 0 and result.stdout.startswith("ok:"), result.stderr
        result = admin(stack.address, "health", "--min-workers", "2", "--format", "json")
        assert result.returncode == 1
        assert json.loads(result.stdout)["healthy"] is False
        # The only worker stopped: the broker answers, but nothing can serve.
        worker = stack.children()["hq-worker-00"]
        worker.send_signal(signal.SIGSTOP)
        try:
            wait_for(
                lambda: admin(stack.address, "health", "--timeout", "2").returncode == 1, 10, 0.1, "unhealthy"
            )
        finally:
            worker.send_signal(signal.SIGCONT)
        wait_for(lambda: admin(stack.address, "health").returncode == 0, 10, 0.1, "healthy again")
    # Nothing listening: unreachable, within the deadline.
    result = admin("tcp://127.0.0.1:9", "health", "--timeout", "1", timeout=10)
    assert result.returncode == 3 and "cannot reach" in result.stderr


def test_usage_errors_exit_2():
    result = subprocess.run([script("hq-admin"), "no-such-command"], capture_output=True, text=True)
    assert result.returncode == 2
    result = subprocess.run([script("hq-admin"), "ping", "--count", "x"], capture_output=True, text=True)
    assert result.returncode == 2


def test_processes_are_named_in_ps(busy_stack):
    if not sys.platform.startswith("linux"):
        pytest.skip("process names are set with prctl on Linux")
    names = {p.name() for p in busy_stack.children().values()}
    assert names == {"hq-broker", "hq-worker-00", "hq-worker-01"}
    assert psutil.Process(busy_stack.proc.pid).name() == "hq-server"


def test_one_log_line_per_lifecycle_event_and_none_per_request(tmp_path):
    import re

    stack = Stack(tmp_path, workers=2).start()
    try:
        with create_client(stack.address, timeout=10) as c:
            c.ping()
            before = stack.log().count(" INFO ")
            for i in range(200):
                c.get_unihash(M, h(i))
            c.report_unihash(h(1), M, h(2), h(3))
            assert stack.log().count(" INFO ") == before  # no per-request logging at INFO
            victim = stack.children()["hq-worker-01"]
            victim.kill()
            # hq-server starts a successor under the same name; the broker logs it as a restart.
            wait_for(
                lambda: "restart 1)" in stack.log() and "hq-worker-01 expired" in stack.log(),
                10,
                0.05,
                "the killed worker expired and its successor registered",
            )
    finally:
        assert stack.stop() == 0
    log = stack.log()
    line = re.compile(r"^\S+ \S+ (hq-server|hq-broker|hq-worker-0[01])\[(\d+)\] (INFO|WARNING) ", re.M)
    assert all(line.match(text) for text in log.splitlines()), log  # program name and pid on every line
    for event in (
        "started hq-broker",
        "broker serving clients",
        "worker hq-worker-00 connecting",
        "worker hq-worker-00 registered (pid",
        "worker hq-worker-01 expired (no heartbeat)",
        "re-dispatched",
        "restart 1)",
        "worker hq-worker-00 stopped",
        "broker stopped",
        "hq-server stopped",
    ):
        assert event in log, event
