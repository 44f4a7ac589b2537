"""hq on a real PostgreSQL server (``--db postgresql://...``): the same answers as on SQLite
under real concurrency (several worker processes writing at once), the schema's life cycle,
import-hashserv, lost connections, and users' mistakes. Each test has its own schema in the
tests' own database (see ``postgresql_url``)."""

from __future__ import annotations

import getpass
import json
import subprocess
import threading

import psycopg
import pytest

from hashserv_db import IMPORTER, IMPORTER_PASSWORD, populate, source_mappings
from helpers import Stack, maps_psycopg, script, wait_for
from hq import protocol as p
from hq.client import create_client
from hq.workers import errors
from hq.workers.handlers import Handlers
from hq.workers.postgresql import _lock_key
from hq.workers.schema import SCHEMA_VERSION, open_database
from hq.workers.store import store_for

M = "TestMethod"


def h(*parts) -> str:
    return "%064x" % (hash(parts) & (2**256 - 1) | 1 << 255)


def hq_backends(url: str, what: str = "count(*)", where: str = "") -> int:
    """``what`` over hq's connections (any worker) to this database, ``where`` more holds."""
    with psycopg.connect(url.split("?", 1)[0], autocommit=True) as conn:
        return conn.execute(
            f"SELECT {what} FROM pg_stat_activity WHERE application_name = 'hq' "
            f"AND datname = current_database() {where}"
        ).fetchone()[0]


def in_transaction(url: str) -> int:
    """hq's connections (any worker) that are inside a transaction now."""
    return hq_backends(url, where="AND state IN ('idle in transaction', 'active') AND xact_start IS NOT NULL")


@pytest.fixture
def pg_stack(tmp_path, postgresql_url):
    """hq-server, 4 workers, on a fresh PostgreSQL schema; every report's transaction held
    open 0.15 s before it takes its hash locks, so writers overlap for certain."""
    s = Stack(
        tmp_path, workers=4, db=postgresql_url, env={"HQ_FAILPOINTS": "store.report=sleep(0.15)"}
    ).start()
    s.url = postgresql_url
    yield s
    assert s.stop() == 0, s.log()


