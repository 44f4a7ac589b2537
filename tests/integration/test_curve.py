"""CURVE on a real stack: what a capture of the wire shows, who gets in, and how a client
that cannot get in finds out (README, "Securing hq")."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import Stack, script, wait_for
from hq import curve
from hq.client import create_client

pytestmark = pytest.mark.skipif(not curve.available(), reason="this libzmq has no CURVE support")

M = "TestMethod"
T = "35788efcb8dfb0a02659d81cf2bfd695fb30faf9"
O1 = "2765d4a5884be49b28601445c2760c5f21e7e5c0ee2b7e3fce98fd7e5970796f"
U1 = "a69ec97f5af2e21e1a1f9cc8896965515d5559425666f734e245a3d40cee33d9"
PASSWORD = "the-admin-password-on-the-wire"


class RecordingRelay:
    """A TCP relay on 127.0.0.1 that forwards to ``target`` and keeps every byte it passes."""

    def __init__(self, target: str):
        host, port = target.rsplit("/", 1)[-1].rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.captured = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            with self.lock:
                self.captured += data
            dst.sendall(data)

    def close(self):
        self.listener.close()


def keygen(directory, name: str):
    run = subprocess.run(
        [script("hq-admin"), "keygen", str(directory), "--name", name],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr
    return os.path.join(directory, name + ".key"), os.path.join(directory, name + ".key_secret")


def exchange(address: str, **keys) -> None:
    """Log in, report, look up: every secret and hash of the test crosses the wire."""
    with create_client(address, username="admin", password=PASSWORD, timeout=10, **keys) as client:
        client.report_unihash(T, M, O1, U1)
        assert client.get_unihash(M, T) == U1
        assert client.unihash_exists(U1)


@pytest.fixture
def keys(tmp_path):
    directory = tmp_path / "keys"
    broker = keygen(directory, "broker")
    client = keygen(directory, "builder")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "builder.key").write_bytes(open(client[0], "rb").read())
    return {"broker": broker, "client": client, "allowed": str(allowed)}


def test_a_capture_shows_hashes_and_tokens_in_clear_text_without_curve_and_nothing_with_it(tmp_path, keys):
    secrets = [T.encode(), O1.encode(), U1.encode(), PASSWORD.encode(), b"admin"]
    (tmp_path / "plain").mkdir()
    env = {"HQ_ADMIN_PASSWORD": PASSWORD}
    with Stack(tmp_path / "plain", args=["--admin-user", "admin"], env=env) as plain:
        relay = RecordingRelay(plain.address)
        exchange(relay.address)
        relay.close()
        assert all(s in relay.captured for s in secrets)  # the check can fail
    (tmp_path / "curve").mkdir()
    args = ["--admin-user", "admin", "--curve-secret-key", keys["broker"][1]]
    with Stack(tmp_path / "curve", args=args, env=env) as secure:
        relay = RecordingRelay(secure.address)
        exchange(relay.address, server_key=keys["broker"][0])
        relay.close()
        assert len(relay.captured) > 1000
        assert [s for s in secrets if s in relay.captured] == []
        assert b"HQC01" not in relay.captured and b"report" not in relay.captured


def test_an_unknown_client_key_is_refused_at_the_handshake(tmp_path, keys):
    args = ["--curve-secret-key", keys["broker"][1], "--curve-clients", keys["allowed"]]
    with Stack(tmp_path, args=args) as s:
        with create_client(s.address, server_key=keys["broker"][0], client_key=keys["client"][1]) as ok:
            ok.ping()
            before = ok.get_stats()["broker"]["counters"]
        stranger = keygen(tmp_path / "other", "stranger")
        for extra in ({"client_key": stranger[1]}, {}):  # a key not listed, a fresh one
            start = time.monotonic()
            with create_client(s.address, server_key=keys["broker"][0], timeout=10, **extra) as client:
                with pytest.raises(ConnectionError, match="refused this client's CURVE key"):
                    client.get_unihash(M, T)
            assert time.monotonic() - start < 5
        with create_client(s.address, server_key=keys["broker"][0], client_key=keys["client"][1]) as ok:
            after = ok.get_stats()["broker"]["counters"]
        # The refused clients never reached the scheduler: no request of theirs was counted.
        assert after.get("requests.get", 0) == before.get("requests.get", 0)
        assert after["curve.refused"] >= 2
        assert "refused a client connection from 127.0.0.1: unknown CURVE key" in s.log()


def test_wrong_or_missing_server_key_is_a_connection_error_within_the_deadline(tmp_path, keys):
    with Stack(tmp_path, args=["--curve-secret-key", keys["broker"][1]]) as s:
        for kwargs, text in (
            ({"server_key": keys["client"][0]}, "CURVE handshake failed"),
            ({}, "wants CURVE"),
        ):
            start = time.monotonic()
            with create_client(s.address, timeout=10, **kwargs) as client:
                with pytest.raises(ConnectionError, match=text):
                    client.get_unihash(M, T)
            assert time.monotonic() - start < 5, kwargs


def test_workers_on_a_tcp_backend_must_prove_themselves(tmp_path, keys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        backend = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    args = ["--backend", backend, "--curve-secret-key", keys["broker"][1]]
    with Stack(tmp_path, args=args) as s:
        client = create_client(s.address, server_key=keys["broker"][0], timeout=10)
        with client:
            client.report_unihash_equiv(T, M, U1)  # the stack's own workers got in
            assert len(client.get_stats()["workers"]) == 2
            rogues = []
            stranger = keygen(tmp_path / "other", "stranger")
            for extra in ([], ["--curve-server-key", keys["broker"][0], "--curve-worker-key", stranger[1]]):
                rogues.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "hq.workers",
                            "--backend",
                            backend,
                            "--db",
                            s.db,
                            "--name",
                            "rogue",
                        ]
                        + ["--heartbeat-interval", "0.2", *extra],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            try:
                wait_for(
                    lambda: s.log().count("refused a worker connection") >= 2, what="both rogues refused"
                )
                for _ in range(20):  # they never register, so never get a job
                    assert client.get_unihash(M, T) == U1
                    assert len(client.get_stats()["workers"]) == 2
            finally:
                for rogue in rogues:
                    rogue.terminate()
                    rogue.wait(10)


def test_a_broker_with_a_bad_key_file_says_so_in_one_line(tmp_path, keys):
    for args in (
        ["--curve-secret-key", keys["broker"][0]],  # the public half
        ["--curve-secret-key", str(tmp_path / "missing")],
        ["--curve-secret-key", keys["broker"][1], "--curve-clients", str(tmp_path / "nowhere")],
    ):
        run = subprocess.run(
            [script("hq-server"), "--db", str(tmp_path / "x.db"), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr, run.stderr


def test_keygen_never_overwrites_a_key(tmp_path):
    keygen(tmp_path, "broker")
    again = subprocess.run(
        [script("hq-admin"), "keygen", str(tmp_path)], capture_output=True, text=True, timeout=30
    )
    assert again.returncode == 1 and "exists; not overwriting it" in again.stderr
    assert oct(os.stat(tmp_path / "broker.key_secret").st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(
    "where,name,said",
    [
        ("/proc", "broker", "cannot write keys in /proc"),
        ("keys", "../../escape", "a plain file name is needed"),
    ],
)
def test_keygen_where_it_cannot_write_says_so_in_one_line(tmp_path, where, name, said):
    directory = where if where.startswith("/") else str(tmp_path / where)
    run = subprocess.run(
        [script("hq-admin"), "keygen", directory, "--name", name], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and said in run.stderr, run.stderr
    assert not (tmp_path.parent / "escape.key").exists()
