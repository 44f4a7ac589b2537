"""The disk fills, or the database file is moved away or replaced: reports are refused at once
with a clear error, lookups go on, no process dies, and writes resume once the fault clears."""

import json
import os
import shutil
import sqlite3
import subprocess
import time

import pytest

from helpers import Stack, wait_for
from hq.client import ServerError, create_client
from hq.protocol import E_STORAGE
from hq.workers import companions

M = "TestMethod"


def fresh(i):
    return "%064x" % (i * 7919 + 1), "%064x" % (i * 104729 + 3), "%064x" % (i * 1299709 + 5)


def report_fails_fast(client, i, words):
    """A report is refused at once: the server answers STORAGE, which the client raises as a
    ServerError (a ConnectionError for BitBake) without retrying. That the client never
    retries a STORAGE answer is tested exactly in tests/unit/test_client_policy.py; here the
    bound only says the server answered within the first attempt (a third of the timeout),
    not after a retry loop or a resend."""
    t, o, u = fresh(i)
    start = time.monotonic()
    with pytest.raises(ServerError) as info:
        client.report_unihash(t, M, o, u)
    assert time.monotonic() - start < client.timeout / 3
    assert info.value.code == E_STORAGE, str(info.value)
    assert any(w in str(info.value) for w in words), str(info.value)


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs: a real filesystem that fills up."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def run_stack(tmp_path, db_dir):
    stack = Stack(tmp_path, workers=2)
    stack.db = str(db_dir / "hq.db")
    stack.argv[stack.argv.index("--db") + 1] = stack.db
    return stack.start()


def test_disk_full_then_freed(tmp_path, tmpfs):
    filler = tmpfs / "filler"
    stack = run_stack(tmp_path, tmpfs)
    try:
        with create_client(stack.address, timeout=10) as c:
            pids = {n: p.pid for n, p in stack.children().items()}
            t0, o0, u0 = fresh(0)
            assert c.report_unihash(t0, M, o0, u0)["unihash"] == u0
            with open(filler, "wb") as fh:  # take the rest of the disk
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError:
                    pass
            big = {"outhash_siginfo": "s" * 200_000}
            with pytest.raises(ConnectionError) as info:
                for i in range(1, 40):
                    t, o, u = fresh(i)
                    c.report_unihash(t, M, o, u, big)
            assert "full" in str(info.value)
            report_fails_fast(c, 100, ["full"])
            assert c.get_unihash(M, t0) == u0  # lookups keep working
            filler.unlink()  # the fault clears
            t, o, u = fresh(200)
            assert c.report_unihash(t, M, o, u)["unihash"] == u
            assert {n: p.pid for n, p in stack.children().items()} == pids  # nothing restarted
    finally:
        assert stack.stop() == 0


def _reports(client, t, o, u):
    try:
        return client.report_unihash(t, M, o, u)["unihash"] == u
    except ConnectionError:
        return False


def test_database_moved_away_and_back(tmp_path):
    stack = Stack(tmp_path, workers=2).start()
    try:
        with create_client(stack.address, timeout=10) as c:
            pids = {n: p.pid for n, p in stack.children().items()}
            t0, o0, u0 = fresh(0)
            assert c.report_unihash(t0, M, o0, u0)["unihash"] == u0
            os.rename(stack.db, stack.db + ".moved")
            # At once, every worker refuses writes: SQLite would otherwise write into a file
            # nobody can open again, and acknowledged reports would be lost.
            for i in range(1, 6):
                report_fails_fast(c, i, ["removed"])
            assert c.get_unihash(M, t0) == u0
            os.rename(stack.db + ".moved", stack.db)
            wait_for(lambda: _reports(c, *fresh(3)), 5, 0.05, "writes resume")
            assert {n: p.pid for n, p in stack.children().items()} == pids
        stack.stop()
        # Everything acknowledged is in the file at the path.
        with Stack(tmp_path, workers=1) as again, create_client(again.address, timeout=10) as c:
            assert c.get_unihash_batch([(M, fresh(i)[0]) for i in (0, 3)]) == [fresh(0)[2], fresh(3)[2]]
    finally:
        stack.stop()


def test_database_replaced_is_reopened(tmp_path):
    stack = Stack(tmp_path, workers=2).start()
    try:
        with create_client(stack.address, timeout=10) as c:
            t0, o0, u0 = fresh(0)
            assert c.report_unihash(t0, M, o0, u0)["unihash"] == u0
            # An admin restores an (empty) copy over the live file.
            os.rename(stack.db, stack.db + ".old")
            for suffix in ("-wal", "-shm"):
                if os.path.exists(stack.db + suffix):
                    os.rename(stack.db + suffix, stack.db + ".old" + suffix)
            sqlite3.connect(stack.db).close()  # a new, empty database file at the path
            wait_for(lambda: _reports(c, *fresh(4)), 5, 0.05, "writes to the new file")
            # Within a heartbeat every worker reads the new file too.
            wait_for(
                lambda: all(c.get_unihash(M, fresh(4)[0]) == fresh(4)[2] for _ in range(6)),
                5,
                0.05,
                "all workers on the new file",
            )
            assert c.get_unihash(M, t0) is None  # the old file's rows are not in the new one
    finally:
        stack.stop()


