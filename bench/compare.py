"""``hq-bench compare``: the same workloads against hq and against ``bitbake-hashserv``,
side by side in one run.

Each repeat runs every workload twice, on fresh servers and fresh copies of databases that
hold the same known keys: once against ``hq-server`` with hq's client, once against
BitBake's ``bitbake-hashserv`` with BitBake's own client (:mod:`hq.bench.reference`), the
clients in separate processes on both sides. The order alternates between repeats, so a
machine that gets busier during the run does not always favour one side. Both sides are
checked against the same expected answers.

Per workload it reports the rate, the server CPU per operation (hq's broker and workers
apart, read from /proc for every server process), the p99 latency and the clients' own CPU
per operation; and for each the ratio hq ÷ reference, taken per repeat (the two runs of a
repeat are seconds apart) and summarized as min/median/max. The machine is shared and
noisy: the ratios are the figures to compare, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import tempfile

import hq
from hq import config, options
from hq.numbers import fmt
from hq.progress import Progress

from . import machine, reference
from .metrics import min_median_max
from .populate import populate
from .runner import run_repeat
from .stack import GatewayStack
from .table import grid, judged_mark, target_text
from .workloads import WORKLOADS

COMPARED = ("burst", "single", "report")
HQ, REF, GW = "hq", "bitbake-hashserv", "hq-gateway"
_NON_NEGATIVE_INT = config.argparse_type(options.NON_NEGATIVE_INT)

#: (label, key, unit): the figures of one side of one repeat, by :func:`figures`.
MEASURES = (
    ("rate", "rate", "/s"),
    ("server CPU per op", "cpu_us", "µs"),
    ("  hq broker", "broker_us", "µs"),
    ("  hq workers", "workers_us", "µs"),
    ("p99 latency", "p99_ms", "ms"),
    ("client CPU per op", "client_us", "µs"),
)

#: Issue 11's targets: (workload, key) -> (operator, value) on the ratio hq ÷ reference, or
#: on hq's own figure for the keys only hq has.
TARGETS = {
    ("burst", "rate"): (">=", 10.0),
    ("burst", "cpu_us"): ("<=", 0.1),
    ("single", "rate"): (">=", 1.5),
    ("single", "cpu_us"): ("<=", 0.5),
    ("single", "broker_us"): ("<=", 25.0),
    ("report", "rate"): (">=", 2.0),
    ("report", "cpu_us"): ("<=", 0.7),
}
HQ_ONLY = ("broker_us", "workers_us")
#: Issue 13's targets, on the rate through hq-gateway (BitBake's own client) ÷ the reference's.
GATEWAY_TARGETS = {
    ("burst", "rate"): (">=", 3.0),
    ("single", "rate"): (">=", 1.0),
    ("report", "rate"): (">=", 1.0),
}
#: The run's options every workload takes from the compare command line.
COMMON = (
    "workers",
    "transport",
    "seed",
    "timeout",
    "run_timeout",
    "server_arg",
    "tmpdir",
    "keep",
    "corrupt_keys",
)


def add_parser(sub, common) -> None:
    p = sub.add_parser(
        "compare",
        help="burst, single and report against hq and bitbake-hashserv (BitBake's own client), side by side",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--bitbake",
        metavar="DIR",
        default=None,
        help="BitBake source tree with bin/bitbake-hashserv and lib/hashserv "
        "(default $HQ_BITBAKE, else ../shared/bitbake)",
    )
    p.add_argument(
        "--workloads",
        default=",".join(COMPARED),
        type=_workloads,
        help=f"comma-separated, from {', '.join(COMPARED)} (default all), each at its own defaults",
    )
    p.add_argument(
        "--scale",
        type=_scale,
        default=1.0,
        help="multiply every workload's clients and per-client requests by this (0 < F <= 1; "
        "targets are judged at 1 only)",
    )
    p.add_argument(
        "--keys",
        type=_NON_NEGATIVE_INT,
        default=0,
        help="single: distinct keys per client, asked in turn (default 0: every lookup a new key)",
    )
    p.add_argument(
        "--configs",
        type=_NON_NEGATIVE_INT,
        default=0,
        help="burst: clients share this many configurations (default 0: each its own)",
    )
    p.add_argument(
        "--gateway",
        action="store_true",
        help="a third side: BitBake's own client through hq-gateway (hq-server --oehashequiv) to hq",
    )
    common(p, transport="tcp", faults=False)


def _workloads(text: str) -> list:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in COMPARED]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(COMPARED)}, not {text!r}")
    return names


def _scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {text}")
    return value


def workload_options(parser, name: str, opts):
    """The workload's own defaults, scaled, with the compare run's common options."""
    wopts = parser.parse_args([name])
    for key in COMMON:
        setattr(wopts, key, getattr(opts, key))
    wopts.repeats = opts.repeats
    if name == "single":
        wopts.keys = opts.keys
    if name == "burst":
        wopts.configs = opts.configs
    f = opts.scale
    wopts.clients = max(1, round(wopts.clients * f))
    if name == "burst":
        wopts.tasks = max(wopts.waves, round(wopts.tasks * f))
    else:
        wopts.requests = max(1, round(wopts.requests * f))
    return wopts


def figures(result: dict) -> dict:
    """rate, CPU per operation (and hq's broker and workers apart), p99, client CPU."""
    m = result.get("metrics", {})
    items = m.get("lookups", m.get("reports", 0))
    rate = m.get("lookups_per_s", m.get("reports_per_s"))
    cpu = result.get("server", {}).get("cpu_s", {})
    per_item = (lambda s: s / items * 1e6) if items else (lambda s: float("nan"))
    out = {
        "rate": rate,
        "cpu_us": m.get("server_cpu_us_per_item"),
        "p99_ms": m.get("latency_p99_ms"),
        "client_us": per_item(m.get("client_cpu_s", float("nan"))),
    }
    if "hq-broker" in cpu:
        out["broker_us"] = per_item(cpu["hq-broker"])
        out["workers_us"] = per_item(sum(v for k, v in cpu.items() if k.startswith("hq-worker")))
    return out


def summarize(pairs: list) -> dict:
    """key -> {hq, ref, ratio: min/median/max} over the repeats' (hq, ref) figure pairs."""
    out = {}
    for _label, key, _unit in MEASURES:
        hq_values = [h.get(key) for h, _ in pairs]
        ref_values = [r.get(key) for _, r in pairs]
        ratios = [h / r for h, r in zip(hq_values, ref_values) if h is not None and r]
        out[key] = {
            "hq": min_median_max(hq_values),
            "ref": min_median_max(ref_values),
            "ratio": min_median_max(ratios),
        }
    return out


def run(parser, opts) -> dict:
    """Run the comparison, print its table; the result (what ``--json`` writes)."""
    tree = reference.find_bitbake(opts.bitbake)
    if tree is None:
        where = opts.bitbake or os.environ.get("HQ_BITBAKE") or reference.DEFAULT_TREE
        parser.error(
            f"compare: no BitBake source tree at {where!r} (it needs bin/bitbake-hashserv and "
            "lib/hashserv): give --bitbake DIR or set HQ_BITBAKE"
        )
    progress = Progress("compare", enabled=not opts.quiet, show_after_s=1.0)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    connect_ref = reference.connector(tree)
    report: dict = {}
    raw = []
    ok = True
    for name in opts.workloads:
        wopts = workload_options(parser, name, opts)
        workload = WORKLOADS[name](wopts)
        base = tempfile.mkdtemp(prefix=f"hq-bench-compare-{name}-", dir=opts.tmpdir)
        try:
            progress.note(f"{name}: pre-populating {len(workload.rows):,} keys on both sides")
            templates = {HQ: os.path.join(base, "hq.db"), REF: os.path.join(base, "hashserv.db")}
            populate(templates[HQ], workload.rows.rows, corrupt=opts.corrupt_keys)
            reference.populate(templates[REF], workload.rows.rows, tree, corrupt=opts.corrupt_keys)
            progress.close()
            pairs, gateway_pairs = [], []
            for n in range(1, opts.repeats + 1):
                if opts.gateway:  # three sides, rotating
                    order = ((REF, HQ, GW) * 2)[(n - 1) % 3 : (n - 1) % 3 + 3]
                else:
                    order = (REF, HQ) if n % 2 else (HQ, REF)
                got = {}
                for side in order:
                    if side == HQ:
                        got[side] = run_repeat(workload, wopts, templates[HQ], n, progress)
                    elif side == GW:
                        got[side] = run_repeat(
                            workload,
                            wopts,
                            templates[HQ],
                            n,
                            progress,
                            server=lambda o, workdir: GatewayStack(workdir, o.workers, o.server_arg),
                            connect=connect_ref,
                        )
                    else:
                        got[side] = run_repeat(
                            workload,
                            wopts,
                            templates[REF],
                            n,
                            progress,
                            server=lambda _opts, workdir: reference.ReferenceServer(workdir, tree),
                            connect=connect_ref,
                        )
                    got[side]["side"] = side
                    raw.append({"workload": name, **got[side]})
                    ok = ok and got[side]["ok"]
                pairs.append((figures(got[HQ]), figures(got[REF])))
                if opts.gateway:
                    gateway_pairs.append((figures(got[GW]), figures(got[REF])))
        finally:
            progress.close()
            shutil.rmtree(base, ignore_errors=True)
        report[name] = {"title": workload.title(), "summary": summarize(pairs), "pairs": pairs}
        if opts.gateway:
            report[name]["gateway"] = summarize(gateway_pairs)
            report[name]["gateway_pairs"] = gateway_pairs
    result = {
        "workload": "compare",
        "config": {k: v for k, v in vars(opts).items() if k != "command"},
        "machine": machine.describe(opts.tmpdir or tempfile.gettempdir()),
        "hq_version": hq.__version__,
        "bitbake_version": reference.version(tree),
        "bitbake_tree": tree,
        "started_at": started,
        "targets": {f"{w}.{k}": list(v) for (w, k), v in TARGETS.items()},
        "gateway_targets": {f"{w}.{k}": list(v) for (w, k), v in GATEWAY_TARGETS.items()},
        "targets_judged": opts.scale == 1.0 and not opts.keys and not opts.configs,
        "workloads": report,
        "repeats": raw,
        "ok": ok,
    }
    print_report(result, quiet=opts.quiet)
    return result


def print_report(result: dict, quiet: bool = False) -> None:
    cfg, m = result["config"], result["machine"]
    if not quiet:
        print(
            f"hq {result['hq_version']} ({cfg['workers']} workers, {cfg['transport']}, hq's client) "
            f"vs bitbake-hashserv {result['bitbake_version']} (BitBake's client); "
            f"{cfg['repeats']} repeats, order alternating"
        )
        print(
            f"machine: {m['cpu_model']}, {m['cpu_count_logical']} CPUs, {m['python']}, "
            f"load {m['load_average'][0]:.2f} at start"
        )
        print("medians over the repeats; hq ÷ ref is the median of the per-repeat ratios (min-max)")
        print()
        print(table(result))
        if not result["targets_judged"]:
            print("(targets are judged at --scale 1, without --keys or --configs, only)")
        print()
    for r in result["repeats"]:
        if not r["ok"]:
            counts = r.get("counts", {})
            what = r.get("error") or ", ".join(f"{k} {v}" for k, v in counts.items() if v)
            print(f"{r['workload']} on {r['side']}, repeat {r['repeat']} FAILED: {what}")
    print("compare: " + ("OK: every answer was right on both sides" if result["ok"] else "FAILED: see above"))


def table(result: dict) -> str:
    rows = []
    for name, data in result["workloads"].items():
        first = True
        for label, key, unit in MEASURES:
            s = data["summary"][key]
            if s["hq"]["median"] is None and s["ref"]["median"] is None:
                continue
            target = TARGETS.get((name, key))
            hq_only = key in HQ_ONLY
            ratio = s["ratio"]
            ratio_text = "" if hq_only or ratio["median"] is None else _ratio_text(ratio)
            judged_value = s["hq"]["median"] if hq_only else ratio["median"]
            mark = judged_mark(target, judged_value, result["targets_judged"])
            target_cell = ""
            if target:
                target_cell = (target_text(target) + (f" {unit}" if hq_only else "×")) + mark
            row = [
                name if first else "",
                f"{label} ({unit})",
                "" if hq_only else fmt(s["ref"]["median"]),
                fmt(s["hq"]["median"]),
                ratio_text,
                target_cell,
            ]
            if "gateway" in data:
                row += _gateway_cells(result, name, key, data["gateway"][key], hq_only)
            rows.append(row)
            first = False
    headers = ["workload", "measure", "bitbake-hashserv", "hq", "hq ÷ ref", "target"]
    align = ("left", "left", "right", "right", "right", "left")
    if any("gateway" in data for data in result["workloads"].values()):
        headers += ["via hq-gateway", "gateway ÷ ref", "target (gateway)"]
        align += ("right", "right", "left")
    return grid(rows, headers=headers, colalign=align)


def _gateway_cells(result: dict, name: str, key: str, s: dict, hq_only: bool) -> list:
    """BitBake's own client through hq-gateway: the figure, its ratio to the reference and
    issue 13's target."""
    if hq_only:
        return ["", "", ""]
    target = GATEWAY_TARGETS.get((name, key))
    ratio = s["ratio"]
    mark = judged_mark(target, ratio["median"], result["targets_judged"])
    return [
        fmt(s["hq"]["median"]),
        "" if ratio["median"] is None else _ratio_text(ratio),
        (target_text(target) + "×" + mark) if target else "",
    ]


def _ratio_text(ratio: dict) -> str:
    return f"{fmt(ratio['median'])}× ({fmt(ratio['min'])}-{fmt(ratio['max'])})"
