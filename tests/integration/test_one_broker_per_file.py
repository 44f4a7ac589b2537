"""One SQLite file serves one broker (hq.workers.brokerlock): a second stack or a worker of
another broker on a live file is refused in one line, the workers of one broker share it
however they spell its address, a read-only mirror shares any file, and a lock dies with its
process. Real processes, real files, real flock."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess

import pytest

from helpers import Stack, script, wait_for
from hq.client import create_client
from hq.workers.brokerlock import BrokerLock, HeldByAnother, broker_identity, holder, lock_path

M = "TestMethod"
T = "35788efcb8dfb0a02659d81cf2bfd695fb30faf9"
O = "2765d4a5884be49b28601445c2760c5f21e7e5c0ee2b7e3fce98fd7e5970796f"  # noqa: E741
U = "a69ec97f5af2e21e1a1f9cc8896965515d5559425666f734e245a3d40cee33d9"


def run(argv, cwd=None, timeout=30):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def refused_in_one_line(result, owner_backend: str) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "one SQLite file serves one broker" in lines[0]
    assert owner_backend in lines[0]
    return lines[0]


def files(db) -> dict:
    """What a writer would change: each file's size, time and (the lock's) text."""
    out = {}
    for suffix in ("", "-wal", "-broker.lock"):  # (-shm changes with every read)
        st = os.stat(db + suffix)
        out[suffix] = (st.st_size, st.st_mtime_ns)
    with open(lock_path(db)) as fh:
        out["text"] = fh.read()
    return out


def owner(db) -> dict:
    with open(lock_path(str(db))) as fh:
        return json.load(fh)


def test_a_second_stack_on_a_live_file_is_refused_and_starts_once_it_is_free(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with Stack(tmp_path / "a") as first:
        with create_client(first.address, timeout=10) as client:
            client.report_unihash(T, M, O, U)
        held = owner(first.db)["broker"]
        assert held.startswith("ipc://") and held.endswith("backend.ipc")
        before = files(first.db)
        second = run([script("hq-server"), "--db", first.db, "--bind", "tcp://127.0.0.1:*"])
        refused_in_one_line(second, held)
        assert files(first.db) == before  # nothing written by the refused one
        with create_client(first.address, timeout=10) as client:
            assert client.get_unihash(M, T) == U  # the first stack is untouched
    with Stack(tmp_path / "b", db=first.db) as again:  # free now: it starts, and has it all
        assert owner(first.db)["broker"] != held
        with create_client(again.address, timeout=10) as client:
            assert client.get_unihash(M, T) == U


def test_workers_of_one_broker_share_the_file_and_another_brokers_are_refused(tmp_path):
    backend = tmp_path / "backend.ipc"
    with Stack(tmp_path, args=["--backend", f"ipc://{backend}"]) as stack:
        # Another broker's worker: refused in one line, before it registers anywhere.
        before = files(stack.db)
        other = run([script("hq-worker"), "--db", stack.db, "--backend", f"ipc://{tmp_path}/other.ipc"])
        refused_in_one_line(other, f"ipc://{backend}")
        assert files(stack.db)["text"] == before["text"]
        # The same broker, its address spelled relative to another directory: it joins.
        (tmp_path / "elsewhere").mkdir()
        argv = [script("hq-worker"), "--db", stack.db, "--backend", "ipc://../backend.ipc", "--name", "third"]
        argv += ["--heartbeat-interval", "0.2"]
        third = subprocess.Popen(argv, cwd=tmp_path / "elsewhere", stderr=subprocess.PIPE, text=True)
        try:
            with create_client(stack.address, timeout=10) as client:

                def names():
                    return {w["name"] for w in client.get_stats()["workers"]}

                wait_for(lambda: "third" in names(), timeout=20, what="the third worker registered")
                assert len(names()) == 3
        finally:
            third.terminate()
            _, err = third.communicate(timeout=20)
        assert third.returncode == 0 and "Traceback" not in err, err


def test_a_read_only_mirror_takes_no_lock_and_refuses_nothing_it_should_serve(tmp_path):
    """The mirror first, then the read-write stack (the other order is in test_users)."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    db = str(tmp_path / "hq.db")
    with Stack(tmp_path / "ro", db=db, args=["--read-only"]) as mirror:
        assert holder(db) is None
        with Stack(tmp_path / "rw", db=db) as live:
            with create_client(live.address, timeout=10) as writer:
                writer.report_unihash(T, M, O, U)
            with create_client(mirror.address, timeout=10) as reader:
                assert reader.get_unihash(M, T) == U
            # A mirror's worker (--read-only) starts beside the live stack: it takes no lock.
            log = tmp_path / "mirror-worker.log"
            argv = [script("hq-worker"), "--db", db, "--backend", f"ipc://{tmp_path}/x.ipc", "--read-only"]
            with open(log, "w") as err:
                worker = subprocess.Popen([*argv, "--log-level", "INFO"], stderr=err)
            try:
                wait_for(lambda: "connecting to" in log.read_text(), timeout=20, what="the worker serving")
                assert "broker" in owner(db) and owner(db)["broker"].endswith("backend.ipc")
            finally:
                worker.terminate()
                assert worker.wait(timeout=20) == 0, log.read_text()


