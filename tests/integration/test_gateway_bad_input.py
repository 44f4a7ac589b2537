"""hq-gateway against clients that misbehave: silent and half-open connections, a client that
never reads its answers, thousands of connections at once, and several gateways sharing one
TCP port. Each misbehaving connection is closed; every other client is served meanwhile."""

from __future__ import annotations

import socket
import subprocess
import time

import psutil
import pytest

from helpers import Gateway, Stack, connect, script, wait_for
from hq.bench.stack import free_port

M = "TestMethod"
HELLO = b"OEHASHEQUIV 1.1\n\n"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("broker")).start()
    yield stack
    assert stack.stop() == 0, stack.log()


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the gateway has closed (EOF or reset); data that was waiting is read away."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(1 << 20):
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def pings(hashserv, address: str) -> bool:
    with hashserv.create_client(address) as client:
        return client.ping() == {"alive": True}


def test_silent_and_half_open_connections_are_closed_others_served(hashserv, broker, tmp_path):
    gateway = Gateway(tmp_path, broker.address, "--idle-timeout", "1")
    try:
        silent = connect(gateway.tcp)  # says nothing at all
        handshaken = connect(gateway.tcp)  # handshakes, then nothing
        handshaken.sendall(HELLO)
        half_open = connect(gateway.tcp)  # sends half a line and stops
        half_open.sendall(b"OEHASHEQ")
        streaming = connect(gateway.tcp)  # enters a stream and stops mid-batch
        streaming.sendall(HELLO + b'{"get-stream": null}\n' + f"{M} {'a' * 40}\n".encode())
        start = time.monotonic()
        assert pings(hashserv, gateway.tcp)  # meanwhile: served at once
        assert time.monotonic() - start < 1
        for sock in (silent, handshaken, half_open, streaming):
            wait_for(lambda s=sock: closed_by_peer(s), timeout=5, what="a silent connection to be closed")
            sock.close()
        assert time.monotonic() - start >= 0.9  # by the idle timeout, not before
    finally:
        assert gateway.stop() == 0, gateway.log()


def test_a_connection_that_keeps_talking_outlives_the_idle_timeout(hashserv, broker, tmp_path):
    """The idle timer counts silence, not age: a client that keeps asking stays connected
    well past a 1 s --idle-timeout, and is closed once it falls silent."""
    gateway = Gateway(tmp_path, broker.address, "--idle-timeout", "1")
    try:
        sock = connect(gateway.tcp)
        sock.sendall(HELLO)
        sock.settimeout(5)
        answers = sock.makefile("rb")
        start = time.monotonic()
        while time.monotonic() - start < 2.5:
            sock.sendall(b'{"ping": null}\n')
            assert answers.readline() == b'{"alive": true}\n'
            silent_from = time.monotonic()
            assert not closed_by_peer(sock)
            sock.settimeout(5)  # blocking again (closed_by_peer looked without blocking)
        wait_for(lambda: closed_by_peer(sock), timeout=5, what="the silent connection to be closed")
        assert time.monotonic() - silent_from >= 0.9
        sock.close()
    finally:
        assert gateway.stop() == 0, gateway.log()


def test_a_client_that_never_reads_is_closed_after_the_write_timeout(hashserv, broker, tmp_path):
    gateway = Gateway(tmp_path, broker.address, "--write-timeout", "1")
    try:
        hog = connect(gateway.tcp, rcvbuf=4096)  # a small window
        # answers (a unihash, 65 bytes a line) far beyond what the kernel buffers hold
        with hashserv.create_client(gateway.tcp) as client:
            client.report_unihash("7" * 40, M, "8" * 64, "9" * 64)
        lines = f"{M} {'7' * 40}\n".encode() * 200000
        hog.sendall(HELLO + b'{"get-stream": null}\n')
        hog.settimeout(0.2)
        sent = 0
        start = time.monotonic()
        while sent < len(lines) and time.monotonic() - start < 10:
            try:
                sent += hog.send(lines[sent : sent + 65536])
            except (socket.timeout, BlockingIOError):
                break  # TCP pushes back: the gateway has stopped reading this client
            except (BrokenPipeError, ConnectionResetError):
                break
        # the hog never reads; everyone else is answered as usual
        for _ in range(3):
            assert pings(hashserv, gateway.tcp)
        # closed by the gateway (the test must not read: that would make the hog a reader)
        hog_port = hog.getsockname()[1]

        def still_connected() -> bool:
            conns = psutil.Process(gateway.proc.pid).net_connections("tcp")
            return any(c.raddr and c.raddr.port == hog_port for c in conns)

        wait_for(lambda: not still_connected(), timeout=10, what="the hog to be closed")
        hog.close()
        assert pings(hashserv, gateway.tcp)
    finally:
        assert gateway.stop() == 0, gateway.log()


