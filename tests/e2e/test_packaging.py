"""The distribution as a Yocto admin installs it: a plain install is the client alone, for
BitBake's Python environment; the daemons and tools come with extras and say so without."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CLIENT_CALL = """
import sys
from hq.client import create_client
with create_client(sys.argv[1], timeout=10) as client:
    print(client.report_unihash("1" * 64, "oe.sstatesig.OEOuthashBasic", "2" * 64, "3" * 64)["unihash"])
    method = "oe.sstatesig.OEOuthashBasic"
    print(client.get_unihash_batch([(method, "1" * 64), (method, "4" * 64)]))
"""


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory):
    """A fresh virtual environment with ``pip install hq-hashequiv`` (the wheel of this tree)."""
    tmp = tmp_path_factory.mktemp("plain")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), REPO],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp / "dist").glob("hq_hashequiv-*.whl")
    # No pip inside (faster); this interpreter's pip installs into it, resolving as a user's would.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, capture_output=True
    )
    python = str(tmp / "venv" / "bin" / "python")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    return tmp / "venv" / "bin"


def test_a_plain_install_is_the_client_and_pyzmq_only(plain_venv):
    code = (
        "import importlib.metadata as m, json\n"
        "print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))"
    )
    out = subprocess.run(
        [str(plain_venv / "python"), "-c", code], check=True, capture_output=True, text=True, cwd="/"
    ).stdout
    assert set(json.loads(out)) - {"pip", "setuptools", "wheel"} == {"hq-hashequiv", "pyzmq"}


def test_the_plain_client_talks_to_a_full_server(plain_venv, stack):
    result = subprocess.run(
        [str(plain_venv / "python"), "-c", CLIENT_CALL, stack.address],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["3" * 64, f"['{'3' * 64}', None]"]


@pytest.mark.parametrize(
    "program,args,extra",
    [
        ("hq-worker", ["--help"], "server"),
        ("hq-server", ["--version"], "server"),
        ("hq-admin", ["stats"], "admin"),
        ("hq-bench", ["burst"], "bench"),
        ("hq-gateway", ["--listen", "ws://127.0.0.1:0", "--broker", "tcp://127.0.0.1:1"], "gateway"),
        ("hq-broker", ["--upstream", "ws://127.0.0.1:1"], "gateway"),
    ],
)
def test_a_program_without_its_extra_says_which_in_one_line(plain_venv, program, args, extra):
    result = subprocess.run([str(plain_venv / program), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"pip install 'hq-hashequiv[{extra}]'" in result.stderr, (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_the_broker_needs_no_extra(plain_venv):
    result = subprocess.run(
        [str(plain_venv / "hq-broker"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.startswith("hq-broker "), result.stderr
