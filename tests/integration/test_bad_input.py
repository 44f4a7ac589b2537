"""Bad input over the wire against a real hq-server (reliability notes E3-E5).

Raw DEALER sockets send what a broken or hostile peer would; raw TCP sockets send what is not
ZMTP at all. After each case a normal client still gets correct answers (a report, then
lookups) and the broker and worker processes are the same ones as before.
"""

from __future__ import annotations

import os
import random
import selectors
import socket
import struct
import time
import uuid

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from helpers import wait_for
from hq import protocol as p
from hq.client import create_client

M = "TestMethod"
HANDSHAKE_IVL_S = 5.0  # the broker's ZMQ_HANDSHAKE_IVL on its public socket


@pytest.fixture(scope="module")
def stack(shared_stack):
    return shared_stack


@pytest.fixture(scope="module")
def pids(stack):
    """Broker and worker pids when the module starts; every test checks they never change."""
    found = wait_for(lambda: len(pid_map(stack)) == 3 and pid_map(stack), what="broker and 2 workers")
    assert "hq-broker" in found
    return found


def pid_map(stack) -> dict:
    return {name: proc.pid for name, proc in stack.children().items()}


@pytest.fixture
def zsockets():
    """Open DEALERs (and monitors) on a private context; fail if a test leaves one open."""
    ctx = zmq.Context()
    opened = []

    class Factory:
        @staticmethod
        def dealer(address, **options):
            sock = ctx.socket(zmq.DEALER)
            opened.append(sock)
            sock.linger = 0
            for option, value in options.items():
                sock.setsockopt(getattr(zmq, option), value)
            sock.connect(address)
            return sock

        @staticmethod
        def monitor(sock, events):
            mon = sock.get_monitor_socket(events)
            mon.linger = 0
            opened.append(mon)
            return mon

    yield Factory
    leaked = [sock for sock in opened if not sock.closed]
    for sock in leaked:
        sock.close(linger=0)
    ctx.term()
    assert not leaked, f"{len(leaked)} socket(s) left open"


def recv_reply(sock, timeout_s: float = 5.0) -> p.Reply:
    if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
        raise AssertionError(f"no reply within {timeout_s} s")
    return p.decode_reply(sock.recv_multipart())


def broker_fds(stack) -> int:
    return stack.children()["hq-broker"].num_fds()


def assert_serving(stack, pids, timeout_s: float = 5.0) -> None:
    """A normal client reports and looks up fresh keys; no process was replaced."""
    taskhash, outhash, unihash = uuid.uuid4().hex, os.urandom(32).hex(), os.urandom(32).hex()
    with create_client(stack.address, timeout=timeout_s) as client:
        assert client.report_unihash(taskhash, M, outhash, unihash)["unihash"] == unihash
        assert client.get_unihash(M, taskhash) == unihash
        assert client.get_unihash_batch([(M, taskhash), (M, uuid.uuid4().hex)]) == [unihash, None]
        assert client.unihash_exists(unihash)
    assert pid_map(stack) == pids


# --- one malformed message, one error reply (E3) -------------------------------------------------


def _batch(command, n_chunks, n_items):
    chunk = p.pack_items([f"{i:08x}" for i in range(n_items)])
    return [x for _ in range(n_chunks) for x in ([M.encode(), chunk] if command == p.GET else [chunk])]


RID = b"bad-1"
GOOD = [M.encode(), uuid.uuid4().hex.encode(), os.urandom(32).hex().encode()]  # method, taskhash, outhash