def test_a_read_only_worker_under_a_writing_broker_is_given_no_writes(tmp_path):
    """hq-worker --read-only joined to a stack that writes (a unit file gone wrong): it says
    so in READY, the broker logs it, shows it, and every report goes to the worker that
    writes, while lookups are still answered."""
    db = str(tmp_path / "hq.db")
    with Stack(tmp_path, db=db, workers=1) as live:
        log = tmp_path / "ro-worker.log"
        argv = [script("hq-worker"), "--db", db, "--backend", owner(db)["broker"], "--read-only"]
        argv += ["--name", "mirror", "--heartbeat-interval", "0.2"]
        with open(log, "w") as err:
            worker = subprocess.Popen(argv, stderr=err)
        try:
            with create_client(live.address, timeout=10) as client:
                workers = wait_for(
                    lambda: [w for w in client.get_stats()["workers"] if w["name"] == "mirror"],
                    timeout=20,
                    what="the read-only worker registered",
                )
                assert workers[0]["read_only"] is True
                # Reports from several clients at once: without the routing, the read-only
                # worker would get (and refuse) some of them.
                clients = [create_client(live.address, timeout=10) for _ in range(4)]
                try:
                    for n in range(25):
                        for i, c in enumerate(clients):
                            c.report_unihash(f"{n:04x}{i:04x}" + T[8:], M, O, U)
                finally:
                    for c in clients:
                        c.close()
                assert client.get_unihash(M, "0018" + "0003" + T[8:]) == U
                mirror = {w["name"]: w["counters"] for w in client.get_stats()["workers"]}["mirror"]
                assert not [k for k in mirror if k.startswith(("reports.", "errors."))], mirror
            shown = run([script("hq-admin"), "workers", "--address", live.address])
            assert "mirror (read-only)" in shown.stdout, shown.stdout + shown.stderr
            wait_for(
                lambda: "mirror runs --read-only under a broker that writes" in live.log(),
                timeout=10,
                what="the broker's warning",
            )
        finally:
            worker.terminate()
            assert worker.wait(timeout=20) == 0, log.read_text()


def _take(db: str, identity: str, start, results, hold):
    start.wait()
    try:
        lock = BrokerLock.acquire(db, identity)
        results.put((identity, True))
        hold.wait()
        lock.release()
    except HeldByAnother:
        results.put((identity, False))


