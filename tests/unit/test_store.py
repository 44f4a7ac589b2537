"""Worker semantics against a real temporary SQLite file and a real PostgreSQL schema
(reference §7.2-7.4)."""

import os
import sqlite3

import pytest

from hq.workers.schema import from_key, open_database, settings_in_force, to_key
from hq.workers.store import store_for

M = "TestMethod"
T1 = "35788efcb8dfb0a02659d81cf2bfd695fb30faf9"
T2 = "3bf6f1e89d26205aec90da04854fbdbf73afe6b4"
T3 = "8aa96fcffb5831b3c2c0cb75f0431e3f8b20554a"
O1 = "2765d4a5884be49b28601445c2760c5f21e7e5c0ee2b7e3fce98fd7e5970796f"
O2 = "0904a7fe3dc712d9fd8a74a616ddca2a825a8ee97adf0bd3fc86082c7639914d"
U1 = "a69ec97f5af2e21e1a1f9cc8896965515d5559425666f734e245a3d40cee33d9"
U2 = "bf6e81926066f770e960f9f777cd088c62bea9addb7745f3e77deaa81a645747"
U3 = "9217a7d6c5c6a47d1b8e6fd1b3d0b87a3c6a2f5b3e6e2b0b4e1e1c9a8f7d6e5c"


@pytest.fixture
def store(db_spec):
    store = store_for(open_database(db_spec))
    yield store
    store.db.close()


def test_create_hash(store):
    assert store.report(M, T1, O1, U1) == U1
    assert store.get_unihashes(M, [T1]) == [U1]


def test_create_equivalent(store):
    store.report(M, T1, O1, U1)
    # A different taskhash with the same outhash gets the first unihash.
    assert store.report(M, T2, O1, U2) == U1
    assert store.get_unihashes(M, [T2, T1]) == [U1, U1]


def test_duplicate_taskhash_keeps_first_unihash(store):
    assert store.report(M, T1, O1, U1) == U1
    assert store.report(M, T1, O2, U2) == U1
    assert store.get_unihashes(M, [T1]) == [U1]
    # Re-reporting the same triple is a no-op with the same answer.
    assert store.report(M, T1, O1, U3) == U1


def test_diverging_report_race(store):
    store.report(M, T1, O1, U1)
    assert store.report(M, T2, O1, U2) == U1  # T2 made equivalent to T1
    # T2 then reports a different outhash: it keeps the unihash it was given.
    assert store.report(M, T2, O2, U2) == U1
    assert store.get_unihashes(M, [T2]) == [U1]
    # A third task with T2's new outhash is equivalent to T2's mapping.
    assert store.report(M, T3, O2, U3) == U1


def test_diverging_report_reverse_race(store):
    assert store.report(M, T2, O2, U2) == U2  # T2 first, with its own unihash
    assert store.report(M, T1, O1, U1) == U1
    # T2 later reports an outhash shared with an older task: it keeps its own.
    assert store.report(M, T2, O1, U3) == U2
    assert store.get_unihashes(M, [T2, T1]) == [U2, U1]


def test_equivalence_goes_to_the_oldest_report(store):
    store.report(M, T1, O1, U1)
    store.report(M, T2, O2, U2)
    store.report(M, T2, O1, U2)  # T2 also reports O1, later than T1 did
    assert store.report(M, T3, O1, U3) == U1


def test_equivalence_needs_a_mapping(store):
    store.report(M, T1, O1, U1)
    store._sql("DELETE FROM unihashes")  # T1's report has no mapping now
    assert store.report(M, T2, O1, U2) == U2
    # An existing triple whose mapping was removed is mapped again, as bitbake-hashserv 2.19
    # does (its documentation, §13.6, says it stores nothing): here to T2's, equivalent.
    assert store.report(M, T1, O1, U3) == U2
    assert store.get_unihashes(M, [T1, T2]) == [U2, U2]


def test_a_report_made_again_after_its_mapping_went_is_mapped_again(store):
    assert store.report(M, T1, O1, U1) == U1
    store._sql("DELETE FROM unihashes")  # remove, or a gc-sweep: the output row stays
    assert store.get_unihashes(M, [T1]) == [None]
    assert store.report(M, T1, O1, U2) == U2  # no equivalent mapped: the submitted one
    assert store.get_unihashes(M, [T1]) == [U2]
    assert store.report(M, T1, O1, U3) == U2  # mapped now: the first mapping wins


