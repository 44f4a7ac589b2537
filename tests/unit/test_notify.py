"""hq.notify against a real AF_UNIX datagram socket, as systemd's NOTIFY_SOCKET is."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import uuid

import pytest

from hq import notify as sd

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def short_dir():
    """A directory for a socket path: AF_UNIX paths hold ~107 bytes, pytest's tmp_path may not."""
    path = tempfile.mkdtemp(prefix="hq-n-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def test_path_socket_gets_the_states_in_one_datagram(short_dir, monkeypatch):
    path = os.path.join(short_dir, "notify")
    with listener(path) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert sd.notify("READY=1", "STATUS=serving clients on tcp://127.0.0.1:8686") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving clients on tcp://127.0.0.1:8686"
        assert sd.notify("STOPPING=1") is True
        assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_socket_when_the_name_starts_with_at(monkeypatch):
    name = f"hq-test-notify-{uuid.uuid4().hex}"
    with listener("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd.notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"


@pytest.mark.parametrize("value", [None, ""])
def test_nothing_without_notify_socket(value, monkeypatch, caplog):
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    with caplog.at_level(logging.DEBUG, logger="hq.notify"):
        assert sd.notify("READY=1") is False
    assert caplog.records == []


def test_a_socket_that_is_gone_never_raises(short_dir, monkeypatch, caplog):
    path = os.path.join(short_dir, "notify")
    listener(path).close()  # bound once, then the manager went away: the path is left behind
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with caplog.at_level(logging.DEBUG, logger="hq.notify"):
        assert sd.notify("STOPPING=1") is False  # ECONNREFUSED
        os.unlink(path)
        assert sd.notify("STOPPING=1") is False  # ENOENT
        monkeypatch.setenv("NOTIFY_SOCKET", f"@hq-test-nobody-{uuid.uuid4().hex}")
        assert sd.notify("READY=1") is False  # an abstract name nobody bound
        monkeypatch.setenv("NOTIFY_SOCKET", "/" + "x" * 200)
        assert sd.notify("READY=1") is False  # not even an address: longer than sun_path
    assert len(caplog.records) == 4
    assert all(r.levelno == logging.DEBUG and "cannot notify" in r.getMessage() for r in caplog.records)


def test_environ_for_children_drops_only_the_socket(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("HQ_DB", "/var/lib/hq/hq.db")
    env = sd.environ_for_children()
    assert "NOTIFY_SOCKET" not in env and env["HQ_DB"] == "/var/lib/hq/hq.db"
    assert os.environ["NOTIFY_SOCKET"] == "/run/systemd/notify"  # this process still notifies
