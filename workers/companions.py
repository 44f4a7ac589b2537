"""The ``-wal`` and ``-shm`` beside an SQLite database file, and which file they belong to.

SQLite finds a database's WAL by name: whatever ``hq.db-wal`` is there when a file is
opened is read into it. After the file was replaced (a backup moved over it, with hq
running or stopped after a crash), the old file's WAL and index are still there, and SQLite
would read the old file's pages into the new one and checkpoint them into it ("database disk
image is malformed", and a corrupted file). SQLite cannot tell whose WAL it is; hq writes it
down: after every open, ``FILE-hq-wal.json`` records the identities (device, inode) of the
file and of its ``-wal`` and ``-shm``. Before an open, a ``-wal`` or ``-shm`` still recorded
for another file is renamed aside (``.replaced-TIME-INODE``, to go with the old file if it
was kept). The old file's last connection neither checkpoints nor deletes them: SQLite sees
that file moved. A crash of the file's own processes leaves the record naming this file, so
its WAL is recovered as SQLite means it to be; a clean stop, which leaves no WAL, removes the
record.

One process at a time (a lock on the directory) looks, moves and records.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time

log = logging.getLogger(__name__)

SUFFIXES = ("-wal", "-shm")
RECORD = "-hq-wal.json"


def file_id(path: str):
    """``[device, inode]`` of the file at ``path``, or None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


def _locked(path: str):
    """The database's directory, opened and locked exclusively; close it to unlock."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _read(path: str):
    try:
        with open(path + RECORD, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _valid(record) -> bool:
    """A record as :func:`identities` makes it (one edited by hand counts as none)."""

    def identity(value) -> bool:
        return value is None or (
            isinstance(value, list) and len(value) == 2 and all(isinstance(n, int) for n in value)
        )

    return isinstance(record, dict) and all(identity(record.get(key)) for key in ("db", *SUFFIXES))


def set_aside(path: str, known: dict | None = None) -> bool:
    """Move aside a ``-wal`` or ``-shm`` beside ``path`` that belongs to another file, by the
    record (or ``known``, the identities a worker saw while the old file was open, when
    there is no record). False if one could not be moved: the file must not be opened then."""
    try:
        directory = _locked(path)
    except OSError as exc:
        log.error("cannot look at the WAL beside %s: %s", path, exc)
        return False
    try:
        record = _read(path)
        if record is None:
            record = known
        if not _valid(record) or record["db"] in (None, file_id(path)):
            return True  # nothing recorded, or recorded for this very file
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in SUFFIXES:
            old = record.get(suffix)
            if old is not None and file_id(path + suffix) == old:
                aside = f"{path}{suffix}.replaced-{stamp}-{record['db'][1]}"
                os.rename(path + suffix, aside)
                log.warning("%s belongs to the file %s replaced: set aside as %s", path + suffix, path, aside)
        return True
    except OSError as exc:
        log.error("cannot set aside the replaced file's WAL beside %s: %s", path, exc)
        return False
    finally:
        os.close(directory)


def forget(path: str) -> None:
    """After a clean close: once SQLite has removed the ``-wal`` and ``-shm`` (the last
    connection closed), the record names files that are gone. It goes too, so that a later
    file's companions given the same inode numbers (another program's crash after a restore)
    are never taken for the old file's."""
    try:
        directory = _locked(path)
    except OSError:
        return
    try:
        if all(file_id(path + suffix) is None for suffix in SUFFIXES):
            os.remove(path + RECORD)
    except OSError:
        pass  # none written (a directory hq cannot write to), or gone already
    finally:
        os.close(directory)


def identities(path: str) -> dict:
    """What :func:`record` writes: the file's identity and its companions'."""
    return {"db": file_id(path), **{suffix: file_id(path + suffix) for suffix in SUFFIXES}}


def record(path: str) -> dict:
    """Write down which file the companions beside ``path`` belong to (after an open);
    returns it. A directory hq cannot write to keeps no record (and gets no WAL either)."""
    ids = identities(path)
    try:
        directory = _locked(path)
    except OSError:
        return ids
    try:
        if _read(path) != ids:
            temporary = f"{path}{RECORD}.{os.getpid()}"
            with open(temporary, "w", encoding="utf-8") as fh:
                json.dump(ids, fh)
            os.replace(temporary, path + RECORD)
    except OSError as exc:
        log.warning("cannot record the WAL beside %s: %s", path, exc)
    finally:
        os.close(directory)
    return ids
