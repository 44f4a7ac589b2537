"""Database administration (PROTOCOL.md §3.7, ref. §7.5-7.8) on a real SQLite file, through
the worker's handlers (bodies as the wire carries them) and the Store."""

import json
import os
import shutil
import sqlite3

import pytest

from helpers import Statements
from hq import protocol as p
from hq.workers.maintenance import GC_MARK_KEY, MAX_MARK_BYTES, QUERY_COLUMNS
from hq.workers.schema import open_database
from hq.workers.timestamps import now_us

M = "TestMethod"
T1 = "35788efcb8dfb0a02659d81cf2bfd695fb30faf9"
T2 = "3bf6f1e89d26205aec90da04854fbdbf73afe6b4"
T3 = "1111111111111111111111111111111111111111"
O1 = "2765d4a5884be49b28601445c2760c5f21e7e5c0ee2b7e3fce98fd7e5970796f"
O2 = "0904a7fe3dc712d9fd8a74a616ddca2a825a8ee97adf0bd3fc86082c7639914d"
U1 = "a69ec97f5af2e21e1a1f9cc8896965515d5559425666f734e245a3d40cee33d9"
U2 = "bf6e81926066f770e960f9f777cd088c62bea9addb7745f3e77deaa81a645747"
O3 = "cc" * 32
U3 = "9217a7d6c5c6a47d1b8e6fd1b3d0b87a3c6a2f5b3e6e2b0b4e1e1c9a8f7d6e5c"
HOUR_US = 3600 * 1_000_000


@pytest.fixture
def store(handlers):
    return handlers.store


def call(handlers, command: bytes, *frames) -> tuple:
    return handlers.handle(command, b"", [f.encode() if isinstance(f, str) else f for f in frames])


def ok(handlers, command: bytes, *frames):
    """The JSON reply of a command that must succeed."""
    status, reply = call(handlers, command, *frames)
    assert status == p.OK, reply
    assert len(reply) == 1
    return json.loads(reply[0])


def where(**columns) -> bytes:
    return p.encode_json(columns)


def remove(handlers, dry_run=None, **columns) -> int:
    frames = [where(**columns)] + ([] if dry_run is None else [p.encode_flag(dry_run)])
    return ok(handlers, p.REMOVE, *frames)["count"]


def status(handlers) -> dict:
    return ok(handlers, p.GC_STATUS)


def mapping(store, taskhash, method=M):
    return store.get_unihashes(method, [taskhash])[0]


def report_row(store, outhash, method=M):
    """The oldest report of an outhash, whether or not it still has a mapping."""
    return store.get_outhash(method, outhash, with_unihash=False)


def rows(store, table: str) -> int:
    return store._sql(f"SELECT count(*) FROM {table}").fetchone()[0]


def worked_example(store):
    """The data of ref. §12.1: two equivalent reports of U1 and an equivalence to U2."""
    assert store.report(M, T1, O1, U1) == U1
    assert store.report(M, T2, O1, U2) == U1
    assert store.report_equiv(M, T3, U2) == U2


# --- remove (ref. §7.5) -----------------------------------------------------------------------


def test_remove_unihash_deletes_mappings_only(handlers, store):
    store.report(M, T1, O1, U1)
    assert remove(handlers, unihash=U1) == 1
    assert mapping(store, T1) is None
    assert report_row(store, O1)["taskhash"] == T1  # what test_clean_unused relies on


def test_remove_outhash_deletes_reports_only(handlers, store):
    store.report(M, T1, O1, U1)
    assert remove(handlers, outhash=O1) == 1
    assert report_row(store, O1) is None
    assert mapping(store, T1) == U1


@pytest.mark.parametrize("column, value", [("taskhash", T1), ("method", M)])
def test_remove_taskhash_or_method_deletes_from_both_tables(handlers, store, column, value):
    store.report(M, T1, O1, U1)
    store.report("Other", T1, O1, U2)
    assert remove(handlers, **{column: value}) == (4 if column == "taskhash" else 2)
    assert mapping(store, T1) is None and report_row(store, O1) is None
    if column == "method":
        assert mapping(store, T1, "Other") == U2


def test_remove_needs_every_given_column_to_match(handlers, store):
    store.report(M, T1, O1, U1)
    store.report("Other", T1, O1, U2)
    store.report(M, T2, O2, U3)
    assert remove(handlers, method="Other", taskhash=T1) == 2
    assert mapping(store, T1) == U1 and mapping(store, T1, "Other") is None
    # outhash is a report column only: the mapping table is matched on method and taskhash.
    assert remove(handlers, method=M, taskhash=T2, outhash=O1) == 1  # the mapping of T2 only
    assert mapping(store, T2) is None and report_row(store, O2) is not None


