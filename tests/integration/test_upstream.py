"""``--upstream``: a local hq in front of a shared server (issue 14), against real servers.

The reference: a local bitbake-hashserv with ``--upstream`` in front of the same upstream
gives the same answers as a local hq does. The upstream here is a bitbake-hashserv, an hq
behind its gateway, or another hq over ZeroMQ (the chain); the bad ones are raw sockets that
answer garbage or nothing.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from helpers import Gateway, LineServer, Stack, script, wait_for
from hq.bench.stack import free_port
from hq.client import create_client

M = "TestMethod"
T1, T2, T3, T4 = "1" * 40, "2" * 40, "3" * 40, "4" * 40
O1, O3, O4 = "a" * 64, "c" * 64, "b" * 64
U1, U2, U3, U4 = "d" * 64, "e" * 64, "f" * 64, "0" * 64
UNKNOWN = "9" * 40


def counters(address: str) -> dict:
    with create_client(address) as client:
        return client.get_stats()["broker"]["counters"]


def reference(tmp_path, bitbake, name: str, *args):
    from hq.bench.reference import ReferenceServer

    (tmp_path / name).mkdir()
    return ReferenceServer(tmp_path / name, bitbake, list(args)).start()


def without_row_ids(answers: list) -> list:
    """The answers, each row's ``id`` checked to be a row number and then left out: it numbers
    the row in that server's own database, where the backfill stores the upstream's rows
    when it gets to them, before or after the session's own reports."""
    out = []
    for answer in answers:
        if isinstance(answer, dict) and "id" in answer:
            assert isinstance(answer["id"], int) and answer["id"] > 0, answer
            answer = {k: v for k, v in answer.items() if k != "id"}
        out.append(answer)
    return out


def session(client) -> list:
    """What a build asks of its local server, through BitBake's own client (rows without
    their local ``id``)."""
    return without_row_ids(
        [
            client.get_unihash(M, T1),  # the upstream's
            client.get_unihash_batch([(M, T1), (M, T3), (M, UNKNOWN), ("OtherMethod", T1)]),
            client.unihash_exists_batch([U1, U3, U2]),
            client.report_unihash(T2, M, O1, U2)["unihash"],  # an output only the upstream knows
            client.report_unihash(T4, M, O4, U4)["unihash"],  # one nobody knows
            client.get_unihash(M, T2),
            client.get_unihash(M, T4),
            client.get_outhash(M, O3, T3),  # the upstream's row, copied here
            client.get_taskhash(M, T3, True),
            client.get_outhash(M, O3, T3, False),
            client.get_outhash(M, "7" * 64, T3),  # nobody's
            client.backfill_wait(),  # 0 once all is stored
            client.get_unihash_batch([(M, T1), (M, T3)]),  # local now
        ]
    )


def test_answers_equal_a_local_bitbake_hashserv_with_the_same_upstream(hashserv, bitbake, tmp_path):
    upstream = reference(tmp_path, bitbake, "upstream")
    local_ref = hq = gateway = None
    try:
        with hashserv.create_client(upstream.address) as client:
            client.report_unihash(T1, M, O1, U1)
            client.report_unihash(T3, M, O3, U3)
        local_ref = reference(tmp_path, bitbake, "local-ref", "--upstream", upstream.address)
        (tmp_path / "hq").mkdir()
        hq = Stack(tmp_path / "hq", args=["--upstream", upstream.address]).start()
        gateway = Gateway(tmp_path, hq.address)
        with hashserv.create_client(local_ref.address) as client:
            expected = session(client)
        with hashserv.create_client(gateway.tcp) as client:
            got = session(client)
        assert got == expected
        assert expected[:4] == [U1, [U1, U3, None, None], [True, True, False], U1]
        assert expected[4:7] == [U4, U1, U4]
        assert expected[7]["unihash"] == U3 and expected[8]["outhash"] == O3 and expected[10] is None
        assert expected[11:] == [0, [U1, U3]]
        with hashserv.create_client(upstream.address) as client:  # reports stay local
            assert client.get_unihash(M, T2) is None and client.get_unihash(M, T4) is None
        seen = counters(hq.address)
        assert seen["upstream.hits"] >= 3 and seen["upstream.report_hits"] == 1
    finally:
        for server in (gateway, hq, local_ref, upstream):
            if server is not None:
                server.stop()


