"""Which filesystem a database file is on: hq's SQLite needs a local one.

SQLite's locks are not reliable on network filesystems (sqlite.org/faq.html#q5), and WAL
mode, which hq uses, needs every process of a database on one host (its ``-shm`` index is
shared memory); so does the lock one broker's workers share (:mod:`.brokerlock`). BitBake
refuses a hash-equivalence database on NFS for the same reason. A file there is refused at
start with a reason, instead of failing later as "database is locked" or worse.

The type comes from ``/proc/self/mountinfo``: the mount whose device is the directory's (a
bind mount has its source's type), else the longest mount point above it.
"""

from __future__ import annotations

import os

MOUNTINFO = "/proc/self/mountinfo"
#: Filesystem types (as mountinfo names them) whose files other hosts share.
NETWORK = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "ceph",
        "fuse.ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "fuse.sshfs",
        "fuse.glusterfs",
        "fuse.s3fs",
        "fuse.rclone",
    }
)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_type(path: str, mountinfo: str = MOUNTINFO) -> str | None:
    """The filesystem type of the directory holding ``path`` (None where it cannot be told)."""
    directory = os.path.dirname(os.path.realpath(path))
    try:
        st_dev = os.stat(directory).st_dev
        with open(mountinfo, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    device = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    by_device, by_prefix, longest = None, None, -1
    for line in lines:
        fields = line.split()
        try:
            dash = fields.index("-", 6)
            mount_device, mount_point, fstype = fields[2], _unescape(fields[4]), fields[dash + 1]
        except (ValueError, IndexError):
            continue
        if mount_device == device:
            by_device = fstype  # the last one: a later mount on the same device wins
        inside = directory == mount_point or directory.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= longest:
            by_prefix, longest = fstype, len(mount_point)
    return by_device or by_prefix


def check_local(path: str, mountinfo: str = MOUNTINFO) -> None:
    """ValueError, with what to do instead, if ``path`` is on a network filesystem."""
    fstype = filesystem_type(path, mountinfo)
    if fstype in NETWORK:
        raise ValueError(
            f"it is on a network filesystem ({fstype}), where SQLite's locks are not reliable "
            "and its WAL mode does not work: put it on a local disk, or use PostgreSQL to share "
            "one database between hosts"
        )
