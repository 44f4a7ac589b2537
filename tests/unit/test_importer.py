"""The worker side of `import` / `import-status` (PROTOCOL.md §3.7) on real SQLite files, and
hq-admin's reading of a bitbake-hashserv file (no server)."""

import json
import sqlite3

import pytest

from hashserv_db import HashservDB, expected_hq_state, hq_state, populate
from hq import protocol as p
from hq.admin.importer import CHUNK_BYTES, SourceError, open_source, read_chunks
from hq.workers import importer as imp
from hq.workers.schema import SCHEMA_VERSION

M = "TestMethod"
T1 = "35788efcb8dfb0a02659d81cf2bfd695fb30faf9"
T2 = "3bf6f1e89d26205aec90da04854fbdbf73afe6b4"
O1 = "2765d4a5884be49b28601445c2760c5f21e7e5c0ee2b7e3fce98fd7e5970796f"
U1 = "a69ec97f5af2e21e1a1f9cc8896965515d5559425666f734e245a3d40cee33d9"
U2 = "bf6e81926066f770e960f9f777cd088c62bea9addb7745f3e77deaa81a645747"


def body(table, rows, last_id=1, source="src"):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    return [source.encode(), table.encode(), str(last_id).encode(), "\n".join(lines).encode()]


def run_import(handlers, table, rows, last_id=1, source="src"):
    status, reply = handlers.handle(p.IMPORT, b"", body(table, rows, last_id, source))
    assert status == p.OK, reply
    return json.loads(reply[0])


def status_of(handlers, source="src"):
    status, reply = handlers.handle(p.IMPORT_STATUS, b"", [source.encode()])
    assert status == p.OK, reply
    return json.loads(reply[0])


def mapping(taskhash, unihash, method=M, gc_mark=""):
    return {"id": 1, "method": method, "taskhash": taskhash, "unihash": unihash, "gc_mark": gc_mark}


def outhash(taskhash, out, created="2026-11-27T12:14:00.721026+00:00", method=M, **extra):
    row = {"id": 1, "method": method, "taskhash": taskhash, "outhash": out, "created": created}
    row.update({k: extra.get(k) for k in p.REPORT_EXTRA_FIELDS})
    return row


# --- conversion -----------------------------------------------------------------------


def test_rows_are_stored_as_a_report_would_store_them(handlers):
    store = handlers.store
    assert run_import(handlers, "unihashes_v3", [mapping(T1, U1)]) == {
        "imported": 1,
        "skipped": 0,
        "invalid": 0,
    }
    row = outhash(
        T1, O1, owner="alice", PN="zlib", PV="1.3", PR="r0", task="do_install", outhash_siginfo='{"a":\n1}'
    )
    assert run_import(handlers, "outhashes_v2", [row]) == {"imported": 1, "skipped": 0, "invalid": 0}
    full = store.get_full(M, T1)
    assert {k: v for k, v in full.items() if k != "id"} == {
        **{k: v for k, v in row.items() if k != "id"},
        "unihash": U1,
        "gc_mark": "",
    }
    # Hex hashes are stored as the engine's keys, the unihash as 32 bytes, the method interned.
    raw = store._sql("SELECT method, taskhash, unihash FROM unihashes").fetchone()
    assert raw[1] == store.key(T1) and raw[2] == bytes.fromhex(U1)
    assert store._sql("SELECT name FROM methods WHERE id = ?", (raw[0],)).fetchone() == (M,)
    # The imported outhash row takes part in equivalence: a new taskhash with this outhash
    # gets the imported unihash.
    assert store.report(M, "9" * 64, O1, U2) == U1


@pytest.mark.parametrize(
    "created, expected",
    [
        ("2026-11-27T12:14:00.721026+00:00", "2026-11-27T12:14:00.721026+00:00"),  # BitBake since 2025
        ("2026-11-27 12:14:00.721026", "2026-11-27T12:14:00.721026+00:00"),  # older: naive, taken as UTC
        ("2026-11-27 12:14:00", "2026-11-27T12:14:00+00:00"),  # no fraction when microsecond is 0
        ("2026-11-27T14:14:00.5+02:00", "2026-11-27T12:14:00.500000+00:00"),  # another zone
        ("2026-11-27T12:14:00Z", "2026-11-27T12:14:00+00:00"),
        (None, "1970-01-01T00:00:00+00:00"),  # no time: oldest, as SQLite sorts NULL first
    ],
)
def test_created_formats(handlers, created, expected):
    assert run_import(handlers, "unihashes_v3", [mapping(T1, U1)])["imported"] == 1
    assert run_import(handlers, "outhashes_v2", [outhash(T1, O1, created)])["imported"] == 1
    assert handlers.store.get_full(M, T1)["created"] == expected


