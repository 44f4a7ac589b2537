"""``hq-bench floor``: what hq's shape of server costs per message with no work in it.

A single lookup to hq crosses three processes (client, broker, worker and back), each with
libzmq's I/O thread. This measures what that path costs on this machine with nothing else
in it, beside hq itself, so that hq's per-message figures (``hq-bench compare``) can be read
against a floor instead of against a guess. Three servers, asked in one run by the same raw
ZeroMQ clients (a DEALER each, one request in flight, ``get`` of one taskhash never stored,
every answer checked):

* ``libzmq proxy``: libzmq's own ``zmq_proxy`` (C) between a ROUTER and a DEALER, and echo
  workers behind it: the path's cost with no Python in the middle process;
* ``python relay``: a ROUTER/ROUTER relay in Python, with hq's socket helpers and the
  broker's loop (poll, drain the workers, drain the clients, send), handing requests round
  robin to echo workers: the path's cost with the least Python a broker can have;
* ``hq``: ``hq-server`` on an empty database, the same number of workers.

An echo worker answers each request with the reply hq gives to a miss and does nothing
else. CPU is user + system time of every server process (read from /proc), over the run.
The sides go in an order that rotates between repeats; each repeat compares them by the
ratio of their CPU per request to hq's, as the machine is shared and noisy.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
import time

import psutil
import zmq

import hq
from hq import config, options
from hq import protocol as p
from hq.numbers import fmt
from hq.progress import Progress
from hq.sockets import readable, recv_frames, send_frames

from . import machine
from .metrics import min_median_max
from .stack import Stack, StackError, cpu_seconds
from .table import grid

SIDES = ("libzmq proxy", "python relay", "hq")
READY = b"READY"
START_TIMEOUT_S = 30.0
MISS_REPLY_STATUS = b"%d" % p.OK
_POSITIVE_INT = config.argparse_type(options.POSITIVE_INT)


def add_parser(sub, common) -> None:
    p_ = sub.add_parser(
        "floor",
        help="single lookups through libzmq's proxy and a bare Python relay to echo workers, beside hq",
        description=__doc__.split("\n\n")[0],
    )
    p_.add_argument("--clients", type=_POSITIVE_INT, default=40, help="client processes (default 40)")
    p_.add_argument("--requests", type=_POSITIVE_INT, default=2000, help="requests per client (default 2000)")
    common(p_, transport="tcp", faults=False)


# --- the servers (each a process of its own) ---------------------------------------------------
def _echo_worker(backend: str, announce: bool) -> None:
    """Answer every request with hq's reply to a one-item miss. ``announce``: say READY first
    (to the Python relay, which routes by worker identity)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(backend)
    if announce:
        send_frames(sock, [READY])
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        poller.poll()
        while readable(sock):
            frames = recv_frames(sock)
            # [client identity, HQC01, request id, command, credentials, body...]
            send_frames(sock, [frames[0], p.CLIENT_PROTOCOL, frames[2], MISS_REPLY_STATUS, b""])


def _libzmq_proxy(frontend: str, backend: str, bound) -> None:
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    front.bind(frontend)
    back.bind(backend)
    bound.put(front.last_endpoint.decode())
    zmq.proxy(front, back)


def _python_relay(frontend: str, backend: str, bound) -> None:
    """The broker's loop with nothing in it: poll, drain the workers, drain the clients,
    send; requests go to the workers in turn (held only until the first one is ready)."""
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for sock in (front, back):
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    front.bind(frontend)
    back.bind(backend)
    bound.put(front.last_endpoint.decode())
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    workers, held, turn = [], [], 0
    to_workers, to_clients = [], []
    while True:
        events = dict(poller.poll())
        if back in events:
            while readable(back):
                frames = recv_frames(back)
                if frames[1] == READY:
                    workers.append(frames[0])
                    to_workers += [[frames[0], *f] for f in held]
                    held.clear()
                else:
                    to_clients.append(frames[1:])
        if front in events:
            while readable(front):
                frames = recv_frames(front)
                if workers:
                    turn = (turn + 1) % len(workers)
                    to_workers.append([workers[turn], *frames])
                else:
                    held.append(frames)
        for sock, queued in ((back, to_workers), (front, to_clients)):
            for frames in queued:
                try:
                    send_frames(sock, frames)
                except zmq.ZMQError:  # a peer gone: its message is dropped, as the broker drops it
                    pass
        to_workers.clear()
        to_clients.clear()


