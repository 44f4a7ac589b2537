"""hq-admin subcommands that look at the running service: stats, reset-stats, workers, top,
ping and health. They read the broker's ``stats`` (raw numbers, see PROTOCOL.md) and do all
the presentation here."""

from __future__ import annotations

import sys
import time

from hq import config, options

from . import output


def add_commands(sub, common) -> None:
    cmd = sub.add_parser("stats", parents=[common], help="summary, per command and per worker statistics")
    cmd.set_defaults(func=stats)
    cmd = sub.add_parser(
        "reset-stats", parents=[common], help="zero the statistics (prints them as they were)"
    )
    cmd.set_defaults(func=reset_stats)
    cmd = sub.add_parser("workers", parents=[common], help="the registered workers")
    cmd.set_defaults(func=workers)
    cmd = sub.add_parser("top", parents=[common], help="a live view, refreshed until interrupted")
    cmd.add_argument(
        "--interval",
        type=config.argparse_type(options.POSITIVE_FLOAT),
        default=2.0,
        help="seconds between refreshes (default %(default)s)",
    )
    cmd.add_argument(
        "--iterations",
        "-n",
        type=config.argparse_type(options.NON_NEGATIVE_INT),
        default=0,
        help="stop after N refreshes (default: until Ctrl-C)",
    )
    cmd.set_defaults(func=top)
    cmd = sub.add_parser("ping", parents=[common], help="round-trip times through the broker to a worker")
    cmd.add_argument(
        "--count",
        "-c",
        type=config.argparse_type(options.POSITIVE_INT),
        default=5,
        help="pings to send (default %(default)s)",
    )
    cmd.set_defaults(func=ping)
    cmd = sub.add_parser(
        "health",
        parents=[common],
        help="exit 0 only if the broker answers and enough workers are registered and answering",
    )
    cmd.add_argument(
        "--min-workers",
        type=config.argparse_type(options.NON_NEGATIVE_INT),
        default=1,
        help="workers required (default %(default)s)",
    )
    cmd.set_defaults(func=health)


# --- reading the stats ----------------------------------------------------------------------


def totals(data: dict) -> dict:
    """Sum the workers' counters (each worker counts what it ran)."""
    out: dict = {}
    for w in data.get("workers", []):
        for name, n in w.get("counters", {}).items():
            out[name] = out.get(name, 0) + n
    return out


def freshest_db(data: dict) -> dict:
    """The database facts of the worker that counted rows most recently."""
    dbs = [w.get("db") or {} for w in data.get("workers", [])]
    dbs = [d for d in dbs if d]
    if not dbs:
        return {}
    return min(dbs, key=lambda d: d.get("rows_age_s") if d.get("rows_age_s") is not None else float("inf"))


def settings_problems(data: dict) -> list:
    """Database settings that differ between workers, or from what hq sets (WAL on SQLite)."""
    problems = []
    seen = {}
    for w in data.get("workers", []):
        s = w.get("settings") or {}
        if s and s.get("engine", "sqlite") == "sqlite" and s.get("journal_mode") != "wal":
            problems.append(f"{w['name']}: journal_mode={s.get('journal_mode')} (hq sets wal)")
        for key in ("engine", "journal_mode", "synchronous", "busy_timeout", "synchronous_commit"):
            if key in s:
                seen.setdefault(key, set()).add(str(s[key]))
    for key, values in seen.items():
        if len(values) > 1:
            problems.append(f"workers disagree on {key}: {', '.join(sorted(values))}")
    return problems


def _ratio(part, whole) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _mib(n) -> str:
    return "-" if n is None else f"{n / 1048576:.1f} MiB"


def summary_rows(data: dict, usage: dict | None = None) -> list:
    """``usage``: exact row counts from db-usage; else the workers' periodic counts."""
    broker = data["broker"]
    counters = broker.get("counters", {})
    t = totals(data)
    db = freshest_db(data)
    rows = {name: v["rows"] for name, v in usage.items()} if usage else db.get("rows", {})
    age = None if usage else db.get("rows_age_s")
    errors = sum(n for k, n in counters.items() if k.startswith("errors."))
    reports = [t.get(k, 0) for k in ("reports.new", "reports.equivalent", "reports.existing")]
    settings = (data["workers"][0].get("settings") or {}) if data.get("workers") else {}
    problems = settings_problems(data)
    cache = broker.get("cache", {})
    cached = counters.get("cache.hits", 0)  # lookups the broker answered: no worker counted them
    lookups = t.get("lookups", 0) + cached
    return [
        ("broker uptime", f"{broker['uptime_s']:.0f} s"),
        ("since reset", f"{data.get('since_reset_s', broker['uptime_s']):.0f} s"),
        ("requests", output.fmt(data["requests"]["num"])),
        (
            "mean / max latency",
            f"{output.ms(data['requests']['average'])} / {output.ms(data['requests']['max_time'])} ms",
        ),
        (
            "lookups (hit rate)",
            f"{output.fmt(lookups)} ({_ratio(t.get('lookups.hit', 0) + cached, lookups)})",
        ),
        (
            "broker cache (mappings / answered)",
            f"{output.fmt(cache.get('entries', 0))} of {output.fmt(cache.get('max_entries', 0))} / "
            f"{output.fmt(cached)}",
        ),
        ("reports new / equivalent / existing", " / ".join(output.fmt(n) for n in reports)),
        *_upstream_rows(broker, counters),
        (
            "log-ins / failed / refused requests",
            " / ".join(
                output.fmt(counters.get(k, 0)) for k in ("auth.logins", "auth.failed", "auth.refused")
            ),
        ),
        ("errors", output.fmt(errors)),
        ("queued / in-flight jobs", f"{broker['queued_jobs']} / {broker['inflight_jobs']}"),
        ("workers (restarts)", f"{len(data['workers'])} ({counters.get('workers.restarted', 0)})"),
        *_database_rows(db, settings, problems),
        (
            "mappings / outhash rows",
            f"{output.fmt(rows.get('unihashes'))} / {output.fmt(rows.get('outhashes'))}"
            + ("" if age is None else f" (counted {age:.0f} s ago)"),
        ),
    ]


