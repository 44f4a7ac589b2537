"""What a new user gets wrong first, through the real console scripts: every mistake is one
clear line and a non-zero exit, within seconds; never a traceback, never an endless retry.

* every option of every program, given a value it must refuse (the sweep below finds the
  options by reading each program's own parser, so a new option is covered the day it lands);
* hq-server started on a database or an address that cannot work: it ends, it does not
  restart its children forever;
* a server that is not there: refused, unreachable or unresolvable is known in about a second.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import pytest

from helpers import Stack, script, wait_for
from hq import options
from hq.admin import cli as admin_cli
from hq.bench import cli as bench_cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DAEMONS = options.PROGRAMS
#: Values a user types by mistake. Each option is tried with those its own type refuses.
CANDIDATES = ("-1", "127.0.0.1:8686", "/no/such/dir/file", "x")
PER_OPTION = 1
#: Seconds a refusal may take: the program starts, parses and says no.
REFUSAL_S = 10.0


def _refused(convert, value) -> bool:
    try:
        convert(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return True
    return False


def daemon_cases():
    for prog, rows in DAEMONS.items():
        env_cases = 0
        for opt in rows:
            if opt.choices:
                bad = ["bogus"]
            elif opt.type is str:
                continue  # free text (a name, a path checked when opened: see below)
            else:
                bad = [v for v in CANDIDATES if _refused(opt.type, v)][:PER_OPTION]
            for value in bad:
                yield prog, [f"--{opt.name}={value}"], {}, f"--{opt.name}"
            if bad and env_cases < 2:  # environment variables go through the same check
                env_cases += 1
                yield prog, [], {opt.env: bad[0]}, opt.env


def _argparse_actions(parser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _argparse_actions(sub, (*path, name))
        elif action.type is not None or action.choices:
            yield path, parser, action


def _placeholders(parser, skip) -> list:
    """Values for the positional arguments of ``parser`` other than ``skip``."""
    return ["x" for a in parser._actions if not a.option_strings and a is not skip and a.nargs is None]


def tool_cases():
    seen = set()
    for prog, parser in (("hq-admin", admin_cli.parser()), ("hq-bench", bench_cli.build_parser())):
        for path, sub, action in _argparse_actions(parser):
            if action.choices:
                bad = ["bogus"]
            else:
                bad = [v for v in CANDIDATES if _refused(action.type, v)][:PER_OPTION]
            # Options shared by every subcommand (--timeout, --workers, ...) once each.
            key = (prog, tuple(action.option_strings) or action.dest, tuple(bad))
            if key in seen:
                continue
            seen.add(key)
            for value in bad:
                if action.option_strings:
                    argv = [*path, *_placeholders(sub, None), f"{action.option_strings[-1]}={value}"]
                    named = action.option_strings[-1]
                else:
                    argv = [*path, value]
                    named = action.dest
                yield prog, argv, {}, named


CASES = (
    list(daemon_cases())
    + list(tool_cases())
    + [
        ("hq-admin", ["stats"], {"HQ_ADDRESS": "127.0.0.1:8686"}, "HQ_ADDRESS"),
        ("hq-admin", ["stats"], {"HQ_ADMIN_TIMEOUT": "-3"}, "HQ_ADMIN_TIMEOUT"),
        ("hq-admin", ["no-such-command"], {}, "no-such-command"),
        ("hq-bench", ["burst", "--tasks", "2", "--waves", "3"], {}, "waves"),
        ("hq-bench", ["burst", "--server-arg=--workers=0"], {}, "workers"),
        ("hq-broker", ["--bind="], {}, "bind"),
    ]
)


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HQ_")}
    # Should a mistake slip through, hq-admin meets no server (exit 3) instead of one.
    env["HQ_ADDRESS"] = "tcp://127.0.0.1:1"
    env.update(extra)
    return env


def _run_all(cases, cwd) -> list:
    """Run every case at once (8 at a time); each gets REFUSAL_S before it is killed."""
    results = []
    pending = list(cases)
    running = []
    while pending or running:
        while pending and len(running) < 8:
            prog, argv, env, named = pending.pop()
            proc = subprocess.Popen(
                [script(prog), *argv],
                cwd=cwd,
                env=_env(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            running.append((proc, time.monotonic(), (prog, argv, env, named)))
        proc, started, case = running.pop(0)
        try:
            out, err = proc.communicate(timeout=max(0.1, started + REFUSAL_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            results.append((case, None, out, err, REFUSAL_S))
            continue
        results.append((case, proc.returncode, out, err, time.monotonic() - started))
    return results


def test_every_option_of_every_program_refuses_a_bad_value_in_one_line(tmp_path):
    assert len(CASES) > 60  # the sweep found the options
    failures = []
    for (prog, argv, env, named), code, out, err, _ in _run_all(CASES, tmp_path):
        lines = err.strip().splitlines()
        what = f"{prog} {' '.join(argv)} {env or ''}"
        if code != 2:
            failures.append(f"{what}: exit {code} (want 2)\n{err[-500:]}")
        elif len(lines) != 1 or "Traceback" in err:
            failures.append(f"{what}: {len(lines)} lines on stderr\n{err[-500:]}")
        elif named.lstrip("-") not in lines[0]:
            failures.append(f"{what}: the line does not name {named}: {lines[0]}")
        elif out:
            failures.append(f"{what}: wrote to stdout: {out[:200]}")
    assert not failures, "\n".join(failures)
    assert not list(tmp_path.iterdir()), "a refused configuration must not create files"


def test_hq_admin_address_without_scheme_suggests_tcp(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        [script("hq-admin"), "--address", "127.0.0.1:8686", "stats"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env({}),
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "did you mean tcp://127.0.0.1:8686?" in result.stderr
    assert time.monotonic() - started < REFUSAL_S


# --- hq-server gives up on what restarting cannot fix -------------------------------------------


def _busy_port():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _bad_database(kind: str, tmp_path) -> str:
    if kind == "directory":
        (tmp_path / "dir.db").mkdir()
        return str(tmp_path / "dir.db")
    if kind == "missing-directory":
        return str(tmp_path / "no" / "such" / "hq.db")
    if kind == "text-file":
        (tmp_path / "text.db").write_text("not a database\n" * 100)
        return str(tmp_path / "text.db")
    if kind == "random-bytes":
        (tmp_path / "random.db").write_bytes(os.urandom(8192))
        return str(tmp_path / "random.db")
    return ""


START_FAILURES = [
    ("db-directory", "it is a directory"),
    ("db-missing-directory", "does not exist"),
    ("db-text-file", "not an SQLite database"),
    ("db-random-bytes", "not an SQLite database"),
    ("db-empty", "no database file given"),
    ("port-in-use", "Address already in use"),
    ("ipc-in-use", "another process listens there"),  # libzmq would take the path over
    ("curve-clients-without-key", "--curve-clients needs --curve-secret-key"),  # not open to all
    ("admin-password-without-user", "needs --admin-user"),  # not silently ignored
    ("bind-unknown-host", "not an address, name or interface of this host"),  # not "No such device"
    ("bind-without-scheme", "did you mean tcp://127.0.0.1:"),
]


@pytest.mark.parametrize("kind,reason", START_FAILURES, ids=[k for k, _ in START_FAILURES])
def test_hq_server_ends_on_a_start_up_error_with_one_line(kind, reason, tmp_path):
    holder = _busy_port()
    port = holder.getsockname()[1]
    try:
        args = ["--db", str(tmp_path / "hq.db"), "--bind", f"tcp://127.0.0.1:{port}"]
        if kind.startswith("db-"):
            args = ["--db", _bad_database(kind[3:], tmp_path), "--bind", "tcp://127.0.0.1:*"]
        elif kind == "ipc-in-use":
            live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            live.bind(str(tmp_path / "live.ipc"))
            live.listen()
            holder.close()
            holder = live
            args = ["--db", str(tmp_path / "hq.db"), "--bind", f"ipc://{tmp_path}/live.ipc"]
        elif kind == "curve-clients-without-key":
            args = ["--db", str(tmp_path / "hq.db"), "--bind", "tcp://127.0.0.1:*"]
            args += ["--curve-clients", str(tmp_path)]
        elif kind == "bind-unknown-host":
            args = ["--db", str(tmp_path / "hq.db"), "--bind", "tcp://no-such-host.invalid:5555"]
        elif kind == "admin-password-without-user":
            args = ["--db", str(tmp_path / "hq.db"), "--bind", "tcp://127.0.0.1:*", "--admin-password", "pw"]
        elif kind == "bind-without-scheme":
            args = ["--db", str(tmp_path / "hq.db"), "--bind", f"127.0.0.1:{port}"]
        started = time.monotonic()
        proc = subprocess.run(
            [script("hq-server"), *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
            env=_env({}),
        )
        took = time.monotonic() - started
    finally:
        holder.close()
    assert proc.returncode == 2, proc.stderr
    assert took < 5, f"took {took:.1f} s"
    problems = [line for line in proc.stderr.splitlines() if " ERROR " in line or "error:" in line]
    assert len(problems) == 1 and reason in problems[0], proc.stderr
    assert "Traceback" not in proc.stderr and "restarting" not in proc.stderr
    assert " WARNING " not in proc.stderr


def test_hq_server_stops_cleanly_on_ctrl_c_with_nothing_alarming(tmp_path):
    """Ctrl-C reaches the whole foreground process group. hq-server stops its children in
    order (workers, then the broker); nothing logs a WARNING or a re-registration. The
    first start on a fresh file logs no 'database busy' either."""
    stack = Stack(tmp_path, workers=4)
    stack.start_new_session = True
    stack.start()
    try:
        os.killpg(stack.proc.pid, 2)  # SIGINT to the group, as a terminal's Ctrl-C
        assert stack.proc.wait(15) == 0
    finally:
        stack.stop()
    log = stack.log()
    assert "hq-server stopped" in log
    for alarming in (" WARNING ", " ERROR ", "register again", "busy", "Traceback"):
        assert alarming not in log, log


# --- a server that is not there ----------------------------------------------------------------


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def test_hq_admin_knows_at_once_that_nothing_listens():
    started = time.monotonic()
    result = subprocess.run(
        [script("hq-admin"), "--address", f"tcp://127.0.0.1:{_closed_port()}", "stats"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env({}),
    )
    took = time.monotonic() - started
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and "Connection refused" in result.stderr, result.stderr
    assert took < 3, f"took {took:.1f} s (the deadline is 10 s)"


CLIENT_CALL = """
import sys, time
from hq.client import create_client
client = create_client(sys.argv[1], timeout=30)
started = time.monotonic()
try:
    client.report_unihash("1" * 64, "oe.sstatesig.OEOuthashBasic", "2" * 64, "3" * 64)