def reports_around_a_backup(client, db: str, backup: str, n: int) -> tuple:
    """``n`` reports, an online backup of ``db`` into ``backup`` (``VACUUM INTO``, as README
    says), ``n`` more reports (only in the live file, in its WAL): both lists."""
    batch, later = [fresh(i) for i in range(n)], [fresh(i) for i in range(n, 2 * n)]
    for t, o, u in batch:
        assert client.report_unihash(t, M, o, u)["unihash"] == u
    with sqlite3.connect(db) as reader:
        reader.execute("VACUUM INTO ?", (backup,))
    for t, o, u in later:
        assert client.report_unihash(t, M, o, u)["unihash"] == u
    return batch, later


def test_a_backup_moved_over_the_live_file_is_served_whole(tmp_path):
    """The natural restore: `mv backup.db hq.db` while hq runs, the live file's -wal and
    -shm left in place. A new connection would read the old file's WAL into the backup and
    corrupt it ("database disk image is malformed"); the workers set those aside first."""
    stack = Stack(tmp_path, workers=2).start()
    try:
        with create_client(stack.address, timeout=10) as c:
            backup = str(tmp_path / "backup.db")
            batch, later = reports_around_a_backup(c, stack.db, backup, 100)
            assert os.path.getsize(stack.db + "-wal") > 0
            restored = "%d:%d:" % (os.stat(backup).st_dev, os.stat(backup).st_ino)
            os.rename(backup, stack.db)

            def every_worker_on_the_restored_file():  # its identity, in each one's heartbeat
                workers = c.get_stats()["workers"]
                return len(workers) == 2 and all(w["db"].get("id", "").startswith(restored) for w in workers)

            wait_for(every_worker_on_the_restored_file, 5, 0.05, "every worker on the restored file")
            assert c.get_unihash_batch([(M, t) for t, _, _ in batch]) == [u for _, _, u in batch]
            assert c.get_unihash_batch([(M, t) for t, _, _ in later]) == [None] * len(later)
            after = [fresh(i) for i in range(200, 300)]
            for t, o, u in after:
                assert c.report_unihash(t, M, o, u)["unihash"] == u
            aside = sorted(f for f in os.listdir(tmp_path) if ".replaced-" in f)
            assert [f.split(".replaced-")[0] for f in aside] == ["hq.db-shm", "hq.db-wal"]
        assert stack.stop() == 0
        # A clean stop: the record of whose the WAL is goes with the WAL. (SQLite removes the
        # WAL at the last close, unless two workers close at the same instant and each sees
        # the other: then both stay, the record naming this very file's WAL.)
        left = sorted(f for f in os.listdir(tmp_path) if f.startswith("hq.db-") and ".replaced-" not in f)
        if "hq.db-wal" in left:
            assert left == ["hq.db-broker.lock", "hq.db-hq-wal.json", "hq.db-shm", "hq.db-wal"]
            assert json.loads((tmp_path / "hq.db-hq-wal.json").read_text())["-wal"] == list(
                companions.file_id(stack.db + "-wal")
            )
        else:
            assert left == ["hq.db-broker.lock"]  # (the lock's file stays; its lock died)
        with sqlite3.connect(stack.db) as check:
            assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        with Stack(tmp_path, workers=1) as again, create_client(again.address, timeout=10) as c:
            wanted = batch + after
            assert c.get_unihash_batch([(M, t) for t, _, _ in wanted]) == [u for _, _, u in wanted]
    finally:
        stack.stop()


def crash(stack) -> None:
    """SIGKILL the workers, the broker, then hq-server: the WAL stays, as after a power cut
    of the processes (hq-server's death would otherwise stop its children cleanly)."""
    children = stack.children()
    for name in sorted(children, reverse=True):  # hq-worker-NN first, hq-broker last
        children[name].kill()
    for child in children.values():
        child.wait(timeout=20)
    stack.proc.kill()
    stack.proc.wait(timeout=20)


