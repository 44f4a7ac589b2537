"""hq-broker: the ROUTER/ROUTER socket loop around :class:`~hq.broker.scheduler.Scheduler`.

Poll, drain the backend, drain the frontend, tick, send. Every send is non-blocking on a
ROUTER with ROUTER_MANDATORY set: a reply for a client that is gone or not reading is
dropped and counted, never waited for.
With ``--metrics`` the same loop also answers HTTP scrapes on a ZMQ_STREAM socket
(:mod:`hq.broker.metrics`), without threads and without ever blocking.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import sys
import time

import zmq

from hq import addresses, config, curve, extras, logs, options, permissions, proctitle, unixsockets
from hq import protocol as p
from hq.notify import notify
from hq.signals import StopFlag
from hq.sockets import readable, recv_frames, recv_frames_tagged, send_frames

from . import zap
from .metrics import HttpEndpoint, render
from .scheduler import Scheduler

log = logging.getLogger(__name__)

#: Messages taken from one socket before looking at the other: keeps both sides moving.
BURST = 256


def router(ctx: zmq.Context, public: bool) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)
    if public:
        sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)  # a silent TCP peer is cut after 5 s
        sock.setsockopt(zmq.HEARTBEAT_IVL, 10000)  # ZMTP pings find dead TCP peers
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30000)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        # With a ZAP domain libzmq refuses ZMTP/1.0 peers (first byte not 0xFF) at once.
        # Without one it reads their bytes as frames and counts the handshake as done, so a
        # peer that sends one stray byte is never cut by HANDSHAKE_IVL. NULL clients still
        # connect: with no ZAP handler bound, the domain is not enforced.
        sock.setsockopt(zmq.ZAP_DOMAIN, b"hq")
    return sock


class BindError(Exception):
    """An endpoint could not be bound (address in use, no such directory, ...): one line."""


def bind(sock: zmq.Socket, address: str, what: str) -> str:
    """Bind ``sock`` to ``address``; return the endpoint bound (the real port for ``:*``).
    An ``ipc://`` path another process listens on is refused, as a TCP port in use is:
    libzmq would remove its socket file and take the path over."""
    path = address[len("ipc://") :] if address.startswith("ipc://") else ""
    if path and path != "*" and unixsockets.is_listening(path):
        raise BindError(f"cannot bind the {what} endpoint {address}: another process listens there")
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        reason = zmq.strerror(exc.errno)
        if exc.errno == errno.ENODEV:  # libzmq's word for a host that is none of this one's
            reason = "not an address, name or interface of this host"
        raise BindError(f"cannot bind the {what} endpoint {address}: {reason}") from None
    return sock.last_endpoint.decode()


def metrics_stream(ctx: zmq.Context, address: str) -> zmq.Socket:
    """A ZMQ_STREAM socket (raw TCP) bound to ``address`` for the HTTP metrics endpoint."""
    sock = ctx.socket(zmq.STREAM)
    sock.linger = 0
    sock.setsockopt(zmq.STREAM_NOTIFY, 1)  # connect and disconnect arrive as empty frames
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_MAXRT, 30000)  # a peer that never reads its answer is cut after 30 s
    bind(sock, address, "metrics")
    return sock


class Broker:
    def __init__(self, opts, ctx: zmq.Context | None = None):
        self.opts = opts
        self.ctx = ctx or zmq.Context()
        self.scheduler = Scheduler(opts, now=time.monotonic())
        self.frontend = router(self.ctx, public=True)
        self.backend = router(self.ctx, public=False)
        self.zap = self._secure(opts)
        self.endpoints = [bind(self.frontend, address, "client") for address in opts.bind]
        self.backend_endpoint = bind(self.backend, opts.backend, "worker")
        self.upstream_socket = self.agent = None
        if getattr(opts, "upstream", ""):
            self._start_upstream(opts)
        self.metrics_socket = self.metrics = None
        if getattr(opts, "metrics", ""):
            self.metrics_socket = metrics_stream(self.ctx, opts.metrics)
            self.metrics_endpoint = self.metrics_socket.last_endpoint.decode()
            self.metrics = HttpEndpoint(self.render_metrics)

    def _start_upstream(self, opts):
        """The upstream agent: a thread of this process, on an inproc:// PAIR socket."""
        from hq.upstream.agent import Agent  # only with --upstream (websockets for ws://)

        endpoint = f"inproc://hq-upstream-{id(self):x}"
        self.upstream_socket = self.ctx.socket(zmq.PAIR)
        self.upstream_socket.linger = 0
        self.upstream_socket.bind(endpoint)
        login = (opts.upstream_username, opts.upstream_password) if opts.upstream_username else ()
        self.agent = Agent(
            self.ctx, endpoint, opts.upstream, opts.upstream_timeout_s, opts.upstream_negative_ttl_s, login
        )
        self.agent.start()

    def _secure(self, opts):
        """CURVE on the frontend (and on a tcp:// backend) with the ZAP handler deciding who
        gets in; None without ``--curve-secret-key``. Raises BindError for a bad setup."""
        tcp_backend = opts.backend.startswith("tcp://")
        if not opts.curve_secret_key:
            if tcp_backend:
                log.warning(
                    "workers on the tcp:// backend %s are not authenticated and see every "
                    "request: use --curve-secret-key and --curve-workers",
                    opts.backend,
                )
            return None
        if not curve.available():
            raise BindError("this libzmq has no CURVE support (--curve-secret-key)")
        try:
            allowed = {zap.CLIENTS: None}
            if opts.curve_clients:
                allowed[zap.CLIENTS] = frozenset().union(*(curve.load_allowed(d) for d in opts.curve_clients))
            curve.serve(self.frontend, opts.curve_secret_key)
            if tcp_backend:
                if not opts.curve_workers:
                    raise curve.BadKey(
                        "a tcp:// backend with CURVE needs --curve-workers (the workers' public keys)"
                    )
                allowed[zap.WORKERS] = curve.load_allowed(opts.curve_workers)
                curve.serve(self.backend, opts.curve_secret_key)
                self.backend.zap_domain = zap.WORKERS
        except curve.BadKey as exc:
            raise BindError(str(exc)) from None
        return zap.ZapHandler(self.ctx, allowed)

    def render_metrics(self) -> str:
        return render(self.scheduler, time.monotonic(), self.metrics.responses)

    def serve(self, stop) -> None:
        sched = self.scheduler
        frontend, backend = self.frontend, self.backend
        poller = zmq.Poller()
        poller.register(frontend, zmq.POLLIN)
        poller.register(backend, zmq.POLLIN)
        zap_handler = self.zap
        if zap_handler is not None:
            poller.register(zap_handler.sock, zmq.POLLIN)
        if stop.fd is not None:
            poller.register(stop.fd, zmq.POLLIN)  # SIGTERM ends the wait at once
        log.info(
            "broker serving clients on %s, workers on %s", ", ".join(self.endpoints), self.backend_endpoint
        )
        metrics, metrics_socket = self.metrics, self.metrics_socket
        upstream = self.upstream_socket
        if upstream is not None:
            poller.register(upstream, zmq.POLLIN)
            log.info("asking the upstream %s on a local miss", addresses.redacted(self.opts.upstream))
        if metrics is not None:
            poller.register(metrics_socket, zmq.POLLIN)
            log.info(
                "metrics (Prometheus text format) on http://%s/metrics",
                self.metrics_endpoint.split("://", 1)[1],
            )
        while not stop:
            timeout_ms = sched.next_wakeup(time.monotonic()) * 1000
            if metrics is not None and metrics.conns:
                timeout_ms = min(timeout_ms, metrics.next_wakeup(time.monotonic()) * 1000)
            events = dict(poller.poll(max(1, int(timeout_ms))))
            now = time.monotonic()
            if stop.fd in events:
                stop.drain()
            if zap_handler is not None and zap_handler.sock in events:
                zap_handler.serve()
                sched.counters["curve.refused"] = zap_handler.refused
            # Drain both sides, then dispatch once (in tick): the jobs that arrived together
            # go to the workers merged, and the replies just read have freed their slots.
            if backend in events:
                for _ in range(BURST):
                    sched.on_worker(recv_frames(backend), now, dispatch=False)
                    if not readable(backend):
                        break
            if frontend in events:
                for _ in range(BURST):
                    frames, first = recv_frames_tagged(frontend)
                    sched.on_client(frames, now, dispatch=False, peer=first)
                    if not readable(frontend):
                        break
            if upstream is not None and upstream in events:
                for _ in range(BURST):
                    sched.on_upstream(recv_frames(upstream), now)
                    if not readable(upstream):
                        break
            sched.tick(now)
            self.flush()
            if metrics is not None:
                if metrics_socket in events:
                    self.serve_metrics(now)
                if metrics.conns:
                    metrics.tick(now)
                if metrics.outbox:
                    self.flush_metrics()
        self.shutdown()

    def serve_metrics(self, now: float) -> None:
        """Take what the metrics socket has (connections, request bytes) and answer."""
        sock, metrics = self.metrics_socket, self.metrics
        for _ in range(BURST):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                break
            if len(frames) == 2:
                metrics.on_message(frames[0], frames[1], now)

    def flush_metrics(self) -> None:
        """Send answers and closes without blocking; one that cannot leave now is dropped."""
        for frames in self.metrics.outbox:
            try:
                send_frames(self.metrics_socket, frames)
            except zmq.ZMQError:  # the peer is gone (EHOSTUNREACH) or not reading (EAGAIN)
                pass
        self.metrics.outbox.clear()

    def flush(self) -> None:
        sched = self.scheduler
        if sched.upstream is not None and sched.upstream.outbox:
            for frames in sched.upstream.outbox:
                try:
                    send_frames(self.upstream_socket, frames)
                except zmq.ZMQError:  # the agent is not reading: the question times out
                    sched.count("upstream.send_failed")
            sched.upstream.outbox.clear()
        if sched.to_workers:
            for frames in sched.to_workers:
                try:
                    send_frames(self.backend, frames)
                except zmq.ZMQError as exc:  # Again at HWM, EHOSTUNREACH: expiry handles it
                    sched.count("workers.send_failed")
                    log.debug("send to worker %s failed: %s", frames[0].hex(), exc)
            sched.to_workers.clear()
        if sched.to_clients:
            dropped = 0
            for frames in sched.to_clients:
                try:
                    send_frames(self.frontend, frames)
                except zmq.ZMQError:  # client gone or not reading: drop, it will retry
                    dropped += 1
            if dropped:
                sched.drop_client_replies(dropped)
            sched.to_clients.clear()

    def shutdown(self) -> None:
        notify("STOPPING=1")  # systemd shows the unit deactivating while the last answers leave
        self.scheduler.shutdown(time.monotonic())
        self.flush()
        # A short linger lets the last answers and DISCONNECTs leave; never wait longer.
        self.frontend.close(linger=500)
        self.backend.close(linger=500)
        if self.upstream_socket is not None:
            try:
                self.upstream_socket.send_multipart([b"", b"stop"], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.agent.thread.join(5)  # it closes its socket, so that ctx.term() returns
            self.upstream_socket.close(linger=0)
        if self.metrics_socket is not None:
            self.metrics_socket.close(linger=0)
        if self.zap is not None:
            self.zap.sock.close(linger=0)
        log.info("broker stopped")


def write_lines(path: str, lines: list) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def main(argv=None) -> int:
    opts = config.parse("hq-broker", "The hq broker: clients in front, workers behind.", options.BROKER, argv)
    logs.setup("hq-broker", opts.log_level)
    proctitle.set_title("hq-broker", " ".join(opts.bind))
    wrong = options.conflict(opts)
    if wrong:
        log.error("%s", wrong)
        return 2
    if opts.upstream.startswith(("ws://", "wss://")) and importlib.util.find_spec("websockets") is None:
        log.error(
            "a ws:// upstream needs the [gateway] extra (websockets is not installed): "
            "pip install '%s[gateway]'",
            extras.DISTRIBUTION,
        )
        return 2
    stop = StopFlag().install()
    try:
        broker = Broker(opts)
    except BindError as exc:  # a configuration error: restarting cannot fix it
        log.error("%s", exc)
        return 2
    if opts.admin_user:
        # Only the salted hash is kept, as for every token.
        broker.scheduler.bootstrap_admin(opts.admin_user, permissions.hash_token(opts.admin_password))
    log.info(
        "anonymous permissions: %s%s",
        ", ".join(sorted(broker.scheduler.access.anon_perms)) or "@none",
        "; read-only" if opts.read_only else "",
    )
    if opts.endpoint_file:
        write_lines(opts.endpoint_file, broker.endpoints)
    # systemd (Type=notify): bound, so clients and workers can connect from now on.
    notify(
        "READY=1",
        f"STATUS=serving clients on {', '.join(broker.endpoints)}, workers on {broker.backend_endpoint}",
    )
    try:
        broker.serve(stop)
    finally:
        if opts.endpoint_file and os.path.exists(opts.endpoint_file):
            os.unlink(opts.endpoint_file)  # a stopped broker leaves no stale endpoint behind
    broker.ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
