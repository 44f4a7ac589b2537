"""hq-server: a whole local stack in the foreground, for the quick start and for tests.

It checks the database, starts ``hq-broker`` and N ``hq-worker`` processes on one SQLite
file or PostgreSQL database (passing on ``--config``, so its ``[hq-broker]`` and ``[hq-worker]`` sections tune
them), reports ready once every worker has registered and a real request has gone through,
and on SIGTERM/SIGINT stops them all, workers first. Once the stack has been ready, a child
that exits is restarted (with backoff); before that, a child that exits ends hq-server with
a non-zero status, because nothing has worked yet and restarting cannot fix a busy port or a
bad option. For production, run the same two programs under supervisord
(``configs/supervisord.conf``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from hq import config, curve, databases, logs, options, proctitle
from hq.notify import environ_for_children, notify
from hq.signals import StopFlag

log = logging.getLogger("hq.server")

_PR_SET_PDEATHSIG = 1
RESTART_BACKOFF_MIN_S = 0.2
RESTART_BACKOFF_MAX_S = 5.0
STOP_WAIT_S = 10.0


class Child:
    """One supervised process: its command, its process, and its restart backoff."""

    def __init__(self, name: str, argv: list, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.backoff = RESTART_BACKOFF_MIN_S
        self.restart_at = 0.0
        self.pid = None  # of the process last started

    def start(self, now: float) -> None:
        # A session of its own: Ctrl-C in the terminal reaches hq-server alone, which stops
        # the workers before the broker. Should hq-server itself be killed, the kernel sends
        # the child SIGTERM (PR_SET_PDEATHSIG), so no orphan keeps the port or the database.
        # hq-server alone tells systemd (Type=notify) when the stack is ready: not its children.
        self.proc = subprocess.Popen(
            self.argv,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            env={**environ_for_children(), **self.env},
        )
        self.pid = self.proc.pid
        self.started = now
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def exited(self, now: float):
        """The exit status if the process has exited since the last look (it is then due for
        a restart after its backoff, which grows while it keeps dying young); else None."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            if now - self.started > 10 * RESTART_BACKOFF_MAX_S:
                self.backoff = RESTART_BACKOFF_MIN_S
            return None
        self.proc = None
        self.restart_at = now + self.backoff
        self.backoff = min(self.backoff * 2, RESTART_BACKOFF_MAX_S)
        return code

    def restart_if_due(self, now: float) -> None:
        if self.proc is None and now >= self.restart_at:
            self.start(now)