def test_created_keeps_the_oldest_first_order(handlers):
    rows = [outhash(T2, O1, "2026-11-27 12:00:01"), outhash(T1, O1, "2026-11-27T11:00:00.000001+00:00")]
    run_import(handlers, "unihashes_v3", [mapping(T1, U1), mapping(T2, U2)])
    assert run_import(handlers, "outhashes_v2", rows)["imported"] == 2
    assert handlers.store.get_outhash(M, O1)["taskhash"] == T1  # older although imported later


@pytest.mark.parametrize(
    "row",
    [
        mapping(T1, "A" * 64),  # upper case
        mapping(T1, "a" * 63),
        mapping(T1, "a" * 65),
        mapping(T1, "${@os.system('true')}"),
        mapping(T1, None),
        mapping("", U1),  # empty taskhash
        mapping("a\tb", U1),  # unprintable: hq's protocol cannot carry it
        mapping("a" * 257, U1),  # longer than MAX_HASH_BYTES
        mapping(T1, U1, method=17),
        mapping(T1, U1, gc_mark=["x"]),
        # Bytes that are not UTF-8, as hq-admin reads them (surrogateescape): once crashed
        # every worker that parsed the chunk.
        mapping("Test\udce9", U1),
        mapping(T1, U1, method="TestM\udce9"),
        mapping(T1, U1, gc_mark="\udce9"),
    ],
)
def test_a_mapping_hq_cannot_hold_is_skipped_and_counted(handlers, row):
    good = mapping(T2, U2)
    assert run_import(handlers, "unihashes_v3", [row, good]) == {"imported": 1, "skipped": 0, "invalid": 1}
    assert handlers.store.get_unihashes(M, [T1, T2]) == [None, U2]
    assert status_of(handlers)["unihashes_v3"] == 1  # the chunk still moves the checkpoint


@pytest.mark.parametrize(
    "row",
    [
        outhash(T1, O1, created="yesterday"),
        outhash(T1, O1, created=12345),
        outhash(T1, "", created=None),
        outhash(T1, O1, outhash_siginfo="x" * (p.MAX_EXTRA_BYTES + 1)),  # as report refuses it
        outhash(T1, O1, PN="\ud800"),  # a lone surrogate SQLite cannot store
        outhash(T1, "ab\udce9"),
        outhash(T1, O1, method="M\udce9"),
        outhash(T1, O1, PN={"no": "objects"}),
    ],
)
def test_an_outhash_row_hq_cannot_hold_is_skipped_and_counted(handlers, row):
    assert run_import(handlers, "outhashes_v2", [row]) == {"imported": 0, "skipped": 0, "invalid": 1}
    assert handlers.store._sql("SELECT count(*) FROM outhashes").fetchone() == (0,)


def test_non_text_extras_are_stored_as_text_like_report(handlers):
    run_import(handlers, "unihashes_v3", [mapping(T1, U1)])
    run_import(handlers, "outhashes_v2", [outhash(T1, O1, PV=1.5, PR=0)])
    full = handlers.store.get_full(M, T1)
    assert (full["PV"], full["PR"]) == ("1.5", "0")


# --- first mapping wins, duplicates -------------------------------------------------------


def test_an_existing_hq_mapping_wins_and_the_row_counts_as_skipped(handlers):
    store = handlers.store
    store.report(M, T1, O1, U1)
    reply = run_import(handlers, "unihashes_v3", [mapping(T1, U2), mapping(T2, U2)])
    assert reply == {"imported": 1, "skipped": 1, "invalid": 0}
    assert store.get_unihashes(M, [T1, T2]) == [U1, U2]
    # The same (method, taskhash, outhash) is not stored twice; other outhashes are.
    reply = run_import(
        handlers, "outhashes_v2", [outhash(T1, O1), outhash(T1, "ab" * 32), outhash(T1, "ab" * 32)]
    )
    assert reply == {"imported": 1, "skipped": 2, "invalid": 0}
    assert store._sql("SELECT count(*) FROM outhashes").fetchone() == (2,)