def test_remove_empty_gc_mark_deletes_unmarked_mappings(handlers, store):
    worked_example(store)
    ok(handlers, p.GC_MARK, "keep", where(unihash=U2))
    assert remove(handlers, gc_mark="") == 2
    assert [mapping(store, t) for t in (T1, T2, T3)] == [None, None, U2]


def test_remove_ignores_unknown_keys_and_null_values(handlers, store):
    store.report(M, T1, O1, U1)
    assert remove(handlers, nope="x", unihashes=U1) == 0
    assert ok(handlers, p.REMOVE, b"{}")["count"] == 0
    assert remove(handlers, taskhash=T1, outhash=None, unihash=None, bogus=None) == 2
    assert rows(store, "unihashes") == rows(store, "outhashes") == 0


def test_remove_accepts_every_query_column(handlers, store):
    """As test_get_db_query_columns: remove({col: ""}) for every advertised column works."""
    columns = ok(handlers, p.QUERY_COLUMNS)["columns"]
    assert columns and set(columns) == set(QUERY_COLUMNS)
    store.report(M, T1, O1, U1)
    for column in columns:
        assert remove(handlers, **{column: ""}) == (1 if column == "gc_mark" else 0), column
    assert report_row(store, O1) is not None


@pytest.mark.parametrize("column", ["owner", "PN", "PV", "PR", "task", "outhash_siginfo"])
def test_remove_by_an_optional_report_column(handlers, store, column):
    store.report(M, T1, O1, U1, {column: "wanted"})
    store.report(M, T2, O2, U2, {column: "other"})
    store.report(M, T3, O2, U3)  # NULL: "" does not match it
    assert remove(handlers, **{column: ""}) == 0
    assert remove(handlers, **{column: "wanted"}) == 1
    assert report_row(store, O1) is None
    assert mapping(store, T1) == U1  # a report column: mappings are not touched


def test_remove_by_created_accepts_the_form_get_full_returns(handlers, store):
    store.report(M, T1, O1, U1)
    store.report(M, T2, O2, U2)
    created = store.get_full(M, T1)["created"]
    assert created.endswith("+00:00")
    for unmatched in ("yesterday", "", "2026-13-01", created.replace("+00:00", "+01:00")):
        assert remove(handlers, created=unmatched) == 0
    assert remove(handlers, dry_run=True, created=created.replace("+00:00", "Z")) == 1
    assert remove(handlers, dry_run=True, created=created.replace("+00:00", "").replace("T", " ")) == 1
    assert remove(handlers, created=created) == 1
    assert report_row(store, O1) is None and report_row(store, O2) is not None


def test_remove_values_that_cannot_be_stored_match_nothing(handlers, store):
    store.report(M, T1, O1, U1)
    store.report_equiv(M, "ABCD", U2)  # not canonical hex: kept as text
    assert remove(handlers, method="NoSuchMethod") == 0
    assert remove(handlers, method="") == 0
    assert remove(handlers, unihash=U1.upper()) == 0
    assert remove(handlers, unihash="123") == 0
    assert remove(handlers, unihash=U1[:-2]) == 0
    assert remove(handlers, taskhash=T1.upper()) == 0
    assert remove(handlers, taskhash="abcd") == 0
    assert remove(handlers, taskhash="ABCD") == 1
    assert mapping(store, T1) == U1


def test_remove_dry_run_counts_and_changes_nothing(handlers, store):
    worked_example(store)
    before = (rows(store, "unihashes"), rows(store, "outhashes"))
    assert remove(handlers, dry_run=True, method=M) == 5
    assert (rows(store, "unihashes"), rows(store, "outhashes")) == before
    assert remove(handlers, dry_run=False, method=M) == 5


# --- clean-unused (ref. §7.6, with the sign the reference gets wrong) --------------------------


def age(store, taskhash, hours: float):
    """Make the reports of a taskhash look ``hours`` old."""
    store._sql(
        "UPDATE outhashes SET created = ? WHERE taskhash = ?",
        (now_us() - int(hours * HOUR_US), store.key(taskhash)),
    )


def clean(handlers, max_age: int, dry_run=None) -> int:
    frames = [b"%d" % max_age] + ([] if dry_run is None else [p.encode_flag(dry_run)])
    return ok(handlers, p.CLEAN_UNUSED, *frames)["count"]


