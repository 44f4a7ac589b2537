"""hq-broker: the ROUTER/ROUTER socket loop around :class:`~hq.broker.scheduler.Scheduler`.

Poll, drain the backend, drain the frontend, tick, send. Every send is non-blocking on a
ROUTER with ROUTER_MANDATORY set: a reply for a client that is gone or not reading is
dropped and counted, never waited for.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import zmq

from hq import config, logs
from hq import protocol as p
from hq.signals import StopFlag
from hq.sockets import readable, recv_frames, send_frames

from .scheduler import Scheduler

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:8686"
DEFAULT_BACKEND = "ipc://hq-backend.ipc"

OPTIONS = [
    config.Option("bind", [DEFAULT_BIND], "client endpoint(s) to bind, tcp:// or ipc://", multiple=True),
    config.Option("backend", DEFAULT_BACKEND, "endpoint to bind for workers"),
    config.Option("heartbeat-interval", 0.5, "seconds between heartbeats with workers", float),
    config.Option("heartbeat-liveness", 3, "missed heartbeats before a worker is dropped", int),
    config.Option("request-timeout", 10.0, "seconds before an unanswered request gets UNAVAILABLE", float),
    config.Option("max-client-jobs", 4096, "queued chunks allowed per client before BUSY", int),
    config.Option("max-queued-jobs", 65536, "queued chunks allowed in total before BUSY", int),
    config.Option("worker-credit", 1, "REQUEST messages a worker holds at a time", int),
    config.Option("merge-items", 1000, "items of small same-command jobs merged into one worker REQUEST (1 = no merging)", int),
    config.Option("max-attempts", 3, "workers a request may be lost with (crash, stall) before it is answered INTERNAL", int),
    config.Option("endpoint-file", "", "once bound, write the client endpoints here, one per line"),
    config.Option("log-level", "INFO", "logging level", choices=logs.LEVELS),
]

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


class Broker:
    def __init__(self, opts, ctx: zmq.Context | None = None):
        self.opts = opts
        self.ctx = ctx or zmq.Context()
        self.scheduler = Scheduler(
            heartbeat_interval_s=opts.heartbeat_interval,
            heartbeat_liveness=opts.heartbeat_liveness,
            request_timeout_s=opts.request_timeout,
            max_client_jobs=opts.max_client_jobs,
            max_queued_jobs=opts.max_queued_jobs,
            worker_credit=opts.worker_credit,
            merge_items=opts.merge_items,
            max_attempts=opts.max_attempts,
            now=time.monotonic(),
        )
        self.frontend = router(self.ctx, public=True)
        self.backend = router(self.ctx, public=False)
        self.endpoints = []
        for address in opts.bind:
            self.frontend.bind(address)
            self.endpoints.append(self.frontend.last_endpoint.decode())
        self.backend.bind(opts.backend)
        self.backend_endpoint = self.backend.last_endpoint.decode()

    def serve(self, stop) -> None:
        sched = self.scheduler
        frontend, backend = self.frontend, self.backend
        poller = zmq.Poller()
        poller.register(frontend, zmq.POLLIN)
        poller.register(backend, zmq.POLLIN)
        log.info("broker serving clients on %s, workers on %s", ", ".join(self.endpoints), self.backend_endpoint)
        while not stop:
            timeout_ms = sched.next_wakeup(time.monotonic()) * 1000
            events = dict(poller.poll(max(1, int(timeout_ms))))
            now = time.monotonic()
            if backend in events:
                for _ in range(BURST):
                    sched.on_worker(recv_frames(backend), now)
                    if not readable(backend):
                        break
            if frontend in events:
                for _ in range(BURST):
                    sched.on_client(recv_frames(frontend), now)
                    if not readable(frontend):
                        break
            sched.tick(now)
            self.flush()
        self.shutdown()

    def flush(self) -> None:
        sched = self.scheduler
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
        self.scheduler.shutdown(time.monotonic())
        self.flush()
        # A short linger lets the last answers and DISCONNECTs leave; never wait longer.
        self.frontend.close(linger=500)
        self.backend.close(linger=500)
        log.info("broker stopped")


def write_lines(path: str, lines: list) -> None:
    """Write atomically, so a reader never sees half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def main(argv=None) -> int:
    opts = config.parse("hq-broker", "The hq broker: clients in front, workers behind.", OPTIONS, argv)
    logs.setup("hq-broker", opts.log_level)
    stop = StopFlag().install()
    try:
        broker = Broker(opts)
    except zmq.ZMQError as exc:
        log.error("cannot bind: %s", exc)
        return 1
    if opts.endpoint_file:
        write_lines(opts.endpoint_file, broker.endpoints)
    try:
        broker.serve(stop)
    finally:
        if opts.endpoint_file and os.path.exists(opts.endpoint_file):
            os.unlink(opts.endpoint_file)  # a stopped broker leaves no stale endpoint behind
    broker.ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