def race(address: str, clients: int, work) -> list:
    """Run ``work(client, i)`` in ``clients`` threads at once, each with its own client."""
    results = [None] * clients
    failures = []
    start = threading.Barrier(clients)

    def run(i):
        try:
            with create_client(address, timeout=60) as client:
                start.wait()
                results[i] = work(client, i)
        except Exception as exc:  # reported below, with the thread's index
            failures.append((i, exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    return results


def test_concurrent_reports_of_one_outhash_from_many_workers_agree(pg_stack):
    """12 clients report, at once, different taskhashes with the same 6 outhashes; 4 worker
    processes write them in overlapping transactions (seen in pg_stat_activity). Every
    answer for one outhash is one unihash, the first report's, and lookups agree."""
    clients, outhashes = 12, 6
    overlap = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            overlap.append(in_transaction(pg_stack.url))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:

        def work(client, i):
            return [
                client.report_unihash(h("t", i, k), M, h("o", k), h("u", i, k))["unihash"]
                for k in range(outhashes)
            ]

        answers = race(pg_stack.address, clients, work)
    finally:
        done.set()
        watcher.join()
    assert max(overlap) >= 2, "the workers' write transactions never overlapped: the test proves nothing"
    for k in range(outhashes):
        given = {answers[i][k] for i in range(clients)}
        assert len(given) == 1, f"outhash {k}: {len(given)} different unihashes"
        (unihash,) = given
        assert unihash in {h("u", i, k) for i in range(clients)}
    with create_client(pg_stack.address) as client:
        looked_up = client.get_unihash_batch(
            [(M, h("t", i, k)) for i in range(clients) for k in range(outhashes)]
        )
        assert looked_up == [answers[i][k] for i in range(clients) for k in range(outhashes)]
        # The oldest report gives the unihash (ref. §7.2), as get-outhash shows.
        for k in range(outhashes):
            assert client.get_outhash(M, h("o", k), h("x"))["unihash"] == answers[0][k]


def test_concurrent_first_mappings_of_one_taskhash_agree(pg_stack):
    """12 clients map the same taskhashes to their own unihashes at once: one wins for
    each, and every client is told the winner."""

    def work(client, i):
        return [client.report_unihash_equiv(h("t", k), M, h("u", i, k))["unihash"] for k in range(20)]

    answers = race(pg_stack.address, 12, work)
    for k in range(20):
        assert len({a[k] for a in answers}) == 1
    with create_client(pg_stack.address) as client:
        assert client.get_unihash_batch([(M, h("t", k)) for k in range(20)]) == answers[0]


def test_maintenance_and_statistics_on_postgresql(pg_stack):
    with create_client(pg_stack.address) as client:
        for k in range(10):
            client.report_unihash(h("t", k), M, h("o", k), h("u", k), {"PN": "pn%d" % (k % 2)})
        assert client.get_taskhash(M, h("t", 3), all_properties=True)["PN"] == "pn1"
        assert client.remove({"PN": "pn1"}) == {"count": 5}
        assert client.clean_unused(0) == {"count": 0}
        assert client.gc_mark("m1", {"unihash": h("u", 0)}) == {"count": 1}
        assert client.gc_status() == {"keep": 1, "remove": 9, "mark": "m1"}
        assert client.gc_sweep("m1") == {"count": 9}
        assert client.get_unihash(M, h("t", 0)) == h("u", 0)
        assert client.get_unihash(M, h("t", 2)) is None
        usage = client.get_db_usage()
        assert usage["unihashes"]["rows"] == 1 and usage["outhashes"]["rows"] == 5
        stats = client.get_stats()
    worker = stats["workers"][0]
    assert maps_psycopg(worker["pid"])  # the driver SQLite workers hide is there
    assert worker["settings"]["engine"] == "postgresql"
    assert worker["db"]["path"] == pg_stack.url
    assert worker["db"]["id"].startswith("postgresql:")
    shown = subprocess.run(
        [script("hq-admin"), "stats", "--address", pg_stack.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "postgresql" in shown.stdout


def test_killed_connections_cost_the_requests_after_them_nothing(pg_stack):
    """PostgreSQL ends every worker's connection (a restart, an admin's pg_terminate_backend):
    each worker's next request runs again on a new connection, so the reads and reports
    after it answer at once, with no error for a build to see."""
    with create_client(pg_stack.address) as client:
        client.report_unihash_equiv(h("t"), M, h("u"))
        assert hq_backends(pg_stack.url, "count(pg_terminate_backend(pid))") == 4
        wait_for(lambda: hq_backends(pg_stack.url) == 0, timeout=10, what="the backends to end")
        for k in range(8):
            assert client.get_unihash(M, h("t")) == h("u")
            assert client.report_unihash(h("t2", k), M, h("o2"), h("u2", k))["unihash"] == h("u2", 0)
        stats = client.get_stats()
    assert hq_backends(pg_stack.url) == 4  # every worker met its dead connection
    for worker in stats["workers"]:
        counters = worker["counters"]
        assert counters.get("jobs.get", 0) + counters.get("jobs.report", 0) >= 1, counters
        assert not [name for name in worker["counters"] if name.startswith("errors.")], worker


def test_import_hashserv_into_postgresql(tmp_path, postgresql_url, monkeypatch):
    source = tmp_path / "hashserv.db"
    facts = populate(source, tasks=400, big_siginfo=0)
    stack = Stack(
        tmp_path,
        db=postgresql_url,
        args=["--admin-user", IMPORTER],
        env={"HQ_ADMIN_PASSWORD": IMPORTER_PASSWORD},
    ).start()
    try:
        monkeypatch.setenv("BB_HASHSERVE_USERNAME", IMPORTER)
        monkeypatch.setenv("BB_HASHSERVE_PASSWORD", IMPORTER_PASSWORD)
        done = subprocess.run(
            [
                script("hq-admin"),
                "import-hashserv",
                "--address",
                stack.address,
                str(source),
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["complete"]
        mappings = source_mappings(source)
        with create_client(stack.address, timeout=30) as client:
            keys = list(mappings)
            for key, answer in zip(keys, client.get_unihash_batch(keys)):
                assert answer == (None if key[1] == facts["bad_taskhash"] else mappings[key]), key
            assert {u["username"] for u in client.get_all_users()} >= {IMPORTER}
    finally:
        assert stack.stop() == 0, stack.log()


def test_schema_versions_on_postgresql(postgresql_url):
    db = open_database(postgresql_url)
    db.execute_sql("UPDATE config SET value = '1' WHERE name = 'schema-version'")
    db.close()
    db = open_database(postgresql_url)  # migrated
    assert db.execute_sql("SELECT value FROM config WHERE name = 'schema-version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    db.execute_sql("UPDATE config SET value = %s WHERE name = 'schema-version'", (str(SCHEMA_VERSION + 1),))
    db.close()
    with pytest.raises(ValueError, match="newer than this hq"):
        open_database(postgresql_url)


def test_a_hashserv_schema_is_refused(postgresql_url):
    with psycopg.connect(postgresql_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE unihashes_v3 (id integer)")
    with pytest.raises(ValueError, match="bitbake-hashserv database"):
        open_database(postgresql_url)


def test_a_lock_not_had_in_time_is_busy(postgresql_url):
    store = store_for(open_database(postgresql_url, lock_wait_s=0.2), lock_wait_s=0.2)
    try:
        with psycopg.connect(postgresql_url) as holder:  # another writer of this outhash, in a transaction
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(M, h("o")),))
            with pytest.raises(Exception) as caught:
                store.report(M, h("t"), h("o"), h("u"))
            assert errors.kind(caught.value) == errors.BUSY
            status, _ = Handlers(store).handle(
                p.REPORT, b"", [M.encode(), h("t2").encode(), h("o").encode(), h("u").encode()]
            )
            assert status == p.E_BUSY
        assert store.report(M, h("t"), h("o"), h("u")) == h("u")  # free again
    finally:
        store.db.close()


@pytest.mark.parametrize(
    "db, says",
    [
        ("postgresql://127.0.0.1/", "name the database"),
        ("postgresql://127.0.0.1:notaport/x", "not a PostgreSQL URL"),
        ("mysql://127.0.0.1/x", "not a database hq knows"),
    ],
)
def test_a_bad_url_is_one_line(tmp_path, db, says):
    done = subprocess.run([script("hq-server"), "--db", db], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert says in done.stderr and "Traceback" not in done.stderr


def test_a_missing_database_is_one_line_without_the_password(tmp_path, postgresql_server):
    url = (
        postgresql_server.url.replace("://", "://root:sekrit@", 1)
        if "@" not in postgresql_server.url
        else None
    )
    if url is None:
        pytest.skip("HQ_POSTGRESQL names a user already")
    url = url.rsplit("/", 1)[0] + "/hq_no_such_database"
    done = subprocess.run(
        [script("hq-server"), "--db", url, "--bind", f"ipc://{tmp_path}/x.ipc"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    errors_shown = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors_shown) == 1 and "hq_no_such_database" in errors_shown[0], done.stderr
    assert "sekrit" not in done.stderr and "root:***@" in errors_shown[0]
    assert "Traceback" not in done.stderr


def test_users_and_permissions_on_postgresql(tmp_path, postgresql_url):
    stack = Stack(
        tmp_path,
        db=postgresql_url,
        args=["--admin-user", "admin", "--anon-perms", "@read"],
        env={"HQ_ADMIN_PASSWORD": "pw"},
    ).start()
    try:
        with create_client(stack.address, username="admin", password="pw") as admin:
            made = admin.new_user("builder", ["@read", "@report"])
            assert sorted(made["permissions"]) == ["@read", "@report"]
            assert admin.get_user("builder")["username"] == "builder"
            with create_client(stack.address, username="builder", password=made["token"]) as builder:
                assert builder.report_unihash(h("t"), M, h("o"), h("u"))["unihash"] == h("u")
            assert admin.set_user_perms("builder", ["@read"])["permissions"] == ["@read"]
            token = admin.refresh_token("builder")["token"]
            with create_client(stack.address, username="builder", password=token) as builder:
                builder.report_unihash(h("t2"), M, h("o2"), h("u2"))  # without @report: a lookup
                assert builder.get_unihash(M, h("t2")) is None
            with pytest.raises(Exception, match="authenticate"):
                with create_client(stack.address, username="builder", password=made["token"]) as old:
                    old.get_unihash(M, h("t"))
            assert admin.delete_user("builder") == {"username": "builder"}
            assert admin.get_user("builder") is None
        with create_client(stack.address) as anonymous:  # @read only
            assert anonymous.get_unihash(M, h("t")) == h("u")
            with pytest.raises(Exception, match="permission"):
                anonymous.report_unihash_equiv(h("t3"), M, h("u3"))
    finally:
        assert stack.stop() == 0, stack.log()


def test_reports_stay_index_lookups_on_prepared_plans(postgresql_url):
    """psycopg prepares a statement after a few runs and PostgreSQL keeps a generic plan,
    made here while the tables are nearly empty. Reports made after the tables have grown
    must still read a few index entries each, not every row of the method."""
    store = store_for(open_database(postgresql_url))
    flush = "SELECT pg_stat_force_next_flush()"  # else an idle session's counts wait 10 s
    try:
        for n in range(60):  # prepared while small; then 3,000 rows
            store.report_many([(M, h("t", n, k), h("o", n, k), h("u", n, k), None) for k in range(50)])
        store.db.execute_sql(flush)
        schema = postgresql_url.rsplit("%3D", 1)[1]

        def read():
            with psycopg.connect(postgresql_url.split("?", 1)[0], autocommit=True) as conn:
                return conn.execute(
                    "SELECT sum(idx_scan), sum(idx_tup_read) FROM pg_stat_user_indexes "
                    "WHERE schemaname = %s AND relname IN ('outhashes', 'unihashes')",
                    (schema,),
                ).fetchone()

        before = wait_for(
            lambda: (lambda r: r if r[0] and r[0] >= 2 * 3000 else None)(read()), what="the stats"
        )
        for n in range(200):
            store.report_many([(M, h("new", n), h("newo", n), h("u"), None)])
        store.db.execute_sql(flush)
        after = wait_for(lambda: (lambda r: r if r[0] >= before[0] + 400 else None)(read()), what="the stats")
        assert (after[1] - before[1]) / (after[0] - before[0]) < 3, (before, after)
        with psycopg.connect(postgresql_url.split("?", 1)[0], autocommit=True) as conn:
            (seq,) = conn.execute(
                "SELECT seq_tup_read FROM pg_stat_user_tables "
                "WHERE schemaname = %s AND relname = 'outhashes'",
                (schema,),
            ).fetchone()
        assert seq == 0
    finally:
        store.db.close()


def test_a_password_in_the_url_is_never_shown(tmp_path, postgresql_url):
    """Not in a worker's command line (it gets PGPASSWORD), a log line or the statistics."""
    if "@" in postgresql_url.split("?", 1)[0]:
        pytest.skip("HQ_POSTGRESQL names a user already")
    url = postgresql_url.replace("://", f"://{getpass.getuser()}:sekrit@", 1)  # trust: any password
    stack = Stack(tmp_path, db=url).start()
    try:
        with create_client(stack.address) as client:
            client.report_unihash_equiv(h("t"), M, h("u"))
            stats = json.dumps(client.get_stats())
        assert "sekrit" not in stats
        for name, proc in stack.processes.items():
            assert "sekrit" not in " ".join(proc.cmdline()), name
            if name.startswith("hq-worker"):
                assert proc.environ().get("PGPASSWORD") == "sekrit"
    finally:
        assert stack.stop() == 0, stack.log()
    assert "sekrit" not in stack.log()