def test_backfill_survives_a_restart_and_a_dead_upstream_costs_nothing(hashserv, bitbake, tmp_path):
    from hq.bench import reference as ref

    known = {f"{n:040x}": f"{n:064x}" for n in range(1, 2001)}
    (tmp_path / "upstream").mkdir()
    upstream = ref.ReferenceServer(tmp_path / "upstream", bitbake)
    rows = [(taskhash, f"{n:064x}", unihash) for n, (taskhash, unihash) in enumerate(known.items())]
    ref.populate(upstream.db, rows, bitbake, method=M)  # written as 2,000 reports would
    upstream.start()
    (tmp_path / "hq").mkdir()
    hq = Stack(tmp_path / "hq", args=["--upstream", upstream.address, "--upstream-timeout", "5"]).start()
    try:
        pairs = [(M, t) for t in known]
        with create_client(hq.address) as client:
            assert client.get_unihash_batch(pairs) == list(known.values())
            wait_for(
                lambda: counters(hq.address).get("upstream.backfilled", 0) == len(known), what="backfill"
            )
        upstream.proc.kill()  # dead (bitbake-hashserv would not stop on SIGTERM while asked)
        assert hq.stop() == 0, hq.log()
        hq.start()
        with create_client(hq.address, timeout=10) as client:
            started = time.monotonic()
            assert client.get_unihash_batch(pairs) == list(known.values())  # local now
            assert client.get_unihash_batch([(M, UNKNOWN)]) == [None]  # refused at once
            assert client.unihash_exists_batch(["8" * 64]) == [False]
            assert client.report_unihash(T4, M, O4, U4)["unihash"] == U4
            assert time.monotonic() - started < 2, "a dead upstream must not hold up lookups"
    finally:
        hq.stop()
        upstream.stop()


def test_an_upstream_restarted_in_the_middle_of_a_burst(tmp_path):
    """The upstream (hq behind its gateway) stops during a burst of lookups and comes back on
    the same port: every answer is the right unihash or a miss, never a wrong one, and hits
    come back by themselves."""
    (tmp_path / "up").mkdir()
    up = Stack(tmp_path / "up").start()
    port = _free_port()
    up_gateway = Gateway(tmp_path, up.address, tcp=f"127.0.0.1:{port}", name="up-gateway")
    known = {f"{n:040x}": f"{n:064x}" for n in range(1, 3001)}
    with create_client(up.address) as client:
        for taskhash, unihash in known.items():
            client.report_unihash_equiv(taskhash, M, unihash)
    (tmp_path / "hq").mkdir()
    hq = Stack(
        tmp_path / "hq", args=["--upstream", f"127.0.0.1:{port}", "--upstream-negative-ttl", "0"]
    ).start()
    wrong, answers, done = [], [0, 0], threading.Event()

    def burst():
        keys = list(known)
        with create_client(hq.address, timeout=30) as client:
            while not done.is_set():
                for start in range(0, len(keys), 500):
                    chunk = keys[start : start + 500]
                    for key, got in zip(chunk, client.get_unihash_batch([(M, k) for k in chunk])):
                        answers[got is None] += 1
                        if got is not None and got != known[key]:
                            wrong.append((key, got))

    thread = threading.Thread(target=burst)
    thread.start()
    try:
        wait_for(lambda: answers[0] > 0, what="hits from the upstream")
        assert up_gateway.stop() == 0
        up_gateway = Gateway(tmp_path, up.address, tcp=f"127.0.0.1:{port}", name="up-gateway")
        before = counters(hq.address).get("upstream.hits", 0)
        wait_for(lambda: counters(hq.address).get("upstream.hits", 0) > before, what="hits again")
    finally:
        done.set()
        thread.join(60)
        up_gateway.stop()
        hq.stop()
        up.stop()
    assert not thread.is_alive()
    assert wrong == []