def test_method_is_part_of_every_key(store):
    store.report(M, T1, O1, U1)
    assert store.get_unihashes("Other", [T1]) == [None]
    assert store.report("Other", T2, O1, U2) == U2  # same outhash, other method: no equivalence
    assert store.get_full("Other", T1) is None
    assert store.get_outhash("Other", O1)["taskhash"] == T2
    assert store.get_outhash(M, O1)["taskhash"] == T1


def test_report_equiv(store):
    assert store.report_equiv(M, T1, U1) == U1
    assert store.report_equiv(M, T1, U2) == U1  # first mapping wins
    assert store.get_unihashes(M, [T1]) == [U1]
    # A mapping without an outhash row: get all=true is null (reference §7.1)
    assert store.get_full(M, T1) is None


def test_get_full_row(store):
    store.report(
        M,
        T1,
        O1,
        U1,
        {
            "owner": "alice",
            "PN": "busybox",
            "PV": "1.36",
            "PR": "r0",
            "task": "do_package",
            "outhash_siginfo": "x" * 100,
        },
    )
    store.report(M, T1, O2, U2)
    row = store.get_full(M, T1)
    assert row["outhash"] == O1  # oldest report of the taskhash
    assert row["unihash"] == U1
    assert row["gc_mark"] == ""
    assert (row["owner"], row["PN"], row["PV"], row["PR"], row["task"]) == (
        "alice",
        "busybox",
        "1.36",
        "r0",
        "do_package",
    )
    assert row["outhash_siginfo"] == "x" * 100
    assert row["created"].endswith("+00:00")
    assert set(row) == {
        "id",
        "method",
        "taskhash",
        "outhash",
        "created",
        "owner",
        "PN",
        "PV",
        "PR",
        "task",
        "outhash_siginfo",
        "unihash",
        "gc_mark",
    }
    assert store.get_full(M, "0" * 40) is None


def test_get_outhash(store):
    store.report(M, T1, O1, U1)
    store.report(M, T2, O1, U2)
    row = store.get_outhash(M, O1)
    assert (row["taskhash"], row["unihash"]) == (T1, U1)  # the oldest report
    bare = store.get_outhash(M, O1, with_unihash=False)
    assert bare["taskhash"] == T1 and "unihash" not in bare and "gc_mark" not in bare
    assert store.get_outhash(M, O2) is None


def test_unihash_exists(store):
    store.report(M, T1, O1, U1)
    assert store.unihashes_exist([U1, U2, "xyz", U1.upper(), ""]) == [True, False, False, False, False]
    store.report_equiv(M, T2, U2)
    assert store.unihashes_exist([U2]) == [True]


def test_batch_preserves_order_and_duplicates(store):
    store.report(M, T1, O1, U1)
    store.report(M, T2, O2, U2)
    assert store.get_unihashes(M, [T2, "f" * 40, T1, T2]) == [U2, None, U1, U2]


@pytest.mark.parametrize(
    "taskhash",
    [
        "0" * 64,
        "abc",  # odd length hex
        "ABCDEF12",  # upper case is not the same string as lower case
        "${@os.system('true')}",
        "tâche-ü",
        "0x1234",
        "12 34",
    ],
)
def test_any_taskhash_round_trips_exactly(store, taskhash):
    store.report(M, taskhash, O1 + "x", U1)
    assert store.get_unihashes(M, [taskhash]) == [U1]
    assert store.get_full(M, taskhash)["taskhash"] == taskhash
    assert from_key(to_key(taskhash)) == taskhash


def test_upper_and_lower_case_are_different_keys(store):
    store.report_equiv(M, "abcd", U1)
    assert store.get_unihashes(M, ["ABCD", "abcd"]) == [None, U1]


@pytest.mark.sqlite_only
def test_canonical_hex_is_stored_as_blob(store):
    store.report(M, T1, O1, U1)
    kinds = store.db.execute_sql(
        "SELECT typeof(taskhash), typeof(unihash), length(unihash) FROM unihashes"
    ).fetchall()
    assert kinds == [("blob", "blob", 32)]