def test_clean_unused_deletes_only_unused_reports_older_than_the_age(handlers, store):
    store.report(M, T1, O1, U1)  # unused, 2 h old: goes
    store.report(M, T2, O2, U2)  # unused, new: stays for max_age 1 h
    store.report(M, T3, O3, U3)  # used (has its mapping), 5 h old: always stays
    remove(handlers, unihash=U1)
    remove(handlers, unihash=U2)
    age(store, T1, 2)
    age(store, T3, 5)
    assert clean(handlers, 3600, dry_run=True) == 1
    assert rows(store, "outhashes") == 3
    assert clean(handlers, 3 * 3600) == 0  # younger than 3 h: all stay
    assert clean(handlers, 3600) == 1
    assert report_row(store, O1) is None
    assert report_row(store, O2)["taskhash"] == T2
    assert clean(handlers, 0) == 1  # 0: every unused report
    assert rows(store, "outhashes") == 1 and store.get_full(M, T3)["unihash"] == U3
    assert clean(handlers, 0) == 0


def test_clean_unused_after_remove_unihash(handlers, store):
    """BitBake's test_clean_unused: remove the mapping, clean-unused 0 removes the report."""
    store.report(M, T1, O1, U1)
    assert clean(handlers, 0) == 0
    remove(handlers, unihash=U1)
    assert clean(handlers, 0) == 1
    assert report_row(store, O1) is None


def test_clean_unused_huge_age_deletes_nothing(handlers, store):
    store.report(M, T1, O1, U1)
    remove(handlers, unihash=U1)
    assert clean(handlers, 10**15 - 1) == 0


# --- garbage collection (ref. §7.7, §12.3) -------------------------------------------------------


def test_gc_worked_exchange(handlers, store):
    """Ref. §12.3, message by message (table names are hq's)."""
    worked_example(store)
    assert status(handlers) == {"keep": 3, "remove": 0, "mark": None}
    assert ok(handlers, p.GC_MARK, "ABC", where(unihash=U1, method=M)) == {"count": 2}
    assert status(handlers) == {"keep": 2, "remove": 1, "mark": "ABC"}
    assert call(handlers, p.GC_MARK_STREAM, "ABC", where(unihash=U2)) == (p.OK, [b"1"])
    assert call(handlers, p.GC_SWEEP, "DEF") == (
        p.E_INVALID,
        [b"'DEF' is not the current mark. Refusing to sweep"],
    )
    assert ok(handlers, p.GC_SWEEP, "ABC") == {"count": 0}
    assert status(handlers) == {"keep": 0, "remove": 3, "mark": None}
    assert remove(handlers, taskhash=T1) == 2
    usage = ok(handlers, p.DB_USAGE)["usage"]
    assert usage == {
        "methods": {"rows": 1},
        "unihashes": {"rows": 2},
        "outhashes": {"rows": 1},
        "users": {"rows": 0},
        "config": {"rows": 1},  # schema-version; the mark was cleared
    }


def test_gc_sweep_deletes_unmarked_mappings_and_clears_the_mark(handlers, store):
    worked_example(store)
    assert ok(handlers, p.GC_MARK, "ABC", where(unihash=U2)) == {"count": 1}
    assert ok(handlers, p.GC_SWEEP, "ABC", b"1") == {"count": 2}  # dry run
    assert status(handlers) == {"keep": 1, "remove": 2, "mark": "ABC"}
    assert ok(handlers, p.GC_SWEEP, "ABC") == {"count": 2}
    assert [mapping(store, t) for t in (T1, T2, T3)] == [None, None, U2]
    assert status(handlers)["mark"] is None
    assert report_row(store, O1) is not None  # reports are clean-unused's job
    assert call(handlers, p.GC_SWEEP, "ABC")[0] == p.E_INVALID  # no current mark any more


def test_gc_switch_mark(handlers, store):
    """Marking with a new name starts a new cycle: the old mark counts as remove."""
    worked_example(store)
    assert ok(handlers, p.GC_MARK, "ABC", where(unihash=U1)) == {"count": 2}
    assert ok(handlers, p.GC_MARK, "DEF", where(unihash=U2)) == {"count": 1}
    assert status(handlers) == {"keep": 1, "remove": 2, "mark": "DEF"}
    assert call(handlers, p.GC_SWEEP, "ABC") == (
        p.E_INVALID,
        [b"'ABC' is not the current mark. Refusing to sweep"],
    )
    assert ok(handlers, p.GC_SWEEP, "DEF") == {"count": 2}
    assert [mapping(store, t) for t in (T1, T2, T3)] == [None, None, U2]


