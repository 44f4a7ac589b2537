"""The installed console scripts as an operator meets them: --help, bad options, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from helpers import script, wait_for
from hq import config, options
from hq.client import create_client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

PROGRAMS = options.PROGRAMS
METHOD = "do_install"


def clean_env(**extra) -> dict:
    """The test's environment without any HQ_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HQ_")}
    env["COLUMNS"] = "100"  # stable --help wrapping
    env.update(extra)
    return env


def run(name: str, *args, env=None, cwd=None, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [script(name), *args],
        env=env or clean_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_help_exits_0_and_names_every_variable(name):
    result = run(name, "--help")
    assert result.returncode == 0, result.stderr
    for opt in [config.CONFIG_OPTION, *PROGRAMS[name]]:
        assert f"--{opt.name}" in result.stdout
        assert opt.env in result.stdout, f"{name} --help does not name {opt.env}"
    assert "Precedence" in result.stdout


BAD_VALUES = [
    ("hq-broker", ["--heartbeat-interval", "soon"], {}, "heartbeat-interval"),
    ("hq-broker", [], {"HQ_WORKER_CREDIT": "lots"}, "HQ_WORKER_CREDIT"),
    ("hq-broker", ["--log-level", "LOUD"], {}, "log-level"),
    ("hq-worker", [], {"HQ_SYNCHRONOUS": "sometimes"}, "HQ_SYNCHRONOUS"),
    ("hq-worker", ["--busy-timeout", "1.5"], {}, "busy-timeout"),
    ("hq-worker", ["--no-such-option"], {}, "--no-such-option"),
    ("hq-server", ["--workers", "many"], {}, "workers"),
    ("hq-server", ["--workers", "0"], {}, "workers"),
    # no abbreviations: --work is not --workers, and --server is not --server-key (whose
    # value, a broker address, was read as a key file) nor a subcommand
    ("hq-server", ["--work", "3"], {}, "unrecognized option --work"),
    ("hq-admin", ["--server", "tcp://127.0.0.1:1", "stats"], {}, "unrecognized option --server"),
    ("hq-admin", ["stats", "--form", "json"], {}, "unrecognized option --form"),
    ("hq-bench", ["single", "--client", "2"], {}, "unrecognized option --client"),
]


@pytest.mark.parametrize("name,args,env,named", BAD_VALUES, ids=[f"{b[0]}-{b[3]}" for b in BAD_VALUES])
def test_bad_option_value_exits_2_with_one_line(name, args, env, named, tmp_path):
    started = time.monotonic()
    result = run(name, *args, env=clean_env(**env), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0] and name in lines[0], lines[0]
    assert time.monotonic() - started < 10
    assert not list(tmp_path.iterdir()), "a rejected configuration must not create files"


@pytest.mark.parametrize("name", ["hq-broker", "hq-worker"])
def test_bad_config_file_exits_2_with_one_line(name, tmp_path):
    conf = tmp_path / "hq.conf"
    conf.write_text("[hq]\nheartbeat-intervall = 1\n")  # typo
    result = run(name, env=clean_env(HQ_CONFIG=str(conf)), cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "heartbeat-intervall" in result.stderr and str(conf) in result.stderr


@pytest.mark.parametrize("kind", ["missing-directory", "directory", "not-a-database"])
def test_worker_with_unusable_database_exits_nonzero_quickly(kind, tmp_path):
    if kind == "missing-directory":
        db = tmp_path / "no" / "such" / "dir" / "hq.db"
    elif kind == "directory":
        db = tmp_path / "a-directory"
        db.mkdir()
    else:
        db = tmp_path / "text.db"
        db.write_text("this is not an SQLite database\n" * 100)
    started = time.monotonic()
    backend = f"ipc://{tmp_path}/backend.ipc"
    result = run("hq-worker", "--db", str(db), "--backend", backend, cwd=tmp_path, timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    assert "cannot open database" in result.stderr, result.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s"


def _descendants(pid: int) -> list:
    return psutil.Process(pid).children(recursive=True)


def test_server_sigterm_stops_every_child(stack):
    children = _descendants(stack.proc.pid)
    assert len(children) == 3, children  # broker + 2 workers
    assert stack.stop() == 0
    # A child that outlived hq-server would be re-parented, out of reach of the leak check.
    wait_for(
        lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
        timeout=5,
        what="hq-server's children to be gone",
    )
    assert not os.path.exists(stack.endpoint_file)
    assert "hq-server stopped" in stack.log()


def test_sigterm_ends_every_wait_at_once(tmp_path):
    """A loop waiting for its next heartbeat (here 30 s away) stops when SIGTERM comes, not
    when the wait would have ended: `systemctl stop` and supervisord's stop are quick."""
    from helpers import Stack

    stack = Stack(tmp_path, args=["--heartbeat-interval", "30"]).start()
    with create_client(stack.address, timeout=10) as client:
        assert client.ping()
    children = stack.children()
    # Each program on its own first: broker and worker, waiting in their polls.
    for name in ("hq-worker-00", "hq-broker"):
        start = time.monotonic()
        children[name].send_signal(signal.SIGTERM)
        children[name].wait(10)
        assert time.monotonic() - start < 5, f"{name} took {time.monotonic() - start:.1f} s to stop"
    # Then hq-server with what is left (it restarts what exited, in its supervision wait).
    start = time.monotonic()
    assert stack.stop() == 0, stack.log()
    assert time.monotonic() - start < 8, f"hq-server took {time.monotonic() - start:.1f} s to stop"
    assert "hq-server stopped" in stack.log()


def test_server_restarts_a_killed_worker(stack):
    known = {f"{i:064x}": f"{i + 1000:064x}" for i in range(50)}
    with create_client(stack.address, timeout=10) as client:
        for taskhash, unihash in known.items():
            client.report_unihash_equiv(taskhash, METHOD, unihash)
        victim = stack.children()["hq-worker-01"]
        victim.send_signal(signal.SIGKILL)
        # The other worker keeps the service answering while hq-server restarts this one.
        assert client.get_unihash_batch([(METHOD, t) for t in known]) == list(known.values())

        def replaced():
            worker = stack.children().get("hq-worker-01")
            return worker is not None and worker.pid != victim.pid and worker

        new = wait_for(replaced, timeout=15, what="hq-server to restart hq-worker-01")
        wait_for(
            lambda: new.pid in [w["pid"] for w in client.get_stats()["workers"]],
            timeout=10,
            what="the restarted worker to register with the broker",
        )
        assert client.get_unihash_batch([(METHOD, t) for t in known]) == list(known.values())
    assert "hq-worker-01" in stack.log() and "restarting" in stack.log()


def test_server_config_file_reaches_broker_and_workers(tmp_path):
    """`hq-server --config FILE`: the [hq-worker] and [hq-broker] sections tune its children."""
    from helpers import Stack

    conf = tmp_path / "hq.conf"
    conf.write_text("[hq-worker]\ncache-size = 1234\n[hq-broker]\nmerge-items = 1\n")
    with Stack(tmp_path, args=["--config", str(conf)]) as stack:
        with create_client(stack.address, timeout=10) as c:
            wait_for(lambda: len(c.get_stats()["workers"]) == 2, 10, what="both workers registered")
            assert {w["settings"]["cache_size"] for w in c.get_stats()["workers"]} == {-1234}
            assert c.get_stats()["broker"]["settings"]["merge_items"] == 1
