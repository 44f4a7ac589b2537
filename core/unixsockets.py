"""Unix socket files: is one there, and does a process listen on it? Used before binding a
path (hq-gateway's ``unix://``, the broker's ``ipc://``): a stale file of a killed process is
replaced, a live one refused, never taken over. Imports only the standard library."""

from __future__ import annotations

import os
import socket
import stat

#: sun_path holds 108 bytes with its NUL; a longer path is reached from its directory.
SUN_PATH_MAX = 107


def in_directory_of(path: str, call):
    """``call(name)`` with the working directory at ``path``'s folder: a unix socket's path
    may be longer than sun_path's 108 bytes, as BitBake's client also allows (it connects the
    same way). Only while starting: the working directory is the whole process's."""
    folder, name = os.path.split(os.path.abspath(path))
    cwd = os.open(".", os.O_RDONLY)
    try:
        os.chdir(folder)
        return call(name)
    finally:
        os.fchdir(cwd)
        os.close(cwd)


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def is_listening(path: str) -> bool:
    """A process accepts connections on the socket file at ``path`` (False: none there, or a
    stale file of a process that was killed, safe to replace)."""
    if not is_socket(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            in_directory_of(path, probe.connect)
        else:
            probe.connect(path)
    except ConnectionRefusedError:
        return False
    except OSError:
        return True  # there, and not refusing (EAGAIN: its backlog is full): taken
    finally:
        probe.close()
    return True