except ConnectionError as exc:
    print(f"{time.monotonic() - started:.2f} {exc}")
"""


@pytest.mark.parametrize(
    "address,reason",
    [
        ("tcp://127.0.0.1:{port}", "Connection refused"),
        ("ipc://{tmp}/nothing-here.ipc", "No such file or directory"),
        ("tcp://no-such-host.invalid:8686", "cannot resolve"),
    ],
)
def test_a_server_that_is_not_there_is_a_connection_error_in_about_a_second(address, reason, tmp_path):
    address = address.format(port=_closed_port(), tmp=tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", CLIENT_CALL, address], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    took, _, message = result.stdout.strip().partition(" ")
    assert reason in message and address in message, message
    assert float(took) < 2.0, result.stdout


FORKED_TASK = """
import os, sys, time
sys.path.insert(0, os.path.join(sys.argv[2], "lib"))
import bb.utils
from hq.client import create_client

client = create_client(sys.argv[1], timeout=30)
client.ping()  # bitbake-worker reached the server before it forked the task
before = os.readlink("/proc/self/ns/net")
pid = os.fork()
if pid == 0:
    bb.utils.disable_network()  # what bitbake-worker does for a task without [network]
    if os.readlink("/proc/self/ns/net") == before:
        print("no-netns")
        os._exit(0)
    started = time.monotonic()
    try:
        client.report_unihash("1" * 64, "oe.sstatesig.OEOuthashBasic", "2" * 64, "3" * 64)
        print("answered")
    except ConnectionError as exc:
        print(f"{time.monotonic() - started:.2f} {exc}")
    sys.stdout.flush()
    os._exit(0)
