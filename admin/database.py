"""hq-admin subcommands that look after the database (PROTOCOL.md §3.7): remove, clean-unused,
the gc cycle (gc-mark, gc-mark-stream, gc-status, gc-sweep), db-usage, query-columns, and
get / get-outhash to look at one task.

The destructive ones (remove, clean-unused, gc-sweep) first ask the server for a dry run and
print what would be deleted; they delete only with ``--yes`` (without it they exit 1 having
changed nothing). ``--dry-run`` prints the count and exits 0.

The usual sstate-driven collection (what OE-core's clean-hashserver-database does)::

    find $SSTATE_DIR -name '*.tar.zst' | sed 's/.*:\\([0-9a-f]\\{64\\}\\)_.*/\\1/' \\
        | hq-admin gc-mark-stream alive
    hq-admin gc-sweep alive --yes
    hq-admin clean-unused --max-age 30d --yes
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys

from hq import protocol as p
from hq.progress import Progress

from . import output

#: Suffixes --max-age accepts (a bare number is seconds).
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: Rows handed to one gc_mark_stream call: the client keeps 4 requests of 8 chunks in flight.
STREAM_BATCH = 32000
#: A placeholder taskhash for get-outhash: the server checks it, and only an upstream uses it.
_ANY_TASKHASH = "0" * 64


#: Default deadline of the commands that may scan or rewrite a whole table (the broker's
#: --admin-request-timeout is as long); --timeout or HQ_ADMIN_TIMEOUT overrides it.
LONG_TIMEOUT_S = 600.0


def add_commands(sub, common) -> None:
    confirm = argparse.ArgumentParser(add_help=False)
    confirm.add_argument(
        "--yes", "-y", action="store_true", help="really delete (without it: show what would go, exit 1)"
    )
    confirm.add_argument(
        "--dry-run", action="store_true", help="only print how many rows would be deleted; exit 0"
    )
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--where",
        action="append",
        type=where_pair,
        default=[],
        metavar="COLUMN=VALUE",
        help="match rows whose COLUMN equals VALUE (repeatable: all must match); see query-columns",
    )

    cmd = sub.add_parser(
        "remove",
        parents=[common, confirm, where],
        help="delete the outhash reports and mappings matching every --where",
        description="Delete the outhash reports matching every given report column and the mappings "
        "matching every given mapping column (method and taskhash are both).",
    )
    cmd.set_defaults(func=remove, default_timeout=LONG_TIMEOUT_S)

    cmd = sub.add_parser(
        "clean-unused",
        parents=[common, confirm],
        help="delete outhash reports that have no mapping and are older than --max-age",
    )
    cmd.add_argument(
        "--max-age",
        required=True,
        type=duration,
        metavar="AGE",
        help="seconds, or with a unit: 90m, 12h, 30d, 2w",
    )
    cmd.set_defaults(func=clean_unused, default_timeout=LONG_TIMEOUT_S)

    cmd = sub.add_parser(
        "gc-mark",
        parents=[common, where],
        help="make MARK the current gc mark and set it on the mappings matching every --where",
    )
    cmd.add_argument("mark")
    cmd.set_defaults(func=gc_mark, default_timeout=LONG_TIMEOUT_S)

    cmd = sub.add_parser(
        "gc-mark-stream",
        parents=[common],
        help="gc-mark every row read from stdin: a unihash, a JSON where object, or 'column value ...'",
    )
    cmd.add_argument("mark")
    cmd.set_defaults(func=gc_mark_stream, default_timeout=LONG_TIMEOUT_S)

    cmd = sub.add_parser(
        "gc-status", parents=[common], help="mappings kept and removed by a sweep now; the current mark"
    )
    cmd.set_defaults(func=gc_status, default_timeout=LONG_TIMEOUT_S)  # counts every mapping

    cmd = sub.add_parser(
        "gc-sweep",
        parents=[common, confirm],
        help="delete every mapping not marked MARK (MARK must be the current mark) and clear the mark",
    )
    cmd.add_argument("mark")
    cmd.set_defaults(func=gc_sweep, default_timeout=LONG_TIMEOUT_S)

    cmd = sub.add_parser("db-usage", parents=[common], help="rows in each table")
    cmd.set_defaults(func=db_usage, default_timeout=LONG_TIMEOUT_S)
    cmd = sub.add_parser("query-columns", parents=[common], help="the columns --where may name")
    cmd.set_defaults(func=query_columns)

    cmd = sub.add_parser("get", parents=[common], help="everything the server knows about one taskhash")
    cmd.add_argument("method")
    cmd.add_argument("taskhash")
    cmd.set_defaults(func=get)
    cmd = sub.add_parser(
        "get-outhash", parents=[common], help="the oldest report of an outhash, with its mapping"
    )
    cmd.add_argument("method")
    cmd.add_argument("outhash")
    cmd.add_argument("taskhash", nargs="?", help="(only passed on; hq does not need it)")
    cmd.set_defaults(func=get_outhash)


# --- argument types ---------------------------------------------------------------------------


def where_pair(text: str) -> tuple:
    column, sep, value = text.partition("=")
    if not sep or not column:
        raise argparse.ArgumentTypeError(f"{text!r} is not COLUMN=VALUE")
    return column, value


def duration(text: str) -> int:
    """Seconds from '3600', '90m', '12h', '30d' or '2w'."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (seconds, or a number with s, m, h, d or w)"
        )
    return int(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


def _where(args, client):
    """The --where pairs as a dict, or None (after an error message) when a column is unknown:
    the server ignores unknown columns, so a typo would widen what remove deletes."""
    where = dict(args.where)
    unknown = sorted(set(where) - set(client.get_db_query_columns()))
    if unknown:
        output.error(f"unknown column {', '.join(unknown)}; `hq-admin query-columns` lists them")
        return None
    return where


def _show_where(where: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in where.items()) or "(nothing)"


# --- destructive commands ---------------------------------------------------------------------


def _destructive(args, call, what: str, data: dict, params: list) -> int:
    """Dry run first, then (with --yes) the real thing. ``call(dry_run)`` -> {"count"}."""
    really = args.yes and not args.dry_run
    count = call(not really)["count"]
    result = {**data, "count": count, "dry_run": not really, "done": really}
    verb = "deleted" if really else "would delete"
    output.emit(args, result, (None, (), [*params, (verb, f"{output.fmt(count)} {what}")]))
    if really or args.dry_run:
        return output.OK
    output.error("nothing deleted: run again with --yes to delete")
    return output.FAILED


def remove(args, client) -> int:
    if not args.where:
        output.error("remove needs at least one --where COLUMN=VALUE")
        return output.USAGE
    where = _where(args, client)
    if where is None:
        return output.USAGE
    return _destructive(
        args,
        lambda dry_run: client.remove(where, dry_run=dry_run),
        "rows (outhash reports and mappings)",
        {"command": "remove", "where": where},
        [("where", _show_where(where))],
    )


def clean_unused(args, client) -> int:
    return _destructive(
        args,
        lambda dry_run: client.clean_unused(args.max_age, dry_run=dry_run),
        "outhash reports without a mapping",
        {"command": "clean-unused", "max_age_seconds": args.max_age},
        [("older than", f"{output.fmt(args.max_age)} s")],
    )


def gc_sweep(args, client) -> int:
    return _destructive(
        args,
        lambda dry_run: client.gc_sweep(args.mark, dry_run=dry_run),
        f"mappings not marked {args.mark}",
        {"command": "gc-sweep", "mark": args.mark},
        [("keep mark", args.mark)],
    )


# --- the gc cycle -----------------------------------------------------------------------------


def gc_mark(args, client) -> int:
    where = _where(args, client)
    if where is None:
        return output.USAGE
    count = client.gc_mark(args.mark, where)["count"]
    data = {"mark": args.mark, "where": where, "count": count}
    output.emit(
        args,
        data,
        (None, (), [("mark", args.mark), ("where", _show_where(where)), ("matched", output.fmt(count))]),
    )
    return output.OK


class BadLine(ValueError):
    pass


def parse_line(line: str):
    """A where dict from one line of gc-mark-stream input, or None for a blank line.

    A bare 64-hex unihash means ``{"unihash": U}``; a line starting with ``{`` is a JSON
    where object; anything else is 'column value ...' pairs (BitBake's hashclient format,
    e.g. ``unihash U``)."""
    text = line.strip()
    if not text:
        return None
    if p.is_unihash(text):
        return {"unihash": text}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            raise BadLine("not valid JSON") from None
        if not isinstance(value, dict):
            raise BadLine("not a JSON object")
        if not all(v is None or isinstance(v, str) for v in value.values()):
            raise BadLine("where values must be strings")
        return value
    words = text.split()
    if len(words) % 2:
        raise BadLine("neither a unihash, a JSON object nor 'column value' pairs")
    return dict(zip(words[::2], words[1::2]))


def gc_mark_stream(args, client) -> int:
    progress = Progress("hq-admin: gc-mark-stream", unit="rows")
    bad = []

    def rows():
        for number, line in enumerate(sys.stdin, 1):
            try:
                where = parse_line(line)
            except BadLine as exc:
                bad.append(f"line {number}: {exc}")
                return
            if where is not None:
                yield where

    source = rows()
    sent = count = 0
    while True:
        batch = list(itertools.islice(source, STREAM_BATCH))
        if not batch:
            break
        count += client.gc_mark_stream(args.mark, batch)["count"]
        sent += len(batch)
        progress.update(sent, None)
    progress.close()
    if bad:
        output.error(f"stopped at {bad[0]} ({output.fmt(sent)} rows marked before it)")
        return output.USAGE
    data = {"mark": args.mark, "rows": sent, "count": count}
    output.emit(
        args,
        data,
        (None, (), [("mark", args.mark), ("rows read", output.fmt(sent)), ("matched", output.fmt(count))]),
    )
    return output.OK


def gc_status(args, client) -> int:
    data = client.gc_status()
    rows = [
        ("mark", data["mark"] if data["mark"] is not None else "(none)"),
        ("keep", output.fmt(data["keep"])),
        ("remove", output.fmt(data["remove"])),
    ]
    output.emit(args, data, (None, (), rows))
    return output.OK


# --- looking at the database ------------------------------------------------------------------


def db_usage(args, client) -> int:
    usage = client.get_db_usage()
    rows = [(table, output.fmt(info.get("rows"))) for table, info in usage.items()]
    output.emit(args, usage, (None, ["table", "rows"], rows))
    return output.OK


def query_columns(args, client) -> int:
    columns = client.get_db_query_columns()
    output.emit(args, columns, (None, ["column"], [(c,) for c in columns]))
    return output.OK


def _row(args, row, missing: str) -> int:
    if row is None:
        output.error(missing)
        if args.format == "json":
            output.emit(args, None)
        return output.FAILED
    output.emit(args, row, (None, (), output.kv_rows(row)))
    return output.OK


def get(args, client) -> int:
    row = client.get_taskhash(args.method, args.taskhash, all_properties=True)
    if row is None:
        # No outhash report (e.g. only report-equiv): the mapping alone, if there is one.
        row = client.get_taskhash(args.method, args.taskhash)
    return _row(args, row, f"no mapping or report of taskhash {args.taskhash} for method {args.method}")


def get_outhash(args, client) -> int:
    row = client.get_outhash(args.method, args.outhash, args.taskhash or _ANY_TASKHASH, with_unihash=True)
    if row is None:
        row = client.get_outhash(
            args.method, args.outhash, args.taskhash or _ANY_TASKHASH, with_unihash=False
        )
    return _row(args, row, f"no report of outhash {args.outhash} for method {args.method}")