def test_a_packed_backfill_stores_the_upstreams_mappings_first_mapping_wins(handlers):
    """The broker's backfill of lookups an upstream answered: method, taskhashes, unihashes,
    packed as a GET chunk and its answer (empty items, misses, are not stored)."""
    store = handlers.store
    store.report(M, T1, O1, U1)
    T3 = "3" * 40
    body = [M.encode(), f"{T1}\n{T2}\n{T3}".encode(), f"{U2}\n{U2}\n".encode()]
    status, reply = handlers.handle(p.BACKFILL, b"", body)
    assert (status, reply) == (p.OK, [b"1"])  # T1 had its own mapping; T3 the upstream missed
    assert store.get_unihashes(M, [T1, T2, T3]) == [U1, U2, None]
    for bad in (
        [M.encode(), T1.encode(), b"x" * 64],  # not a unihash
        [M.encode(), f"{T1}\n{T2}".encode(), U2.encode()],  # one answer for two taskhashes
        [b"", T1.encode(), U2.encode()],  # no method
        [M.encode(), T1.encode()],  # two frames
    ):
        status, reply = handlers.handle(p.BACKFILL, b"", bad)
        assert status in (p.E_BAD_REQUEST, p.E_INVALID), (bad, reply)
    assert store.get_unihashes(M, [T1, T2, T3]) == [U1, U2, None]


@pytest.mark.sqlite_only
def test_running_a_chunk_twice_changes_nothing(handlers, tmp_path):
    rows = [mapping("%040x" % i, "%064x" % (i % 7 + 1)) for i in range(50)]
    assert run_import(handlers, "unihashes_v3", rows, last_id=50)["imported"] == 50
    before = hq_state(tmp_path / "hq.db")
    assert run_import(handlers, "unihashes_v3", rows, last_id=50) == {
        "imported": 0,
        "skipped": 50,
        "invalid": 0,
    }
    assert hq_state(tmp_path / "hq.db") == before


def test_imported_mappings_take_hqs_current_gc_mark(handlers):
    run_import(handlers, "unihashes_v3", [mapping(T1, U1, gc_mark="old")])
    handlers.store._sql("INSERT INTO config (name, value) VALUES ('gc-mark', 'hq-mark')")
    run_import(handlers, "unihashes_v3", [mapping(T2, U2, gc_mark="old")])
    marks = dict(handlers.store._sql("SELECT unihash, gc_mark FROM unihashes").fetchall())
    # Without a current mark the source's is kept; with one, a new mapping gets it (as a
    # report would), so the next sweep keeps what was just imported.
    assert marks == {bytes.fromhex(U1): "old", bytes.fromhex(U2): "hq-mark"}


# --- users and config ------------------------------------------------------------------


def test_users_are_copied_and_an_existing_user_is_kept(handlers):
    db = handlers.store.db
    db.execute_sql("INSERT INTO users (username, token, permissions) VALUES ('admin', 'hq-token', '@all')")
    rows = [
        {"id": 1, "username": "admin", "token": "other", "permissions": "@read"},
        {"id": 2, "username": "builder", "token": "$hash$", "permissions": "@read @report"},
        {"id": 3, "username": "", "token": "x", "permissions": "@read"},
    ]
    assert run_import(handlers, "users", rows, last_id=3) == {"imported": 1, "skipped": 1, "invalid": 1}
    assert db.execute_sql("SELECT username, token, permissions FROM users ORDER BY username").fetchall() == [
        ("admin", "hq-token", "@all"),
        ("builder", "$hash$", "@read @report"),
    ]


