"""hq-gateway with BitBake's own client (``hashserv.create_client`` from ../shared/bitbake) and
``bitbake-hashclient``: the reference's answers, through the gateway, from hq."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from helpers import Gateway, Stack, connect, wait_for
from hq.client import create_client

M = "TestMethod"
T1 = "35788efcb8dfb0a02659d81cf2bfd695fb30faf9"
T2 = "3bf6f1e89d26205aec90da04854fbdbf73afe6b4"
O1 = "2765d4a5884be49b28601445c2760c5f21e7e5c0ee2b7e3fce98fd7e5970796f"
U1 = "a69ec97f5af2e21e1a1f9cc8896965515d5559425666f734e245a3d40cee33d9"
U2 = "bf6e81926066f770e960f9f777cd088c62bea9addb7745f3e77deaa81a645747"
ADMIN_PASSWORD = "gateway-admin-password"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An hq stack (anonymous: the reference's default permissions; an admin) and a gateway."""
    root = tmp_path_factory.mktemp("gateway")
    (root / "hq").mkdir()
    stack = Stack(root / "hq", args=["--admin-user", "admin"], env={"HQ_ADMIN_PASSWORD": ADMIN_PASSWORD})
    stack.start()
    gateway = Gateway(root, stack.address)
    yield stack, gateway
    assert gateway.stop() == 0, gateway.log()
    assert stack.stop() == 0, stack.log()


@pytest.mark.parametrize("transport", ["tcp", "unix", "ws"])
def test_bitbakes_client_gets_the_references_answers(hashserv, served, transport):
    stack, gateway = served
    address = {"tcp": gateway.tcp, "unix": gateway.unix, "ws": gateway.ws}[transport]
    t1, t2 = {"tcp": (T1, T2), "unix": (T1[::-1], T2[::-1]), "ws": (T1[:-1] + "w", T2[:-1] + "w")}[transport]
    client = hashserv.create_client(address)
    try:
        assert client.ping() == {"alive": True}
        assert client.report_unihash(t1, M, O1, U1) == {"taskhash": t1, "method": M, "unihash": U1}
        # the equivalence rule (ref. §7.2): a second taskhash with the same outhash
        assert client.report_unihash(t2, M, O1, U2)["unihash"] == U1
        assert client.get_unihash(M, t1) == U1
        assert client.get_unihash(M, "0" * 40) is None
        wave = [(M, t1), (M, "1" * 40), (M, t2)] * 700  # a pipelined get-stream batch
        assert client.get_unihash_batch(wave) == [U1, None, U1] * 700
        # a hash hq could not even hold is a miss, as for the reference, not a failed batch
        assert client.get_unihash_batch([(M, "x" * 300), (M, t1)]) == [None, U1]
        assert client.unihash_exists_batch(["y" * 300, U1]) == [False, True]
        assert client.unihash_exists(U1) and not client.unihash_exists(U2)
        assert client.unihash_exists_batch([U1, U2] * 300) == [True, False] * 300
        row = client.get_taskhash(M, t1, True)
        assert (row["taskhash"], row["outhash"], row["unihash"]) == (t1, O1, U1)
        assert client.get_outhash(M, O1, t1)["taskhash"] in (t1, T1, T2)
        assert set(client.get_stats()["requests"]) == {"num", "total_time", "max_time", "average", "stdev"}
        with pytest.raises(
            hashserv.client.InvokeError if hasattr(hashserv.client, "InvokeError") else Exception
        ):
            client.report_unihash(t1, M, O1, "${@os.system('true')}")
        assert client.get_unihash(M, t1) == U1  # reconnected by itself after the invoke-error
        # a 131 KB report arrives chunked and comes back chunked (ref. test_huge_message)
        siginfo = "s" * 131000
        client.report_unihash("d" * 40, M, "e" * 64, "f" * 64, {"outhash_siginfo": siginfo})
        assert client.get_taskhash(M, "d" * 40, True)["outhash_siginfo"] == siginfo
        assert client.get_outhash(M, "e" * 64, "d" * 40)["outhash_siginfo"] == siginfo
    finally:
        client.close()


