"""Layout rules: one import namespace, layers that import downward only, a small client.

core (hq)                      the foundation: imports nothing of the rest
broker, workers, client        import only core (the client only its leaf modules)
admin, bench, server           on top: may import the layers below, never each other's
                               internals (bench runs hq-server as a program)
"""

import ast
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: Source folder -> the import package it is installed as (pyproject's package-dir).
PACKAGES = {
    "core": "hq",
    "broker": "hq.broker",
    "workers": "hq.workers",
    "client": "hq.client",
    "admin": "hq.admin",
    "bench": "hq.bench",
    "server": "hq.server",
}
#: Layer -> the layers it may import. hq-admin is a client: it must not load the
#: workers' database code (peewee) or the broker.
ALLOWED = {
    "core": {"core"},
    "broker": {"core", "broker"},
    "workers": {"core", "workers"},
    "client": {"client", "hq.protocol", "hq.sockets", "hq.addresses"},
    "admin": {"core", "client", "admin"},
    "bench": {"core", "client", "workers", "bench"},
    "server": {"core", "client", "broker", "workers", "server"},
}
#: Modules of core that import nothing of hq at all.
LEAVES = ("protocol", "addresses", "sockets", "logs", "signals", "notify", "numbers", "progress", "extras")


def layer_of(module: str) -> str:
    """The folder an ``hq...`` module lives in."""
    parts = module.split(".")
    if len(parts) > 1 and f"hq.{parts[1]}" in PACKAGES.values():
        return next(folder for folder, package in PACKAGES.items() if package == f"hq.{parts[1]}")
    return "core"


def hq_imports(path: pathlib.Path, package: str) -> set:
    """Every hq module ``path`` imports, at any depth of the file (lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "hq")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the same package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                out.add(f"{base}.{node.module}" if node.module else base)
            elif node.module and node.module.split(".")[0] == "hq":
                if node.module == "hq":
                    out.update(f"hq.{a.name}" for a in node.names)
                else:
                    out.add(node.module)
    return out


def test_layers_import_downward_only():
    offenders = []
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            for module in hq_imports(path, package):
                target = layer_of(module)
                allowed = ALLOWED[folder]
                if (
                    target not in allowed
                    and module not in allowed
                    and not (
                        target == "core" and any(module == a or module.startswith(a + ".") for a in allowed)
                    )
                ):
                    offenders.append(f"{path.relative_to(ROOT)} imports {module} ({folder} -> {target})")
    assert offenders == []


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from hq.broker.main import write_lines\n")
    assert layer_of(next(iter(hq_imports(bad, "hq")))) == "broker"  # core -> broker is caught


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_of_hq(leaf):
    assert hq_imports(ROOT / "core" / f"{leaf}.py", "hq") == set()


def test_client_loads_only_stdlib_and_pyzmq():
    code = (
        "import sys, hq.client\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] in ('peewee', 'tabulate', 'sqlite3', 'psutil'))\n"
        "bad += sorted(m for m in sys.modules if m.startswith('hq.') and not m.startswith('hq.client') "
        "and m not in ('hq.protocol', 'hq.sockets', 'hq.addresses'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == ""


def test_hq_admin_loads_no_database_code():
    code = (
        "import sys, hq.admin.cli\n"
        "print(','.join(sorted(m for m in sys.modules\n"
        "      if m.split('.')[0] == 'peewee' or m.startswith(('hq.workers', 'hq.broker')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == ""


def test_no_bare_imports_of_source_folders():
    pattern = re.compile(r"^\s*(from|import)\s+(%s)(\.|\s|$)" % "|".join(PACKAGES), re.M)
    offenders = []
    for folder in (*PACKAGES, "tests"):
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
    (wheel,) = tmp_path.glob("*.whl")
    listing = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in listing if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"hq"}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).glob("*.py"):
            assert f"{package.replace('.', '/')}/{path.name}" in listing