def test_a_gc_cycle_in_progress_at_the_source_goes_on_in_hq(handlers):
    # The source is mid-cycle: current mark ABC, T1 marked (kept), T2 not (to be swept).
    run_import(handlers, "config", [{"id": 1, "name": "gc-mark", "value": "ABC"}])
    run_import(handlers, "unihashes_v3", [mapping(T1, U1, gc_mark="ABC"), mapping(T2, U2)], last_id=2)

    def gc(command, body):
        return json.loads(handlers.handle(command, b"", body)[1][0])

    assert gc(p.GC_STATUS, []) == {"keep": 1, "remove": 1, "mark": "ABC"}
    assert gc(p.GC_SWEEP, [b"ABC", b"1"]) == {"count": 1}  # as the source would sweep
    # Another source's mappings, imported while hq has that mark, get it (kept).
    run_import(handlers, "unihashes_v3", [mapping("cd" * 32, U2)], source="other")
    assert gc(p.GC_STATUS, []) == {"keep": 2, "remove": 1, "mark": "ABC"}


def config_rows(handlers):
    return dict(
        handlers.store._sql("SELECT name, value FROM config WHERE name NOT LIKE 'import:%'").fetchall()
    )


def test_config_takes_only_the_gc_mark_and_never_hqs_own_rows(handlers):
    rows = [
        {"id": 1, "name": "schema-version", "value": "99"},
        {"id": 2, "name": "gc-mark", "value": "ABC"},
        {"id": 3, "name": "import:users:src", "value": "999"},
        {"id": 4, "name": "something-else", "value": "x"},
    ]
    assert run_import(handlers, "config", rows, last_id=4) == {"imported": 1, "skipped": 3, "invalid": 0}
    assert config_rows(handlers) == {"schema-version": str(SCHEMA_VERSION), "gc-mark": "ABC"}
    assert status_of(handlers)["users"] == 0


@pytest.mark.parametrize("setup", ["hq has a mark", "hq has mappings"])
def test_config_gc_mark_is_not_taken_into_an_hq_with_gc_state(handlers, setup):
    if setup == "hq has a mark":
        handlers.store._sql("INSERT INTO config (name, value) VALUES ('gc-mark', 'mine')")
    else:
        handlers.store.report_equiv(M, T1, U1)
    reply = run_import(handlers, "config", [{"id": 1, "name": "gc-mark", "value": "ABC"}])
    assert reply == {"imported": 0, "skipped": 1, "invalid": 0}
    assert config_rows(handlers).get("gc-mark") == ("mine" if setup == "hq has a mark" else None)


def test_a_null_gc_mark_means_no_mark(handlers):
    assert run_import(handlers, "config", [{"id": 1, "name": "gc-mark", "value": None}])["skipped"] == 1
    assert "gc-mark" not in config_rows(handlers)


# --- checkpoints -------------------------------------------------------------------------


def test_import_status_reports_each_tables_checkpoint_per_source(handlers):
    assert status_of(handlers) == {"users": 0, "config": 0, "unihashes_v3": 0, "outhashes_v2": 0}
    run_import(handlers, "unihashes_v3", [mapping(T1, U1)], last_id=41)
    run_import(handlers, "outhashes_v2", [outhash(T1, O1)], last_id=7, source="/other/file.db")
    assert status_of(handlers) == {"users": 0, "config": 0, "unihashes_v3": 41, "outhashes_v2": 0}
    assert status_of(handlers, "/other/file.db")["outhashes_v2"] == 7
    name = imp.checkpoint_name("unihashes_v3", "src")
    assert handlers.store._sql("SELECT value FROM config WHERE name = ?", (name,)).fetchone() == ("41",)


@pytest.mark.sqlite_only
@pytest.mark.parametrize("failing", ["config", "unihashes"])
def test_the_checkpoint_commits_with_the_rows_or_neither_does(handlers, failing):
    """A real SQLite failure part-way through the transaction (a trigger aborting the
    checkpoint's insert, or the rows' insert) leaves neither the rows nor the checkpoint."""
    db = handlers.store.db
    run_import(handlers, "unihashes_v3", [mapping(T1, U1)], last_id=10)
    db.execute_sql(
        f"CREATE TRIGGER fail BEFORE INSERT ON {failing} BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
    )
    status, _ = handlers.handle(p.IMPORT, b"", body("unihashes_v3", [mapping(T2, U2)], last_id=20))
    assert status != p.OK
    assert handlers.store.get_unihashes(M, [T2]) == [None]
    assert status_of(handlers)["unihashes_v3"] == 10
    db.execute_sql("DROP TRIGGER fail")
    assert run_import(handlers, "unihashes_v3", [mapping(T2, U2)], last_id=20)["imported"] == 1
    assert status_of(handlers)["unihashes_v3"] == 20