class BareServer:
    """The libzmq proxy or the Python relay, and its echo workers: processes of their own."""

    def __init__(self, side: str, workdir: str, workers: int, transport: str):
        self.side, self.workdir, self.workers = side, workdir, workers
        self.frontend = "tcp://127.0.0.1:*" if transport == "tcp" else f"ipc://{workdir}/front.ipc"
        self.backend = f"ipc://{workdir}/back.ipc"
        self.procs: list = []
        self.processes: dict = {}  # name -> psutil.Process
        self.address = None

    def start(self) -> BareServer:
        ctx = multiprocessing.get_context("spawn")  # no ZeroMQ context crosses a fork
        bound = ctx.Queue()
        target = _libzmq_proxy if self.side == "libzmq proxy" else _python_relay
        front = ctx.Process(target=target, args=(self.frontend, self.backend, bound), daemon=True)
        front.start()
        self.procs.append(front)
        try:
            self.address = bound.get(timeout=START_TIMEOUT_S)
        except Exception:
            self.stop()
            raise StackError(f"{self.side}: did not bind within {START_TIMEOUT_S:g} s") from None
        announce = self.side == "python relay"
        for _ in range(self.workers):
            worker = ctx.Process(target=_echo_worker, args=(self.backend, announce), daemon=True)
            worker.start()
            self.procs.append(worker)
        names = ["front", *(f"worker-{n:02d}" for n in range(self.workers))]
        self.processes = {name: psutil.Process(proc.pid) for name, proc in zip(names, self.procs)}
        return self

    def cpu_seconds(self) -> dict:
        return cpu_seconds(self.processes)

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.join(10)


class HqServer(Stack):
    """hq-server, its CPU figures named as the bare servers' are (front = the broker)."""

    def cpu_seconds(self) -> dict:
        own = super().cpu_seconds()
        return {("front" if name == "hq-broker" else name.replace("hq-", "")): v for name, v in own.items()}


