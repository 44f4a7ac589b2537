"""``hq-bench cold-start``: a local server with an empty database in front of an upstream that
holds the farm burst's mappings, hq beside bitbake-hashserv, in one run (issue 14).

The upstream holds every mapping the burst asks about: an hq (``--upstream-server hq``, the
default; the local hq asks it over ZeroMQ, the local bitbake-hashserv through its gateway)
or a bitbake-hashserv (``--upstream-server bitbake-hashserv``, which serves a cold burst at
its own pace: then the upstream, not the local server, sets the time). In front of it, each
on a fresh, empty database, one after the other in an order that rotates between repeats:

* ``bitbake-hashserv --upstream``, with BitBake's own client (in separate processes);
* ``hq --upstream`` through hq-gateway, with BitBake's own client (the same client path);
* ``hq --upstream`` with hq's client;

and, once per repeat, ``hq`` with the mappings already local (no upstream): the local-only
time a cold hq is compared with. Each local server gets the burst twice: cold (everything
comes from the upstream), then again once what the upstream answered is stored (waited for
up to a minute: bitbake-hashserv stores it one upstream round trip at a time), counting the
lookups the second burst asked of the upstream, from the upstream's own statistics. With
``--delay-ms D`` (default 20) the whole set runs again through a relay that adds D ms to
every round trip to the upstream, as a WAN would. Targets: the cold burst ≥ 10× faster
through hq than through bitbake-hashserv; the second burst (almost) no upstream request;
with the delay, hq's cold burst within 2× of its local-only time.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import psutil

import hq
from hq.client import create_client
from hq.numbers import fmt
from hq.progress import Progress

from . import machine, reference
from .compare import workload_options
from .metrics import min_median_max
from .populate import populate
from .runner import _finish_figures, _is_ok, _measure, hq_stack
from .stack import GatewayStack, StackError, free_port
from .table import grid
from .workloads import WORKLOADS

REF, GW, HQ, LOCAL = "bitbake-hashserv --upstream", "hq --upstream, gateway", "hq --upstream", "hq, all local"
COLD_SIDES = (REF, GW, HQ)
#: --sides names for the local servers.
SIDE_NAMES = {"reference": REF, "gateway": GW, "hq": HQ}
#: How long the second burst waits for a local server to store what its upstream answered.
BACKFILL_WAIT_S = 60.0
UPSTREAM_SERVERS = ("hq", "bitbake-hashserv")


def add_parser(sub, common) -> None:
    p = sub.add_parser(
        "cold-start",
        help="a local hq and a local bitbake-hashserv, empty, in front of one upstream (issue 14)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--bitbake", metavar="DIR", default=None, help="BitBake source tree (default $HQ_BITBAKE)")
    p.add_argument(
        "--scale", type=float, default=1.0, help="multiply the burst's clients and tasks by this (0 < F <= 1)"
    )
    p.add_argument(
        "--delay-ms",
        type=float,
        default=20.0,
        help="also run through a relay adding this to every round trip to the upstream (0: not)",
    )
    p.add_argument(
        "--upstream-server",
        choices=UPSTREAM_SERVERS,
        default="hq",
        help="what holds the mappings: hq (default) or bitbake-hashserv",
    )
    p.add_argument(
        "--sides",
        default=",".join(SIDE_NAMES),
        help="the local servers to run, comma-separated, of reference (bitbake-hashserv --upstream: "
        "about 90 s a cold burst at full scale), gateway and hq (default: all three; the ratios to the "
        "reference need it)",
    )
    p.add_argument(
        "--configs",
        type=int,
        default=0,
        help="clients share this many configurations (default 0: each its own)",
    )
    p.add_argument(
        "--upstream-cpus",
        metavar="LIST",
        default=None,
        help="run the upstream (and the relay) on these CPUs, e.g. 1 or 2-3, and everything else "
        "on the others: an upstream on a host of its own (default: all share every CPU)",
    )
    common(p, transport="tcp", faults=False)


def parse_cpus(text: str) -> set:
    """``"1"``, ``"0,2"``, ``"2-3"`` -> a set of CPU numbers; ValueError if malformed."""
    cpus: set = set()
    for part in text.split(","):
        found = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if found is None:
            raise ValueError(text)
        first, last = found.groups()
        cpus.update(range(int(first), int(last or first) + 1))
    if not cpus:
        raise ValueError(text)
    return cpus


def _split_cpus(parser, text: str | None):
    """(the upstream's CPUs, everyone else's), both within this process's; (None, None)
    without --upstream-cpus. Every process started later inherits what this one is set to."""
    if text is None:
        return None, None
    mine = os.sched_getaffinity(0)
    try:
        upstream = parse_cpus(text)
    except ValueError:
        parser.error(f"cold-start: --upstream-cpus takes CPU numbers such as 1 or 2-3; got {text!r}")
    rest = mine - upstream
    if not upstream <= mine or not rest:
        parser.error(
            f"cold-start: --upstream-cpus {text} must name some, not all, of this process's CPUs "
            f"({', '.join(map(str, sorted(mine)))})"
        )
    return upstream, rest


def ask_oehashequiv(address: str, message: dict, timeout: float = BACKFILL_WAIT_S):
    """One normal-mode request to an OEHASHEQUIV server over a plain socket; its answer."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(b"OEHASHEQUIV 1.1\nneeds-headers: false\n\n" + json.dumps(message).encode() + b"\n")
        return json.loads(sock.makefile("rb").readline())