@pytest.mark.sqlite_only
def test_a_chunk_is_one_write_transaction(handlers):
    sql = []
    handlers.store.db.connection().set_trace_callback(sql.append)
    try:
        run_import(handlers, "outhashes_v2", [outhash("%040x" % i, O1) for i in range(20)], last_id=20)
    finally:
        handlers.store.db.connection().set_trace_callback(None)
    writes = [s for s in sql if s.startswith(("BEGIN", "COMMIT", "INSERT"))]
    assert writes[0] == "BEGIN IMMEDIATE" and writes[-1] == "COMMIT"
    assert sum(s.startswith("BEGIN") for s in sql) == 1 and sum(s.startswith("COMMIT") for s in sql) == 1
    assert any("import:outhashes_v2:src" in s for s in writes)


@pytest.mark.sqlite_only
def test_a_database_file_moved_away_refuses_the_import_with_storage(handlers, tmp_path):
    path = tmp_path / "hq.db"
    path.rename(tmp_path / "away.db")
    try:
        status, reply = handlers.handle(p.IMPORT, b"", body("unihashes_v3", [mapping(T1, U1)]))
    finally:
        (tmp_path / "away.db").rename(path)
    assert status == p.E_STORAGE, reply
    assert status_of(handlers)["unihashes_v3"] == 0
    assert run_import(handlers, "unihashes_v3", [mapping(T1, U1)])["imported"] == 1  # back: writes resume


# --- bad bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames, code",
    [
        (body("unihashes_v3", ["{not json"]), p.E_BAD_REQUEST),
        (body("unihashes_v3", [json.dumps(mapping(T1, U1)), "[1, 2]"]), p.E_BAD_REQUEST),
        (body("unihashes_v3", [json.dumps(mapping(T1, U1)), ""]), p.E_BAD_REQUEST),  # empty line
        (body("unihashes_v3", ['{"a": 1}, {"b": 2}']), p.E_BAD_REQUEST),  # two values on one line
        ([b"src", b"unihashes_v3", b"1", b"\xff\xfe"], p.E_BAD_REQUEST),
        (body("unihashes_v2", [mapping(T1, U1)]), p.E_INVALID),
        (body("methods", [mapping(T1, U1)]), p.E_INVALID),
        (body("unihashes_v3", [mapping(T1, U1)] * 1001), p.E_TOO_LARGE),
        (body("unihashes_v3", [mapping(T1, U1)], last_id=-1), p.E_BAD_REQUEST),
        (body("unihashes_v3", [mapping(T1, U1)], last_id="1.5"), p.E_BAD_REQUEST),
        (body("unihashes_v3", [mapping(T1, U1)], last_id=""), p.E_BAD_REQUEST),
        (body("unihashes_v3", [mapping(T1, U1)], last_id="1" * 19), p.E_BAD_REQUEST),
        (body("unihashes_v3", [{"method": M, "taskhash": T1}]), p.E_INVALID),  # lacks columns
        (body("unihashes_v3", [mapping(T1, U1)], source=""), p.E_INVALID),
        (body("unihashes_v3", [mapping(T1, U1)], source="x" * 257), p.E_INVALID),
        (body("unihashes_v3", [mapping(T1, U1)])[:3], p.E_BAD_REQUEST),  # frame missing
    ],
)
def test_bad_import_bodies_get_their_codes_and_write_nothing(handlers, frames, code):
    status, reply = handlers.handle(p.IMPORT, b"", frames)
    assert status == code, reply
    assert handlers.store.get_unihashes(M, [T1]) == [None]
    assert status_of(handlers) == dict.fromkeys(p.IMPORT_TABLES, 0)


def test_import_status_checks_its_source(handlers):
    assert handlers.handle(p.IMPORT_STATUS, b"", [b""])[0] == p.E_INVALID
    assert handlers.handle(p.IMPORT_STATUS, b"", [])[0] == p.E_BAD_REQUEST


# --- a whole file, chunk by chunk, as hq-admin sends it ---------------------------------------


