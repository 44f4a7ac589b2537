"""hq-worker: one single-threaded process, a DEALER to the broker and a SQLite database.

The loop: poll until the next heartbeat is due, run every job that arrived, answer each
after its transaction has committed, heartbeat, and reconnect when the broker has been
silent for ``heartbeat_liveness`` intervals (for example after a broker restart).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TYPE_CHECKING

import zmq

from hq import config, curve, databases, failpoints, logs, options, proctitle
from hq import protocol as p
from hq.notify import notify
from hq.signals import StopFlag
from hq.sockets import readable, recv_frames, send_frames

if TYPE_CHECKING:  # imported in main(), once the database is known (databases.hide_unused_drivers)
    from .handlers import Handlers
    from .stats import WorkerStats

log = logging.getLogger(__name__)

BURST = 64


class WorkerLoop:
    """``maintenance`` runs once per heartbeat interval; ``stats`` (a WorkerStats) counts each
    REQUEST and rides in the heartbeats."""

    def __init__(
        self,
        opts,
        handlers: Handlers,
        info: dict,
        stats: WorkerStats | None = None,
        maintenance=lambda: None,
        ctx: zmq.Context | None = None,
        identity=None,
    ):
        self.opts = opts
        self.handlers = handlers
        self.info = info
        self.identity = identity  # () -> the database's identity, sent with READY
        self.stats = stats
        self.maintenance = maintenance
        self.ctx = ctx or zmq.Context()
        self.stop = None
        self.socket = None
        self.poller = None
        self.broker_expiry = 0.0
        self.last_sent = 0.0
        self.last_beat = 0.0
        self.curve = None  # (server public key, own secret key file) for a CURVE backend

    def _liveness_s(self) -> float:
        return self.opts.heartbeat_interval_s * self.opts.heartbeat_liveness

    def connect(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
        sock = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)
        if self.curve is not None:
            curve.connect_as(sock, *self.curve)
        sock.connect(self.opts.backend)
        self.socket = sock
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        if self.stop is not None and self.stop.fd is not None:
            self.poller.register(self.stop.fd, zmq.POLLIN)  # SIGTERM ends the wait at once
        info = self.info if self.identity is None else {**self.info, "db_id": self.identity()}
        self.send(p.encode_ready(info))
        self.broker_expiry = time.monotonic() + self._liveness_s()
        log.info("worker %s connecting to %s", self.info["name"], self.opts.backend)

    def send(self, frames: list) -> None:
        try:
            send_frames(self.socket, frames)
        except zmq.Again:
            log.warning("broker not accepting messages; reply dropped (it will re-dispatch)")
        self.last_sent = time.monotonic()

    def heartbeat(self) -> list:
        if self.stats is None:
            return p.HEARTBEAT_MESSAGE
        try:
            return p.encode_heartbeat(self.stats.snapshot())
        except Exception as exc:  # e.g. the database file went away: still a heartbeat
            log.debug("no stats in this heartbeat: %s", exc)
            return p.HEARTBEAT_MESSAGE

    def heartbeat_if_due(self) -> None:
        """Called while a long step (waiting for the write lock) holds up the loop."""
        if time.monotonic() - self.last_sent >= self.opts.heartbeat_interval_s:
            self.send(p.HEARTBEAT_MESSAGE)

    def serve(self, stop) -> None:
        self.stop = stop
        self.connect()
        # systemd (Type=notify): the database is open and READY is on its way to the broker.
        # When the broker registers this worker cannot be known (it sends no acknowledgement),
        # and a worker whose broker is down is started all the same: it reconnects by itself.
        notify("READY=1", f"STATUS=worker {self.info['name']} serving the broker at {self.opts.backend}")
        interval = self.opts.heartbeat_interval_s
        while not stop:
            wait_s = max(0.0, min(self.last_beat + interval, self.broker_expiry) - time.monotonic())
            events = dict(self.poller.poll(max(1, int(wait_s * 1000))))
            if self.stop.fd in events:
                self.stop.drain()
            if self.socket in events:
                for _ in range(BURST):
                    if not self.on_message(recv_frames(self.socket)) or not readable(self.socket):
                        break
            now = time.monotonic()
            if now >= self.broker_expiry:
                log.warning("broker silent for %.1f s; reconnecting", self._liveness_s())
                self.connect()
            elif now - self.last_beat >= interval:
                # Every interval, busy or not: maintenance, then a HEARTBEAT with the stats.
                self.last_beat = now
                self.maintenance()
                self.send(self.heartbeat())
        notify("STOPPING=1")
        self.send(p.DISCONNECT_MESSAGE)
        self.socket.close(linger=200)  # long enough for DISCONNECT to leave
        log.info("worker %s stopped", self.info["name"])

    def on_message(self, frames: list) -> bool:
        """Handle one broker message; False when the socket was replaced."""
        self.broker_expiry = time.monotonic() + self._liveness_s()
        try:
            kind, fields = p.decode_broker_message(frames)
        except p.ProtocolError as exc:
            log.warning("bad message from broker: %s", exc.message)
            return True
        if kind == p.REQUEST:
            command, credentials, jobs = fields
            failpoints.hit("worker.request")
            results = self.handlers.handle_jobs(command, credentials, jobs)
            for i, (job_id, _, reply) in enumerate(results):
                if any(len(frame) > p.MAX_FRAME_BYTES for frame in reply):
                    results[i] = (job_id, p.E_TOO_LARGE, [b"reply larger than MAX_FRAME_BYTES"])
            if self.stats is not None:
                self.stats.record(command, results)
            self.send(p.encode_results(results))
        elif kind == p.DISCONNECT:
            if self.stop:  # Ctrl-C reaches the broker and this worker at once: nothing to redo
                return False
            log.info("broker asked this worker to register again (it is stopping, or restarted without it)")
            self.connect()
            return False
        return True


def main(argv=None) -> int:
    opts = config.parse(
        "hq-worker", "An hq worker: answers the broker's jobs from SQLite.", options.WORKER, argv
    )
    name = opts.name or f"hq-worker-{os.getpid()}"
    logs.setup(name if opts.name else "hq-worker", opts.log_level)
    proctitle.set_title(name, databases.redacted(opts.db))
    stop = StopFlag().install()
    if failpoints.ACTIVE:
        log.warning("failpoints active (HQ_FAILPOINTS): %s", ", ".join(failpoints.ACTIVE))
    databases.hide_unused_drivers(opts.db)
    from .handlers import Handlers
    from .schema import check_path, open_database, settings_in_force
    from .stats import WorkerStats
    from .store import store_for

    def open_db():
        return open_database(
            opts.db,
            synchronous=opts.synchronous,
            busy_timeout_ms=opts.busy_timeout_ms,
            cache_size_kib=opts.cache_size_kib,
            mmap_size=opts.mmap_size,
            lock_wait_s=opts.lock_wait_s,
        )

    keys = None
    if opts.curve_server_key:
        try:
            keys = (curve.load_public(opts.curve_server_key), opts.curve_worker_key or None)
            if keys[1]:
                curve.load_secret(keys[1])
        except curve.BadKey as exc:
            log.error("%s", exc)
            return 2
    lock = None
    if not databases.is_postgresql(opts.db) and not opts.read_only:
        from .brokerlock import BrokerLock, HeldByAnother, broker_identity

        # One SQLite file, one broker: refused while another broker's workers use it, before
        # anything is written into it (a schema created or migrated).
        try:
            check_path(opts.db)
            lock = BrokerLock.acquire(opts.db, broker_identity(opts.backend))
        except ValueError as exc:  # a path no worker can use: said once, as open_db says it
            log.error("cannot open database %r: %s", opts.db, exc)
            return 2
        except HeldByAnother as exc:
            log.error("%s", exc)
            return 2
    try:
        db = open_db()
    except Exception as exc:  # bad path, not a database, permissions: a configuration error
        log.error("cannot open database %r: %s", databases.redacted(opts.db), exc)
        return 2
    info = {"name": name, "pid": os.getpid(), "settings": settings_in_force(db)}
    if opts.read_only:  # the broker keeps writes off it and its cache off (it takes no lock)
        info["read_only"] = True
    store = store_for(db, lock_wait_s=opts.lock_wait_s)
    store.reopen = open_db
    stats = WorkerStats(store, rows_interval_s=opts.stats_rows_interval_s)
    handlers = Handlers(store, read_only=opts.read_only)
    loop = WorkerLoop(
        opts, handlers, info, stats=stats, maintenance=store.check_file, identity=store.identity
    )
    loop.curve = keys
    store.on_wait = loop.heartbeat_if_due
    loop.serve(stop)
    store.close()
    if lock is not None:
        lock.release()
    loop.ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