def test_a_websocket_client_that_asks_for_headers_gets_them_before_asking_anything(served):
    """needs-headers over ws: the empty headers message comes at once, as from the reference
    (a client waiting for it before its first request would otherwise wait forever)."""
    from websockets.sync.client import connect as ws_connect

    _, gateway = served
    with ws_connect(gateway.ws) as ws:
        for message in ("OEHASHEQUIV 1.1", "needs-headers: true", ""):
            ws.send(message)
        assert ws.recv(timeout=5) == ""
        ws.send('{"ping": {}}')
        assert ws.recv(timeout=5) == '{"alive": true}'


def test_users_and_permissions_through_the_gateway(hashserv, served):
    import bb.asyncrpc

    stack, gateway = served
    with hashserv.create_client(gateway.tcp, username="admin", password=ADMIN_PASSWORD) as admin:
        user = admin.new_user("builder", ["@read", "@report"])
        assert user["permissions"] == ["@read", "@report"] and len(user["token"]) == 64
        assert admin.get_user()["username"] == "admin"
        assert admin.become_user("builder") == {"username": "builder", "permissions": ["@read", "@report"]}
        with pytest.raises(bb.asyncrpc.InvokeError, match="builder is not allowed to access permissions"):
            admin.get_all_users()
    with hashserv.create_client(gateway.tcp, username="builder", password=user["token"]) as builder:
        builder.report_unihash("a" * 40, M, "b" * 64, U2)
        assert builder.get_taskhash(M, "a" * 40, True)["owner"] == "builder"
    # A wrong token: the reference's answer, after its 1 s, then the close (BitBake's client
    # itself would retry that four times; one exchange on a raw socket shows it).
    start = time.monotonic()
    answer = raw(gateway.tcp, b'OEHASHEQUIV 1.1\n\n{"auth": {"username": "builder", "token": "wrong"}}\n')
    assert answer == b'{"invoke-error": {"message": "Unable to authenticate as builder"}}\n'
    assert 0.9 <= time.monotonic() - start < 5


T3 = "c" * 40
ADMIN = ["--login", "admin", "--password", ADMIN_PASSWORD]
O3 = "d" * 64
U3 = "e" * 64
HASHCLIENT_SESSION = [
    # (arguments, stdin): every command of bitbake-hashclient, as an admin would run them
    (["get", M, T1], None),
    (["get", M, "0" * 40], None),
    (["get-outhash", M, O1, T1], None),
    (["unihash-exists", U1], None),
    (["unihash-exists", "f" * 64], None),
    (["get-db-usage"], None),
    (["get-db-query-columns"], None),
    (["gc-status"], None),
    (["gc-mark", "ABC", "-w", "unihash", U1, "-w", "method", M], None),
    (["gc-status"], None),
    (["gc-mark-stream", "ABC"], f"unihash {U3}\nunihash {'9' * 64}\n"),
    (["gc-status"], None),
    (["gc-sweep", "ABC"], None),
    (["gc-status"], None),
    (["remove", "-w", "taskhash", T1], None),
    (["clean-unused", "0"], None),
    (["get-db-usage"], None),
    ([*ADMIN, "new-user", "-u", "builder", "@read", "@report"], None),
    ([*ADMIN, "get-user", "-u", "builder"], None),
    ([*ADMIN, "set-user-perms", "-u", "builder", "@read"], None),
    ([*ADMIN, "get-all-users"], None),
    ([*ADMIN, "refresh-token", "-u", "builder"], None),
    ([*ADMIN, "delete-user", "-u", "builder"], None),
    ([*ADMIN, "get-user", "-u", "builder"], None),
    (["get-all-users"], None),  # anonymous: refused
    (["stats"], None),
]


