"""The embedded client never hangs a build: deadlines, ConnectionError, stale replies, fork."""

import os
import socket
import subprocess
import threading
import time

import pytest
import zmq

from helpers import script, wait_for
from hq import protocol as p
from hq.client import InvokeError, ServerError, create_client

M = "TestMethod"
U1 = "a69ec97f5af2e21e1a1f9cc8896965515d5559425666f734e245a3d40cee33d9"

ALL_CALLS = [
    ("ping", ()),
    ("get_unihash", (M, "a" * 64)),
    ("get_unihash_batch", ([(M, "a" * 64)] * 3,)),
    ("report_unihash", ("a" * 64, M, "b" * 64, U1)),
    ("report_unihash_equiv", ("a" * 64, M, U1)),
    ("get_taskhash", (M, "a" * 64, True)),
    ("get_outhash", (M, "b" * 64, "a" * 64)),
    ("unihash_exists", (U1,)),
    ("unihash_exists_batch", ([U1],)),
    ("get_stats", ()),
]


def assert_connection_error_within(address, timeout=0.6, calls=ALL_CALLS):
    with create_client(address, timeout=timeout) as c:
        for name, args in calls:
            start = time.monotonic()
            with pytest.raises(ConnectionError):
                getattr(c, name)(*args)
            elapsed = time.monotonic() - start
            assert elapsed <= timeout * 1.1 + 0.05, (name, elapsed)


def test_nothing_listening_on_tcp():
    # Hold a bound but non-listening socket: the port is surely closed and stays ours.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    try:
        port = holder.getsockname()[1]
        assert_connection_error_within(f"tcp://127.0.0.1:{port}")
    finally:
        holder.close()


def test_nothing_listening_on_ipc(tmp_path):
    assert_connection_error_within(f"ipc://{tmp_path}/absent.ipc", calls=ALL_CALLS[:3])


def test_silent_tcp_listener():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        assert_connection_error_within("tcp://127.0.0.1:%d" % listener.getsockname()[1], calls=ALL_CALLS[:3])
    finally:
        listener.close()