@pytest.mark.parametrize("kind", ["garbage", "a wrong unihash", "silence"])
def test_a_bad_upstream_is_never_an_answer(tmp_path, kind):
    replies = {
        "garbage": lambda line: b"no thanks\n",
        "a wrong unihash": lambda line: b'"ok"\n' if b"-stream" in line else b"xyz\n",
        "silence": lambda line: None,
    }
    bad = LineServer(replies[kind])
    hq = Stack(tmp_path, args=["--upstream", bad.address, "--upstream-timeout", "0.5"]).start()
    try:
        with create_client(hq.address, timeout=10) as client:
            client.report_unihash(T1, M, O1, U1)
            started = time.monotonic()
            assert client.get_unihash_batch([(M, T1), (M, UNKNOWN)]) == [U1, None]
            assert client.report_unihash(T2, M, O1, U2)["unihash"] == U1  # local equivalent
            assert client.report_unihash(T4, M, O4, U4)["unihash"] == U4
            assert time.monotonic() - started < 5
        seen = counters(hq.address)
        failed = seen.get("upstream.timeouts" if kind == "silence" else "upstream.errors", 0)
        assert failed >= 1, seen
        assert seen.get("upstream.hits", 0) == 0
    finally:
        hq.stop()
        bad.close()


def test_identical_lookups_in_flight_are_asked_once(tmp_path):
    """12 clients ask the same 300 taskhashes at once, misses not remembered: while the first
    batch is with a slow upstream, the others' identical keys join it, so the upstream is
    asked each key once, not once per client."""
    asked, release = [], threading.Event()

    def reply(line):
        if line.startswith(b"{"):  # entering get-stream
            return b'"ok"\n'
        asked.append(line)
        release.wait(20)  # the first batch stays with the upstream until every client asked
        return b"\n"

    slow = LineServer(reply)
    args = ["--upstream", slow.address, "--upstream-negative-ttl", "0", "--upstream-timeout", "5"]
    hq = Stack(tmp_path, args=args).start()
    keys = [(M, f"{n:040x}") for n in range(300)]
    results = []

    def client():
        with create_client(hq.address, timeout=20) as c:
            results.append(c.get_unihash_batch(keys))

    threads = [threading.Thread(target=client) for _ in range(12)]
    try:
        for thread in threads:
            thread.start()
        everyone = 12 * len(keys)  # what the broker has handed its agent
        wait_for(lambda: counters(hq.address).get("upstream.asked", 0) == everyone, what="every question")
        release.set()
        for thread in threads:
            thread.join(30)
        assert results == [[None] * 300] * 12
        assert len(asked) == 300, len(asked)
    finally:
        release.set()
        hq.stop()
        slow.close()