def _reports_around_removals(client) -> list:
    """Reports of taskhashes whose mappings ``remove`` and ``gc-sweep`` deleted while their
    output rows stayed, and what each side then answers."""
    u = ["%064x" % (0xA0 + i) for i in range(8)]
    out = [
        client.report_unihash(T1, M, O1, u[0])["unihash"],
        client.report_unihash(T2, M, O1, u[1])["unihash"],  # equivalent: u0
        client.remove({"unihash": u[0]}),  # both mappings gone, both output rows stay
        client.report_unihash(T2, M, O1, u[2])["unihash"],  # no mapped equivalent: its own
        client.report_unihash(T1, M, O1, u[3])["unihash"],  # equivalent to T2 now
        client.get_unihash_batch([(M, T1), (M, T2)]),
        client.report_unihash(T3, M, O3, u[4])["unihash"],
        client.gc_mark("m1", {"taskhash": T1}),
        client.gc_sweep("m1"),  # T2's and T3's mappings go
        client.get_unihash_batch([(M, T1), (M, T2), (M, T3)]),
        client.report_unihash(T3, M, O3, u[5])["unihash"],
        client.report_unihash(T2, M, O1, u[6])["unihash"],  # equivalent to T1
        client.report_unihash(T2, M, O1, u[7])["unihash"],  # mapped: kept
        client.get_unihash_batch([(M, T1), (M, T2), (M, T3)]),
        client.report_unihash_equiv(T3, M, u[7]),  # mapped: kept
    ]
    for taskhash in (T1, T2, T3):
        row = client.get_taskhash(M, taskhash, True)
        out.append({k: row[k] for k in ("taskhash", "outhash", "unihash", "gc_mark")})
    return out


@contextlib.contextmanager
def side_by_side(bitbake, tmp_path):
    """bitbake-hashserv and hq (through a gateway), each with the user admin: their
    OEHASHEQUIV addresses, ``{"reference": ..., "hq": ...}``, and the gateway."""
    from hq.bench.reference import ReferenceServer

    (tmp_path / "ref").mkdir()
    (tmp_path / "hq").mkdir()
    admin_password = {"HASHSERVER_ADMIN_PASSWORD": ADMIN_PASSWORD}
    reference = ReferenceServer(tmp_path / "ref", bitbake, ["--admin-user", "admin"], env=admin_password)
    reference.start()
    stack = Stack(tmp_path / "hq", args=["--admin-user", "admin"], env={"HQ_ADMIN_PASSWORD": ADMIN_PASSWORD})
    gateway = None
    try:
        stack.start()
        gateway = Gateway(tmp_path, stack.address)
        yield {"reference": reference.address, "hq": gateway.tcp}, gateway
    finally:
        if gateway is not None and gateway.proc.poll() is None:
            gateway.stop()
        reference.stop()
        stack.stop()


def answers_of_both(bitbake, hashserv, tmp_path, session) -> dict:
    """``session(client)`` run by BitBake's client logged in as admin on each server of
    :func:`side_by_side`: what it returned, per side."""
    answers = {}
    with side_by_side(bitbake, tmp_path) as (sides, _):
        for side, address in sides.items():
            with hashserv.create_client(address, username="admin", password=ADMIN_PASSWORD) as client:
                answers[side] = session(client)
    return answers


def test_reports_after_removals_get_the_references_answers(bitbake, hashserv, tmp_path):
    """bitbake-hashserv 2.19 maps a taskhash again when its own output was reported before
    and its mapping has been deleted since (its documentation says it stores nothing): a
    build re-reporting tasks after a gc-sweep gets its mappings back. hq, through the
    gateway, answers each step as the reference does."""
    answers = answers_of_both(bitbake, hashserv, tmp_path, _reports_around_removals)
    assert answers["hq"] == answers["reference"]
    assert answers["hq"][4] == answers["hq"][3]  # (the case itself: T1 mapped again, to T2's)


def _clean_unused_ages(client) -> list:
    """An unused output row (its mapping removed) made before each clean-unused."""
    out = []
    for n, age in enumerate([-3600, 1.5, 0, -(10**6), 3600]):
        taskhash, unihash = "%040x" % (0xC0 + n), "%064x" % (0xC0 + n)
        client.report_unihash(taskhash, M, O3, unihash)
        client.remove({"unihash": unihash})
        out.append((age, client.clean_unused(age)))
    try:  # a cutoff past what a date holds: the reference closes the connection
        out.append(client.clean_unused(10**12))
    except ConnectionError:
        out.append("closed")
    return out