#: (id, frames, status, request id echoed, text in the error)
CASES = [
    ("empty message", [b""], p.E_BAD_REQUEST, b"", "frame 0"),
    ("protocol frame only", [p.CLIENT_PROTOCOL], p.E_BAD_REQUEST, b"", "4 frames"),
    ("no command", [p.CLIENT_PROTOCOL, RID], p.E_BAD_REQUEST, RID, "4 frames"),
    ("no credentials", [p.CLIENT_PROTOCOL, RID, p.PING], p.E_BAD_REQUEST, RID, "4 frames"),
    ("missing body frame", p.encode_request(RID, p.GET_FULL, [M.encode()]), p.E_BAD_REQUEST, RID, "get-full"),
    ("extra body frame", p.encode_request(RID, p.PING, [b""]), p.E_BAD_REQUEST, RID, "ping"),
    ("odd GET body", p.encode_request(RID, p.GET, [M.encode()]), p.E_BAD_REQUEST, RID, "groups"),
    ("wrong protocol", [b"HTTP/1.1", RID, p.PING, b""], p.E_BAD_REQUEST, b"", "HQC01"),
    ("request id too long", [p.CLIENT_PROTOCOL, b"x" * 33, p.PING, b""], p.E_BAD_REQUEST, b"", "request id"),
    (
        "unknown command",
        p.encode_request(RID, b"get-everything"),
        p.E_UNKNOWN_COMMAND,
        RID,
        "unknown command",
    ),
    (
        "non-ASCII command",
        p.encode_request(RID, "pïng".encode()),
        p.E_UNKNOWN_COMMAND,
        RID,
        "unknown command",
    ),
    ("old version", [b"HQC00", RID, p.PING, b""], p.E_VERSION, RID, "supported: HQC01"),
    ("new version", [b"HQC02", RID, p.PING, b""], p.E_VERSION, RID, "supported: HQC01"),
    (
        "non-hex unihash",
        p.encode_request(RID, p.REPORT, [*GOOD, b"${@os.system('true')}"]),
        p.E_INVALID,
        RID,
        "Invalid unihash",
    ),
    (
        "short unihash",
        p.encode_request(RID, p.REPORT, [*GOOD, b"a" * 63]),
        p.E_INVALID,
        RID,
        "Invalid unihash",
    ),
    (
        "long unihash",
        p.encode_request(RID, p.REPORT, [*GOOD, b"a" * 65]),
        p.E_INVALID,
        RID,
        "Invalid unihash",
    ),
    (
        "upper-case unihash",
        p.encode_request(RID, p.REPORT_EQUIV, [*GOOD[:2], b"A" * 64]),
        p.E_INVALID,
        RID,
        "Invalid unihash",
    ),
    (
        "invalid UTF-8 method",
        p.encode_request(RID, p.GET, [b"\xffTest", b"0" * 40]),
        p.E_BAD_REQUEST,
        RID,
        "UTF-8",
    ),
    (
        "NUL in method",
        p.encode_request(RID, p.REPORT, [b"Te\x00st", *GOOD[1:], b"a" * 64]),
        p.E_INVALID,
        RID,
        "control",
    ),
    (
        "empty taskhash",
        p.encode_request(RID, p.GET_FULL, [M.encode(), b""]),
        p.E_INVALID,
        RID,
        "empty taskhash",
    ),
    (
        "extra not an object",
        p.encode_request(RID, p.REPORT, [*GOOD, b"a" * 64, b"[1]"]),
        p.E_BAD_REQUEST,
        RID,
        "object",
    ),
    (
        "chunk over the limit",
        p.encode_request(RID, p.GET, _batch(p.GET, 1, p.MAX_CHUNK_ITEMS + 1)),
        p.E_TOO_LARGE,
        RID,
        "chunk",
    ),
    (
        "batch over the limit",
        p.encode_request(RID, p.EXISTS, _batch(p.EXISTS, 66, 1000)),
        p.E_TOO_LARGE,
        RID,
        "batch",
    ),
    ("100k tiny frames", p.encode_request(RID, p.GET, [b""] * 100_000), p.E_TOO_LARGE, RID, "frames"),
]


