"""Is a process listening on a unix socket file (hq.unixsockets)? On real sockets."""

import socket

from hq import unixsockets


def listener(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unixsockets.in_directory_of(str(path), sock.bind)
    sock.listen()
    return sock


def test_a_live_socket_is_taken_a_stale_one_and_other_files_are_not(tmp_path):
    live = listener(tmp_path / "live.sock")
    try:
        assert unixsockets.is_listening(str(tmp_path / "live.sock"))
    finally:
        live.close()  # the file stays, as after a killed process
    assert unixsockets.is_socket(str(tmp_path / "live.sock"))
    assert not unixsockets.is_listening(str(tmp_path / "live.sock"))
    (tmp_path / "plain").write_text("x")
    assert not unixsockets.is_listening(str(tmp_path / "plain"))
    assert not unixsockets.is_listening(str(tmp_path / "absent"))


def test_a_path_longer_than_sun_path_is_reached(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "live.sock"
    assert len(str(path)) > unixsockets.SUN_PATH_MAX
    live = listener(path)
    try:
        assert unixsockets.is_listening(str(path))
    finally:
        live.close()