def test_a_chain_of_hq_hq_and_bitbake_hashserv(hashserv, bitbake, tmp_path):
    """hq -> hq (over ZeroMQ) -> bitbake-hashserv: what only the last knows reaches the first."""
    far = reference(tmp_path, bitbake, "far")
    middle = near = None
    try:
        with hashserv.create_client(far.address) as client:
            client.report_unihash(T1, M, O1, U1)
        (tmp_path / "middle").mkdir()
        middle = Stack(tmp_path / "middle", args=["--upstream", far.address]).start()
        (tmp_path / "near").mkdir()
        metrics = f"127.0.0.1:{_free_port()}"
        near = Stack(tmp_path / "near", args=["--upstream", middle.address, "--metrics", f"tcp://{metrics}"])
        near.start()
        with create_client(near.address) as client:
            assert client.get_unihash_batch([(M, T1), (M, UNKNOWN)]) == [U1, None]
            assert client.unihash_exists_batch([U1, U2]) == [True, False]
            assert client.report_unihash(T2, M, O1, U2)["unihash"] == U1
        wait_for(lambda: counters(middle.address).get("upstream.backfilled", 0) >= 1, what="middle backfill")
        wait_for(lambda: counters(near.address).get("upstream.backfilled", 0) >= 1, what="near backfill")
        # what an admin sees: hq-admin stats and the Prometheus metrics
        admin = [script("hq-admin"), "--address", near.address, "stats"]
        stats = subprocess.run(admin, capture_output=True, text=True, timeout=20)
        assert stats.returncode == 0, stats.stderr
        assert middle.address in stats.stdout and "upstream asked / hits / misses: lookups" in stats.stdout
        assert re.search(r"upstream not stored: backfills failed / mappings dropped\s+0 / 0", stats.stdout)
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert 'hq_broker_events_total{event="upstream.hits"}' in text
        assert 'hq_request_duration_seconds_count{command="upstream"}' in text
    finally:
        for server in (near, middle, far):
            if server is not None:
                server.stop()


def test_it_logs_in_to_an_upstream_that_wants_it_and_never_shows_the_token(hashserv, bitbake, tmp_path):
    """The upstream lets no anonymous client read: with --upstream-username and the token
    in HQ_UPSTREAM_PASSWORD the local hq gets its answers; the token is in no log line."""
    token = "upstream-admin-token-s3cret"
    (tmp_path / "up").mkdir()
    from hq.bench.reference import ReferenceServer

    upstream = ReferenceServer(
        tmp_path / "up",
        bitbake,
        ["--anon-perms", "@none", "--admin-user", "admin"],
        env={"HASHSERVER_ADMIN_PASSWORD": token},
    ).start()
    stacks = []
    try:
        with hashserv.create_client(upstream.address, username="admin", password=token) as client:
            client.report_unihash(T1, M, O1, U1)
        for name, login in (("anonymous", {}), ("admin", {"HQ_UPSTREAM_PASSWORD": token})):
            (tmp_path / name).mkdir()
            args = ["--upstream", upstream.address, *(["--upstream-username", "admin"] if login else [])]
            stacks.append(Stack(tmp_path / name, args=args, env=login).start())
        anonymous, admin = stacks
        with create_client(admin.address) as client:
            assert client.get_unihash_batch([(M, T1)]) == [U1]
        with create_client(anonymous.address) as client:
            assert client.get_unihash_batch([(M, T1)]) == [None]  # refused there: local data
        assert counters(anonymous.address).get("upstream.errors", 0) >= 1
    finally:
        for stack in stacks:
            stack.stop()
        upstream.stop()
    for stack in stacks:
        assert token not in stack.log()


def test_a_password_in_the_upstream_url_is_on_no_command_line_and_in_no_log(tmp_path):
    """``ws://user:password@host``: hq-server hands the URL to its broker in the environment,
    so ``ps`` shows the password nowhere (the upstream here is down: a miss costs nothing)."""
    secret = "UPSECRET42"
    url = f"ws://bob:{secret}@127.0.0.1:{free_port()}"
    with Stack(tmp_path, args=["--upstream", url]) as stack:
        with create_client(stack.address) as client:
            assert client.get_unihash_batch([(M, T1)]) == [None]
        children = stack.children()
        assert "hq-broker" in children
        for child in children.values():
            assert not [a for a in child.cmdline() if secret in a], child.cmdline()
    assert secret not in stack.log()


@pytest.mark.parametrize("program", ["hq-server", "hq-broker"])
def test_read_only_with_an_upstream_is_refused(program, tmp_path):
    result = subprocess.run(
        [script(program), "--upstream", "127.0.0.1:1", "--read-only"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--upstream and --read-only" in lines[0], result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
