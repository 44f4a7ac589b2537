"""``hq-bench secure``: what log-ins and CURVE cost, measured side by side in one run.

Each repeat runs every workload once per configuration, on fresh stacks and fresh copies of
one pre-populated database, the configurations in an order that rotates between repeats:

* ``plain``: anonymous clients, no encryption (the reference's default);
* ``login``: ``--anon-perms @none``; every client logs in (``auth``) and sends its session
  key with each request, so every request passes the permission check;
* ``curve``: CURVE on the frontend, anonymous clients with a fresh key each;
* ``login+curve``: both.

It reports each configuration's rate and its ratio to ``plain`` in the same repeat
(min/median/max over the repeats): the machine is shared and noisy, so the ratios are the
figures to compare. Targets (issue "Who may do what"): login at least 95 % of plain for the
burst and single lookups; CURVE at least 80 % of plain for the burst.
"""

from __future__ import annotations

import datetime
import functools
import os
import shutil
import tempfile

import hq
from hq import curve
from hq.client import create_client
from hq.numbers import fmt
from hq.progress import Progress

from . import machine
from .compare import workload_options
from .metrics import min_median_max
from .populate import populate
from .runner import run_repeat
from .stack import Stack
from .table import grid, judged_mark, target_text
from .workloads import WORKLOADS

WORKLOAD_NAMES = ("burst", "single")
CONFIGS = ("plain", "login", "curve", "login+curve")
USER, PASSWORD = "bench", "bench-password"
#: (workload, configuration) -> target on the rate ÷ plain.
TARGETS = {
    ("burst", "login"): (">=", 0.95),
    ("single", "login"): (">=", 0.95),
    ("burst", "curve"): (">=", 0.8),
}