# --- the clients ----------------------------------------------------------------------------
def _client(address: str, index: int, requests: int, timeout_s: float, release: tuple, out) -> None:
    """Warm up (one answered request), post ready, wait for the release, then ask
    ``requests`` lookups one at a time; post (CPU seconds, answers right, error or None)."""
    release_fd, release_w = release
    os.close(release_w)  # else the pipe never reaches end of file
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    timeout_ms = int(timeout_s * 1000)

    def ask(n: int) -> bool:
        taskhash = "%016x%048x" % (index, n)  # never stored: every answer is a miss
        request_id = b"%x" % n
        send_frames(sock, p.encode_request(request_id, p.GET, [b"floor", p.pack_items([taskhash])]))
        if not sock.poll(timeout_ms):
            raise TimeoutError(f"no answer within {timeout_s:g} s")
        reply = recv_frames(sock)
        return reply[:4] == [p.CLIENT_PROTOCOL, request_id, MISS_REPLY_STATUS, b""] and len(reply) == 4

    try:
        ask(requests)  # the warm-up: a key outside the measured ones
        out.put(("ready", index, None))
        os.read(release_fd, 1)  # returns at end of file: the parent closed the write end
        right = 0
        started = time.process_time()
        for n in range(requests):
            right += ask(n)
        out.put(("done", index, (time.process_time() - started, right, None)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the repeat
        out.put(("done", index, (0.0, 0, f"{type(exc).__name__}: {exc}")))
    finally:
        sock.close(0)
        ctx.term()


def run_clients(server, opts) -> dict:
    """Start the clients, release them together, measure; the repeat's figures."""
    ctx = multiprocessing.get_context("fork")  # the parent holds no ZeroMQ context
    out = ctx.Queue()
    release_r, release_w = os.pipe()
    clients = [
        ctx.Process(
            target=_client,
            args=(server.address, i, opts.requests, opts.timeout, (release_r, release_w), out),
            daemon=True,
        )
        for i in range(opts.clients)
    ]
    for proc in clients:
        proc.start()
    os.close(release_r)
    deadline = time.monotonic() + opts.run_timeout
    try:
        ready = 0
        while ready < opts.clients:
            kind, _, payload = out.get(timeout=max(0.1, deadline - time.monotonic()))
            if kind == "done":  # failed before the release
                return {"ok": False, "error": payload[2]}
            ready += 1
        before = server.cpu_seconds()
        started = time.monotonic()
        os.close(release_w)
        release_w = None
        results = [out.get(timeout=max(0.1, deadline - time.monotonic()))[2] for _ in clients]
        wall = time.monotonic() - started
        after = server.cpu_seconds()
    except queue.Empty:
        return {"ok": False, "error": f"clients not done within --run-timeout ({opts.run_timeout:g} s)"}
    finally:
        if release_w is not None:
            os.close(release_w)
        for proc in clients:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    total = opts.clients * opts.requests
    errors = [r[2] for r in results if r[2]]
    right = sum(r[1] for r in results)
    cpu = {name: after[name] - before[name] for name in after}

    def per(seconds: float) -> float:
        return seconds / total * 1e6  # µs per request

    return {
        "ok": not errors and right == total,
        "error": errors[0] if errors else None,
        "requests": total,
        "right": right,
        "wall_s": wall,
        "requests_per_s": total / wall,
        "server_us": per(sum(cpu.values())),
        "front_us": per(cpu.get("front", 0.0)),
        "workers_us": per(sum(v for k, v in cpu.items() if k != "front")),
        "client_us": per(sum(r[0] for r in results)),
        "cpu_s": cpu,
    }


# --- the run --------------------------------------------------------------------------------
def _server(side: str, workdir: str, opts):
    if side == "hq":
        bind = "tcp://127.0.0.1:*" if opts.transport == "tcp" else f"ipc://{workdir}/hq.ipc"
        return HqServer(workdir, opts.workers, bind, opts.server_arg, log_level="WARNING", inherit_env=False)
    return BareServer(side, workdir, opts.workers, opts.transport)


def run(parser, opts) -> dict:
    if opts.corrupt_keys:
        parser.error("floor: --corrupt-keys does not apply (no key is stored)")
    progress = Progress("floor", enabled=not opts.quiet, show_after_s=1.0)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    description = machine.describe(opts.tmpdir or tempfile.gettempdir())
    repeats = []
    try:
        for n in range(1, opts.repeats + 1):
            shift = (n - 1) % len(SIDES)
            for side in SIDES[shift:] + SIDES[:shift]:
                progress.note(f"repeat {n}/{opts.repeats}: {side}")
                workdir = tempfile.mkdtemp(prefix="hq-bench-floor-", dir=opts.tmpdir)
                server = _server(side, workdir, opts)
                try:
                    server.start()
                    got = run_clients(server, opts)
                except StackError as exc:
                    got = {"ok": False, "error": str(exc)}
                finally:
                    server.stop()
                    if not opts.keep:
                        shutil.rmtree(workdir, ignore_errors=True)
                repeats.append({"repeat": n, "side": side, **got})
    finally:
        progress.close()
    result = {
        "workload": "floor",
        "title": (
            f"floor: {opts.clients} clients x {opts.requests} single-hash gets of keys never "
            f"stored, one in flight each, {opts.workers} workers, {opts.transport}"
        ),
        "config": {k: v for k, v in vars(opts).items() if k != "command"},
        "machine": description,
        "hq_version": hq.__version__,
        "started_at": started,
        "command": ["hq-bench", *sys.argv[1:]],
        "repeats": repeats,
        "summary": summarize(repeats),
        "ok": all(r["ok"] for r in repeats),
    }
    print_report(result, quiet=opts.quiet)
    return result


FIGURES = ("requests_per_s", "server_us", "front_us", "workers_us", "client_us")


def summarize(repeats: list) -> dict:
    """side -> figure -> min/median/max, and ``server_vs_hq``: its CPU per request ÷ hq's,
    repeat by repeat."""
    hq_cpu = {r["repeat"]: r.get("server_us") for r in repeats if r["side"] == "hq" and r["ok"]}
    out = {}
    for side in SIDES:
        mine = [r for r in repeats if r["side"] == side and r["ok"]]
        out[side] = {name: min_median_max([r[name] for r in mine]) for name in FIGURES}
        ratios = [r["server_us"] / hq_cpu[r["repeat"]] for r in mine if hq_cpu.get(r["repeat"])]
        out[side]["server_vs_hq"] = min_median_max(ratios)
    return out


def print_report(result: dict, quiet: bool = False) -> None:
    if not quiet:
        m = result["machine"]
        print(result["title"])
        print(
            f"machine: {m['cpu_model']}, {m['cpu_count_logical']} CPUs, {m['python']}, "
            f"libzmq {m['libzmq']}, load {m['load_average'][0]:.2f} at start"
        )
        print("medians over the repeats; ÷ hq is the median of the per-repeat ratios (min-max)")
        print()
        rows = []
        for side in SIDES:
            s = result["summary"][side]
            ratio = s["server_vs_hq"]
            rows.append(
                [
                    side,
                    fmt(s["requests_per_s"]["median"]),
                    fmt(s["server_us"]["median"]),
                    fmt(s["front_us"]["median"]),
                    fmt(s["workers_us"]["median"]),
                    f"{fmt(ratio['median'])}× ({fmt(ratio['min'])}-{fmt(ratio['max'])})"
                    if ratio["median"] is not None
                    else "",
                    fmt(s["client_us"]["median"]),
                ]
            )
        print(
            grid(
                rows,
                headers=[
                    "server",
                    "requests/s",
                    "server CPU per request (µs)",
                    "proxy / relay / broker",
                    "workers",
                    "÷ hq",
                    "client CPU per request (µs)",
                ],
                colalign=("left", "right", "right", "right", "right", "right", "right"),
            )
        )
        print()
    for r in result["repeats"]:
        if not r["ok"]:
            print(f"{r['side']}, repeat {r['repeat']} FAILED: {r.get('error') or 'wrong answers'}")
    print("floor: " + ("OK: every answer was right" if result["ok"] else "FAILED: see above"))
