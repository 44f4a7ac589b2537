"""One SQLite file, one broker: a lock beside the file that the workers of one broker share.

The broker keeps a cache of mappings (:mod:`hq.broker.cache`) that is exact because every
write to the file passes through it. A second broker whose workers open the same file (a
second ``hq-server`` started by mistake, a supervisord and a systemd stack at once) would
write behind the first one's cache: it would answer misses for what the other stored and
hits for what the other removed. So a worker takes a shared ``flock`` on ``FILE-broker.lock``
while it runs, and the file names the broker its holders serve (the backend address they
connect to). A worker of another broker finds the lock held for someone else and refuses to
start, in one line; ``hq-server`` checks the same before it starts anything. Several brokers
on one database is what PostgreSQL is for.

The lock needs no gate: the file's text changes only under an exclusive lock (nobody else
holds it then), and a worker checks the text after it holds its shared lock, so every holder
agrees with the text. A worker that finds another broker's name looks again for a moment
before it refuses: the name may be a stopped broker's, read while someone held the lock
exclusively for an instant (hq-server's check, a worker naming its broker). A lock dies
with its process, so a crashed stack never leaves a stale one. SQLite in WAL mode
works on one host only, so every worker of a file is on this host, where the lock is seen.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time

from hq import addresses

log = logging.getLogger(__name__)

SUFFIX = "-broker.lock"
#: How long a worker waits while another holds the lock exclusively (writing its text).
WAIT_S = 5.0
#: How long a worker looks again before it takes another broker's name in the file for a
#: live broker's (an exclusive lock lasts microseconds: see :meth:`BrokerLock.acquire`).
SETTLE_S = 0.5


class HeldByAnother(Exception):
    """The database file is in use by another broker's workers: the message says whose."""


def lock_path(db_path: str) -> str:
    """Beside the file itself: a symbolic link to it finds the same lock (as SQLite finds the
    same ``-wal`` file)."""
    return os.path.realpath(db_path) + SUFFIX


def _is_local(ip: str) -> bool:
    """Is ``ip`` one of this host's addresses (loopback included)? Binding to it says."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


def broker_identity(backend: str) -> str:
    """The broker a worker serves, named so that every worker of it agrees: an ipc:// path
    made absolute, a tcp:// host resolved to all its addresses (any address of this host is
    ``local``, since 127.0.0.1 and the host's own address reach the same broker)."""
    scheme, sep, rest = backend.partition("://")
    if not sep:
        return backend
    if scheme == "ipc" and not rest.startswith("@"):  # @name: Linux's abstract namespace
        return f"ipc://{os.path.realpath(rest)}"
    parts = addresses.host_port(rest) if scheme == "tcp" else None
    if parts is None:
        return backend
    host, port = parts[0].rpartition(";")[2], parts[1]  # tcp://SOURCE;HOST:PORT: the host
    try:
        ips = sorted({info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
    except (OSError, UnicodeError):
        return f"tcp://{host.lower()}:{port}"  # as written (a name that does not resolve now)
    if any(_is_local(ip) for ip in ips):
        return f"tcp://local:{port}"
    return f"tcp://{','.join(ips)}:{port}"  # all of a name's addresses: any order DNS gives


def _flock(fd: int, operation: int, deadline: float) -> bool:
    """``flock`` without blocking, retried until ``deadline`` while it would block; False
    then (a holder of the exclusive lock is stuck, or the lock is held the other way)."""
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0)
        holder = json.loads(text)
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict, path: str) -> str:
    broker = holder.get("broker", "an unknown broker")
    pid, host = holder.get("pid"), holder.get("host")
    first = f"; its first worker was pid {pid}" if isinstance(pid, int) else ""
    first += f" on {host}" if first and isinstance(host, str) and host else ""
    return (
        f"{path} is in use by the workers of another broker ({broker}{first}): one SQLite file "
        "serves one broker (stop that stack first; several brokers need PostgreSQL; a read-only "
        "mirror's workers take --read-only)"
    )


class BrokerLock:
    """The shared lock of one worker process, held until :meth:`release` or its exit."""

    def __init__(self, fd: int, path: str):
        self.fd = fd
        self.path = path

    @classmethod
    def acquire(cls, db_path: str, identity: str, wait_s: float = WAIT_S) -> BrokerLock | None:
        """Hold the lock of ``db_path`` for the broker named ``identity``; HeldByAnother if
        another broker's workers hold it. None (no guard) when the lock file cannot be made:
        a read-only directory, where the worker can only answer lookups anyway."""
        path = lock_path(db_path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            log.warning("cannot make %s (%s): nothing stops another broker's workers", path, exc.strerror)
            return None
        try:
            deadline = time.monotonic() + wait_s
            settle = time.monotonic() + SETTLE_S
            while True:
                if _flock(fd, fcntl.LOCK_EX, time.monotonic()):  # nobody holds it: name the broker
                    text = json.dumps({"broker": identity, "pid": os.getpid(), "host": socket.gethostname()})
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, text.encode() + b"\n", 0)
                if not _flock(fd, fcntl.LOCK_SH, deadline):
                    raise HeldByAnother(f"{path}: held exclusively for over {wait_s:g} s; is a worker stuck?")
                holder = _read(fd)
                if holder.get("broker") == identity:
                    return cls(fd, path)
                # Another broker's name: its workers hold the lock, or nobody does and someone
                # (hq-server's check, another worker switching to shared) held it exclusively
                # for an instant while the name was a stopped broker's. Look again a moment.
                fcntl.flock(fd, fcntl.LOCK_UN)
                if time.monotonic() >= settle:
                    raise HeldByAnother(_describe(holder, db_path))
                time.sleep(0.01)
        except BaseException:
            os.close(fd)  # closing drops the lock
            raise

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def holder(db_path: str, wait_s: float = WAIT_S) -> str | None:
    """Why a new broker must not use ``db_path`` (its workers' lock is held), else None."""
    try:
        fd = os.open(lock_path(db_path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: nobody holds it
    try:
        if _flock(fd, fcntl.LOCK_EX, time.monotonic()):
            return None
        if not _flock(fd, fcntl.LOCK_SH, time.monotonic() + wait_s):
            return None  # someone is taking it this instant; its workers will settle it
        return _describe(_read(fd), db_path)
    finally:
        os.close(fd)
