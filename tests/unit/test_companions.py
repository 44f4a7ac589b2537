"""Which file the -wal and -shm beside a database belong to (hq.workers.companions), on real
files: the cases the stacks in tests/integration/test_storage_faults.py do not reach."""

import os

from hq.workers import companions


def files(tmp_path, *names):
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    return str(tmp_path / "hq.db")


def another_file(tmp_path) -> str:
    (tmp_path / "new.db").write_bytes(b"y")
    return str(tmp_path / "new.db")


def test_a_wal_recorded_for_this_file_stays(tmp_path):
    db = files(tmp_path, "hq.db", "hq.db-wal", "hq.db-shm")
    companions.record(db)
    assert companions.set_aside(db)
    assert sorted(os.listdir(tmp_path)) == ["hq.db", "hq.db-hq-wal.json", "hq.db-shm", "hq.db-wal"]


def test_a_wal_recorded_for_a_replaced_file_is_set_aside_and_a_new_one_is_not(tmp_path):
    db = files(tmp_path, "hq.db", "hq.db-wal", "hq.db-shm")
    companions.record(db)
    os.replace(another_file(tmp_path), db)  # a backup moved in
    os.remove(db + "-shm")
    files(tmp_path, "hq.db-shm")  # a -shm made since (not the recorded one)
    assert companions.set_aside(db)
    names = sorted(os.listdir(tmp_path))
    assert [n.split(".replaced-")[0] for n in names if ".replaced-" in n] == ["hq.db-wal"]
    assert "hq.db-shm" in names and "hq.db-wal" not in names


def test_a_record_edited_by_hand_counts_as_none(tmp_path):
    db = files(tmp_path, "hq.db", "hq.db-wal")
    for text in ('{"db": 5, "-wal": 3}', "[1, 2]", '{"db": ["a", 1]}', "not json"):
        (tmp_path / "hq.db-hq-wal.json").write_text(text)
        assert companions.set_aside(db)
        assert os.path.exists(db + "-wal")


def test_without_a_record_what_the_worker_saw_decides(tmp_path):
    db = files(tmp_path, "hq.db", "hq.db-wal")
    seen = companions.identities(db)
    os.replace(another_file(tmp_path), db)
    assert companions.set_aside(db, known=seen)
    assert not os.path.exists(db + "-wal")


def wal_connection(db: str):
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    return conn


def test_a_clean_stop_removes_the_record_a_later_file_cannot_be_taken_for_it(tmp_path):
    """The last connection closed: SQLite removed the -wal and -shm, and the record goes.
    Another program's WAL made after a restore is then never set aside, whatever inode
    numbers it was given."""
    db = str(tmp_path / "hq.db")
    first, second = wal_connection(db), wal_connection(db)
    companions.record(db)
    first.close()
    companions.forget(db)  # one worker stopped, another still has the file: kept
    assert os.path.exists(db + companions.RECORD) and os.path.exists(db + "-wal")
    second.close()
    assert not os.path.exists(db + "-wal")
    companions.forget(db)
    assert not os.path.exists(db + companions.RECORD)
    os.replace(another_file(tmp_path), db)  # a backup moved in, another program crashed on it
    files(tmp_path, "hq.db-wal")
    assert companions.set_aside(db)
    assert sorted(os.listdir(tmp_path)) == ["hq.db", "hq.db-wal"]