def test_broker_without_workers(tmp_path):
    endpoint_file = tmp_path / "ep"
    proc = subprocess.Popen(
        [
            script("hq-broker"),
            "--bind",
            "tcp://127.0.0.1:*",
            "--backend",
            f"ipc://{tmp_path}/be.ipc",
            "--endpoint-file",
            str(endpoint_file),
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(endpoint_file.exists, 10, what="broker endpoint file")
        assert_connection_error_within(endpoint_file.read_text().split()[0], calls=ALL_CALLS[:4])
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_bad_addresses_are_refused_early():
    with pytest.raises(ValueError):
        create_client("localhost:8686")
    with create_client("tcp://no-such-host.invalid:1", timeout=0.3) as c:
        with pytest.raises(ConnectionError):
            c.ping()


class ScriptedPeer:
    """A real ROUTER socket that answers each request with frames a test chooses."""

    def __init__(self, script_fn):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.last_endpoint.decode()
        self.script_fn = script_fn
        self.requests = []
        self.routing_ids = []  # the client socket each request came from
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        later = []  # (due time, frames): replies of a peer that takes its time
        while not self.stop:
            now = time.monotonic()
            for due, frames in [x for x in later if x[0] <= now]:
                later.remove((due, frames))
                self.sock.send_multipart(frames)
            if not self.sock.poll(10 if later else 50):
                continue
            frames = self.sock.recv_multipart()
            request = p.decode_request(frames[1:])
            self.requests.append(request)
            self.routing_ids.append(frames[0])
            for reply in self.script_fn(request, len(self.requests)):
                if isinstance(reply, tuple):  # (seconds the work takes, reply)
                    later.append((time.monotonic() + reply[0], [frames[0], *reply[1]]))
                else:
                    self.sock.send_multipart([frames[0], *reply])

    def close(self):
        self.stop = True
        self.thread.join(5)
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def peer_factory():
    peers = []

    def make(fn):
        peer = ScriptedPeer(fn)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()


def test_stale_and_garbage_replies_are_discarded(peer_factory):
    def answer(request, n):
        yield p.encode_reply(b"old-id", p.OK, [U1.encode()])  # a reply to someone else
        yield [b"garbage"]
        yield p.encode_reply(request.request_id, p.OK, [("b" * 64).encode()])

    peer = peer_factory(answer)
    with create_client(peer.address, timeout=5) as c:
        assert c.report_unihash("a" * 64, M, "c" * 64, U1)["unihash"] == "b" * 64
        assert c.stale_replies == 2


@pytest.mark.parametrize("json_text", [b"not json", b"[1, 2]", b'"text"'])
def test_a_json_answer_that_is_not_an_object_is_a_connection_error(peer_factory, json_text):
    """Stats, rows and the log-in answer are JSON objects: anything else from a server that
    is not hq (or is broken) is a ConnectionError, never a JSON or type error."""

    def answer(request, n):
        yield p.encode_reply(request.request_id, p.OK, [json_text, b"0" * 32])

    peer = peer_factory(answer)
    with create_client(peer.address, timeout=5) as c:
        with pytest.raises(ConnectionError):
            c.get_stats()
        with pytest.raises(ConnectionError):
            c.get_db_usage()
    with create_client(peer.address, "admin", "secret", timeout=5) as c:
        with pytest.raises(ConnectionError, match="malformed log-in answer"):
            c.get_unihash(M, "a" * 64)


def test_malformed_unihash_in_reply_is_a_connection_error(peer_factory):
    def answer(request, n):
        if request.command == p.GET:
            yield p.encode_reply(request.request_id, p.OK, [b"${@os.system('true')}"])
        else:
            yield p.encode_reply(request.request_id, p.OK, [b"A" * 64])

    peer = peer_factory(answer)
    with create_client(peer.address, timeout=5) as c:
        with pytest.raises(ConnectionError):
            c.get_unihash(M, "a" * 64)
        with pytest.raises(ConnectionError):
            c.report_unihash("a" * 64, M, "c" * 64, U1)


def test_wrong_item_count_in_reply_is_a_connection_error(peer_factory):
    peer = peer_factory(lambda r, n: [p.encode_reply(r.request_id, p.OK, [U1.encode()])])
    with create_client(peer.address, timeout=5) as c:
        with pytest.raises(ConnectionError):
            c.get_unihash_batch([(M, "a" * 64), (M, "b" * 64)])


def test_retryable_errors_are_retried_then_succeed(peer_factory):
    def answer(request, n):
        if n <= 2:
            yield p.encode_error(request.request_id, p.E_UNAVAILABLE, "no worker")
        else:
            yield p.encode_reply(request.request_id, p.OK, [U1.encode()])

    peer = peer_factory(answer)
    with create_client(peer.address, timeout=5) as c:
        assert c.report_unihash_equiv("a" * 64, M, U1)["unihash"] == U1
    assert len(peer.requests) == 3
    assert len({r.request_id for r in peer.requests}) == 3  # every attempt has its own id


def test_retryable_error_until_the_deadline_is_a_connection_error(peer_factory):
    """Resent on the same socket until the next resend would miss the deadline, then the
    server's text; the exact times are in tests/unit/test_client_policy.py."""
    peer = peer_factory(lambda r, n: [p.encode_error(r.request_id, p.E_BUSY, "queue full")])
    with create_client(peer.address, timeout=0.5) as c:
        with pytest.raises(ServerError, match="queue full") as info:
            c.ping()
    assert info.value.code == p.E_BUSY and isinstance(info.value, ConnectionError)
    assert len(peer.requests) >= 2 and len(set(peer.routing_ids)) == 1


@pytest.mark.parametrize("code", [p.E_INVALID, p.E_FORBIDDEN, p.E_UNAUTHORIZED])
def test_refusals_raise_invoke_error(peer_factory, code):
    peer = peer_factory(lambda r, n: [p.encode_error(r.request_id, code, "Invalid unihash")])
    with create_client(peer.address, timeout=5) as c:
        with pytest.raises(InvokeError, match="Invalid unihash"):
            c.report_unihash("a" * 64, M, "c" * 64, U1)


@pytest.mark.parametrize("code", [p.E_BAD_REQUEST, p.E_UNKNOWN_COMMAND, p.E_VERSION, p.E_TOO_LARGE])
def test_protocol_mismatch_is_a_connection_error(peer_factory, code):
    peer = peer_factory(lambda r, n: [p.encode_error(r.request_id, code, "nope")])
    with create_client(peer.address, timeout=5) as c:
        with pytest.raises(ConnectionError):
            c.ping()


def test_silent_peer_gets_a_resend_on_a_new_socket(peer_factory):
    """Lazy Pirate: after an attempt (1 s here) without an answer, the client drops its socket
    and resends on a new one, which the peer sees as a new routing id. When exactly, and that
    a long admin command waits instead, is in tests/unit/test_client_policy.py."""

    def answer(request, n):
        if n >= 2:
            yield p.encode_reply(request.request_id, p.OK, [])

    peer = peer_factory(answer)
    with create_client(peer.address, timeout=3.0) as c:
        assert c.ping() == {"alive": True}
    assert len(peer.requests) == 2
    assert peer.requests[0].request_id != peer.requests[1].request_id
    assert peer.routing_ids[0] != peer.routing_ids[1]


@pytest.mark.parametrize("status", [p.E_UNAVAILABLE, p.E_INTERNAL])
def test_an_admin_write_that_may_have_run_is_not_retried(peer_factory, status):
    """503 (timed out at the broker) or 500 (its worker lost): the sweep may have run. It is
    not sent again (the second would be refused); the error says to check first."""

    def answer(request, n):
        yield p.encode_error(request.request_id, status, "no worker answered in time")

    peer = peer_factory(answer)
    with create_client(peer.address, timeout=5) as c:
        with pytest.raises(ServerError, match="may or may not have run") as info:
            c.gc_sweep("m")
        assert info.value.code == 0 and isinstance(info.value, ConnectionError)
        assert len(peer.requests) == 1


def test_an_admin_write_refused_busy_is_retried(peer_factory):
    def answer(request, n):
        if n == 1:
            yield p.encode_error(request.request_id, p.E_BUSY, "queue full")
        else:
            yield p.encode_reply(request.request_id, p.OK, [b'{"count":2}'])

    peer = peer_factory(answer)
    with create_client(peer.address, timeout=5) as c:
        assert c.remove({"method": "M"}) == {"count": 2}
    assert len(peer.requests) == 2


def test_other_error_statuses_are_server_errors_with_their_code(peer_factory):
    def answer(request, n):
        yield p.encode_error(request.request_id, p.E_STORAGE, "database is read-only")

    peer = peer_factory(answer)
    with create_client(peer.address, timeout=5) as c:
        with pytest.raises(ServerError, match="read-only") as info:
            c.report_unihash("a" * 64, "M", "b" * 64, "c" * 64)
    assert info.value.code == p.E_STORAGE


def test_client_works_in_a_forked_child(shared_stack):
    c = create_client(shared_stack.address, timeout=10)
    c.report_unihash_equiv("f0" * 32, M, U1)
    assert c.get_unihash(M, "f0" * 32) == U1
    pid = os.fork()
    if pid == 0:  # child: use the parent's client object, as BitBake's forked tasks do
        code = 1
        try:
            if (
                c.get_unihash(M, "f0" * 32) == U1
                and c.report_unihash_equiv("f1" * 32, M, U1)["unihash"] == U1
            ):
                code = 0
        finally:
            os._exit(code)
    start = time.monotonic()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert time.monotonic() - start < 5
    # The parent's client still works, and sees the child's report.
    assert c.get_unihash(M, "f1" * 32) == U1
    c.close()


@pytest.mark.parametrize("chunk_items", [1, 3, 1000])
def test_batches_respect_frame_and_item_limits(shared_stack, chunk_items):
    """Tiny chunks or alternating methods must still fit MAX_FRAMES and MAX_BATCH_ITEMS."""
    with create_client(shared_stack.address, timeout=20, chunk_items=chunk_items, request_items=10**6) as c:
        c.report_unihash_equiv("ab" * 32, M, U1)
        pairs = [(M if i % 2 else "Other", "ab" * 32) for i in range(9000)]
        assert c.get_unihash_batch(pairs) == [U1 if i % 2 else None for i in range(9000)]
        assert c.unihash_exists_batch([U1, "0" * 64] * 4000) == [True, False] * 4000
        # The same by method, each group cut into chunks by slicing (an empty one adds nothing).
        unknown = [f"{i:064x}" for i in range(5000)]
        groups = [(M, ["ab" * 32, *unknown]), ("Other", []), ("Other", ["ab" * 32] * 4000), (M, ["ab" * 32])]
        assert c.get_unihash_groups(groups) == [U1] + [None] * 5000 + [None] * 4000 + [U1]