def test_thousands_of_connections_at_once(hashserv, broker, tmp_path):
    gateway = Gateway(tmp_path, broker.address)
    n = 2000
    socks = []
    try:
        for _ in range(n):
            sock = connect(gateway.tcp)
            sock.sendall(HELLO + b'{"ping": {}}\n')
            socks.append(sock)
        assert pings(hashserv, gateway.tcp)  # a build's client, among them all
        for sock in socks:
            sock.settimeout(30)
            assert sock.makefile("rb").readline() == b'{"alive": true}\n'
        for sock in socks:
            sock.close()
        socks.clear()
        assert pings(hashserv, gateway.tcp)
        assert gateway.proc.poll() is None
    finally:
        for sock in socks:
            sock.close()
        assert gateway.stop() == 0, gateway.log()


def test_gateways_share_a_port_and_one_going_leaves_the_other(hashserv, broker, tmp_path):
    """SO_REUSEPORT: the kernel spreads new connections over every gateway on the port."""
    port = free_port()
    first = Gateway(tmp_path, broker.address, tcp=f"127.0.0.1:{port}", name="first")
    second = Gateway(tmp_path, broker.address, tcp=f"127.0.0.1:{port}", name="second")
    try:
        assert first.tcp == second.tcp == f"127.0.0.1:{port}"
        # The second says it shares (an unrelated hq's gateway there would split the traffic).
        assert "another process already listens" in second.log()
        assert "another process already listens" not in first.log()
        socks = [connect(first.tcp) for _ in range(40)]
        for sock in socks:
            sock.sendall(HELLO + b'{"ping": {}}\n')
            assert sock.makefile("rb").readline() == b'{"alive": true}\n'

        def accepted(gateway) -> int:
            conns = psutil.Process(gateway.proc.pid).net_connections("tcp")
            return sum(c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in conns)

        counts = (accepted(first), accepted(second))
        assert sum(counts) == 40 and min(counts) > 0, counts  # both took some (odds: 1 - 2^-39)
        for sock in socks:
            sock.close()
        assert first.stop() == 0, first.log()
        for _ in range(10):  # all to the one left
            assert pings(hashserv, second.tcp)
    finally:
        if first.proc.poll() is None:
            first.stop()
        assert second.stop() == 0, second.log()


def test_a_unix_path_that_is_a_file_is_refused_not_replaced(broker, tmp_path):
    """--listen unix://PATH where PATH is some file: one line and exit 2; the file stays."""
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    run = subprocess.run(
        [script("hq-gateway"), "--broker", broker.address, "--listen", f"unix://{victim}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and f"cannot listen on unix://{victim}" in run.stderr
    assert victim.read_text() == "keep me"


def test_a_chunk_stream_that_never_ends_is_closed_at_its_limit(hashserv, broker, tmp_path):
    """{"chunk-stream": null} then line after line and never the blank one: the gateway
    closes at MAX_CHUNKED, its memory bounded, and others are served meanwhile."""
    from hq.oehashequiv import MAX_CHUNKED

    gateway = Gateway(tmp_path, broker.address)
    try:
        before = psutil.Process(gateway.proc.pid).memory_info().rss
        sock = connect(gateway.tcp)
        sock.sendall(HELLO + b'{"chunk-stream": null}\n')
        line, sent = b"x" * 60000 + b"\n", 0
        with pytest.raises(OSError):  # reset or broken pipe: the gateway closed it
            while sent < 4 * MAX_CHUNKED:
                sock.sendall(line)
                sent += len(line)
        sock.close()
        assert psutil.Process(gateway.proc.pid).memory_info().rss - before < 3 * MAX_CHUNKED
        assert pings(hashserv, gateway.tcp)
    finally:
        assert gateway.stop() == 0, gateway.log()