os.waitpid(pid, 0)
print("parent", client.ping()["alive"])
"""


def test_a_bitbake_task_without_network_falls_back_at_once(stack, bitbake):
    """A task forked by bitbake-worker runs in a network namespace of its own, where the
    broker's TCP address cannot be reached: its report must fail in about a second (BitBake
    then falls back to the taskhash), not after the 30 s deadline."""
    result = subprocess.run(
        [sys.executable, "-c", FORKED_TASK, stack.address, bitbake],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    first, parent = result.stdout.strip().splitlines()
    if first == "no-netns":
        pytest.skip(
            "this kernel refuses unprivileged network namespaces: BitBake runs tasks with the network"
        )
    took, _, message = first.partition(" ")
    assert "Network is unreachable" in message, first
    assert float(took) < 2.0, first
    assert parent == "parent True"  # the parent's connection is untouched


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_hq_server_waiting_for_postgresql_stops_at_once(sig, tmp_path):
    """Ctrl-C (or SIGTERM) while hq-server waits for a PostgreSQL server that is not up ends
    it at once, not when its 30 s wait runs out."""
    import signal

    log = tmp_path / "hq-server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [script("hq-server"), "--db", f"postgresql://hq@127.0.0.1:{_closed_port()}/hq"],
            stderr=err,
            cwd=tmp_path,
            env=_env({}),
        )
    try:
        wait_for(lambda: "waiting for PostgreSQL" in log.read_text(), timeout=20, what="the wait")
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=5) != 0
        assert "Traceback" not in log.read_text()
    finally:
        proc.kill()
        proc.wait()