def test_clean_unused_ages_as_the_reference(bitbake, hashserv, tmp_path):
    """The reference's cutoff is now + age: a positive age deletes every unused row, a
    negative one only those older than its size; hq, through the gateway, deletes the same."""
    answers = answers_of_both(bitbake, hashserv, tmp_path, _clean_unused_ages)
    assert answers["hq"] == answers["reference"]
    assert answers["hq"][0] == (-3600, {"count": 0}) and answers["hq"][1] == (1.5, {"count": 2})


#: Exchanges no BitBake client makes, where hq once answered otherwise (found by a
#: differential fuzz): each is sent whole, after a log-in, to both servers.
ODD_EXCHANGES = [
    # a bad line in a get-stream read: the lines before it answered, then the close
    b'{"get-stream": null}\nTestMethod ' + T1.encode() + b"\nTestMethod " + T2.encode() + b"\nbad\n",
    # exists-stream strips a line's end only, as BitBake's reader does
    b'{"exists-stream": null}\n ' + U1.encode() + b"\n" + U1.encode() + b" \nEND\n",
    # a whitespace-only line ends a chunk stream; "chunk-stream" in a string starts one
    b'{"chunk-stream": null}\n{"ping": \n{}}\n   \n"chunk-stream"\n{"ping": {}}\n\n',
    # a lookup of a method or hash hq could not hold is a miss, not an error
    b'{"get": {"method": "", "taskhash": "' + T1.encode() + b'"}}\n',
    b'{"get": {"method": "TestMethod", "taskhash": "' + b"x" * 300 + b'", "all": true}}\n',
    b'{"get-outhash": {"method": "TestMethod", "outhash": "\\t", "taskhash": "t"}}\n',
    # a lone surrogate, which no database takes: a close, and no traceback in hq's log
    b'{"get": {"method": "\\ud800", "taskhash": "a"}}\n',
    b'{"get": {"method": "\\udc80", "taskhash": "a", "all": true}}\n{"ping": {}}\n',
    b'{"get-outhash": {"method": "TestMethod", "outhash": "\\udfff", "taskhash": "a"}}\n',
    # a user command's username as the reference reads it: absent is the caller, null is
    # "None", "" is nobody; an argument that is not an object closes (and deletes nothing)
    b'{"delete-user": null}\n',
    b'{"refresh-token": null}\n',
    b'{"get-user": []}\n',
    b'{"refresh-token": {"username": null}}\n',
    b'{"get-user": {"username": ""}}\n{"get-user": {"username": null}}\n',
    b'{"delete-user": {"username": ""}}\n',
    b'{"new-user": {"username": "x", "permissions": ["@read", 5]}}\n',
    # a report whose argument is not an object closes with no reply
    b'{"report": null}\n{"ping": {}}\n',
    b'{"report-equiv": ["x"]}\n',
    # a gc-mark-stream line whose where holds a list: the lines before it answered; a key
    # that is no column is ignored, whatever its value
    b'{"gc-mark-stream": null}\n{"mark": "m", "where": {"method": "TestMethod", "note": 5}}\n'
    b'{"mark": "m", "where": {"method": [1]}}\n',
]


def test_odd_exchanges_get_the_references_bytes(bitbake, hashserv, tmp_path):
    login = b'OEHASHEQUIV 1.1\n\n{"auth": {"username": "admin", "token": "%s"}}\n' % ADMIN_PASSWORD.encode()
    with side_by_side(bitbake, tmp_path) as (sides, gateway):
        for address in sides.values():
            with hashserv.create_client(address) as client:
                client.report_unihash(T1, M, O1, U1)
        for spelling in (b" needs-headers: true", b"needs-headers : true", b"Needs-Headers:  true "):
            # the tag as BitBake's server reads it: whitespace around it makes another tag
            hello = b"OEHASHEQUIV 1.1\n" + spelling + b'\n\n{"ping": {}}\n'
            answers = {side: raw(address, hello) for side, address in sides.items()}
            assert answers["hq"] == answers["reference"], spelling
        for exchange in ODD_EXCHANGES:
            answers = {side: raw(address, login + exchange) for side, address in sides.items()}
            assert answers["hq"] == answers["reference"], exchange
        rows = {}  # get-outhash ignores the taskhash (it is for an upstream): any will do
        for side, address in sides.items():
            with hashserv.create_client(address) as client:
                rows[side] = [client.get_outhash(M, O1, taskhash) for taskhash in ("", "\t", "t" * 300)]
        for row in rows["hq"] + rows["reference"]:
            assert row is not None and row.pop("created")
        assert rows["hq"] == rows["reference"]
        assert gateway.stop() == 0 and "Traceback" not in gateway.log(), gateway.log()


