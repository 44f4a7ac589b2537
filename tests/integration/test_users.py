"""Users, log-in sessions and permissions on a real stack (PROTOCOL.md §3.6; ref. §6).

The permission matrix runs every command as every kind of caller and compares each cell with
a table written here from the reference (bitbake-hashserv-protocol.md §6-§7), not from hq's
own table: allowed, or refused with the reference's text.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import pytest

from helpers import Stack, script, wait_for
from hq.client import InvokeError, ServerError, create_client

ADMIN_PASSWORD = "correct horse battery staple"
ADMIN_ENV = {"HQ_ADMIN_PASSWORD": ADMIN_PASSWORD}
M = "TestMethod"
T = "35788efcb8dfb0a02659d81cf2bfd695fb30faf9"
O1 = "2765d4a5884be49b28601445c2760c5f21e7e5c0ee2b7e3fce98fd7e5970796f"
U1 = "a69ec97f5af2e21e1a1f9cc8896965515d5559425666f734e245a3d40cee33d9"
U2 = "bf6e81926066f770e960f9f777cd088c62bea9addb7745f3e77deaa81a645747"

R, P, D, A = "@read", "@report", "@db-admin", "@user-admin"
#: The reference's rules: command -> (permissions it needs, do anonymous permissions count,
#: may a logged-in user run it on themselves).
RULES = {
    "ping": ((), True, False),
    "get": ((R,), True, False),
    "exists": ((R,), True, False),
    "get-full": ((R,), True, False),
    "get-outhash": ((R,), True, False),
    "stats": ((R,), True, False),
    "report": ((R,), True, False),
    "report-equiv": ((R, P), True, False),
    "reset-stats": ((D,), True, False),
    "remove": ((D,), True, False),
    "clean-unused": ((D,), True, False),
    "gc-mark": ((D,), True, False),
    "gc-mark-stream": ((D,), True, False),
    "gc-status": ((D,), True, False),
    "gc-sweep": ((D,), True, False),
    "db-usage": ((D,), True, False),
    "query-columns": ((D,), True, False),
    "import": ((D,), True, False),
    "import users": ((D, A), True, False),
    "import-status": ((D,), True, False),
    "get-user": ((A,), False, False),
    "get-user self": ((A,), False, True),
    "get-all-users": ((A,), False, False),
    "new-user": ((A,), False, False),
    "set-user-perms": ((A,), False, False),
    "refresh-token": ((A,), False, False),
    "refresh-token self": ((A,), False, True),
    "delete-user": ((A,), False, False),
    "become-user": ((A,), False, False),  # last: it changes who the client is
}

CALLS = {
    "ping": lambda c, me: c.ping(),
    "get": lambda c, me: c.get_unihash(M, T),
    "exists": lambda c, me: c.unihash_exists(U1),
    "get-full": lambda c, me: c.get_taskhash(M, T, True),
    "get-outhash": lambda c, me: c.get_outhash(M, O1, T),
    "stats": lambda c, me: c.get_stats(),
    "report": lambda c, me: c.report_unihash(T, M, O1, U1),
    "report-equiv": lambda c, me: c.report_unihash_equiv(T, M, U2),
    "reset-stats": lambda c, me: c.reset_stats(),
    "remove": lambda c, me: c.remove({"taskhash": "absent"}),
    "clean-unused": lambda c, me: c.clean_unused(10**9),
    "gc-mark": lambda c, me: c.gc_mark("matrix", {"unihash": "0" * 64}),
    "gc-mark-stream": lambda c, me: c.gc_mark_stream("matrix", [{"unihash": "0" * 64}]),
    "gc-status": lambda c, me: c.gc_status(),
    "gc-sweep": lambda c, me: c.gc_sweep("not-the-mark"),
    "db-usage": lambda c, me: c.get_db_usage(),
    "query-columns": lambda c, me: c.get_db_query_columns(),
    "import": lambda c, me: c.import_rows("matrix", "config", 1, [{"name": "x", "value": "y"}]),
    "import users": lambda c, me: c.import_rows(
        "matrix", "users", 1, [{"username": "imported", "token": "sha256:00:00", "permissions": R}]
    ),
    "import-status": lambda c, me: c.import_status("matrix"),
    "get-user": lambda c, me: c.get_user("target"),
    "get-user self": lambda c, me: c.get_user(),
    "get-all-users": lambda c, me: c.get_all_users(),
    "new-user": lambda c, me: c.new_user(f"new-by-{me}", [R]),
    "set-user-perms": lambda c, me: c.set_user_perms("target", [R]),
    "refresh-token": lambda c, me: c.refresh_token("target"),
    "refresh-token self": lambda c, me: c.refresh_token(),
    "delete-user": lambda c, me: c.delete_user("nobody-here"),
    "become-user": lambda c, me: c.become_user("target"),
}


def has(granted: set, needed) -> bool:
    return "@all" in granted or set(needed) <= granted


def expected(name: str, anon: set, user: str | None, user_perms: set):
    """None if allowed, else the refusal text."""
    needed, anon_counts, self_service = RULES[name]
    if not needed or (anon_counts and has(anon, needed)):
        return None
    if user is not None and (has(user_perms, needed) or self_service):
        return None
    who = user or "Anonymous user"
    return f"{who} is not allowed to access permissions(s) {', '.join(needed)}"


def outcome(client, name: str, me: str):
    """None if the call passed the permission check (whatever it answered), else the text."""
    try:
        CALLS[name](client, me)
    except InvokeError as exc:
        if exc.code == 403:
            return str(exc)
    except ServerError as exc:
        assert exc.code != 403, exc
    return None


def matrix_rows(address: str, anon: set, principals: dict) -> list:
    """[(principal, command, expected, got)] for every cell."""
    rows = []
    for label, (user, token, user_perms) in principals.items():
        with create_client(address, username=user or "", password=token, timeout=10) as client:
            for name in RULES:
                rows.append(
                    (label, name, expected(name, anon, user, user_perms), outcome(client, name, label))
                )
    return rows


@pytest.fixture(scope="module")
def auth_stack(tmp_path_factory):
    """Anonymous users get nothing; admin / ADMIN_PASSWORD has @all. One for the module:
    each test makes users of its own names."""
    args = ["--anon-perms", "@none", "--admin-user", "admin", "--metrics", "tcp://127.0.0.1:*"]
    s = Stack(tmp_path_factory.mktemp("auth"), args=args, env=ADMIN_ENV).start()
    yield s
    assert s.stop() == 0, s.log()


def admin(stack, **kw):
    return create_client(stack.address, username="admin", password=ADMIN_PASSWORD, timeout=10, **kw)


def test_permission_matrix(auth_stack, tmp_path):
    with admin(auth_stack) as root:
        root.new_user("target", [R])
        principals = {"anonymous (@none)": (None, None, set())}
        for perm in ("@read", "@report", "@db-admin", "@user-admin", "@all"):
            name = "u" + perm
            token = root.new_user(name, [perm])["token"]
            principals[name] = (name, token, {perm})
    rows = matrix_rows(auth_stack.address, set(), principals)
    (tmp_path / "default").mkdir()
    with Stack(tmp_path / "default") as default:  # the reference's anonymous default
        rows += matrix_rows(default.address, {R, P, D}, {"anonymous (default)": (None, None, set())})
    wrong = [row for row in rows if row[2] != row[3]]
    assert not wrong, "\n".join(f"{p} {c}: expected {e!r}, got {g!r}" for p, c, e, g in wrong)
    # Both outcomes occur for every command that needs a permission: the matrix can fail.
    for name, (needed, _, _) in RULES.items():
        cells = {row[2] is None for row in rows if row[1] == name}
        assert cells == ({True} if not needed else {True, False}), name


def test_anonymous_user_admin_or_all_is_refused_at_start(tmp_path):
    for perms in ("@all", "@read,@user-admin"):
        run = subprocess.run(
            [script("hq-server"), "--db", str(tmp_path / "x.db"), "--anon-perms", perms],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 2
        assert "are not allowed for anonymous users" in run.stderr
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_auth_answers_as_the_reference_and_reports_get_the_owner(auth_stack):
    with admin(auth_stack) as root:
        assert root.get_user() == {
            "username": "admin",
            "permissions": ["@all", "@db-admin", "@read", "@report", "@user-admin"],
        }
        assert root.user == {"result": True, "username": "admin", "permissions": ["@all"]}
        token = root.new_user("builder", ["@read", "@report"])["token"]
        assert len(token) == 64 and set(token) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._"
        )
    with create_client(auth_stack.address, username="builder", password=token, timeout=10) as builder:
        builder.report_unihash("b" * 40, M, O1, U1, {"owner": "someone-else"})
        assert builder.get_taskhash(M, "b" * 40, True)["owner"] == "builder"  # as the reference


def test_wrong_token_is_refused_after_a_second_and_never_logged(auth_stack):
    secret = "not-the-token-" + "x" * 40
    before = root_stats(auth_stack)
    start = time.monotonic()
    with create_client(auth_stack.address, username="admin", password=secret, timeout=10) as client:
        with pytest.raises(InvokeError, match="^Unable to authenticate as admin$") as err:
            client.ping()
    assert err.value.code == 401
    assert time.monotonic() - start >= 0.9
    with create_client(auth_stack.address, username="ghost", password=secret, timeout=10) as client:
        with pytest.raises(InvokeError, match="^Unable to authenticate as ghost$"):
            client.get_unihash(M, T)
    after = root_stats(auth_stack)
    assert after["failed_logins"] - before["failed_logins"] == 2 and after["logins"] > before["logins"]
    log = wait_for(lambda: "failed log-in as ghost from 127.0.0.1" in auth_stack.log() and auth_stack.log())
    assert "failed log-in as admin from 127.0.0.1" in log
    assert secret not in log and ADMIN_PASSWORD not in log


def test_self_service_and_become_user(auth_stack):
    with admin(auth_stack) as root:
        token = root.new_user("dev", ["@read"])["token"]
        root.new_user("other", ["@read"])
    with create_client(auth_stack.address, username="dev", password=token, timeout=10) as dev:
        assert dev.get_user() == {"username": "dev", "permissions": ["@read"]}
        assert dev.get_user("dev") == {"username": "dev", "permissions": ["@read"]}
        with pytest.raises(
            InvokeError, match="^dev is not allowed to access permissions\\(s\\) @user-admin$"
        ):
            dev.get_user("other")
        new = dev.refresh_token()
        assert new["username"] == "dev" and new["token"] != token
        dev.close()
        assert dev.get_user()["username"] == "dev"  # a new connection logs in with the new token
    with create_client(auth_stack.address, username="dev", password=token, timeout=10) as stale:
        with pytest.raises(InvokeError, match="Unable to authenticate as dev"):
            stale.ping()
    with admin(auth_stack) as root:
        assert root.become_user("dev") == {"username": "dev", "permissions": ["@read"]}
        assert root.get_user() == {"username": "dev", "permissions": ["@read"]}
        with pytest.raises(InvokeError, match="^dev is not allowed"):
            root.get_all_users()
        root.close()  # a new connection: log in again, then become dev again
        assert root.get_user() == {"username": "dev", "permissions": ["@read"]}
        assert root.delete_user() == {"username": "dev"}  # self-service, as the become'd user
    with admin(auth_stack) as root:
        names = [u["username"] for u in root.get_all_users()]
        assert "dev" not in names and names[0] == "admin" and "other" in names
        with pytest.raises(InvokeError, match="^User nobody doesn't exist$"):
            root.become_user("nobody")
        with pytest.raises(InvokeError, match="^No user named 'nobody' exists$"):
            root.set_user_perms("nobody", ["@read"])
        with pytest.raises(InvokeError, match="^Unknown permissions @bogus, @x$"):
            root.set_user_perms("other", ["@bogus", "@x"])
        assert root.set_user_perms("other", ["@read", "@none"]) == {
            "username": "other",
            "permissions": ["@read"],
        }
        with pytest.raises(InvokeError, match="^Cannot create new user 'other'$"):
            root.new_user("other", [])
        assert root.get_user("nobody") is None


def test_permission_changes_reach_live_sessions(auth_stack):
    with admin(auth_stack) as root:
        token = root.new_user("ops", ["@read"])["token"]
        with create_client(auth_stack.address, username="ops", password=token, timeout=10) as ops:
            with pytest.raises(InvokeError, match="@db-admin"):
                ops.gc_status()
            root.set_user_perms("ops", ["@read", "@db-admin"])
            assert "keep" in ops.gc_status()  # the same session, new permissions
            root.delete_user("ops")
            with pytest.raises(InvokeError, match="Unable to authenticate as ops"):
                ops.ping()  # session ended; logging in again fails


def test_sessions_survive_a_broker_restart(tmp_path):
    with Stack(tmp_path, args=["--anon-perms", "@none", "--admin-user", "admin"], env=ADMIN_ENV) as s:
        with admin(s) as root:
            root.report_unihash_equiv(T, M, U1)
            logins = root._logins
            old = s.children()["hq-broker"]
            old.kill()
            wait_for(lambda: s.children().get("hq-broker", old).pid != old.pid, what="a new broker")
            assert root.get_unihash(M, T) == U1  # logged in again by itself, within the deadline
            assert root._logins > logins


def test_admin_bootstrap_resets_the_admin_at_every_start(tmp_path):
    with Stack(tmp_path, args=["--admin-user", "boss"], env=ADMIN_ENV) as first:
        with create_client(first.address, username="boss", password=ADMIN_PASSWORD, timeout=10) as boss:
            boss.set_user_perms("boss", ["@read"])
            assert boss.get_user()["permissions"] == ["@read"]
    with Stack(tmp_path, args=["--admin-user", "boss"], env={"HQ_ADMIN_PASSWORD": "second"}) as again:
        with create_client(again.address, username="boss", password=ADMIN_PASSWORD, timeout=10) as old:
            with pytest.raises(InvokeError, match="Unable to authenticate as boss"):
                old.ping()
        with create_client(again.address, username="boss", password="second", timeout=10) as boss:
            assert boss.get_user()["permissions"] == ["@all", "@db-admin", "@read", "@report", "@user-admin"]
        assert "second" not in again.log() and ADMIN_PASSWORD not in again.log()


def test_admin_user_without_password_is_one_line_and_exit_2(tmp_path):
    run = subprocess.run(
        [script("hq-server"), "--db", str(tmp_path / "x.db"), "--admin-user", "boss"],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in __import__("os").environ.items() if k != "HQ_ADMIN_PASSWORD"},
    )
    assert run.returncode == 2, run.stderr
    assert "HQ_ADMIN_PASSWORD" in run.stderr and "Traceback" not in run.stderr


def test_read_only_mirror_of_a_live_database(tmp_path):
    """As the reference's test_ro_server: a read-write and a read-only server on one file."""
    (tmp_path / "rw").mkdir()
    (tmp_path / "ro").mkdir()
    with Stack(tmp_path / "rw") as rw:
        ro_args = ["--db", rw.db, "--read-only", "--admin-user", "admin"]
        with Stack(tmp_path / "ro", args=ro_args, env=ADMIN_ENV) as ro:
            with (
                create_client(rw.address, timeout=10) as writer,
                create_client(ro.address, timeout=10) as mirror,
            ):
                assert mirror.get_unihash(M, T) is None
                writer.report_unihash(T, M, O1, U1)
                assert mirror.get_unihash(M, T) == U1  # seen at once: a mirror keeps no cache
                # A report is a lookup of its outhash: the current unihash, nothing stored.
                other = "1" * 40
                assert mirror.report_unihash(other, M, O1, U2)["unihash"] == U1
                assert mirror.report_unihash(other, M, "9" * 64, U2)["unihash"] == U2
                assert writer.get_unihash(M, other) is None
                for call, name in (
                    (lambda: mirror.report_unihash_equiv(other, M, U2), "report-equiv"),
                    (lambda: mirror.remove({"taskhash": T}), "remove"),
                    (lambda: mirror.gc_sweep("x"), "gc-sweep"),
                    (lambda: mirror.reset_stats(), "reset-stats"),
                ):
                    with pytest.raises(ServerError, match=f"{name} is not available on a read-only server"):
                        call()
                assert writer.get_unihash(M, T) == U1
            with admin(ro) as root:  # log-in and user reads work; user writes do not
                assert root.get_user()["username"] == "admin"
                with pytest.raises(ServerError, match="new-user is not available on a read-only server"):
                    root.new_user("x", [])