def _database_rows(db: dict, settings: dict, problems: list) -> list:
    """What the database is and how it is set, per engine."""
    warning = "  WARNING: " + "; ".join(problems) if problems else ""
    if settings.get("engine") == "postgresql":
        return [
            ("database", f"{db.get('path', '-')} ({_mib(db.get('file_bytes'))})"),
            (
                "postgresql",
                f"server {settings.get('server_version', '-')} "
                f"synchronous_commit={settings.get('synchronous_commit', '-')} "
                f"lock_timeout={settings.get('lock_timeout', '-')}" + warning,
            ),
        ]
    return [
        ("database", f"{_mib(db.get('file_bytes'))} + WAL {_mib(db.get('wal_bytes'))}"),
        (
            "sqlite",
            f"journal_mode={settings.get('journal_mode', '-')} "
            f"synchronous={settings.get('synchronous', '-')} "
            f"busy_timeout={settings.get('busy_timeout', '-')}ms" + warning,
        ),
    ]


def _upstream_rows(broker: dict, counters: dict) -> list:
    """With --upstream: what was asked of it, and what it gave."""
    address = broker.get("settings", {}).get("upstream")
    if not address:
        return []
    n = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("upstream.")}
    return [
        ("upstream", address),
        (
            "upstream asked / hits / misses: lookups",
            " / ".join(output.fmt(n.get(k, 0)) for k in ("asked", "hits", "misses")),
        ),
        (
            "upstream asked / hits: reports",
            " / ".join(output.fmt(n.get(k, 0)) for k in ("report_asked", "report_hits")),
        ),
        (
            "upstream errors / timeouts / backfilled",
            " / ".join(output.fmt(n.get(k, 0)) for k in ("errors", "timeouts", "backfilled")),
        ),
        (
            "upstream not stored: backfills failed / mappings dropped",
            " / ".join(output.fmt(n.get(k, 0)) for k in ("backfill_failed", "backfill_dropped")),
        ),
    ]


def command_rows(data: dict) -> list:
    counters = data["broker"].get("counters", {})
    rows = []
    for command, h in data["broker"].get("latency", {}).items():
        rows.append(
            (
                command,
                output.fmt(counters.get(f"requests.{command}", 0)),
                output.fmt(counters.get(f"items.{command}", 0)),
                output.ms(h["p50_s"]),
                output.ms(h["p90_s"]),
                output.ms(h["p99_s"]),
                output.ms(h["max_s"]),
            )
        )
    return rows


COMMAND_HEADERS = ["command", "requests", "items", "p50 ms", "p90 ms", "p99 ms", "max ms"]


def worker_rows(data: dict) -> list:
    rows = []
    for w in sorted(data.get("workers", []), key=lambda w: w["name"]):
        c = w.get("counters", {})
        reports = sum(c.get(k, 0) for k in ("reports.new", "reports.equivalent", "reports.existing"))
        errors = sum(n for k, n in c.items() if k.startswith("errors."))
        s = w.get("settings") or {}
        rows.append(
            (
                f"{w['name']} (read-only)" if w.get("read_only") else w["name"],
                w.get("pid"),
                "-" if w.get("uptime_s") is None else f"{w['uptime_s']:.0f} s",
                w.get("restarts", 0),
                w.get("inflight", 0),
                output.fmt(w.get("served", 0)),
                output.fmt(c.get("lookups", 0)),
                _ratio(c.get("lookups.hit", 0), c.get("lookups", 0)),
                output.fmt(reports),
                output.fmt(errors),
                f"{s.get('journal_mode', '-')}/{s.get('synchronous', '-')}",
            )
        )
    return rows


WORKER_HEADERS = [
    "worker",
    "pid",
    "uptime",
    "restarts",
    "in flight",
    "requests",
    "lookups",
    "hits",
    "reports",
    "errors",
    "journal/sync",
]


# --- subcommands ------------------------------------------------------------------------------


