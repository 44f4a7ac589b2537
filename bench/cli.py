"""hq-bench: run a workload against a fresh hq stack N times and report min/median/max.

    hq-bench burst    [--clients 40 --tasks 9000 --waves 10 --hit-ratio 0.5]
    hq-bench single   [--clients 40 --requests 2000 --batch 1 --rate R]
    hq-bench report   [--clients 10 --requests 1000 --equiv 0.2]
    hq-bench mixed    [--clients 20 --tasks 4500 --waves 10 --reporters 4 --reports 1000]
    hq-bench fairness [--clients 20 --requests 200 --interval-ms 10 --batch 1000]
    hq-bench compare  [--workloads burst,single,report --bitbake DIR --scale F --gateway]
    hq-bench secure   [--workloads burst,single --scale F]
    hq-bench cold-start [--bitbake DIR --scale F --delay-ms 20]
    hq-bench floor    [--clients 40 --requests 2000]
    hq-bench summary DIR

Common options: --workers, --transport, --repeats, --json, --quiet, --seed (see --help of
each workload). Exit status: 0 if every answer of every repeat was right, 1 if not (or a
repeat failed), 2 for bad options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile

import hq
from hq import config, databases, options
from hq.progress import Progress

from . import coldstart, compare, floor, machine, secure, summary
from .metrics import summarize
from .populate import populate
from .runner import json_safe, run_repeat
from .table import metrics_table
from .workloads import WORKLOADS

_POSITIVE_INT = config.argparse_type(options.POSITIVE_INT)
_POSITIVE_FLOAT = config.argparse_type(options.POSITIVE_FLOAT)
_NON_NEGATIVE_INT = config.argparse_type(options.NON_NEGATIVE_INT)
_NON_NEGATIVE_FLOAT = config.argparse_type(options.NON_NEGATIVE_FLOAT)
_OUTPUT_FILE = config.argparse_type(options.writable_file)


def _ratio(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def _directory(text):
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory")
    return text


def _database(text: str) -> str:
    if not databases.is_postgresql(text):
        raise argparse.ArgumentTypeError("give postgresql://USER@HOST[:PORT]/DBNAME (SQLite is the default)")
    try:
        return databases.check_postgresql(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(parser: argparse.ArgumentParser, transport: str = "ipc", faults: bool = True) -> None:
    g = parser.add_argument_group("stack and run")
    g.add_argument("--workers", type=_POSITIVE_INT, default=2, help="hq-server worker processes (default 2)")
    g.add_argument(
        "--transport",
        choices=("ipc", "tcp"),
        default=transport,
        help=f"client endpoint: ipc:// in the run directory or tcp://127.0.0.1:* (default {transport})",
    )
    g.add_argument(
        "--repeats",
        type=_POSITIVE_INT,
        default=3,
        help="runs, each on a fresh stack and database (default 3)",
    )
    g.add_argument(
        "--json",
        metavar="FILE",
        type=_OUTPUT_FILE,
        help="write config, machine, raw repeats and summary here",
    )
    g.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar and no table: one line saying whether every answer was right",
    )
    g.add_argument("--seed", type=int, default=1, help="seed of every generated hash (default 1)")
    g.add_argument(
        "--timeout", type=_POSITIVE_FLOAT, default=60.0, help="client call deadline in seconds (default 60)"
    )
    g.add_argument(
        "--run-timeout",
        type=_POSITIVE_FLOAT,
        default=600.0,
        help="a repeat whose clients are not all done after this many seconds fails (default 600)",
    )
    g.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra hq-server argument, repeatable, e.g. --server-arg=--synchronous=full",
    )
    g.add_argument(
        "--tmpdir",
        type=_directory,
        default=None,
        help="where run directories (database, ipc socket) go (default: system temp)",
    )
    g.add_argument("--keep", action="store_true", help="keep each run directory (database, hq-server.log)")
    g.add_argument(
        "--corrupt-keys",
        type=_NON_NEGATIVE_INT,
        default=0,
        metavar="N",
        help="testing the checker: store a wrong unihash for N pre-populated keys; the run must fail",
    )
    if not faults:
        return
    g.add_argument(
        "--db",
        type=_database,
        default=None,
        metavar="URL",
        help="run on PostgreSQL: each repeat gets a fresh schema in this database (dropped after), "
        "pre-populated like the SQLite file of the default",
    )
    g.add_argument(
        "--kill-workers-every",
        type=_POSITIVE_FLOAT,
        default=None,
        metavar="S",
        help="fault injection: kill -9 a random worker S/4 s after the release and every S s "
        "after that, each time once every worker is registered again (hq-server restarts "
        "them); every answer must still be right",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = config.ArgumentParser(
        prog="hq-bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each workload: hq-bench WORKLOAD --help.",
    )
    config.add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="WORKLOAD")

    p = sub.add_parser(
        "burst", help="the farm burst: clients x tasks in dependency waves, one batch per wave"
    )
    p.add_argument("--clients", type=_POSITIVE_INT, default=40, help="client processes (default 40)")
    p.add_argument("--tasks", type=_POSITIVE_INT, default=9000, help="lookups per client (default 9000)")
    p.add_argument(
        "--waves",
        type=_POSITIVE_INT,
        default=10,
        help="dependency waves per client; wave size = tasks/waves",
    )
    p.add_argument(
        "--hit-ratio", type=_ratio, default=0.5, help="fraction of tasks the server knows (default 0.5)"
    )
    p.add_argument(
        "--configs",
        type=_NON_NEGATIVE_INT,
        default=0,
        help="clients share this many configurations (client c builds c %% N: same taskhashes, "
        "same waves); 0 = every client its own (default)",
    )
    _common(p)

    p = sub.add_parser("single", help="closed-loop lookups, one call in flight per client")
    p.add_argument("--clients", type=_POSITIVE_INT, default=40, help="client processes (default 40)")
    p.add_argument("--requests", type=_POSITIVE_INT, default=2000, help="lookups per client (default 2000)")
    p.add_argument(
        "--batch",
        type=_POSITIVE_INT,
        default=1,
        help="items per call: 1 = get_unihash, else get_unihash_batch",
    )
    p.add_argument(
        "--rate",
        type=_NON_NEGATIVE_FLOAT,
        default=0.0,
        help="open loop: calls per second per client (latency from the intended send time); 0 = closed loop",
    )
    p.add_argument(
        "--hit-ratio", type=_ratio, default=0.5, help="fraction of lookups the server knows (default 0.5)"
    )
    p.add_argument(
        "--keys",
        type=_NON_NEGATIVE_INT,
        default=0,
        help="distinct keys per client, asked in turn (repeated lookups); 0 = every lookup a new "
        "key (default)",
    )
    _common(p)

    p = sub.add_parser("report", help="new reports (fresh taskhash/outhash), one in flight per client")
    p.add_argument("--clients", type=_POSITIVE_INT, default=10, help="client processes (default 10)")
    p.add_argument("--requests", type=_POSITIVE_INT, default=1000, help="reports per client (default 1000)")
    p.add_argument(
        "--equiv",
        type=_ratio,
        default=0.2,
        help="fraction of reports reusing the client's previous outhash (default 0.2)",
    )
    _common(p)

    p = sub.add_parser("mixed", help="burst lookups and new reports at once, as in a real build")
    p.add_argument("--clients", type=_POSITIVE_INT, default=20, help="burst (lookup) clients (default 20)")
    p.add_argument(
        "--tasks", type=_POSITIVE_INT, default=4500, help="lookups per burst client (default 4500)"
    )
    p.add_argument(
        "--waves", type=_POSITIVE_INT, default=10, help="dependency waves per burst client (default 10)"
    )
    p.add_argument(
        "--hit-ratio", type=_ratio, default=0.5, help="fraction of lookups the server knows (default 0.5)"
    )
    p.add_argument("--reporters", type=_NON_NEGATIVE_INT, default=4, help="reporting clients (default 4)")
    p.add_argument(
        "--reports", type=_POSITIVE_INT, default=1000, help="reports per reporting client (default 1000)"
    )
    p.add_argument(
        "--equiv",
        type=_ratio,
        default=0.2,
        help="fraction of reports reusing the previous outhash (default 0.2)",
    )
    _common(p)

    p = sub.add_parser("fairness", help="light clients' p99, unloaded then next to a greedy batch client")
    p.add_argument("--clients", type=_POSITIVE_INT, default=20, help="light clients (default 20)")
    p.add_argument(
        "--requests",
        type=_POSITIVE_INT,
        default=200,
        help="lookups per light client per phase (default 200)",
    )
    p.add_argument(
        "--interval-ms", type=_POSITIVE_FLOAT, default=10.0, help="light clients' pace (default 10 ms)"
    )
    p.add_argument(
        "--batch", type=_POSITIVE_INT, default=1000, help="the greedy client's batch size (default 1000)"
    )
    p.add_argument(
        "--hit-ratio", type=_ratio, default=0.5, help="fraction of lookups the server knows (default 0.5)"
    )
    _common(p)

    compare.add_parser(sub, _common)
    secure.add_parser(sub, _common)
    coldstart.add_parser(sub, _common)
    floor.add_parser(sub, _common)

    p = sub.add_parser("summary", help="one table over every hq-bench JSON result in DIR")
    p.add_argument("directory", metavar="DIR", type=_directory)
    return parser


def config_of(opts, workload) -> dict:
    config = {k: v for k, v in vars(opts).items() if k != "command"}
    config["batch"] = workload.batch()
    return config


def judged(opts) -> bool:
    """Are the workload's targets judged for this run? Only at the size they were set for
    (the workload's defaults): a seconds-long smoke run says nothing about them."""
    defaults = vars(build_parser().parse_args([opts.command]))
    common = argparse.ArgumentParser(add_help=False)
    _common(common)
    run_options = {action.dest for action in common._actions}
    return all(getattr(opts, k) == v for k, v in defaults.items() if k not in run_options and k != "command")


def main(argv=None) -> int:
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.command == "summary":
        return summary.main(opts.directory)
    # hq-server's own parser checks the extra arguments now, not after pre-populating.
    config.parse("hq-server", "", options.SERVER, ["--workers", "1", *opts.server_arg], environ={})
    if opts.command in ("compare", "secure", "cold-start", "floor"):
        modules = {"compare": compare, "secure": secure, "cold-start": coldstart, "floor": floor}
        result = modules[opts.command].run(parser, opts)
        write_json(opts.json, result)
        return 0 if result["ok"] else 1
    try:
        workload = WORKLOADS[opts.command](opts)
    except ValueError as exc:
        parser.error(f"{opts.command}: {exc}")
    progress = Progress(opts.command, enabled=not opts.quiet, show_after_s=1.0)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    description = machine.describe(opts.tmpdir or tempfile.gettempdir())
    base = tempfile.mkdtemp(prefix="hq-bench-template-", dir=opts.tmpdir)
    try:
        progress.note(f"{opts.command}: pre-populating {len(workload.rows):,} keys")
        template = os.path.join(base, "template.db")
        if not opts.db:  # on PostgreSQL each repeat fills its own schema
            populate(template, workload.rows.rows, corrupt=opts.corrupt_keys)
        progress.close()
        repeats = [run_repeat(workload, opts, template, n, progress) for n in range(1, opts.repeats + 1)]
    finally:
        progress.close()
        shutil.rmtree(base, ignore_errors=True)
    result = {
        "workload": opts.command,
        "title": workload.title(),
        "config": config_of(opts, workload),
        "machine": description,
        "hq_version": hq.__version__,
        "started_at": started,
        "command": ["hq-bench", *(sys.argv[1:] if argv is None else argv)],
        "prepopulated_keys": len(workload.rows),
        "key_metrics": list(workload.key_metrics),
        "targets": {k: list(v) for k, v in workload.targets.items()},
        "targets_judged": judged(opts),
        "repeats": repeats,
        "summary": summarize(repeats),
        "ok": all(r["ok"] for r in repeats),
    }
    print_report(result, workload, quiet=opts.quiet)
    write_json(opts.json, result)
    return 0 if result["ok"] else 1


def write_json(path, result: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(json_safe(result), fh, indent=1, allow_nan=False)
            fh.write("\n")


def print_report(result: dict, workload, quiet: bool = False) -> None:
    cfg, m = result["config"], result["machine"]
    if not quiet:
        print(result["title"])
        print(
            f"hq {result['hq_version']}: {cfg['workers']} workers, {cfg['transport']}, "
            f"{len(result['repeats'])} repeats on fresh stacks, "
            f"{result['prepopulated_keys']:,} keys pre-populated"
        )
        print(
            f"machine: {m['cpu_model']}, {m['cpu_count_logical']} CPUs, {m['python']}, libzmq {m['libzmq']}, "
            f"sqlite {m['sqlite']}, load {m['load_average'][0]:.2f} at start"
        )
        print()
        print(metrics_table(result["summary"], workload.targets, judge=result["targets_judged"]))
        if not result["targets_judged"]:
            print("(targets are judged only at the workload's default size; this run is not that size)")
        print()
    for r in result["repeats"]:
        if r["ok"]:
            continue
        counts = r.get("counts", {})
        print(
            f"repeat {r['repeat']} FAILED: "
            + (r.get("error") or ", ".join(f"{k} {v}" for k, v in counts.items() if v))
        )
        for line in r.get("client_errors", [])[:3]:
            print(f"  {line}")
        for sample in r.get("wrong_samples", [])[:3]:
            print(f"  key {sample['key']}: expected {sample['expected']}, got {sample['got']}")
    print(f"{result['workload']}: " + ("OK: every answer was right" if result["ok"] else "FAILED: see above"))


if __name__ == "__main__":
    sys.exit(main())