@pytest.mark.sqlite_only
def test_a_whole_hashserv_file_imports_to_the_same_equivalences(handlers, tmp_path):
    source = tmp_path / "hashserv.db"
    facts = populate(source, tasks=400, big_siginfo=2)
    conn = open_source(str(source))
    for table in p.IMPORT_TABLES:
        for last_id, lines, dropped in read_chunks(conn, table, 0, 100):
            assert dropped == 0
            assert run_import(handlers, table, lines, last_id=last_id)["invalid"] == (
                1 if facts["bad_taskhash"] in "".join(lines) else 0
            )
    conn.close()
    # hq took its gc mark from this source: every mapping keeps its own mark, as there.
    assert hq_state(tmp_path / "hq.db") == expected_hq_state(source)
    # Equivalent taskhashes keep sharing their unihash, and a new one joins them.
    for method, out, unihash in facts["equivalent"][:20]:
        assert handlers.store.report(method, "f" * 64, out, U2) == unihash
        handlers.store._sql("DELETE FROM unihashes WHERE taskhash = ?", (bytes.fromhex("f" * 64),))
        handlers.store._sql("DELETE FROM outhashes WHERE taskhash = ?", (bytes.fromhex("f" * 64),))


# --- hq-admin's side: reading the source file ----------------------------------------------


def test_read_chunks_splits_by_rows_and_by_bytes(tmp_path):
    path = tmp_path / "hashserv.db"
    db = HashservDB(path)
    for i in range(25):
        siginfo = "x" * (CHUNK_BYTES // 3) if i in (3, 4, 5, 6, 7) else None
        db.report(
            M, "%040x" % i, "%064x" % i, "%064x" % (i + 1), "2026-11-27 12:00:00", outhash_siginfo=siginfo
        )
    db.close()
    conn = open_source(str(path))
    chunks = list(read_chunks(conn, "outhashes_v2", 0, 10))
    conn.close()
    # Rows 4-8 are a third of CHUNK_BYTES each: two fit in a chunk, a third does not.
    assert [len(lines) for _, lines, _ in chunks] == [5, 2, 10, 8]
    assert [last for last, _, _ in chunks] == [5, 7, 17, 25]
    assert all(sum(len(line) + 1 for line in lines) <= CHUNK_BYTES for _, lines, _ in chunks)
    assert [json.loads(line)["taskhash"] for line in chunks[0][1]] == ["%040x" % i for i in range(5)]


def test_read_chunks_resumes_after_an_id(tmp_path):
    path = tmp_path / "hashserv.db"
    populate(path, tasks=50, big_siginfo=0)
    conn = open_source(str(path))
    every = [json.loads(line) for _, lines, _ in read_chunks(conn, "unihashes_v3", 0, 1000) for line in lines]
    ids = [row[0] for row in conn.execute("SELECT id FROM unihashes_v3 ORDER BY id")]
    chunks = list(read_chunks(conn, "unihashes_v3", ids[19], 7))
    conn.close()
    assert [json.loads(line) for _, lines, _ in chunks for line in lines] == every[20:]
    assert [len(lines) for _, lines, _ in chunks][:-1] == [7] * (len(chunks) - 1)
    rest = ids[20:]
    assert [last for last, _, _ in chunks] == [
        rest[min(i + 6, len(rest) - 1)] for i in range(0, len(rest), 7)
    ]


@pytest.mark.parametrize("content", ["missing", "empty", "garbage", "old schema", "other tables"])
def test_open_source_refuses_what_is_not_a_hashserv_database(tmp_path, content):
    path = tmp_path / "file.db"
    if content == "empty":
        path.write_bytes(b"")
    elif content == "garbage":
        path.write_bytes(b"this is not sqlite" * 100)
    elif content in ("old schema", "other tables"):
        with sqlite3.connect(path) as conn:
            conn.execute(
                "CREATE TABLE %s (id INTEGER PRIMARY KEY)"
                % ("unihashes_v2" if content == "old schema" else "foo")
            )
    with pytest.raises(SourceError) as err:
        open_source(str(path))
    assert str(path) in str(err.value)
    if content == "old schema":
        assert "older bitbake-hashserv" in str(err.value)
