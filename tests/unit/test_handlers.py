"""A worker REQUEST's jobs run together: one query per method, one transaction for reports."""

import pytest

from helpers import Statements
from hq import protocol as p

M = b"TestMethod"
U1 = "a69ec97f5af2e21e1a1f9cc8896965515d5559425666f734e245a3d40cee33d9"
U2 = "bf6e81926066f770e960f9f777cd088c62bea9addb7745f3e77deaa81a645747"


def report_body(taskhash, outhash, unihash):
    return [M, taskhash.encode(), outhash.encode(), unihash.encode()]


@pytest.mark.sqlite_only
def test_reports_of_one_request_share_one_transaction(handlers):
    jobs = [
        (b"1", report_body("1" * 64, "a" * 64, U1)),
        (b"2", report_body("2" * 64, "a" * 64, U2)),  # same outhash: equivalent to job 1
        (b"3", report_body("3" * 64, "b" * 64, "A" * 64)),  # invalid: refused alone
    ]
    with Statements(handlers.store.db) as sql:
        results = handlers.handle_jobs(p.REPORT, b"", jobs)
    assert results == [
        (b"1", p.OK, [U1.encode()]),
        (b"2", p.OK, [U1.encode()]),
        (b"3", p.E_INVALID, [b"Invalid unihash"]),
    ]
    assert sum(s.startswith("BEGIN") for s in sql) == 1
    assert sum(s.startswith("COMMIT") for s in sql) == 1


@pytest.mark.sqlite_only
def test_lookups_of_one_request_are_one_query_per_method(handlers):
    handlers.store.report_equiv("TestMethod", "1" * 64, U1)
    handlers.store.report_equiv("Other", "2" * 64, U2)
    handlers.handle_jobs(p.GET, b"", [(b"w", [M, b"0" * 64]), (b"x", [b"Other", b"0" * 64])])  # cache ids
    jobs = [
        (b"a", [M, b"1" * 64]),
        (b"b", [b"Other", ("2" * 64 + "\n" + "1" * 64).encode()]),
        (b"c", [M, ("1" * 64 + "\n" + "f" * 64).encode(), b"Other", b"2" * 64]),
        (b"d", [M, b""]),  # empty taskhash: refused alone
    ]
    with Statements(handlers.store.db) as sql:
        results = handlers.handle_jobs(p.GET, b"", jobs)
    assert results[:3] == [
        (b"a", p.OK, [U1.encode()]),
        (b"b", p.OK, [U2.encode() + b"\n"]),
        (b"c", p.OK, [U1.encode() + b"\n", U2.encode()]),
    ]
    assert results[3][:2] == (b"d", p.E_INVALID)
    assert len([s for s in sql if s.startswith("SELECT")]) == 2


@pytest.mark.sqlite_only
def test_exists_jobs_share_one_query(handlers):
    handlers.store.report_equiv("TestMethod", "1" * 64, U1)
    jobs = [(b"a", [U1.encode()]), (b"b", [(U2 + "\n" + U1).encode()]), (b"c", [b"zz"])]
    with Statements(handlers.store.db) as sql:
        results = handlers.handle_jobs(p.EXISTS, b"", jobs)
    assert results == [(b"a", p.OK, [b"1"]), (b"b", p.OK, [b"01"]), (b"c", p.OK, [b"0"])]
    assert len(sql) == 1


@pytest.mark.sqlite_only
def test_a_refused_write_fails_every_report_of_the_request(handlers):
    handlers.store.db.execute_sql("PRAGMA query_only = 1")  # SQLite refuses every write
    try:
        results = handlers.handle_jobs(
            p.REPORT,
            b"",
            [(b"1", report_body("1" * 64, "a" * 64, U1)), (b"2", report_body("2" * 64, "b" * 64, U2))],
        )
    finally:
        handlers.store.db.execute_sql("PRAGMA query_only = 0")
    assert [(job_id, status) for job_id, status, _ in results] == [(b"1", p.E_STORAGE), (b"2", p.E_STORAGE)]
    assert b"database busy" not in results[0][2][0] and b"locked" not in results[0][2][0]
    # Nothing half-written: the same reports succeed afterwards.
    results = handlers.handle_jobs(p.REPORT, b"", [(b"1", report_body("1" * 64, "a" * 64, U1))])
    assert results == [(b"1", p.OK, [U1.encode()])]


@pytest.mark.sqlite_only
def test_a_new_method_rolled_back_is_not_cached(handlers):
    store = handlers.store
    store.db.execute_sql("PRAGMA query_only = 1")
    try:
        handlers.handle_jobs(
            p.REPORT_EQUIV,
            b"",
            [(b"1", [b"New", b"1" * 64, U1.encode()]), (b"2", [b"New", b"2" * 64, U1.encode()])],
        )
    finally:
        store.db.execute_sql("PRAGMA query_only = 0")
    assert "New" not in store._method_ids
    store.report_equiv("Another", "9" * 64, U2)  # takes the id the rolled-back insert had
    assert handlers.handle_jobs(p.REPORT_EQUIV, b"", [(b"1", [b"New", b"1" * 64, U1.encode()])]) == [
        (b"1", p.OK, [U1.encode()])
    ]
    assert store.get_unihashes("Another", ["9" * 64]) == [U2]
    assert store.get_unihashes("New", ["1" * 64]) == [U1]


def test_a_read_only_worker_refuses_every_write_but_the_admin_set_up(db_spec):
    """hq-worker --read-only (the workers of hq-server --read-only, which share a file another
    hq writes): a write its broker should never have sent is refused, not stored unseen."""
    from hq.permissions import hash_token
    from hq.workers.handlers import Handlers
    from hq.workers.schema import open_database
    from hq.workers.store import store_for

    store = store_for(open_database(db_spec))
    try:
        writer, mirror = Handlers(store), Handlers(store, read_only=True)
        assert writer.handle(p.REPORT, b"", report_body("1" * 64, "a" * 64, U1)) == (p.OK, [U1.encode()])
        refused = [
            (p.REPORT, b"", report_body("2" * 64, "b" * 64, U2)),
            (p.REPORT, p.encode_actor("alice"), report_body("2" * 64, "b" * 64, U2)),
            (p.REPORT_EQUIV, b"", [M, b"2" * 64, U2.encode()]),
            (p.REMOVE, b"", [b'{"taskhash": "' + b"1" * 64 + b'"}']),
            (p.NEW_USER, b"", [b"bob", b'["@read"]']),
        ]
        for command, actor, body in refused:
            status, reply = mirror.handle(command, actor, body)
            assert (status, reply) == (
                p.E_UNKNOWN_COMMAND,
                [command + b" is not available on a read-only worker (--read-only)"],
            )
        # What it serves: lookups, and reports answered as lookups (the read-only broker's actor).
        assert mirror.handle(p.GET, b"", [M, b"1" * 64]) == (p.OK, [U1.encode()])
        as_lookup = p.encode_actor(None, write=False)
        answer = mirror.handle(p.REPORT, as_lookup, report_body("3" * 64, "a" * 64, U2))
        assert answer == (p.OK, [U1.encode()])
        assert writer.handle(p.GET, b"", [M, b"2" * 64 + b"\n" + b"3" * 64]) == (p.OK, [b"\n"])
        # The admin user a read-only server sets up at start, as the reference's does.
        status, reply = mirror.handle(p.ADMIN_BOOTSTRAP, b"", [b"admin", hash_token("secret").encode()])
        assert status == p.OK
    finally:
        store.db.close()