def test_bitbake_hashclient_session_same_output_as_the_reference(bitbake, hashserv, tmp_path):
    """Every bitbake-hashclient command against bitbake-hashserv and against hq through the
    gateway, on the same data: the same output, line for line (tokens, times and timestamps
    aside), and the same exit codes. gc-mark-stream is served, not fallen back from."""
    with side_by_side(bitbake, tmp_path) as (sides, gateway):
        for address in sides.values():
            with hashserv.create_client(address) as client:
                client.report_unihash(T1, M, O1, U1)
                client.report_unihash(T2, M, O1, U2)  # equivalent: U1
                client.report_unihash(T3, M, O3, U3)
        outputs = {side: [] for side in sides}
        hashclient = [sys.executable, os.path.join(bitbake, "bin", "bitbake-hashclient")]
        for args, stdin in HASHCLIENT_SESSION:
            procs = {
                side: subprocess.Popen(
                    [*hashclient, "--address", address, *args],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for side, address in sides.items()
            }
            for side, proc in procs.items():
                out, err = proc.communicate(stdin or "", timeout=60)
                assert "doesn't seem to support" not in err, (side, args, err)  # no fallback
                # the last line of stderr: the error, where there is one (the tool's own
                # traceback included: get-user of a user that is gone fails in the tool)
                last = (err.strip().splitlines() or [""])[-1]
                outputs[side].append((args[-3:], proc.returncode, _comparable(args, out), last))
        for ours, theirs in zip(outputs["hq"], outputs["reference"]):
            assert ours == theirs
        stress = subprocess.run(
            [*hashclient, "--address", gateway.tcp, "stress", "--clients", "4", "--requests", "50"]
            + ["--report"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert stress.returncode == 0, stress.stdout + stress.stderr
        assert "Average request time" in stress.stdout or "Requests" in stress.stdout, stress.stdout
        assert gateway.stop() == 0, gateway.log()
        assert "Traceback" not in gateway.log()


def _comparable(args, out: str) -> str:
    """Output with what differs between any two servers blanked: tokens, timestamps, times."""
    if args[-1] == "stats":
        return sorted(json.loads(out)["requests"])
    if args[-1] == "get-db-usage":  # hq's own tables (PROTOCOL.md): the rows of the two that matter
        usage = ast.literal_eval(out.splitlines()[0])
        tables = ("unihashes", "outhashes")
        return sorted((name.split("_")[0], v["rows"]) for name, v in usage.items() if name[:9] in tables)
    out = re.sub(r"^(Token:\s+)\S{64}$", r"\1TOKEN", out, flags=re.M)
    return re.sub(r"\d{4}-\d\d-\d\d[ T][\d:.+]+", "TIME", out)


def raw(address: str, data: bytes, timeout: float = 5.0) -> bytes:
    with connect(address, timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"OEHASHEQUIV 1.0\n\n",
        b"OEHASHEQUIV 1.1\nno colon here\n\n",
        b"OEHASHEQUIV 1.1\n\n{not json}\n",
        b'OEHASHEQUIV 1.1\n\n{"frobnicate": {}}\n',
        b'OEHASHEQUIV 1.1\n\n{"get": {"method": "M"}}\n',
        b'OEHASHEQUIV 1.1\n\n{"get-stream": null}\nonly-one-field\n',
        b"OEHASHEQUIV 1.1\n\n" + b"x" * 200000 + b"\n",
        b"\xff\xfe\x00garbage",
    ],
)
def test_bad_input_is_closed_without_a_reply_and_others_go_on(hashserv, served, garbage):
    stack, gateway = served
    start = time.monotonic()
    answer = raw(gateway.tcp, garbage)
    assert answer in (b"", b'"ok"\n'), answer[:200]  # the stream entry itself was fine
    assert time.monotonic() - start < 5
    with hashserv.create_client(gateway.tcp) as client:
        assert client.ping() == {"alive": True}


def test_with_the_broker_down_bitbake_falls_back_quickly_then_it_recovers(hashserv, tmp_path):
    import bb.asyncrpc

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gateway = Gateway(tmp_path, f"tcp://127.0.0.1:{port}")
    try:
        client = hashserv.create_client(gateway.tcp)
        start = time.monotonic()
        with pytest.raises((ConnectionError, bb.asyncrpc.ClientError, EOFError)):
            client.get_unihash(M, T1)
        assert time.monotonic() - start < 5  # one wait of CONNECT_GRACE_S, then at once
        client.close()
        (tmp_path / "hq").mkdir()
        with Stack(tmp_path / "hq", bind=f"tcp://127.0.0.1:{port}"):

            def answers():
                try:
                    with hashserv.create_client(gateway.tcp) as client:
                        return client.get_unihash(M, T1) is None
                except ConnectionError:
                    return False

            # libzmq reconnects by itself (every 0.5 s at most): no restart of the gateway
            wait_for(answers, timeout=5, interval=0.1, what="the gateway to reach the broker again")
    finally:
        assert gateway.stop() == 0, gateway.log()


def test_hq_server_runs_the_gateway_with_the_stack(hashserv, tmp_path):
    sock = f"unix://{tmp_path}/hashserv.sock"
    with Stack(tmp_path, args=["--oehashequiv", sock]) as stack:
        assert f"OEHASHEQUIV on {sock}" in stack.log()
        with hashserv.create_client(sock) as client:
            assert client.report_unihash(T1, M, O1, U1)["unihash"] == U1
        children = psutil.Process(stack.proc.pid).children()  # the gateway is one of hq-server's
        assert any("hq.gateway" in child.cmdline() for child in children)
    assert not os.path.exists(sock[len("unix://") :])  # removed on the way out


def test_a_unix_path_longer_than_sun_path(hashserv, served, tmp_path):
    """unix:// paths past sun_path's 108 bytes work, as with BitBake's own server."""
    stack, _ = served
    folder = tmp_path / ("d" * 60) / ("e" * 60)
    folder.mkdir(parents=True)
    gateway = Gateway(tmp_path, stack.address, unix_path=folder / "hashserv.sock")
    try:
        assert len(gateway.unix) > 130
        with hashserv.create_client(gateway.unix) as client:
            assert client.ping() == {"alive": True}
    finally:
        assert gateway.stop() == 0, gateway.log()
    assert not (folder / "hashserv.sock").exists()


def test_backfill_wait_without_an_upstream_closes_as_the_references(hashserv, served):
    stack, gateway = served
    client = hashserv.create_client(gateway.tcp)
    try:
        with pytest.raises(ConnectionError):
            client.backfill_wait()
    finally:
        client.close()


def test_lookups_of_many_connections_go_to_the_broker_together(served):
    """20 BitBake connections with one get-stream line each, arriving together (the gateway
    is stopped while they are sent): one batched hq request, and every answer right."""
    stack, gateway = served
    with create_client(stack.address) as client:
        client.report_unihash("5" * 40, M, "6" * 64, U2)
    socks = []
    try:
        socks += streams(gateway, 20)
        before = get_counters(stack.address)
        os.kill(gateway.proc.pid, signal.SIGSTOP)
        try:
            stopped = psutil.Process(gateway.proc.pid)
            wait_for(lambda: stopped.status() == psutil.STATUS_STOPPED, what="the gateway to stop")
            for n, sock in enumerate(socks):
                sock.sendall(f"{M} {'5' * 40 if n % 2 else '4' * 40}\n".encode())
        finally:
            os.kill(gateway.proc.pid, signal.SIGCONT)
        for n, sock in enumerate(socks):
            assert sock.makefile("rb").readline() == (f"{U2}\n".encode() if n % 2 else b"\n")
        after = get_counters(stack.address)
        assert after.get("items.get", 0) - before.get("items.get", 0) == 20
        assert after.get("requests.get", 0) - before.get("requests.get", 0) == 1
    finally:
        for sock in socks:
            sock.close()


def test_lookups_wait_while_a_request_is_with_the_broker(served, tmp_path):
    """The broker stopped: the first lookup, read in a turn of its own, goes as a request;
    the next 21, each read in a turn of its own too, wait for its answer and then go as one
    request (3 with two requests allowed at once, 22 without a cap). A gateway of its own,
    whose attempts outlast the broker's stop (a resent attempt would count twice)."""
    stack, _ = served
    gateway = Gateway(tmp_path, stack.address, "--timeout", "60")
    before = get_counters(stack.address)
    broker = stack.children()["hq-broker"]
    socks = []
    try:
        socks += streams(gateway, 22)
        broker.suspend()
        try:
            wait_for(lambda: broker.status() == psutil.STATUS_STOPPED, what="the broker to stop")
            for sock in socks:
                sock.sendall(f"{M} {os.urandom(20).hex()}\n".encode())
                turned(gateway)  # the gateway has read it and handed it over
        finally:
            broker.resume()
        for sock in socks:
            assert sock.makefile("rb").readline() == b"\n"
        after = get_counters(stack.address)
        assert after.get("items.get", 0) - before.get("items.get", 0) == 22
        assert after.get("requests.get", 0) - before.get("requests.get", 0) == 2
    finally:
        for sock in socks:
            sock.close()
        assert gateway.stop() == 0, gateway.log()


def test_a_lookup_waiting_for_a_slot_keeps_its_own_deadline(served, tmp_path):
    """The workers stopped (the broker answers, nothing else does): lookups queued behind a
    request are closed when their own --timeout from arrival is up, with its, not a whole
    --timeout after its."""
    stack, _ = served
    gateway = Gateway(tmp_path, stack.address, "--timeout", "2")
    workers = [process for name, process in stack.children().items() if name.startswith("hq-worker")]
    socks = []
    try:
        socks += streams(gateway, 3)
        for worker in workers:
            worker.suspend()
        try:
            for sock in socks:
                sock.sendall(f"{M} {os.urandom(20).hex()}\n".encode())
                turned(gateway)
            closed = []
            for sock in socks:  # each closed without an answer: BitBake falls back
                assert sock.makefile("rb").readline() == b""
                closed.append(time.monotonic())
        finally:
            for worker in workers:
                worker.resume()
        assert closed[2] - closed[0] < 1.0, closed
        with create_client(stack.address) as client:  # the workers are back for what follows
            wait_for(lambda: len(client.get_stats()["workers"]) == 2, what="both workers back")
    finally:
        for sock in socks:
            sock.close()
        assert gateway.stop() == 0, gateway.log()


def streams(gateway, n: int) -> list:
    """``n`` raw TCP connections to the gateway, each in get-stream mode."""
    socks = []
    for _ in range(n):
        sock = connect(gateway.tcp)
        socks.append(sock)
        sock.sendall(b'OEHASHEQUIV 1.1\n\n{"get-stream": null}\n')
        assert sock.makefile("rb").readline() == b'"ok"\n'
    return socks


def turned(gateway) -> None:
    """Return once the gateway's loop has come round: a handshake it answers itself
    (needs-headers), so everything readable before it has been read and handed over."""
    with connect(gateway.tcp) as sock:
        sock.sendall(b"OEHASHEQUIV 1.1\nneeds-headers: true\n\n")
        assert sock.makefile("rb").readline() == b"\n"


def get_counters(address: str) -> dict:
    with create_client(address) as client:
        return client.get_stats()["broker"]["counters"]