@pytest.mark.sqlite_only
def test_one_query_per_chunk(store):
    store.report(M, T1, O1, U1)
    store.get_unihashes(M, [T1])  # caches the method id
    statements = []
    store.db.connection().set_trace_callback(statements.append)
    try:
        store.get_unihashes(M, [T1, T2] + ["%040x" % i for i in range(997)])
    finally:
        store.db.connection().set_trace_callback(None)
    assert len(statements) == 1, statements[:3]


@pytest.mark.sqlite_only
def test_settings_in_force(store):
    s = settings_in_force(store.db)
    assert s["journal_mode"] == "wal"
    assert s["synchronous"] == "normal"
    assert s["busy_timeout"] == 200


def test_synchronous_full(tmp_path):
    db = open_database(str(tmp_path / "full.db"), synchronous="full")
    try:
        assert settings_in_force(db)["synchronous"] == "full"
    finally:
        db.close()


@pytest.mark.sqlite_only
def test_two_connections_see_each_others_writes(tmp_path, store):
    store.report(M, T1, O1, U1)
    other = sqlite3.connect(store.db.database)
    try:
        assert other.execute("SELECT count(*) FROM unihashes").fetchone()[0] == 1
    finally:
        other.close()


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    "sql, index",
    [
        ("SELECT unihash FROM unihashes WHERE substr(unihash, 1, 8) IN (?, ?)", "unihashes_unihash8"),
        (
            "SELECT id FROM outhashes WHERE method = ? AND substr(taskhash, 1, 8) = substr(?, 1, 8) "
            "AND taskhash = ?",
            "outhashes_taskhash8",
        ),
        (
            "SELECT id FROM outhashes WHERE method = ? AND substr(outhash, 1, 8) = substr(?, 1, 8) "
            "AND outhash = ? ORDER BY created, id LIMIT 1",
            "outhashes_outhash8",
        ),
    ],
)
def test_queries_use_the_prefix_indexes(store, sql, index):
    plan = " ".join(
        str(row) for row in store.db.execute_sql("EXPLAIN QUERY PLAN " + sql, [b"x"] * sql.count("?"))
    )
    assert index in plan, plan


@pytest.mark.sqlite_only
def test_a_write_waits_for_the_lock_and_heartbeats_meanwhile(store):
    holder = sqlite3.connect(store.db.database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another worker holds the write lock
    waits = []

    def on_wait():
        waits.append(1)
        if len(waits) == 2:
            holder.execute("COMMIT")  # ... and lets go while we wait

    store.on_wait = on_wait
    try:
        assert store.report(M, T1, O1, U1) == U1
    finally:
        holder.close()
    assert len(waits) == 2


@pytest.mark.sqlite_only
def test_a_write_gives_up_after_lock_wait(store):
    holder = sqlite3.connect(store.db.database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    waits = []
    store.on_wait = lambda: waits.append(1)
    store.lock_wait_s = 0.5
    try:
        with pytest.raises(Exception, match="locked"):
            store.report_equiv(M, T1, U1)
    finally:
        holder.close()
    assert len(waits) >= 1
    assert store.report_equiv(M, T1, U1) == U1  # nothing half-done was left behind


@pytest.mark.parametrize(
    "batch",
    [
        ["ab" * 32, "AB" * 32],  # same width, one upper case
        ["abcd", "ab  "],  # spaces that fromhex would skip
        ["abcd", "abc"],  # mixed widths
        ["ab" * 20, "cd" * 20, "ef" * 20],  # all canonical: the fast path
    ],
)
def test_batch_keys_match_one_by_one_keys(store, batch):
    for i, taskhash in enumerate(batch):
        store.report_equiv(M, taskhash, "%064x" % (i + 1))
    assert store.get_unihashes(M, batch) == ["%064x" % (i + 1) for i in range(len(batch))]


@pytest.mark.sqlite_only
def test_writes_stop_while_the_file_is_away_and_resume_when_back(store):
    from hq.workers.store import StorageUnavailable

    store.report(M, T1, O1, U1)
    path = store.db.database
    os.rename(path, path + ".away")
    try:
        with pytest.raises(StorageUnavailable, match="removed"):
            store.report(M, T2, O2, U2)
        assert store.get_unihashes(M, [T1]) == [U1]  # reads go on
    finally:
        os.rename(path + ".away", path)
    assert store.report(M, T2, O2, U2) == U2