@pytest.mark.parametrize("replaced", [False, True], ids=["crashed", "crashed-then-restored"])
def test_after_a_crash_the_wal_is_recovered_unless_the_file_was_replaced(tmp_path, replaced):
    """A crash leaves committed reports in the WAL: the next start recovers them. If the file
    was replaced meanwhile (a backup moved in while hq was down), that WAL is the old file's:
    the next start sets it aside instead of reading it into the backup."""
    stack = Stack(tmp_path, workers=2).start()
    try:
        with create_client(stack.address, timeout=10) as c:
            backup = str(tmp_path / "backup.db")
            batch, later = reports_around_a_backup(c, stack.db, backup, 50)
        crash(stack)
        assert os.path.getsize(stack.db + "-wal") > 0  # acknowledged, not yet checkpointed
        if replaced:
            os.rename(backup, stack.db)
        (tmp_path / "again").mkdir()  # (the crashed stack's endpoint file stays in tmp_path)
        with Stack(tmp_path / "again", db=stack.db) as again, create_client(again.address, timeout=10) as c:
            wanted = [u for _, _, u in batch] + [None if replaced else u for _, _, u in later]
            assert c.get_unihash_batch([(M, t) for t, _, _ in batch + later]) == wanted
            t, o, u = fresh(200)
            assert c.report_unihash(t, M, o, u)["unihash"] == u
        with sqlite3.connect(stack.db) as check:
            assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        aside = sorted(f.split(".replaced-")[0] for f in os.listdir(tmp_path) if ".replaced-" in f)
        assert aside == (["hq.db-shm", "hq.db-wal"] if replaced else [])
    finally:
        stack.stop()


def test_a_replaced_file_whose_old_wal_cannot_be_moved_is_not_opened(tmp_path):
    """The directory is not writable for hq when the backup is moved over the live file: the
    old WAL cannot be set aside, so the workers stay on the old file (lookups go on, writes
    are refused) until it can, instead of opening the new file with the old WAL."""
    (tmp_path / "db").mkdir()
    stack = without_root_override(Stack(tmp_path, workers=2, db=str(tmp_path / "db" / "hq.db"))).start()
    try:
        with create_client(stack.address, timeout=10) as c:
            backup = str(tmp_path / "backup.db")
            [first], [later] = reports_around_a_backup(c, stack.db, backup, 1)
            os.chmod(tmp_path / "db", 0o555)
            os.rename(backup, stack.db)  # as root: the workers could not have
            wait_for(
                lambda: "cannot set aside the replaced file's WAL" in stack.log(), 5, 0.05, "a worker noticed"
            )
            for i in range(2, 6):
                report_fails_fast(c, i, ["cannot be set aside"])
            assert c.get_unihash(M, later[0]) == later[2]  # still the old file
            os.chmod(tmp_path / "db", 0o755)  # the fault clears
            wait_for(lambda: c.get_unihash(M, later[0]) is None, 5, 0.05, "the restored file served")
            wait_for(lambda: _reports(c, *fresh(10)), 5, 0.05, "writes resume")
            assert c.get_unihash(M, first[0]) == first[2]
        assert stack.stop() == 0
        with sqlite3.connect(stack.db) as check:
            assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        os.chmod(tmp_path / "db", 0o755)
        stack.stop()


def without_root_override(stack):
    """Make file modes bind the stack: as root, run it without CAP_DAC_OVERRIDE."""
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is missing: file modes would not apply")
        stack.argv[:0] = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    return stack


def test_database_made_read_only_then_writable(tmp_path):
    stack = without_root_override(Stack(tmp_path, workers=2)).start()
    try:
        with create_client(stack.address, timeout=10) as c:
            t0, o0, u0 = fresh(0)
            assert c.report_unihash(t0, M, o0, u0)["unihash"] == u0
            os.chmod(stack.db, 0o444)
            # The workers' descriptors are still writable; they refuse writes anyway.
            for i in range(1, 6):
                report_fails_fast(c, i, ["read-only"])
            assert c.get_unihash(M, t0) == u0
            # A worker restarted meanwhile opens the file read-only: it serves lookups and
            # refuses writes with the same reason, and does not crash-loop.
            victim = stack.children()["hq-worker-00"]
            victim.kill()
            wait_for(
                lambda: (
                    stack.children().get("hq-worker-00") not in (None, victim)
                    and len(c.get_stats()["workers"]) == 2
                ),
                10,
                0.05,
                "worker restarted",
            )
            restarted = {n: p.pid for n, p in stack.children().items()}
            for i in range(6, 12):
                report_fails_fast(c, i, ["read-only"])
                assert c.get_unihash(M, t0) == u0
            os.chmod(stack.db, 0o644)  # the fault clears
            wait_for(lambda: _reports(c, *fresh(20)), 5, 0.05, "writes resume")
            # Every worker writes again, including the one that opened the file read-only.
            for i in range(21, 41):
                t, o, u = fresh(i)
                assert c.report_unihash(t, M, o, u)["unihash"] == u
            assert {n: p.pid for n, p in stack.children().items()} == restarted
            assert "Traceback" not in stack.log()
    finally:
        os.chmod(stack.db, 0o644)
        stack.stop()