@pytest.mark.parametrize("frames, status, request_id, text", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_malformed_request_gets_one_error_reply(stack, pids, zsockets, frames, status, request_id, text):
    sock = zsockets.dealer(stack.address)
    try:
        sock.send_multipart(frames)
        reply = recv_reply(sock)
        assert (reply.status, reply.request_id) == (status, request_id), p.error_text(reply.body)
        assert len(reply.body) == 1 and len(reply.body[0]) <= p.MAX_ERROR_BYTES
        assert text in p.error_text(reply.body)
        # Exactly one reply: the next thing on this connection is the answer to the next request.
        sock.send_multipart(p.encode_request(b"next", p.PING))
        assert recv_reply(sock)[:2] == (b"next", p.OK)
    finally:
        sock.close()
    assert_serving(stack, pids)


def test_frame_over_max_size_disconnects_only_that_peer(stack, pids, zsockets):
    sock = zsockets.dealer(stack.address)
    try:
        sock.send_multipart(p.encode_request(b"before", p.PING))
        assert recv_reply(sock)[:2] == (b"before", p.OK)  # connected and handshaken
        monitor = zsockets.monitor(sock, zmq.EVENT_DISCONNECTED)
        try:
            sock.send_multipart(p.encode_request(b"huge", p.PING, [b"x" * (p.MAX_FRAME_BYTES + 1)]))
            if not monitor.poll(10_000, zmq.POLLIN):
                raise AssertionError("the broker did not drop the peer that sent an oversized frame")
            assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        finally:
            sock.disable_monitor()
            monitor.close()
        assert_serving(stack, pids)
        # The DEALER reconnects by itself and is served again; the huge message is gone.
        sock.send_multipart(p.encode_request(b"after", p.PING))
        reply = recv_reply(sock, 10.0)
        assert reply[:2] == (b"after", p.OK)
    finally:
        sock.close()
    assert_serving(stack, pids)


@pytest.mark.parametrize("command", [p.PING, p.STATS], ids=["worker", "broker"])
def test_replayed_request_id_while_pending(stack, pids, zsockets, command):
    """A second request with the id of one still in progress is refused, whoever would
    answer it (a worker, or the broker itself); the first completes."""
    chunks = [[uuid.uuid4().hex for _ in range(p.MAX_CHUNK_ITEMS)] for _ in range(65)]
    body = [x for chunk in chunks for x in (M.encode(), p.pack_items(chunk))]
    sock = zsockets.dealer(stack.address)
    try:
        sock.send_multipart(p.encode_request(b"dup", p.GET, body))
        sock.send_multipart(p.encode_request(b"dup", command))
        first, second = recv_reply(sock, 20.0), recv_reply(sock, 20.0)
        assert (first.request_id, first.status) == (b"dup", p.E_BAD_REQUEST)
        assert "already in use" in p.error_text(first.body)
        assert (second.request_id, second.status) == (b"dup", p.OK)
        assert [p.unpack_unihashes(frame, p.MAX_CHUNK_ITEMS) for frame in second.body] == [[None] * 1000] * 65
        # Once answered, the id may be used again.
        sock.send_multipart(p.encode_request(b"dup", p.PING))
        assert recv_reply(sock)[:2] == (b"dup", p.OK)
    finally:
        sock.close()
    assert_serving(stack, pids)


# --- bytes that are not ZMTP (E4) ---------------------------------------------------------------


def tcp_port(stack) -> int:
    assert stack.address.startswith("tcp://127.0.0.1:")
    return int(stack.address.rsplit(":", 1)[1])


def tls_client_hello() -> bytes:
    rng = random.Random(443)
    sni = b"hq.example.org"
    server_name = struct.pack("!HBH", len(sni) + 3, 0, len(sni)) + sni
    extensions = struct.pack("!HH", 0, len(server_name)) + server_name
    extensions += struct.pack("!HHH", 0x002B, 3, 0x0203) + b"\x04"  # supported_versions: TLS 1.3
    hello = (
        b"\x03\x03"
        + rng.randbytes(32)
        + b"\x20"
        + rng.randbytes(32)
        + struct.pack("!H", 6)
        + b"\x13\x01\x13\x02\xc0\x2f"
        + b"\x01\x00"
        + struct.pack("!H", len(extensions))
        + extensions
    )
    handshake = b"\x01" + struct.pack("!I", len(hello))[1:] + hello
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def zmtp_greeting() -> bytes:
    return b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


BLOBS = {
    "random bytes": random.Random(1).randbytes(64 * 1024),
    "http request": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
    "tls client hello": tls_client_hello(),
    "zmtp greeting then garbage": zmtp_greeting() + random.Random(2).randbytes(4096),
    "zmtp 1.0 frames": b"\x01\x00" + b"\x06\x01HQC01" + b"\x03\x01r1" + b"\x05\x01ping" + b"\x01\x00",
    "one stray byte": b"\x05",
}


def hung_up(conn, timeout_s: float) -> bool:
    """Read until the broker closes the connection (True) or the deadline passes (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        conn.settimeout(remaining)
        try:
            if not conn.recv(65536):
                return True
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True


@pytest.mark.parametrize("blob", list(BLOBS.values()), ids=list(BLOBS))
def test_non_zmtp_bytes_on_the_tcp_port(stack, pids, blob):
    """The broker hangs up on a peer that does not speak ZMTP/3, even one that stays connected."""
    baseline = broker_fds(stack)
    with socket.create_connection(("127.0.0.1", tcp_port(stack)), timeout=5) as conn:
        try:
            conn.sendall(blob)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the broker hung up first
        assert_serving(stack, pids)
        assert hung_up(conn, HANDSHAKE_IVL_S + 1), "the broker kept a non-ZMTP peer connected"
    wait_for(lambda: broker_fds(stack) <= baseline, HANDSHAKE_IVL_S + 1, what="broker fds back to baseline")
    assert_serving(stack, pids)


SILENT = 500  # connections opened at once that never speak


def test_silent_tcp_connections(stack, pids):
    baseline = broker_fds(stack)
    conns = []
    try:
        for _ in range(SILENT):
            conns.append(socket.create_connection(("127.0.0.1", tcp_port(stack)), timeout=5))
        wait_for(
            lambda: broker_fds(stack) >= baseline + SILENT, what=f"the broker accepting {SILENT} connections"
        )
        assert_serving(stack, pids)
        # Half of them hang up; the broker cuts the other half after its handshake interval.
        for conn in conns[: SILENT // 2]:
            conn.close()
        silent = conns[SILENT // 2 :]
        selector = selectors.DefaultSelector()
        for conn in silent:
            conn.setblocking(False)
            selector.register(conn, selectors.EVENT_READ)
        deadline = time.monotonic() + HANDSHAKE_IVL_S + 3
        open_conns = len(silent)
        while open_conns and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    data = key.fileobj.recv(4096)  # the broker's greeting, then end of stream
                except ConnectionResetError:
                    data = b""
                if not data:
                    selector.unregister(key.fileobj)
                    open_conns -= 1
        selector.close()
        assert open_conns == 0, f"{open_conns} silent connection(s) still open after {HANDSHAKE_IVL_S + 3} s"
    finally:
        for conn in conns:
            conn.close()
    wait_for(
        lambda: broker_fds(stack) <= baseline + 5, HANDSHAKE_IVL_S + 1, what="broker fds back to baseline"
    )
    assert_serving(stack, pids)


# --- a client that never reads (E5) -------------------------------------------------------------


def test_client_that_never_reads_does_not_block_others(stack, pids, zsockets):
    taskhash, unihash = uuid.uuid4().hex, os.urandom(32).hex()
    with create_client(stack.address, timeout=5) as client:
        client.report_unihash(taskhash, M, os.urandom(32).hex(), unihash)
        dropped_before = client.get_stats()["broker"]["counters"].get("replies.dropped", 0)
    # Each reply is 20 hits (1.3 KB): 10,000 of them overflow the broker's send queue to this
    # peer (1000 messages) plus the kernel buffers, which are kept small on the reading side.
    greedy = zsockets.dealer(stack.address, RCVHWM=10, RCVBUF=4096, SNDTIMEO=10_000)
    try:
        chunk = p.pack_items([taskhash] * 20)
        for i in range(10_000):
            greedy.send_multipart(p.encode_request(b"g%x" % i, p.GET, [M.encode(), chunk]))
        latencies = []
        overlapped = 0
        with create_client(stack.address, timeout=10) as client:
            while True:
                pending = client.get_stats()["broker"]["pending_requests"]
                started = time.monotonic()
                assert_serving(stack, pids, timeout_s=10)
                latencies.append(time.monotonic() - started)
                if not pending:
                    break
                overlapped += 1
            wait_for(
                lambda: client.get_stats()["broker"]["pending_requests"] == 0,
                timeout=30,
                what="the greedy client's requests to be processed",
            )
            dropped = client.get_stats()["broker"]["counters"].get("replies.dropped", 0) - dropped_before
    finally:
        greedy.close()
    assert overlapped >= 1, "the other client never ran while the greedy one had requests queued"
    assert max(latencies) < 5.0, latencies
    assert dropped > 0, "the broker never met the high-water mark: the test did not test anything"
    assert_serving(stack, pids)