def scrape(stack) -> str:
    port = next(
        line.rsplit(":", 1)[1].split("/")[0]
        for line in stack.log().splitlines()
        if "metrics (Prometheus text format) on http://" in line
    )
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def metric(text: str, name: str) -> int:
    return int(float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " "))))


def test_failed_logins_and_refusals_in_metrics(auth_stack):
    before = scrape(auth_stack)
    with create_client(
        auth_stack.address, username="nobody", password="pw-that-must-not-show", timeout=10
    ) as c:
        with pytest.raises(InvokeError):
            c.ping()
    with create_client(auth_stack.address, username="", timeout=10) as anon:
        with pytest.raises(InvokeError):
            anon.gc_status()
    after = scrape(auth_stack)
    for name in ('hq_logins_total{outcome="failed"}', 'hq_requests_refused_total{reason="forbidden"}'):
        assert metric(after, name) == metric(before, name) + 1, name
    assert metric(after, "hq_sessions") >= 0
    assert "pw-that-must-not-show" not in after


def test_users_made_by_bitbake_log_in_after_import(tmp_path, bitbake):
    """A user made with bitbake-hashclient on bitbake-hashserv, imported into hq, logs in with
    the token the reference gave it; and hq's hq-admin user commands manage it."""
    import os
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = tmp_path / "hashserv.db"
    server = subprocess.Popen(
        [sys.executable, os.path.join(bitbake, "bin", "bitbake-hashserv"), "-b", f"127.0.0.1:{port}"]
        + ["-d", str(source), "--admin-user", "admin", "--admin-password", "adminpw", "-l", "WARNING"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    hashclient = [sys.executable, os.path.join(bitbake, "bin", "bitbake-hashclient"), "--address"]
    hashclient += [f"127.0.0.1:{port}", "--login", "admin", "--password", "adminpw", "--no-netrc"]
    try:
        made = wait_for(
            lambda: (
                (
                    run := subprocess.run(
                        [*hashclient, "new-user", "-u", "builder", "@read", "@report"],
                        capture_output=True,
                        text=True,
                        timeout=30,
                    )
                ).returncode
                == 0
                and run.stdout
            ),
            timeout=30,
            what="bitbake-hashclient new-user",
        )
    finally:
        server.terminate()
        server.wait(10)
    token = next(line.split()[-1] for line in made.splitlines() if line.startswith("Token:"))
    (tmp_path / "hq").mkdir()
    hq_args = ["--anon-perms", "@read", "--admin-user", "hqadmin"]
    with Stack(tmp_path / "hq", args=hq_args, env=ADMIN_ENV) as s:
        imported = subprocess.run(
            [
                script("hq-admin"),
                "import-hashserv",
                str(source),
                "--address",
                s.address,
                "--login",
                "hqadmin",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "BB_HASHSERVE_PASSWORD": ADMIN_PASSWORD},
        )
        assert imported.returncode == 0, imported.stderr
        with create_client(s.address, username="builder", password=token, timeout=10) as builder:
            assert builder.get_user() == {"username": "builder", "permissions": ["@read", "@report"]}
            builder.report_unihash(T, M, O1, U1)
            assert builder.get_taskhash(M, T, True)["owner"] == "builder"
        with create_client(s.address, username="admin", password="adminpw", timeout=10) as root:
            root.ping()  # logs in
            assert root.user["permissions"] == ["@all"]
        admin_cli = [script("hq-admin"), "--address", s.address, "--login", "admin", "--format", "json"]
        env = {**os.environ, "BB_HASHSERVE_PASSWORD": "adminpw"}
        listed = subprocess.run(
            [*admin_cli, "user", "list"], capture_output=True, text=True, env=env, timeout=30
        )
        assert listed.returncode == 0, listed.stderr
        assert {u["username"] for u in json.loads(listed.stdout)} == {"hqadmin", "admin", "builder"}
        added = subprocess.run(
            [*admin_cli, "user", "add", "ci", "@read,@report"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert added.returncode == 0, added.stderr
        ci = json.loads(added.stdout)
        assert ci["permissions"] == ["@read", "@report"] and len(ci["token"]) == 64
        perms = subprocess.run(
            [*admin_cli, "user", "perms", "ci", "@read"], capture_output=True, text=True, env=env, timeout=30
        )
        assert json.loads(perms.stdout) == {"username": "ci", "permissions": ["@read"]}
        table = subprocess.run(
            [script("hq-admin"), "--address", s.address, "user", "show"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "BB_HASHSERVE_USERNAME": "ci", "BB_HASHSERVE_PASSWORD": ci["token"]},
        )
        assert table.returncode == 0 and "ci" in table.stdout and "@read" in table.stdout, table.stderr
        refused = subprocess.run(
            [script("hq-admin"), "--address", s.address, "user", "list"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode == 1
        assert refused.stderr.strip() == (
            "hq-admin: refused: Anonymous user is not allowed to access permissions(s) @user-admin"
        )
        removed = subprocess.run(
            [*admin_cli, "user", "remove", "ci"], capture_output=True, text=True, env=env, timeout=30
        )
        assert json.loads(removed.stdout) == {"username": "ci"}


HAMMER = r"""
import json, sys, threading, time
from hq.client import create_client

address, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
counts = {"refused": 0, "other": 0}
lock = threading.Lock()
end = time.monotonic() + seconds

def hammer(n):
    i = 0
    while time.monotonic() < end:
        i += 1
        try:
            with create_client(address, username="admin", password=f"guess-{n}-{i}", timeout=5) as c:
                c.ping()
            outcome = "other"
        except Exception as exc:
            outcome = "refused" if "Unable to authenticate" in str(exc) else "other"
        with lock:
            counts[outcome] += 1

workers = [threading.Thread(target=hammer, args=(n,)) for n in range(threads)]
for w in workers:
    w.start()
print("started", flush=True)
for w in workers:
    w.join()
print(json.dumps(counts), flush=True)
"""


def _p99(client, n: int) -> float:
    times = []
    for i in range(n):
        start = time.perf_counter()
        client.get_unihash(M, "%040x" % i)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[int(len(times) * 0.99) - 1]


def test_a_client_hammering_wrong_tokens_is_slowed_and_others_are_not(auth_stack):
    """12 threads guessing the admin's token as fast as the server answers: about 8 guesses a
    second get through (one peer address), and a logged-in reader never waits on them."""
    import sys

    root = admin(auth_stack)
    token = root.new_user("reader", ["@read"])["token"]
    reader = create_client(auth_stack.address, username="reader", password=token, timeout=10)
    with root, reader:  # logged in before the hammering starts
        _p99(reader, 200)  # warm up
        quiet = [_p99(reader, 300)]
        before = root.get_stats()["broker"]["access"]["failed_logins"]
        seconds = 3.0
        hammer = subprocess.Popen(
            [sys.executable, "-c", HAMMER, auth_stack.address, "12", str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert hammer.stdout.readline().strip() == "started"
            started = time.monotonic()
            wait_for(
                lambda: root.get_stats()["broker"]["access"]["failed_logins"] > before, what="the hammering"
            )
            loud = [_p99(reader, 300) for _ in range(3)]
            assert time.monotonic() - started < seconds, "the hammer stopped before the measurement"
            counts = json.loads(hammer.stdout.readline())
        finally:
            hammer.wait(30)
        guesses = root.get_stats()["broker"]["access"]["failed_logins"] - before
        quiet += [_p99(reader, 300) for _ in range(2)]
    assert counts["refused"] >= 1
    # One peer address: at most 8 log-ins at a time, each failure held 1 s.
    assert guesses <= 8 * (seconds + 2), guesses
    # The hammer shares the 2 CPUs, so the reader's sub-millisecond p99 may well double; what
    # must not happen is a wait on anyone's failed log-in (each held 1 s): the median of
    # three rounds stays far below that.
    assert sorted(loud)[1] < 0.1, (quiet, loud)


def root_stats(stack) -> dict:
    with admin(stack) as root:
        return root.get_stats()["broker"]["access"]


def test_a_resend_on_a_new_socket_logs_in_again_first(auth_stack):
    """The Lazy Pirate rebuild (no answer for a third of the deadline) makes a new connection;
    the resend must go with a new session, not anonymously (here anonymous may do nothing)."""
    import signal
    import threading

    s = auth_stack
    with create_client(s.address, username="admin", password=ADMIN_PASSWORD, timeout=4) as client:
        client.report_unihash_equiv("c" * 40, M, U1)
        logins = client._logins
        workers = [proc for name, proc in s.children().items() if name != "hq-broker"]
        for proc in workers:
            proc.send_signal(signal.SIGSTOP)
        result = {}
        try:
            call = threading.Thread(target=lambda: result.update(answer=client.get_unihash(M, "c" * 40)))
            call.start()
            wait_for(lambda: client._logins > logins, timeout=10, what="a log-in on the new socket")
        finally:
            for proc in workers:
                proc.send_signal(signal.SIGCONT)
        call.join(10)
        assert result == {"answer": U1}
