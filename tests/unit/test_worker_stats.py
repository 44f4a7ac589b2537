"""A worker's counters, derived from the replies it builds, on a real SQLite file."""

import pytest

from hq import protocol as p
from hq.workers.handlers import Handlers
from hq.workers.schema import open_database
from hq.workers.stats import WorkerStats
from hq.workers.store import Store

M = b"TestMethod"


def h(i: int) -> str:
    return "%064x" % i


@pytest.fixture
def worker(tmp_path):
    db = open_database(str(tmp_path / "hq.db"))
    store = Store(db)
    yield Handlers(store), WorkerStats(store, rows_interval_s=0.0)
    db.close()


def run(worker, command, jobs):
    handlers, stats = worker
    results = handlers.handle_jobs(command, b"", [(b"%d" % i, body) for i, body in enumerate(jobs)])
    stats.record(command, results)
    return results


def test_lookups_hits_misses_reports_and_errors_are_counted(worker):
    _, stats = worker
    # 3 new reports: two share an outhash, so the second is an equivalence; then one again.
    for body in ([M, h(1).encode(), h(100).encode(), h(1000).encode()],
                 [M, h(2).encode(), h(100).encode(), h(2000).encode()],
                 [M, h(3).encode(), h(300).encode(), h(3000).encode()],
                 [M, h(1).encode(), h(100).encode(), h(1000).encode()]):
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


def test_snapshot_has_settings_and_database_facts(worker):
    _, stats = worker
    run(worker, p.REPORT, [[M, h(1).encode(), h(1).encode(), h(1).encode()]])
    stats.last_request = 0.0  # idle: the row count is due
    snap = stats.snapshot()
    assert snap["settings"]["journal_mode"] == "wal"
    assert snap["db"]["rows"]["unihashes"] == 1 and snap["db"]["rows"]["outhashes"] == 1
    assert snap["db"]["file_bytes"] > 0 and snap["db"]["page_count"] > 0