def test_gc_sweep_refused_without_any_mark(handlers, store):
    worked_example(store)
    status_code, reply = call(handlers, p.GC_SWEEP, "")
    assert status_code == p.E_INVALID and b"Refusing to sweep" in reply[0]
    assert call(handlers, p.GC_SWEEP, "ABC", b"1")[0] == p.E_INVALID  # a dry run checks too
    assert rows(store, "unihashes") == 3


def test_gc_mark_counts_matches_and_sets_the_mark_without_mapping_columns(handlers, store):
    worked_example(store)
    assert ok(handlers, p.GC_MARK, "ABC", where(outhash=O1, PN="x")) == {"count": 0}
    assert status(handlers) == {"keep": 0, "remove": 3, "mark": "ABC"}
    assert ok(handlers, p.GC_MARK, "ABC", where(unihash=U1)) == {"count": 2}
    assert ok(handlers, p.GC_MARK, "ABC", where(unihash=U1)) == {"count": 2}  # already marked: counted
    assert ok(handlers, p.GC_MARK, "ABC", where(unihash="123")) == {"count": 0}  # ref: test_auth_gc
    assert ok(handlers, p.GC_MARK, "ABC", where(taskhash=T3, method=M, gc_mark="")) == {"count": 1}
    assert status(handlers) == {"keep": 3, "remove": 0, "mark": "ABC"}


def test_new_mappings_get_the_current_mark(handlers, store):
    worked_example(store)
    ok(handlers, p.GC_MARK, "ABC", where(unihash=U1))
    store.report(M, "aa" * 20, "bb" * 32, U3)
    store.report_equiv(M, "cc" * 20, U3)
    assert store.get_full(M, "aa" * 20)["gc_mark"] == "ABC"
    assert status(handlers) == {"keep": 4, "remove": 1, "mark": "ABC"}
    assert ok(handlers, p.GC_SWEEP, "ABC") == {"count": 1}  # only T3, marked before the cycle
    assert mapping(store, "aa" * 20) == mapping(store, "cc" * 20) == U3
    store.report(M, "dd" * 20, "ee" * 32, U3)  # no current mark: ""
    assert store.get_full(M, "dd" * 20)["gc_mark"] == ""


@pytest.mark.sqlite_only
def test_reports_read_the_mark_another_worker_set(handlers, store):
    """The mark is read inside each write transaction, not cached: another worker (here a
    second connection) may have started a cycle."""
    store.report(M, T1, O1, U1)
    other = sqlite3.connect(store.db.database)
    with other:
        other.execute("INSERT INTO config (name, value) VALUES (?, 'XYZ')", (GC_MARK_KEY,))
    other.close()
    store.report(M, T2, O2, U2)
    assert store.get_full(M, T2)["gc_mark"] == "XYZ"
    assert status(handlers) == {"keep": 1, "remove": 1, "mark": "XYZ"}


def test_gc_mark_stream_chunks(handlers, store):
    worked_example(store)
    chunk = p.pack_items(
        [
            json.dumps({"unihash": U1}),
            json.dumps({"unihash": U1}),  # listed twice: counted twice, as line by line
            json.dumps({"unihash": "123"}),
            json.dumps({"unihash": U3}),  # no such mapping
            json.dumps({"taskhash": T3, "method": M, "ignored": 1}),
            "{}",
        ]
    )
    status_code, reply = call(handlers, p.GC_MARK_STREAM, "ABC", chunk, "ABC", where(unihash=U2))
    assert (status_code, reply) == (p.OK, [b"5", b"1"])
    assert status(handlers) == {"keep": 3, "remove": 0, "mark": "ABC"}


@pytest.mark.sqlite_only
def test_gc_mark_stream_of_unihashes_is_one_update_per_chunk(handlers, store):
    unihashes = ["%064x" % (i * 7919) for i in range(1, 1001)]
    for i, u in enumerate(unihashes[:600]):
        store.report_equiv(M, "%040x" % i, u)
    chunk = p.pack_items([json.dumps({"unihash": u}) for u in unihashes])
    with Statements(store.db) as sql:
        assert call(handlers, p.GC_MARK_STREAM, "alive", chunk) == (p.OK, [b"600"])
    assert sum(s.startswith("UPDATE") for s in sql) == 1
    assert sum(s.startswith("BEGIN") for s in sql) == 1
    assert status(handlers) == {"keep": 600, "remove": 0, "mark": "alive"}