def test_workers_of_two_brokers_starting_at_once_never_both_hold_it(tmp_path):
    db = str(tmp_path / "hq.db")
    ctx = multiprocessing.get_context("fork")
    start, hold, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_take, args=(db, f"broker-{i % 2}", start, results, hold)) for i in range(8)]
    for proc in procs:
        proc.start()
    start.set()
    outcomes = [results.get(timeout=30) for _ in procs]
    hold.set()
    for proc in procs:
        proc.join(timeout=30)
    holders = {identity for identity, held in outcomes if held}
    assert len(holders) == 1, outcomes
    assert owner(db)["broker"] == holders.pop()


def test_a_link_to_the_file_finds_the_same_lock(tmp_path):
    db = tmp_path / "hq.db"
    db.touch()
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "link.db"
    link.symlink_to(db)
    lock = BrokerLock.acquire(str(db), "first")
    try:
        with pytest.raises(HeldByAnother, match=r"another broker \(first"):
            BrokerLock.acquire(str(link), "second")
    finally:
        lock.release()
    BrokerLock.acquire(str(link), "second").release()
    assert owner(db)["broker"] == "second"


def _check_until(db: str, stop):
    while not stop.is_set():
        holder(db)


def test_a_stopped_brokers_name_read_during_a_check_does_not_refuse(tmp_path):
    """hq-server's check takes the lock exclusively for an instant; a worker starting then
    reads the last (stopped) broker's name under its shared lock. It must look again, not
    refuse. (Refusing at once, 16 of 2,000 starts here were refused.)"""
    db = str(tmp_path / "hq.db")
    BrokerLock.acquire(db, "stopped-stack").release()
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    checker = ctx.Process(target=_check_until, args=(db, stop))
    checker.start()
    try:
        for i in range(2000):
            lock = BrokerLock.acquire(db, f"stack-{i}")  # each a new broker on a free file
            assert owner(db)["broker"] == f"stack-{i}"
            lock.release()
    finally:
        stop.set()
        checker.join(timeout=30)


def test_a_lock_dies_with_its_process(tmp_path):
    db = str(tmp_path / "hq.db")
    ctx = multiprocessing.get_context("fork")
    start, hold, results = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_take, args=(db, "crashed", start, results, hold))
    proc.start()
    start.set()
    assert results.get(timeout=30) == ("crashed", True)
    with pytest.raises(HeldByAnother, match=r"another broker \(crashed"):
        BrokerLock.acquire(db, "next")
    assert "crashed" in holder(db)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=30)
    assert holder(db) is None
    lock = BrokerLock.acquire(db, "next")
    try:
        assert owner(db)["broker"] == "next"
    finally:
        lock.release()


def test_every_spelling_of_one_broker_names_it_alike(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert broker_identity("ipc://backend.ipc") == broker_identity(f"ipc://{tmp_path}/x/../backend.ipc")
    assert broker_identity("ipc://a.ipc") != broker_identity("ipc://b.ipc")
    assert (
        broker_identity("tcp://localhost:5556")
        == broker_identity("tcp://127.0.0.1:5556")
        == "tcp://local:5556"
    )
    assert broker_identity("tcp://127.0.0.1:5557") != broker_identity("tcp://127.0.0.1:5556")
    assert broker_identity("tcp://192.0.2.7:5556") == "tcp://192.0.2.7:5556"  # not this host's
    assert broker_identity("tcp://eth0;localhost:5556") == "tcp://local:5556"  # a source address
    assert broker_identity("ipc://@abstract") == "ipc://@abstract"


def test_a_lock_file_that_cannot_be_made_is_said_and_not_fatal(tmp_path, caplog):
    """(As where the directory is not writable: a worker there can only answer lookups.)"""
    db = str(tmp_path / "hq.db")
    os.mkdir(lock_path(db))  # in the way: the lock file cannot be opened
    with caplog.at_level("WARNING", logger="hq.workers.brokerlock"):
        assert BrokerLock.acquire(db, "x") is None
    assert "nothing stops another broker's workers" in caplog.text
