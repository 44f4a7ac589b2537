"""A database file on a network filesystem is refused at start, in one line (as BitBake
refuses its hash-equivalence database on NFS): SQLite's locks are not reliable there and WAL
mode does not work. The network filesystem is real: sshfs (FUSE) mounted from an sshd this
test runs on 127.0.0.1. Without sshfs and sshd the test skips, saying how to get them; with
HQ_REQUIRE_SSHFS=1 (.ci/run sets it where they are) it fails instead."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess

import pytest

from helpers import script, wait_for
from hq.workers.filesystem import filesystem_type

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
HOW = "install sshfs and openssh-server (Debian: apt-get install sshfs openssh-server)"


def missing(message: str) -> None:
    if os.environ.get("HQ_REQUIRE_SSHFS"):
        pytest.fail(message + " (HQ_REQUIRE_SSHFS is set)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshfs_mount(tmp_path):
    """A directory of tmp_path mounted over SSH (fuse.sshfs) at another; yields the mount."""
    if not (shutil.which("sshfs") and os.access(SSHD, os.X_OK) and shutil.which("ssh-keygen")):
        missing(f"no sshfs or sshd here: {HOW}")
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        missing("sshfs needs /dev/fuse, and this test's sshd needs root")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    port = free_port()
    config = keys / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile {keys / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\n"
        "UsePAM no\nSubsystem sftp internal-sftp\n"
    )
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
    exported, mount = tmp_path / "exported", tmp_path / "mnt"
    exported.mkdir()
    mount.mkdir()
    try:

        def listening():
            if sshd.poll() is not None:
                pytest.fail(f"sshd exited: {sshd.stderr.read()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, timeout=20, what="sshd listening")
        options = [
            f"IdentityFile={keys / 'client'}",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "BatchMode=yes",
            f"port={port}",
        ]
        argv = ["sshfs", f"{getpass.getuser()}@127.0.0.1:{exported}", str(mount)]
        for option in options:
            argv += ["-o", option]
        subprocess.run(argv, check=True, timeout=30, capture_output=True)
        try:
            wait_for(lambda: filesystem_type(str(mount / "x")) == "fuse.sshfs", timeout=20, what="the mount")
            yield mount
        finally:
            subprocess.run(["fusermount", "-u", "-z", str(mount)], timeout=30, capture_output=True)
    finally:
        sshd.terminate()
        sshd.wait(timeout=20)


def one_line_refusal(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "network filesystem (fuse.sshfs)" in lines[0] and "local disk" in lines[0], lines[0]
    return lines[0]


def test_a_database_on_a_network_filesystem_is_refused_in_one_line(sshfs_mount, tmp_path):
    db = str(sshfs_mount / "hq.db")
    argv = [script("hq-server"), "--db", db, "--bind", "tcp://127.0.0.1:*"]
    server = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    one_line_refusal(server)
    worker = subprocess.run(
        [script("hq-worker"), "--db", db, "--backend", f"ipc://{tmp_path}/backend.ipc"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    one_line_refusal(worker)
    assert not os.listdir(sshfs_mount)  # nothing made there: no database, no lock file


def test_the_filesystem_type_is_the_kernels(tmp_path):
    """On the local disk the tests run on: what findmnt (util-linux) says, and not refused."""
    if not shutil.which("findmnt"):
        pytest.skip("no findmnt here (util-linux)")
    expected = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    assert filesystem_type(str(tmp_path / "hq.db")) == expected