def _prctl():
    """libc's prctl, looked up in hq-server itself (never between fork and exec); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when hq-server's process goes away. Elsewhere the
    session alone still keeps Ctrl-C away from the children."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


def _module_argv(module: str, args: list) -> list:
    return [sys.executable, "-m", module, *args]


def wait_ready(address: str, workers: int, deadline_s: float, stop, **keys) -> bool:
    """Until the deadline: has every worker registered, and does a request go through?"""
    from hq.client import InvokeError, create_client

    end = time.monotonic() + deadline_s
    with create_client(address, username="", timeout=0.5, **keys) as client:
        while not stop and time.monotonic() < end:
            try:
                try:
                    registered = len(client.get_stats()["workers"])
                except InvokeError:  # anonymous users may not read stats: a ping must do
                    registered = workers
                if registered >= workers:
                    client.ping()
                    return True
            except ConnectionError:
                continue
            time.sleep(0.02)
    return False


def prepare_database(opts) -> bool:
    """Open the database once before any worker starts: a path no worker could use is one
    ERROR line now (not a worker pool restarting forever), and the schema is in place before
    the workers open it together."""
    if not databases.is_postgresql(opts.db) and not opts.read_only:  # a mirror may share it
        from hq.workers.brokerlock import holder

        refusal = holder(opts.db)  # another stack's workers use the file (hq.workers.brokerlock)
        if refusal is not None:
            log.error("%s", refusal)
            return False
    try:
        databases.hide_unused_drivers(opts.db)
        from hq.workers.schema import open_database

        open_database(opts.db, synchronous=opts.synchronous).close()
    except Exception as exc:  # bad path, not a database, permissions: a configuration error
        log.error("cannot open database %r: %s", databases.redacted(opts.db), exc)
        return False
    return True


def main(argv=None) -> int:
    opts = config.parse(
        "hq-server",
        "Run a whole local hq stack: one broker and N workers on one database.",
        options.SERVER,
        argv,
    )
    logs.setup("hq-server", opts.log_level)
    proctitle.set_title("hq-server", databases.redacted(opts.db))
    wrong = options.conflict(opts)
    if wrong:
        log.error("%s", wrong)
        return 2
    # Nothing runs yet: Ctrl-C or SIGTERM during the database's first open (waiting for a
    # PostgreSQL server that is not up) ends hq-server at once, by the default actions (Ctrl-C
    # even where it started ignored, as StopFlag's handler later takes it anyway).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if not prepare_database(opts):
            return 2
    except KeyboardInterrupt:
        log.info("hq-server stopped before it started")
        return 130
    stop = StopFlag().install()
    if opts.curve_secret_key:
        try:
            curve.load_secret(opts.curve_secret_key)
            for directory in opts.curve_clients:
                curve.load_allowed(directory)
        except curve.BadKey as exc:
            log.error("%s", exc)
            return 2
    rundir = tempfile.mkdtemp(prefix="hq-server-")
    backend = opts.backend or f"ipc://{rundir}/backend.ipc"
    broker_endpoints = os.path.join(rundir, "endpoints")
    common = ["--log-level", opts.log_level, "--heartbeat-interval", str(opts.heartbeat_interval_s)]
    if opts.config:
        # One file tunes the whole stack: [hq-broker] and [hq-worker] sections reach them.
        common += ["--config", os.path.abspath(opts.config)]
    broker_args = ["--backend", backend, "--endpoint-file", broker_endpoints, *common]
    if opts.metrics:
        broker_args.append(f"--metrics={opts.metrics}")
    if opts.cache_entries != options.CACHE_ENTRIES.default:
        broker_args.append(f"--cache-entries={opts.cache_entries}")
    broker_args.append(f"--anon-perms={opts.anon_perms}")
    if opts.read_only:
        broker_args.append("--read-only")
    broker_env = {}
    if opts.upstream:
        # In the broker's environment, not its command line: the URL may hold a password
        # (ws://user:password@host), and a command line is anyone's to read in ps.
        broker_env[options.UPSTREAM.env] = opts.upstream
        broker_args += [
            f"--upstream-timeout={opts.upstream_timeout_s}",
            f"--upstream-negative-ttl={opts.upstream_negative_ttl_s}",
        ]
        if opts.upstream_username:
            broker_args.append(f"--upstream-username={opts.upstream_username}")
    ready_keys: dict = {}
    worker_curve: list = []
    if opts.curve_secret_key:
        # hq-server's own readiness client needs a key the broker lets in: one made here.
        keys = os.path.join(rundir, "client-keys")
        _, own_key = curve.create(keys, "hq-server")
        broker_args.append(f"--curve-secret-key={os.path.abspath(opts.curve_secret_key)}")
        for directory in [*opts.curve_clients, keys] if opts.curve_clients else []:
            broker_args.append(f"--curve-clients={os.path.abspath(directory)}")
        ready_keys = {"server_key": opts.curve_secret_key, "client_key": own_key}
        if backend.startswith("tcp://"):  # workers prove themselves with a key made here
            worker_keys = os.path.join(rundir, "worker-keys")
            _, worker_secret = curve.create(worker_keys, "hq-worker")
            broker_args.append(f"--curve-workers={worker_keys}")
            worker_curve = [
                f"--curve-server-key={os.path.abspath(opts.curve_secret_key)}",
                f"--curve-worker-key={worker_secret}",
            ]
    if opts.admin_user:
        # The password reaches the broker in its environment, never in a command line.
        broker_args.append(f"--admin-user={opts.admin_user}")
        broker_env[options.ADMIN_PASSWORD.env] = opts.admin_password
    if opts.upstream_password:  # likewise
        broker_env[options.UPSTREAM_PASSWORD.env] = opts.upstream_password

    def broker_argv(binds: list) -> list:
        return _module_argv("hq.broker", [*broker_args, *(f"--bind={b}" for b in binds)])

    children = [Child("hq-broker", broker_argv(opts.bind), broker_env)]
    gateway_endpoints = os.path.join(rundir, "gateway.endpoints")

    def gateway_argv(broker_address: str) -> list:
        args = [f"--listen={a}" for a in opts.oehashequiv]
        args += [f"--broker={broker_address}", f"--endpoint-file={gateway_endpoints}"]
        args += [
            "--log-level",
            opts.log_level,
            *(["--config", os.path.abspath(opts.config)] if opts.config else []),
        ]
        if opts.curve_secret_key:
            args += [f"--curve-server-key={os.path.abspath(opts.curve_secret_key)}"]
            args += [f"--curve-client-key={ready_keys['client_key']}"]
        return _module_argv("hq.gateway", args)

    # A password in a PostgreSQL URL goes to the workers in PGPASSWORD, not on their command line.
    worker_db, db_password = databases.without_password(opts.db)
    worker_env = {} if db_password is None else {"PGPASSWORD": db_password}
    for n in range(opts.workers):
        name = f"hq-worker-{n:02d}"
        worker_args = [
            "--backend",
            backend,
            "--db",
            worker_db,
            "--synchronous",
            opts.synchronous,
            "--name",
            name,
            *worker_curve,
            *(["--read-only"] if opts.read_only else []),
            *common,
        ]
        children.append(Child(name, _module_argv("hq.workers", worker_args), worker_env))
    try:
        now = time.monotonic()
        for child in children:
            child.start(now)
        ready = False
        while not stop:
            now = time.monotonic()
            for child in children:
                code = child.exited(now)
                if code is None:
                    continue
                if not ready:
                    # Nothing has ever worked: restarting cannot fix a busy port or a bad
                    # option. A child that exits 2 has said why in its own ERROR line.
                    if code == 2:
                        log.info("%s could not start; stopping", child.name)
                        return 2
                    log.error("%s exited with %s before hq was ready; stopping", child.name, exit_text(code))
                    return 1
                log.warning(
                    "%s (pid %d) exited with %s; restarting in %.1f s",
                    child.name,
                    child.pid,
                    exit_text(code),
                    child.restart_at - now,
                )
            for child in children:
                child.restart_if_due(now)
            if not ready and os.path.exists(broker_endpoints):
                with open(broker_endpoints, encoding="utf-8") as fh:
                    endpoints = fh.read().split()
                if wait_ready(endpoints[0], opts.workers, 0.5, stop, **ready_keys):
                    gateway_text = ""
                    if opts.oehashequiv:
                        if not _gateway_started(children, gateway_argv(endpoints[0]), now):
                            time.sleep(0.05)
                            continue
                        with open(gateway_endpoints, encoding="utf-8") as fh:
                            listening = fh.read().split()
                        # A restarted gateway listens where the first one did (port 0 too).
                        children[-1].argv = [
                            a for a in children[-1].argv if not a.startswith("--listen=")
                        ] + [f"--listen={a}" for a in listening]
                        gateway_text = f"; OEHASHEQUIV on {', '.join(listening)}"
                    ready = True
                    # A restarted broker binds the same endpoints, even where the first bind
                    # said tcp://...:* : connected clients and workers find it again.
                    children[0].argv = broker_argv(endpoints)
                    log.info(
                        "hq ready on %s (%d workers, database %s)%s",
                        ", ".join(endpoints),
                        opts.workers,
                        databases.redacted(opts.db),
                        gateway_text,
                    )
                    if opts.endpoint_file:
                        from hq.broker.main import write_lines

                        write_lines(opts.endpoint_file, endpoints)
                    notify("READY=1", f"STATUS=hq ready on {', '.join(endpoints)} ({opts.workers} workers)")
                continue
            stop.wait(0.1)  # supervision tick: restarts within 0.1 s of an exit, stops at once
    finally:
        notify("STOPPING=1")
        _stop_all(children)
        if opts.endpoint_file and os.path.exists(opts.endpoint_file):
            os.unlink(opts.endpoint_file)
        shutil.rmtree(rundir, ignore_errors=True)
        log.info("hq-server stopped")
    return 0


def _gateway_started(children: list, argv: list, now: float) -> bool:
    """Once the broker answers: start hq-gateway (once), and say whether it is listening."""
    gateway = next((c for c in children if c.name == "hq-gateway"), None)
    if gateway is None:
        gateway = Child("hq-gateway", argv)
        children.append(gateway)
        gateway.start(now)
    endpoint_file = next(a.split("=", 1)[1] for a in argv if a.startswith("--endpoint-file="))
    return os.path.exists(endpoint_file)


def _stop_all(children: list) -> None:
    """The gateway and the workers first, then the broker, so none sees its broker vanish."""
    workers = [c for c in children[1:] if c.proc is not None]
    broker = [c for c in children[:1] if c.proc is not None]
    for group in (workers, broker):
        for child in group:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + STOP_WAIT_S
        for child in group:
            try:
                child.proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", child.name, STOP_WAIT_S)
                child.proc.kill()
                child.proc.wait()


if __name__ == "__main__":
    sys.exit(main())
