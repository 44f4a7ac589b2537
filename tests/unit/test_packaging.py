"""Layout rules: one import namespace, a small client, no imports of the source folders."""

import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("core", "broker", "workers", "client")


def test_client_imports_only_stdlib_and_pyzmq():
    code = (
        "import sys, hq.client\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('peewee', 'tabulate', 'sqlite3', 'psutil'))\n"
        "bad += sorted(m for m in sys.modules if m.startswith('hq.') and m not in ('hq.client', 'hq.client.client', 'hq.protocol', 'hq.sockets', 'hq.addresses'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == ""


def test_no_bare_imports_of_source_folders():
    pattern = re.compile(r"^\s*(from|import)\s+(core|broker|workers|client)(\.|\s|$)", re.M)
    offenders = []
    for folder in (*SOURCE_DIRS, "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_protocol_module_is_a_leaf():
    text = (ROOT / "core" / "protocol.py").read_text()
    imports = re.findall(r"^(?:from|import)\s+([\w.]+)", text, re.M)
    assert {name.split(".")[0] for name in imports} <= {"__future__", "json", "re", "typing"}


@pytest.mark.e2e
def test_wheel_has_one_top_level_name(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("hq-*.whl")
    names = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    top = {n for n in names if not n.endswith(".dist-info")}
    assert top == {"hq"}
    listing = zipfile.ZipFile(wheel).namelist()
    for module in ("hq/protocol.py", "hq/broker/scheduler.py", "hq/workers/store.py", "hq/client/client.py", "hq/server.py"):
        assert module in listing