def test_sweep_after_marking_from_a_cache(handlers, store):
    """The OE-core flow: mark what the sstate cache holds, sweep, clean unused reports."""
    for i in range(10):
        store.report(M, "%040x" % i, "%064x" % i, "%064x" % (1000 + i))
    alive = [json.dumps({"unihash": "%064x" % (1000 + i)}) for i in range(0, 10, 2)]
    assert call(handlers, p.GC_MARK_STREAM, "alive", p.pack_items(alive)) == (p.OK, [b"5"])
    assert ok(handlers, p.GC_SWEEP, "alive") == {"count": 5}
    assert clean(handlers, 0) == 5
    assert rows(store, "unihashes") == rows(store, "outhashes") == 5


# --- the rest ----------------------------------------------------------------------------------


def test_query_columns_lists_every_where_column(handlers):
    assert ok(handlers, p.QUERY_COLUMNS) == {
        "columns": [
            "method",
            "taskhash",
            "unihash",
            "gc_mark",
            "outhash",
            "created",
            "owner",
            "PN",
            "PV",
            "PR",
            "task",
            "outhash_siginfo",
        ]
    }


@pytest.mark.sqlite_only
def test_writes_are_refused_while_the_file_is_gone_and_reads_go_on(handlers, store, tmp_path):
    worked_example(store)
    os.rename(tmp_path / "hq.db", tmp_path / "away.db")
    try:
        assert call(handlers, p.REMOVE, where(method=M))[0] == p.E_STORAGE
        assert call(handlers, p.GC_MARK, "ABC", where(unihash=U1))[0] == p.E_STORAGE
        assert remove(handlers, dry_run=True, method=M) == 5
        assert status(handlers) == {"keep": 3, "remove": 0, "mark": None}
    finally:
        os.rename(tmp_path / "away.db", tmp_path / "hq.db")
    store.check_file()
    assert remove(handlers, method=M) == 5


@pytest.mark.sqlite_only
def test_a_replaced_file_is_opened_again_before_the_write(handlers, store, tmp_path):
    """The store reopens a replaced file inside write_transaction, under the heartbeat hook."""
    worked_example(store)
    path = str(tmp_path / "hq.db")
    store.reopen = lambda: open_database(path)
    store.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(path, path + ".new")
    os.replace(path + ".new", path)
    assert remove(handlers, method=M) == 5
    assert rows(store, "unihashes") == 0


@pytest.mark.sqlite_only
def test_long_statements_keep_the_worker_heartbeating(handlers, store):
    beats = []
    store.on_wait = lambda: beats.append(1)
    store.report(M, T1, O1, U1)
    store.db.execute_sql(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) "
        "INSERT INTO unihashes (method, taskhash, unihash, gc_mark) "
        "SELECT 1, randomblob(20), randomblob(32), '' FROM n"
    )
    assert remove(handlers, gc_mark="") > 20000
    assert beats, "the progress handler did not call on_wait"
    beats.clear()
    store.get_unihashes(M, ["%040x" % i for i in range(1000)])
    assert not beats  # the handler is gone after the statement


# --- bad bodies ----------------------------------------------------------------------------------