def stats(args, client) -> int:
    data = client.get_stats()
    # Exact row counts now (a worker scans the tables: ~35 ms per million rows); top and
    # the metrics endpoint use the counts workers refresh every stats-rows-interval.
    data["db_usage"] = client.get_db_usage()
    output.emit(
        args,
        data,
        ("Summary", ["", "value"], summary_rows(data, data["db_usage"])),
        ("Per command (latency at the broker: arrival to reply)", COMMAND_HEADERS, command_rows(data)),
        ("Per worker", WORKER_HEADERS, worker_rows(data)),
    )
    return output.OK


def reset_stats(args, client) -> int:
    data = client.reset_stats()
    output.emit(args, data, ("Statistics before the reset", ["", "value"], summary_rows(data)))
    return output.OK


def workers(args, client) -> int:
    data = client.get_stats()
    output.emit(args, data["workers"], (None, WORKER_HEADERS, worker_rows(data)))
    return output.OK


def _rates(before: dict, after: dict, dt: float) -> dict:
    b, a = totals(before), totals(after)
    bc, ac = before["broker"].get("counters", {}), after["broker"].get("counters", {})

    def rate(x, y):
        return max(0, y - x) / dt if dt > 0 else 0.0

    return {
        "requests_per_s": rate(before["requests"]["num"], after["requests"]["num"]),
        "lookups_per_s": rate(  # the workers' and those the broker answered from its cache
            b.get("lookups", 0) + bc.get("cache.hits", 0), a.get("lookups", 0) + ac.get("cache.hits", 0)
        ),
        "reports_per_s": rate(
            sum(b.get(k, 0) for k in ("reports.new", "reports.equivalent", "reports.existing")),
            sum(a.get(k, 0) for k in ("reports.new", "reports.equivalent", "reports.existing")),
        ),
        "errors_per_s": rate(
            sum(n for k, n in bc.items() if k.startswith("errors.")),
            sum(n for k, n in ac.items() if k.startswith("errors.")),
        ),
    }


def top(args, client) -> int:
    """Refresh a screen of rates, latency and workers every --interval seconds."""
    tty = (getattr(args, "out", None) or sys.stdout).isatty()
    before, t0 = client.get_stats(), time.monotonic()
    n = 0
    while True:
        # The refresh period the user asked for.
        time.sleep(max(0.0, args.interval))
        after, t1 = client.get_stats(), time.monotonic()
        rates = _rates(before, after, t1 - t0)
        n += 1
        if args.format == "json":
            output.emit(args, {"rates": rates, "stats": after})
        else:
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")  # home, clear screen
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(
                f"hq-admin top  {args.address}  {stamp}  (every {args.interval:g} s, Ctrl-C to quit)\n\n"
            )
            rate_rows = [
                ("requests/s", f"{rates['requests_per_s']:,.0f}"),
                ("lookups/s", f"{rates['lookups_per_s']:,.0f}"),
                ("reports/s", f"{rates['reports_per_s']:,.0f}"),
                ("errors/s", f"{rates['errors_per_s']:,.1f}"),
            ]
            output.emit(
                args,
                None,
                ("Rates over the last refresh", ["", "value"], rate_rows),
                ("Summary", ["", "value"], summary_rows(after)[2:]),
                ("Per command", COMMAND_HEADERS, command_rows(after)),
                ("Per worker", WORKER_HEADERS, worker_rows(after)),
            )
            if not tty:
                sys.stdout.write("\n")
        sys.stdout.flush()
        before, t0 = after, t1
        if args.iterations and n >= args.iterations:
            return output.OK


def ping(args, client) -> int:
    times = []
    for _ in range(max(1, args.count)):
        start = time.perf_counter()
        client.ping()
        times.append(time.perf_counter() - start)
    times.sort()
    data = {
        "address": args.address,
        "count": len(times),
        "min_s": times[0],
        "median_s": times[len(times) // 2],
        "max_s": times[-1],
    }
    rows = [
        (args.address, len(times), output.ms(times[0]), output.ms(data["median_s"]), output.ms(times[-1]))
    ]
    output.emit(args, data, (None, ["address", "pings", "min ms", "median ms", "max ms"], rows))
    return output.OK


def health(args, client) -> int:
    """0 when the broker answers, at least --min-workers are registered and one answers a
    ping; 1 otherwise; 3 when the broker cannot be reached (cli.py)."""
    data = client.get_stats()
    n = len(data.get("workers", []))
    problems = []
    if n < args.min_workers:
        problems.append(f"{n} worker(s) registered, {args.min_workers} required")
    else:
        try:
            client.ping()  # a worker answers through the broker
        except ConnectionError as exc:
            problems.append(f"no worker answered a ping: {exc}")
    result = {"healthy": not problems, "workers": n, "problems": problems, "address": args.address}
    if args.format == "json":
        output.emit(args, result)
    else:
        line = (
            f"ok: broker at {args.address}, {n} worker(s)"
            if not problems
            else "unhealthy: " + "; ".join(problems)
        )
        (sys.stdout if not problems else sys.stderr).write(line + "\n")
    return output.OK if not problems else output.FAILED
