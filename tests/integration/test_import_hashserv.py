"""hq-admin import-hashserv against a real hq-server: a bitbake-hashserv database (a real
SQLite file with the reference's schema) keeps every equivalence in hq, and an interrupted
import resumes exactly where it stopped."""

import datetime
import json
import os
import signal
import sqlite3
import subprocess

import pytest

from hashserv_db import (
    IMPORTER,
    IMPORTER_PASSWORD,
    expected_hq_state,
    hq_state,
    iso_utc,
    populate,
    source_mappings,
    source_outhash_rows,
)
from helpers import Stack, script, wait_for
from hq.client import create_client

U_NEW = "0123456789abcdef" * 4


@pytest.fixture
def stack(tmp_path):
    """hq-server with an admin: importing users needs @user-admin. hq-admin and the tests'
    clients log in as it through BitBake's variables."""
    s = Stack(tmp_path, args=["--admin-user", IMPORTER], env={"HQ_ADMIN_PASSWORD": IMPORTER_PASSWORD}).start()
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(autouse=True)
def logged_in(monkeypatch):
    monkeypatch.setenv("BB_HASHSERVE_USERNAME", IMPORTER)
    monkeypatch.setenv("BB_HASHSERVE_PASSWORD", IMPORTER_PASSWORD)


def hq_admin(stack, *args, timeout=120):
    argv = [
        script("hq-admin"),
        "import-hashserv",
        "--address",
        stack.address if stack else "tcp://127.0.0.1:9",
        *args,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def import_json(stack, path, *args):
    done = hq_admin(stack, str(path), "--format", "json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("hashserv") / "hashserv.db"
    facts = populate(path, tasks=3000, big_siginfo=8)
    return path, facts


def full_row(rows: list, mappings: dict, marks: dict, method: str, taskhash: str):
    """What get_taskhash(all_properties=True) answers, from the source rows (ref. §7.4):
    the oldest report of (method, taskhash) joined with its mapping (whose gc mark hq took
    from the source, as it took the source's current mark)."""
    mine = [r for r in rows if (r["method"], r["taskhash"]) == (method, taskhash)]
    oldest = min(mine, key=lambda r: (datetime.datetime.fromisoformat(iso_utc(r["created"])), r["id"]))
    row = {k: v for k, v in oldest.items() if k != "id"}
    row["created"] = iso_utc(row["created"])
    return {**row, "unihash": mappings[(method, taskhash)], "gc_mark": marks[(method, taskhash)]}


def without_id(row):
    return {k: v for k, v in row.items() if k != "id"} if row else row


def test_an_import_keeps_every_equivalence(stack, source, tmp_path):
    path, facts = source
    data = import_json(stack, path)
    assert data["complete"] and not data["resumed"]
    assert data["source"] == str(path.resolve())
    mappings = source_mappings(path)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        marks = {(m, t): g for m, t, g in conn.execute("SELECT method, taskhash, gc_mark FROM unihashes_v3")}
    rows = source_outhash_rows(path)
    t = data["tables"]
    assert (t["unihashes_v3"]["rows"], t["unihashes_v3"]["imported"], t["unihashes_v3"]["invalid"]) == (
        len(mappings),
        len(mappings) - 1,
        1,
    )
    assert (t["outhashes_v2"]["rows"], t["outhashes_v2"]["imported"], t["outhashes_v2"]["skipped"]) == (
        len(rows),
        len(rows),
        0,
    )
    assert (t["users"]["imported"], t["config"]["imported"]) == (2, 1)
    assert data["chunks"] > 1 + 1 + len(mappings) // 1000 + len(rows) // 1000  # big siginfo split a chunk
    assert hq_state(stack.db) == expected_hq_state(path)

    with create_client(stack.address, timeout=30) as client:
        # Every valid mapping answers exactly as the source; the invalid one is absent.
        keys = list(mappings)
        answers = client.get_unihash_batch(keys)
        for key, answer in zip(keys, answers):
            assert answer == (None if key[1] == facts["bad_taskhash"] else mappings[key]), key
        # Full rows and outhash lookups return the imported rows (hq numbers its own ids).
        for method, taskhash, outhash in facts["reported"][::97]:
            got = client.get_taskhash(method, taskhash, all_properties=True)
            assert without_id(got) == full_row(rows, mappings, marks, method, taskhash)
            got = client.get_outhash(method, outhash, taskhash)
            same = [r for r in rows if (r["method"], r["outhash"]) == (method, outhash)]
            oldest = min(
                same, key=lambda r: (datetime.datetime.fromisoformat(iso_utc(r["created"])), r["id"])
            )
            assert without_id(got) == full_row(rows, mappings, marks, method, oldest["taskhash"])
        big = next(r for r in rows if r["outhash_siginfo"] and len(r["outhash_siginfo"]) > 500_000)
        got = client.get_taskhash(big["method"], big["taskhash"], all_properties=True)
        assert got["outhash_siginfo"] == big["outhash_siginfo"]
        # The equivalences survived: a NEW taskhash reporting an imported outhash gets the
        # imported unihash.
        for i, (method, outhash, unihash) in enumerate(facts["equivalent"][:25]):
            reply = client.report_unihash("%064x" % (10**6 + i), method, outhash, U_NEW)
            assert reply["unihash"] == unihash


def test_running_again_sends_nothing_and_restart_skips_everything(stack, source):
    path, _ = source
    first = import_json(stack, path)
    state = hq_state(stack.db)
    again = import_json(stack, path)
    assert again["resumed"] and again["complete"] and again["chunks"] == 0
    for table, r in again["tables"].items():
        assert r["resumed_after_id"] == first["tables"][table]["last_id"]
        assert (r["sent"], r["imported"]) == (0, 0)
    restart = import_json(stack, path, "--restart")
    assert not restart["resumed"]
    for r in restart["tables"].values():
        assert r["imported"] == 0
        assert r["skipped"] + r["invalid"] == r["sent"] == r["rows"]
    assert restart["tables"]["unihashes_v3"]["invalid"] == 1
    assert hq_state(stack.db) == state


def test_an_import_stopped_after_some_chunks_resumes_where_it_stopped(stack, source):
    path, _ = source
    part = import_json(stack, path, "--source", "site-a", "--max-chunks", "4")
    assert not part["complete"] and part["chunks"] == 4
    with create_client(stack.address, timeout=30) as client:
        checkpoints = client.import_status("site-a")
    assert checkpoints == {t: r["last_id"] for t, r in part["tables"].items()}
    assert 0 < checkpoints["unihashes_v3"] and checkpoints["outhashes_v2"] == 0
    state_part = hq_state(stack.db)
    assert 0 < len(state_part["mappings"]) < len(expected_hq_state(path)["mappings"])

    rest = import_json(stack, path, "--source", "site-a")
    assert rest["complete"] and rest["resumed"]
    for table, r in rest["tables"].items():
        assert r["resumed_after_id"] == part["tables"][table]["last_id"]
        # Nothing sent twice, nothing left out.
        assert part["tables"][table]["sent"] + r["sent"] == r["rows"]
        assert part["tables"][table]["skipped"] + r["skipped"] == 0
    assert hq_state(stack.db) == expected_hq_state(path)


def test_ctrl_c_stops_an_import_and_running_again_finishes_it(stack, source):
    path, _ = source
    argv = [
        script("hq-admin"),
        "import-hashserv",
        str(path),
        "--address",
        stack.address,
        "--chunk-rows",
        "5",
        "--quiet",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with create_client(stack.address, timeout=30) as client:
            wait_for(
                lambda: client.import_status(str(path))["unihashes_v3"] > 0,
                timeout=60,
                what="the first mapping chunks",
            )
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == 130:  # stopped part-way (it may, rarely, have finished first)
        assert "run the same command again to resume" in err
    else:
        assert proc.returncode == 0, err
    data = import_json(stack, path)
    assert data["complete"] and data["resumed"]
    assert hq_state(stack.db) == expected_hq_state(path)


def test_the_table_output_names_every_table(stack, source):
    path, _ = source
    done = hq_admin(stack, str(path), "--max-chunks", "3")
    assert done.returncode == 0, done.stderr
    assert "run again to resume" in done.stdout
    for word in (
        "users",
        "config",
        "unihashes_v3",
        "outhashes_v2",
        "rows in source",
        "resumed after id",
        "invalid",
    ):
        assert word in done.stdout
    assert "hq-admin: importing" in done.stderr  # progress lines, stderr not being a terminal
    quiet = hq_admin(stack, str(path), "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.parametrize("content", ["missing", "not sqlite", "no hashserv tables"])
def test_a_file_that_is_not_a_hashserv_database_exits_1(tmp_path, content):
    path = tmp_path / "file.db"
    if content == "not sqlite":
        path.write_text("hello\n" * 1000)
    elif content == "no hashserv tables":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    done = hq_admin(None, str(path))  # the file is checked before the server is reached
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("hq-admin: ") and str(path) in done.stderr
    assert done.stdout == ""


def test_no_server_exits_3(source):
    path, _ = source
    done = hq_admin(None, str(path), "--timeout", "1")
    assert done.returncode == 3, done.stderr
    assert "cannot reach hq" in done.stderr


def test_the_source_file_is_not_modified(stack, source):
    path, _ = source
    before = (os.stat(path).st_mtime_ns, path.read_bytes())
    import_json(stack, path)
    assert (os.stat(path).st_mtime_ns, path.read_bytes()) == before


def test_importing_users_needs_user_admin_and_no_users_leaves_them_out(tmp_path, source, monkeypatch):
    path, _ = source
    monkeypatch.delenv("BB_HASHSERVE_USERNAME")
    with Stack(tmp_path) as anonymous:  # the reference's default anonymous permissions
        refused = hq_admin(anonymous, str(path), "--quiet")
        assert refused.returncode == 1
        assert refused.stderr == (
            "hq-admin: refused: Anonymous user is not allowed to access permissions(s) "
            "@db-admin, @user-admin\n"
        )
        done = import_json(anonymous, path, "--no-users", "--quiet")
        assert "users" not in done["tables"] and done["tables"]["unihashes_v3"]["imported"] > 0
        assert hq_state(anonymous.db)["users"] == []


def test_rows_bitbake_hashserv_would_not_write_are_counted_invalid_not_a_traceback(stack, source, tmp_path):
    """A hand-edited file: a blob where text belongs, and (in a table of its own making) a
    text id. Each such row is counted invalid; the rest are imported."""
    path = tmp_path / "edited.db"
    with sqlite3.connect(source[0]) as original, sqlite3.connect(path) as copy:
        original.backup(copy)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE outhashes_v2 SET PN = x'ff00fe' WHERE id = (SELECT min(id) FROM outhashes_v2)")
        db.execute("ALTER TABLE config RENAME TO config_old")
        db.execute("CREATE TABLE config (id, name TEXT, value TEXT)")
        db.execute("INSERT INTO config SELECT * FROM config_old")
        db.execute("INSERT INTO config VALUES ('x', 'odd', 'row')")
        db.execute("DROP TABLE config_old")
    done = import_json(stack, path)
    assert done["complete"]
    assert done["tables"]["outhashes_v2"]["invalid"] == 1
    assert done["tables"]["config"]["invalid"] == 1
    rows = done["tables"]["outhashes_v2"]
    assert rows["imported"] == rows["rows"] - 1
