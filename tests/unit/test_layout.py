"""Layout rules: one import namespace, layers that import downward only, a small client.

core (hq)                      the foundation: imports nothing of the rest
broker, workers, client        import only core (the client only protocol, permissions, curve,
                               sockets, addresses: permissions imports only protocol); the
                               broker also upstream, whose agent runs in its process
gateway                        only core: it speaks the client protocol itself, over asyncio
upstream                       core, and the client for an upstream that is another hq
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
    "gateway": "hq.gateway",
    "upstream": "hq.upstream",
}
#: Layer -> the layers it may import. hq-admin is a client: it must not load the
#: workers' database code (peewee) or the broker.
ALLOWED = {
    "core": {"core"},
    "broker": {"core", "broker", "upstream"},
    "workers": {"core", "workers"},
    "client": {"client", "hq.protocol", "hq.sockets", "hq.addresses", "hq.permissions", "hq.curve"},
    "admin": {"core", "client", "admin"},
    "bench": {"core", "client", "workers", "bench"},
    "server": {"core", "client", "broker", "workers", "server"},
    "gateway": {"core", "gateway"},
    "upstream": {"core", "client", "upstream"},
}
#: Modules of core that import nothing of hq at all.
LEAVES = (
    "protocol",
    "addresses",
    "sockets",
    "logs",
    "signals",
    "notify",
    "numbers",
    "progress",
    "extras",
)


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


def upward_imports(path: pathlib.Path, folder: str) -> list:
    """The imports of ``path`` (in ``folder``) that its layer may not make."""
    allowed = ALLOWED[folder]
    out = []
    for module in sorted(hq_imports(path, PACKAGES[folder])):
        target = layer_of(module)
        # A layer, or (for the client) single core modules by name.
        if target in allowed or any(module == a or module.startswith(a + ".") for a in allowed):
            continue
        out.append(f"{path.name} imports {module} ({folder} -> {target})")
    return out


def test_layers_import_downward_only():
    offenders = [
        line
        for folder in PACKAGES
        for path in (ROOT / folder).rglob("*.py")
        for line in upward_imports(path, folder)
    ]
    assert offenders == []


def test_meta_hq_uses_the_client_alone():
    """The BitBake layer runs in BitBake's Python, where only the client is installed."""
    modules = {m for path in (ROOT / "meta-hq").rglob("*.py") for m in hq_imports(path, "hq_siggen")}
    assert modules == {"hq.client"}


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from hq.broker.main import write_lines\n")  # a lazy one
    assert upward_imports(bad, "core") == ["bad.py imports hq.broker.main (core -> broker)"]
    assert upward_imports(bad, "server") == []
    bad.write_text("from hq import config\n")
    assert upward_imports(bad, "client") == ["bad.py imports hq.config (client -> core)"]


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_modules_import_nothing_of_hq(leaf):
    assert hq_imports(ROOT / "core" / f"{leaf}.py", "hq") == set()


def loaded_modules(statement: str) -> list:
    """Every module a fresh interpreter holds after ``statement``."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return out.stdout.split()


def test_client_loads_only_stdlib_and_pyzmq():
    loaded = loaded_modules("import hq.client")
    assert [m for m in loaded if m.split(".")[0] in ("peewee", "tabulate", "sqlite3", "psutil")] == []
    core = ("hq.protocol", "hq.permissions", "hq.curve", "hq.sockets", "hq.addresses")
    assert [
        m for m in loaded if m.startswith("hq.") and not m.startswith("hq.client") and m not in core
    ] == []
    assert "hq.client.policy" in loaded  # the check sees the client's own modules


def test_hq_admin_loads_no_database_code():
    loaded = loaded_modules("import hq.admin.cli")
    assert [
        m for m in loaded if m.split(".")[0] == "peewee" or m.startswith(("hq.workers", "hq.broker"))
    ] == []


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