def add_parser(sub, common) -> None:
    p = sub.add_parser(
        "secure",
        help="burst and single with log-ins and with CURVE, beside plain, in one run",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--workloads",
        default=",".join(WORKLOAD_NAMES),
        help=f"comma-separated, from {', '.join(WORKLOAD_NAMES)} (default both)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="clients and requests x F (0 < F <= 1)")
    p.add_argument("--keys", type=int, default=0, help="single: distinct keys per client (default 0)")
    p.add_argument("--configs", type=int, default=0, help="burst: shared configurations (default 0)")
    common(p, transport="tcp", faults=False)


def _server(config: str, keys: tuple, opts, workdir):
    bind = "tcp://127.0.0.1:*" if opts.transport == "tcp" else f"ipc://{workdir}/hq.ipc"
    args, env = list(opts.server_arg), {}
    if "login" in config:
        args += ["--anon-perms", "@none", "--admin-user", USER]
        env["HQ_ADMIN_PASSWORD"] = PASSWORD
    if "curve" in config:
        args += ["--curve-secret-key", keys[1]]
    stack = Stack(workdir, opts.workers, bind, args, env=env, log_level="WARNING", inherit_env=False)
    stack.client_kwargs = _client_kwargs(config, keys)
    return stack


def _client_kwargs(config: str, keys: tuple) -> dict:
    kwargs = {"username": ""}
    if "login" in config:
        kwargs = {"username": USER, "password": PASSWORD}
    if "curve" in config:
        kwargs["server_key"] = keys[0]
    return kwargs


def _connect(config: str, keys: tuple):
    return functools.partial(create_client, **_client_kwargs(config, keys))


def run(parser, opts) -> dict:
    names = [n.strip() for n in opts.workloads.split(",") if n.strip()]
    if not names or any(n not in WORKLOAD_NAMES for n in names):
        parser.error(f"secure: --workloads takes {', '.join(WORKLOAD_NAMES)}, not {opts.workloads!r}")
    if not 0 < opts.scale <= 1:
        parser.error("secure: --scale must be in (0, 1]")
    if not curve.available():
        parser.error("secure: this libzmq has no CURVE support")
    progress = Progress("secure", enabled=not opts.quiet, show_after_s=1.0)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    base = tempfile.mkdtemp(prefix="hq-bench-secure-", dir=opts.tmpdir)
    keys = curve.create(os.path.join(base, "keys"), "broker")
    report, raw, ok = {}, [], True
    try:
        for name in names:
            wopts = workload_options(parser, name, opts)
            workload = WORKLOADS[name](wopts)
            template = os.path.join(base, f"{name}.db")
            progress.note(f"{name}: pre-populating {len(workload.rows):,} keys")
            populate(template, workload.rows.rows, corrupt=wopts.corrupt_keys)
            progress.close()
            rates: dict = {c: [] for c in CONFIGS}
            for n in range(1, opts.repeats + 1):
                shift = (n - 1) % len(CONFIGS)
                for config in CONFIGS[shift:] + CONFIGS[:shift]:
                    result = run_repeat(
                        workload,
                        wopts,
                        template,
                        n,
                        progress,
                        server=functools.partial(_server, config, keys),
                        connect=_connect(config, keys),
                    )
                    raw.append({"workload": name, "config": config, **result})
                    ok = ok and result["ok"]
                    m = result.get("metrics", {})
                    rates[config].append(m.get("lookups_per_s"))
            report[name] = {"title": workload.title(), "rates": rates, "summary": summarize(rates)}
    finally:
        progress.close()
        shutil.rmtree(base, ignore_errors=True)
    result = {
        "workload": "secure",
        "config": {k: v for k, v in vars(opts).items() if k != "command"},
        "machine": machine.describe(opts.tmpdir or tempfile.gettempdir()),
        "hq_version": hq.__version__,
        "started_at": started,
        "targets": {f"{w}.{c}": list(t) for (w, c), t in TARGETS.items()},
        "targets_judged": opts.scale == 1.0 and not opts.keys and not opts.configs,
        "workloads": report,
        "repeats": raw,
        "ok": ok,
    }
    print_report(result, quiet=opts.quiet)
    return result


def summarize(rates: dict) -> dict:
    """config -> {rate, ratio (÷ plain, per repeat)}: min/median/max."""
    plain = rates["plain"]
    out = {}
    for config, values in rates.items():
        ratios = [v / p for v, p in zip(values, plain) if v and p]
        out[config] = {"rate": min_median_max(values), "ratio": min_median_max(ratios)}
    return out


def print_report(result: dict, quiet: bool = False) -> None:
    cfg, m = result["config"], result["machine"]
    if not quiet:
        print(
            f"hq {result['hq_version']}: {cfg['workers']} workers, {cfg['transport']}, "
            f"{cfg['repeats']} repeats, configurations in rotating order"
        )
        print(f"machine: {m['cpu_model']}, {m['cpu_count_logical']} CPUs, {m['python']}")
        print()
        rows = []
        for name, data in result["workloads"].items():
            for i, config in enumerate(CONFIGS):
                s = data["summary"][config]
                ratio = s["ratio"]
                target = TARGETS.get((name, config))
                mark = judged_mark(target, ratio["median"], result["targets_judged"])
                rows.append(
                    [
                        name if i == 0 else "",
                        config,
                        fmt(s["rate"]["median"]),
                        f"{fmt(ratio['median'])}× ({fmt(ratio['min'])}-{fmt(ratio['max'])})",
                        (target_text(target) + "×" + mark) if target else "",
                    ]
                )
        print(
            grid(
                rows,
                headers=["workload", "configuration", "lookups/s", "÷ plain", "target"],
                colalign=("left", "left", "right", "right", "left"),
            )
        )
        if not result["targets_judged"]:
            print("(targets are judged at --scale 1, without --keys or --configs, only)")
        print()
    for r in result["repeats"]:
        if not r["ok"]:
            what = r.get("error") or r.get("counts")
            print(f"{r['workload']} {r['config']}, repeat {r['repeat']} FAILED: {what}")
    print("secure: " + ("OK: every answer was right" if result["ok"] else "FAILED: see above"))