class Upstream:
    """The server holding the mappings, its addresses (for a local hq and for a local
    bitbake-hashserv), and how many lookups it has answered."""

    def __init__(self, kind: str, workdir: str, tree: str, wopts):
        self.kind = kind
        if kind == "hq":
            self.server = GatewayStack(workdir, wopts.workers, wopts.base_server_arg)
        else:
            self.server = reference.ReferenceServer(workdir, tree)
        self.db = self.server.db
        self.stats_asked = 0

    def start(self) -> None:
        self.server.start()
        if self.kind == "hq":  # the local hq asks over ZeroMQ; bitbake-hashserv the gateway
            self.for_hq, self.for_ref = self.server.hq_address, self.server.address
        else:
            self.for_hq = self.for_ref = self.server.address

    def lookups(self) -> int:
        """Lookups answered so far (bitbake-hashserv: requests, a stream line each, less the
        get-stats requests this made)."""
        if self.kind == "hq":
            with create_client(self.server.hq_address, timeout=30) as client:
                counters = client.get_stats()["broker"]["counters"]
            return sum(counters.get(f"items.{c}", 0) for c in ("get", "exists", "get-full", "get-outhash"))
        self.stats_asked += 1  # each get-stats counts itself
        return ask_oehashequiv(self.server.address, {"get-stats": None})["requests"]["num"] - self.stats_asked

    def cpu_s(self) -> float:
        """CPU seconds its processes have used so far (NaN if one died: the figure is void)."""
        return sum(self.server.cpu_seconds().values())

    def stop(self) -> None:
        self.server.stop()


