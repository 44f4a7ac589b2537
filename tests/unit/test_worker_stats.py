"""A worker's counters, derived from the replies it builds, on a real SQLite file."""

import json
import sqlite3

import pytest

from hq import protocol as p
from hq.workers.handlers import Handlers
from hq.workers.schema import open_database
from hq.workers.stats import RowCountPolicy, WorkerStats
from hq.workers.store import Store

M = b"TestMethod"


def h(i: int) -> str:
    return "%064x" % i


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def worker(tmp_path, clock):
    db = open_database(str(tmp_path / "hq.db"))
    store = Store(db)
    yield Handlers(store), WorkerStats(store, rows_interval_s=0.0, clock=clock)
    db.close()


def run(worker, command, jobs):
    handlers, stats = worker
    results = handlers.handle_jobs(command, b"", [(b"%d" % i, body) for i, body in enumerate(jobs)])
    stats.record(command, results)
    return results


def test_lookups_hits_misses_reports_and_errors_are_counted(worker):
    _, stats = worker
    # 3 new reports: two share an outhash, so the second is an equivalence; then one again.
    for body in (
        [M, h(1).encode(), h(100).encode(), h(1000).encode()],
        [M, h(2).encode(), h(100).encode(), h(2000).encode()],
        [M, h(3).encode(), h(300).encode(), h(3000).encode()],
        [M, h(1).encode(), h(100).encode(), h(1000).encode()],
    ):
        run(worker, p.REPORT, [body])
    chunk = p.pack_items([h(i) for i in range(1, 11)])  # 3 known of 10
    run(worker, p.GET, [[M, chunk], [M, p.pack_items([h(2)])]])
    run(worker, p.EXISTS, [[p.pack_items([h(1000), h(2000), h(9)])]])
    run(worker, p.GET, [[M, b"not-hex\nzz"]])  # fine: text keys, 2 misses
    run(worker, p.REPORT, [[M, h(4).encode(), h(4).encode(), b"A" * 64]])  # 422
    c = stats.counters()
    assert (c["lookups"], c["lookups.hit"], c["lookups.miss"]) == (13, 4, 9)
    assert (c["exists"], c["exists.hit"]) == (3, 1)  # 2000 was never mapped: 2 took 1000
    assert (c["reports.new"], c["reports.equivalent"], c["reports.existing"]) == (2, 1, 1)
    assert c["jobs.report"] == 5 and c["jobs.get"] == 3 and c["errors.422"] == 1


def test_snapshot_has_settings_and_database_facts(worker, clock):
    _, stats = worker
    run(worker, p.REPORT, [[M, h(1).encode(), h(1).encode(), h(1).encode()]])
    clock.now += RowCountPolicy.IDLE_S  # idle: the row count is due
    snap = stats.snapshot()
    assert snap["settings"]["journal_mode"] == "wal"
    assert snap["db"]["rows"]["unihashes"] == 1 and snap["db"]["rows"]["outhashes"] == 1
    assert snap["db"]["file_bytes"] > 0 and snap["db"]["page_count"] > 0


def rows(stats) -> dict:
    return stats.db_facts()["rows"]


def test_row_counts_wait_for_a_pause_in_build_traffic_only(worker, clock):
    """Lookups and reports hold the count back; ping, db-usage, gc-status (what hq-admin and
    health checks send, maybe every 0.1 s) do not, or they would starve it (issue 9)."""
    _, stats = worker
    run(worker, p.REPORT, [[M, h(1).encode(), h(1).encode(), h(1).encode()]])
    clock.now += RowCountPolicy.IDLE_S - 0.01
    assert rows(stats) == {}  # not counted yet: the worker is busy with a build
    for _ in range(50):  # an admin polling hard
        clock.now += 0.1
        run(worker, p.PING, [[]])
        run(worker, p.GC_STATUS, [[]])
    assert rows(stats)["unihashes"] == 1
    for _ in range(5):
        clock.now += 0.1
        run(worker, p.GET, [[M, p.pack_items([h(1)])]])
    run(worker, p.REPORT, [[M, h(2).encode(), h(2).encode(), h(2).encode()]])
    assert rows(stats)["unihashes"] == 1  # lookups just now: the count waits
    clock.now += RowCountPolicy.IDLE_S
    assert rows(stats)["unihashes"] == 2


def test_an_unchanged_database_is_not_counted_again(worker, clock, monkeypatch):
    _, stats = worker
    clock.now += 10
    assert rows(stats)["unihashes"] == 0
    scans = []
    monkeypatch.setattr(stats.store, "count_rows", lambda: scans.append(1) or {"unihashes": -1})
    for _ in range(10):
        clock.now += 10
        assert rows(stats)["unihashes"] == 0
    assert scans == []
    run(worker, p.REPORT, [[M, h(1).encode(), h(1).encode(), h(1).encode()]])  # this connection wrote
    clock.now += 10
    assert rows(stats) == {"unihashes": -1} and len(scans) == 1


def test_another_connection_writing_is_noticed(worker, clock, tmp_path):
    _, stats = worker
    clock.now += 10
    assert rows(stats)["unihashes"] == 0
    other = sqlite3.connect(stats.store.db.database)
    other.execute("INSERT INTO config (name, value) VALUES ('x', 'y')")
    other.commit()
    other.close()
    clock.now += 10
    assert rows(stats)["config"] == 2  # schema-version and x


def test_counts_are_spaced_by_the_interval_and_by_their_own_cost():
    policy = RowCountPolicy(interval_s=2.0)
    assert policy.due(0.0, "v1")  # the first count needs only idleness
    policy.counted(0.0, "v1", scan_s=0.001)
    assert not policy.due(100.0, "v1")  # nothing changed
    assert not policy.due(1.9, "v2") and policy.due(2.0, "v2")
    policy.counted(2.0, "v2", scan_s=0.35)  # a big database: 0.35 s a scan
    assert not policy.due(2.0 + 34.9, "v3") and policy.due(2.0 + 35.0, "v3")  # at most 1 % of the time
    policy.traffic(40.0)
    assert not policy.due(40.4, "v3") and policy.due(40.5, "v3")


def test_db_usage_replaces_the_periodic_count_at_once(worker, clock):
    """hq-admin stats shows db-usage's exact counts; top and the metrics show the periodic
    ones. The exact count replaces the periodic one, so they agree (issue 9)."""
    _, stats = worker
    stats.row_counts.interval_s = 3600.0
    clock.now += 10
    assert rows(stats)["unihashes"] == 0
    run(worker, p.REPORT, [[M, h(1).encode(), h(1).encode(), h(1).encode()]])
    clock.now += 10
    assert rows(stats)["unihashes"] == 0  # changed, but the interval has not passed
    (result,) = run(worker, p.DB_USAGE, [[]])
    assert json.loads(result[2][0])["usage"]["unihashes"]["rows"] == 1
    facts = stats.db_facts()
    assert facts["rows"]["unihashes"] == 1 and facts["rows_age_s"] == 0.0