W = where(unihash=U1)
BAD = [
    ("remove: not JSON", p.REMOVE, [b"{"], p.E_BAD_REQUEST, "JSON"),
    ("remove: not UTF-8", p.REMOVE, [b"\xff"], p.E_BAD_REQUEST, "JSON"),
    ("remove: a list", p.REMOVE, [b"[]"], p.E_BAD_REQUEST, "object"),
    ("remove: null", p.REMOVE, [b"null"], p.E_BAD_REQUEST, "object"),
    ("remove: number value", p.REMOVE, [b'{"taskhash": 5}'], p.E_BAD_REQUEST, "taskhash"),
    ("remove: object value", p.REMOVE, [b'{"method": {}}'], p.E_BAD_REQUEST, "method"),
    ("remove: surrogate", p.REMOVE, [b'{"PN": "\\ud800"}'], p.E_INVALID, "PN"),
    ("remove: too large", p.REMOVE, [b" " * (p.MAX_EXTRA_BYTES + 1)], p.E_TOO_LARGE, "where"),
    ("remove: bad dry_run", p.REMOVE, [W, b"yes"], p.E_BAD_REQUEST, "dry_run"),
    ("remove: extra frame", p.REMOVE, [W, b"0", b"0"], p.E_BAD_REQUEST, "remove"),
    ("remove: no frame", p.REMOVE, [], p.E_BAD_REQUEST, "remove"),
    ("clean-unused: negative", p.CLEAN_UNUSED, [b"-1"], p.E_BAD_REQUEST, "max_age"),
    ("clean-unused: fraction", p.CLEAN_UNUSED, [b"1.5"], p.E_BAD_REQUEST, "max_age"),
    ("clean-unused: empty", p.CLEAN_UNUSED, [b""], p.E_BAD_REQUEST, "max_age"),
    ("clean-unused: words", p.CLEAN_UNUSED, [b"1h"], p.E_BAD_REQUEST, "max_age"),
    ("clean-unused: unicode digits", p.CLEAN_UNUSED, ["١٢".encode()], p.E_BAD_REQUEST, "max_age"),
    ("clean-unused: too big", p.CLEAN_UNUSED, [b"9" * 16], p.E_BAD_REQUEST, "max_age"),
    ("clean-unused: bad dry_run", p.CLEAN_UNUSED, [b"0", b""], p.E_BAD_REQUEST, "dry_run"),
    ("gc-mark: mark too long", p.GC_MARK, [b"m" * (MAX_MARK_BYTES + 1), W], p.E_TOO_LARGE, "mark"),
    ("gc-mark: mark not UTF-8", p.GC_MARK, [b"\xff", W], p.E_BAD_REQUEST, "mark"),
    ("gc-mark: where not JSON", p.GC_MARK, [b"m", b"unihash=1"], p.E_BAD_REQUEST, "JSON"),
    ("gc-mark: one frame", p.GC_MARK, [b"m"], p.E_BAD_REQUEST, "gc-mark"),
    (
        "gc-mark-stream: not JSON",
        p.GC_MARK_STREAM,
        [b"m", W + b"\n" + U1.encode()],
        p.E_BAD_REQUEST,
        "where 2",
    ),
    ("gc-mark-stream: empty line", p.GC_MARK_STREAM, [b"m", W + b"\n"], p.E_BAD_REQUEST, "where 2"),
    ("gc-mark-stream: a list", p.GC_MARK_STREAM, [b"m", b"[]"], p.E_BAD_REQUEST, "object"),
    ("gc-mark-stream: not UTF-8", p.GC_MARK_STREAM, [b"m", b"\xff"], p.E_BAD_REQUEST, "UTF-8"),
    ("gc-mark-stream: mark too long", p.GC_MARK_STREAM, [b"m" * 300, W], p.E_TOO_LARGE, "mark"),
    ("gc-mark-stream: odd frames", p.GC_MARK_STREAM, [b"m", W, b"m"], p.E_BAD_REQUEST, "groups"),
    (
        "gc-mark-stream: 1001 items",
        p.GC_MARK_STREAM,
        [b"m", b"\n".join([b"{}"] * 1001)],
        p.E_TOO_LARGE,
        "1001",
    ),
    ("gc-sweep: mark too long", p.GC_SWEEP, [b"m" * 257], p.E_TOO_LARGE, "mark"),
    ("gc-sweep: bad dry_run", p.GC_SWEEP, [b"m", b"true"], p.E_BAD_REQUEST, "dry_run"),
    ("gc-status: a body", p.GC_STATUS, [b"{}"], p.E_BAD_REQUEST, "gc-status"),
    ("db-usage: a body", p.DB_USAGE, [b""], p.E_BAD_REQUEST, "db-usage"),
    ("query-columns: a body", p.QUERY_COLUMNS, [b""], p.E_BAD_REQUEST, "query-columns"),
]


@pytest.mark.parametrize("command, body, code, text", [pytest.param(*row[1:], id=row[0]) for row in BAD])
def test_bad_body(handlers, store, command, body, code, text):
    worked_example(store)
    status_code, reply = handlers.handle(command, b"", body)
    assert status_code == code, reply
    assert len(reply) == 1 and text in reply[0].decode("utf-8", "replace")
    assert rows(store, "unihashes") == 3 and status(handlers)["mark"] is None  # nothing changed


def test_a_mark_of_256_bytes_is_fine(handlers, store):
    worked_example(store)
    mark = "é" * 128
    assert ok(handlers, p.GC_MARK, mark, W) == {"count": 2}
    assert status(handlers)["mark"] == mark