class Relay:
    def __init__(self, target: str, delay_ms: float):
        self.port = free_port()
        scheme = "tcp://" if target.startswith("tcp://") else ""
        self.address = f"{scheme}127.0.0.1:{self.port}"
        target = target[len(scheme) :]
        argv = [sys.executable, "-m", "hq.bench.relay", str(self.port), target, str(delay_ms)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise StackError("the delaying relay did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _cpus(processes) -> list:
    """The CPUs these psutil.Processes may run on, together."""
    return sorted(set().union(*(process.cpu_affinity() for process in processes)))


def _wait_backfilled(side: str, server) -> float | None:
    """Until the local server has stored what its upstream answered: how long that took,
    or None if it had not within BACKFILL_WAIT_S."""
    started = time.monotonic()
    if side == REF:
        try:
            ask_oehashequiv(server.address, {"backfill-wait": None}, timeout=BACKFILL_WAIT_S)
        except TimeoutError:
            return None
        return time.monotonic() - started
    address = server.hq_address if side == GW else server.address
    with create_client(address, timeout=30) as client:
        while client.get_stats()["broker"]["upstream"]["backfill_pending"]:
            if time.monotonic() - started > BACKFILL_WAIT_S:
                return None
            time.sleep(0.1)
    return time.monotonic() - started


def _run_side(side, workload, wopts, template, upstream_address, upstream, tree, n, progress) -> dict:
    """One local server: the cold burst, its backfill, the second burst."""
    workdir = tempfile.mkdtemp(prefix="hq-bench-cold-", dir=wopts.tmpdir)
    args = [] if side == LOCAL else ["--upstream", upstream_address]
    if side == REF:
        server, connect = reference.ReferenceServer(workdir, tree, args), reference.connector(tree)
    elif side == GW:
        server, connect = (
            GatewayStack(workdir, wopts.workers, [*wopts.server_arg, *args]),
            reference.connector(tree),
        )
    else:
        wopts.server_arg = [*wopts.base_server_arg, *args]
        server, connect = hq_stack(wopts, workdir), create_client
    out: dict = {"side": side, "repeat": n}
    try:
        shutil.copyfile(template, server.db)
        server.start()
        out["cpus"] = _cpus(server.processes.values())
        try:
            for burst in ("cold", "second"):
                if burst == "second":
                    if side == LOCAL:
                        break
                    out["backfill_s"] = _wait_backfilled(side, server)
                before, cpu_before = upstream.lookups(), upstream.cpu_s()
                result: dict = {}
                _measure(workload, wopts, server, progress, n, result, connect)
                result["upstream_lookups"] = upstream.lookups() - before
                # The upstream's CPU in the burst: on this machine it shares the cores.
                result["upstream_cpu_s"] = upstream.cpu_s() - cpu_before
                result["db"] = server.database_size()
                _finish_figures(result)
                result["ok"] = _is_ok(result)
                out[burst] = result
        finally:
            server.stop(check=False)
    except (StackError, OSError, ValueError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        progress.close()
        shutil.rmtree(workdir, ignore_errors=True)
    out["ok"] = "error" not in out and all(out[b]["ok"] for b in ("cold", "second") if b in out)
    return out


def run(parser, opts) -> dict:
    tree = reference.find_bitbake(opts.bitbake)
    if tree is None:
        parser.error("cold-start: no BitBake source tree: give --bitbake DIR or set HQ_BITBAKE")
    if not 0 < opts.scale <= 1:
        parser.error("cold-start: --scale must be more than 0 and at most 1")
    names = [name.strip() for name in opts.sides.split(",") if name.strip()]
    unknown = [name for name in names if name not in SIDE_NAMES]
    if unknown or not names:
        parser.error(f"cold-start: --sides takes a list of {', '.join(SIDE_NAMES)}; got {opts.sides!r}")
    sides = tuple(side for side in COLD_SIDES if side in {SIDE_NAMES[name] for name in names})
    upstream_cpus, local_cpus = _split_cpus(parser, opts.upstream_cpus)
    opts.workloads, opts.keys = ["burst"], 0
    wopts = workload_options(parser, "burst", opts)
    wopts.base_server_arg = list(wopts.server_arg)
    workload = WORKLOADS["burst"](wopts)
    progress = Progress("cold-start", enabled=not opts.quiet, show_after_s=1.0)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    base = tempfile.mkdtemp(prefix="hq-bench-cold-start-", dir=opts.tmpdir)
    upstream, relays, upstream_ran_on = None, [], []
    raw: list = []
    try:
        progress.note(f"cold-start: {len(workload.rows):,} keys on the upstream")
        empty_ref, empty_hq, full_hq = (os.path.join(base, name) for name in ("ref.db", "hq.db", "full.db"))
        reference.populate(empty_ref, [], tree)
        populate(empty_hq, [])
        populate(full_hq, workload.rows.rows)
        os.mkdir(os.path.join(base, "upstream"))
        upstream = Upstream(opts.upstream_server, os.path.join(base, "upstream"), tree, wopts)
        if opts.upstream_server == "hq":
            populate(upstream.db, workload.rows.rows, corrupt=opts.corrupt_keys)
        else:
            reference.populate(upstream.db, workload.rows.rows, tree, corrupt=opts.corrupt_keys)
        if upstream_cpus:  # the upstream's processes, and the relays', inherit these
            os.sched_setaffinity(0, upstream_cpus)
        upstream.start()
        progress.close()
        # (delay, address for a local hq, address for a local bitbake-hashserv)
        routes = [(0.0, upstream.for_hq, upstream.for_ref)]
        if opts.delay_ms > 0:
            relays.append(Relay(upstream.for_hq, opts.delay_ms))
            if upstream.for_ref != upstream.for_hq:
                relays.append(Relay(upstream.for_ref, opts.delay_ms))
            routes.append((opts.delay_ms, relays[0].address, relays[-1].address))
        if local_cpus:  # and the local servers and clients these
            os.sched_setaffinity(0, local_cpus)
        upstream_side = [*upstream.server.processes.values(), *(psutil.Process(r.proc.pid) for r in relays)]
        upstream_ran_on = _cpus(upstream_side)
        for n in range(1, opts.repeats + 1):
            raw.append(_run_side(LOCAL, workload, wopts, full_hq, "", upstream, tree, n, progress))
            for delay, for_hq, for_ref in routes:
                turn = (n - 1) % len(sides)
                order = sides[turn:] + sides[:turn]
                for side in order:
                    template, address = (empty_ref, for_ref) if side == REF else (empty_hq, for_hq)
                    got = _run_side(side, workload, wopts, template, address, upstream, tree, n, progress)
                    got["delay_ms"] = delay
                    raw.append(got)
    finally:
        progress.close()
        for relay in relays:
            relay.stop()
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(base, ignore_errors=True)
    result = {
        "workload": "cold-start",
        "title": workload.title(),
        "config": {k: v for k, v in vars(opts).items() if k != "command"},
        "machine": machine.describe(opts.tmpdir or tempfile.gettempdir()),
        "hq_version": hq.__version__,
        "bitbake_version": reference.version(tree),
        "started_at": started,
        "upstream_cpus": upstream_ran_on,
        "summary": summarize(raw),
        "repeats": raw,
        "ok": all(r["ok"] for r in raw),
    }
    print_report(result, quiet=opts.quiet)
    return result


def _cpu_list(cpus: list) -> str:
    return ",".join(map(str, cpus))


def _metric(r: dict, burst: str, name: str):
    return r.get(burst, {}).get("metrics", {}).get(name)


def _wall(r: dict, burst: str):
    return _metric(r, burst, "wall_s")


def summarize(raw: list) -> dict:
    """Per delay and side: the cold and second bursts' wall time, the second's upstream
    requests, and the ratios the targets are on (min/median/max over the repeats)."""
    local = {r["repeat"]: _wall(r, "cold") for r in raw if r["side"] == LOCAL}
    local_cpu = [_metric(r, "cold", "server_cpu_s") for r in raw if r["side"] == LOCAL]
    out: dict = {
        "local_wall_s": min_median_max(list(local.values())),
        "local_server_cpu_s": min_median_max(local_cpu),
        "delays": {},
    }
    for delay in sorted({r["delay_ms"] for r in raw if "delay_ms" in r}):
        runs = [r for r in raw if r.get("delay_ms") == delay]
        ref = {r["repeat"]: _wall(r, "cold") for r in runs if r["side"] == REF}
        sides = {}
        for side in COLD_SIDES:
            mine = [r for r in runs if r["side"] == side]
            if not mine:
                continue
            speedups = [
                ref[r["repeat"]] / _wall(r, "cold") for r in mine if ref.get(r["repeat"]) and _wall(r, "cold")
            ]
            over_local = [
                _wall(r, "cold") / local[r["repeat"]]
                for r in mine
                if local.get(r["repeat"]) and _wall(r, "cold")
            ]
            sides[side] = {
                "cold_wall_s": min_median_max([_wall(r, "cold") for r in mine]),
                "second_wall_s": min_median_max([_wall(r, "second") for r in mine]),
                "second_upstream_lookups": min_median_max(
                    [r.get("second", {}).get("upstream_lookups") for r in mine]
                ),
                "cold_speedup_over_reference": min_median_max(speedups),
                "cold_over_local_only": min_median_max(over_local),
                "cold_server_cpu_s": min_median_max([_metric(r, "cold", "server_cpu_s") for r in mine]),
                "cold_upstream_cpu_s": min_median_max(
                    [r.get("cold", {}).get("upstream_cpu_s") for r in mine]
                ),
            }
        out["delays"][str(delay)] = sides
    return out


def print_report(result: dict, quiet: bool = False) -> None:
    ok = "OK: every answer was right" if result["ok"] else "FAILED: a wrong answer or an error (see the JSON)"
    if quiet:
        print(f"cold-start: {ok}")
        return
    s = result["summary"]
    print(result["title"])
    print(
        f"hq {result['hq_version']} vs bitbake-hashserv {result['bitbake_version']}; upstream: "
        f"{result['config']['upstream_server']}; medians (min-max)"
    )
    if result["config"]["upstream_cpus"]:
        local = sorted({cpu for r in result["repeats"] for cpu in r.get("cpus", ())})
        print(
            f"the upstream and the relay on CPU {_cpu_list(result['upstream_cpus'])}, the local "
            f"servers and clients on CPU {_cpu_list(local)} (--upstream-cpus: hosts of their own)"
        )
    print(
        f"hq with the mappings already local: {_mmm(s['local_wall_s'], 's')}, "
        f"its CPU {_mmm(s['local_server_cpu_s'], 's')}"
    )
    rows = []
    for delay, sides in s["delays"].items():
        for side, v in sides.items():
            rows.append(
                [
                    f"{float(delay):g} ms",
                    side,
                    _mmm(v["cold_wall_s"], "s"),
                    _mmm(v["cold_speedup_over_reference"], "×"),
                    _mmm(v["cold_over_local_only"], "×"),
                    _mmm(v["cold_server_cpu_s"], "s"),
                    _mmm(v["cold_upstream_cpu_s"], "s"),
                    _mmm(v["second_wall_s"], "s"),
                    _mmm(v["second_upstream_lookups"], ""),
                ]
            )
    headers = [
        "delay",
        "local server",
        "cold burst",
        "ref ÷ this",
        "÷ local-only",
        "its CPU",
        "upstream's CPU",
        "second burst",
        "its upstream lookups",
    ]
    print(grid(rows, headers))
    print(f"cold-start: {ok}")


def _mmm(v: dict, unit: str) -> str:
    if v["median"] is None:
        return "-"
    if v["min"] == v["max"]:
        return f"{fmt(v['median'])}{unit}"
    return f"{fmt(v['median'])}{unit} ({fmt(v['min'])}-{fmt(v['max'])})"
