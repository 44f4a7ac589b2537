"""How hq-admin prints: tabulate tables for people, ``--format json`` for scripts.

Exit codes scripts can trust (README, "Operating hq"):

====  ================================================================
0     done (for ``health``: healthy)
1     the server refused or the check failed (``health``: unhealthy)
2     usage error (bad arguments; argparse's code)
3     the server could not be reached within the deadline
130   interrupted (Ctrl-C)
====  ================================================================
"""

from __future__ import annotations

import json
import sys

from tabulate import tabulate

from hq.numbers import fmt  # noqa: F401 (the cell format of every table here)

OK, FAILED, USAGE, UNREACHABLE, INTERRUPTED = 0, 1, 2, 3, 130

TABLE_FORMAT = "simple"


def emit(args, data, *tables) -> None:
    """Print ``data`` as JSON, or each ``(title, headers, rows)`` of ``tables`` as a table."""
    out = getattr(args, "out", None) or sys.stdout
    if args.format == "json":
        out.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        return
    first = True
    for title, headers, rows in tables:
        if not first:
            out.write("\n")
        first = False
        if title:
            out.write(title + "\n")
        out.write(
            tabulate(rows, headers=headers, tablefmt=TABLE_FORMAT, floatfmt=".3g", disable_numparse=True)
            + "\n"
        )
    out.flush()


def kv_rows(mapping: dict) -> list:
    """A dict as (name, value) rows, in key order."""
    return [(k, fmt(v)) for k, v in mapping.items()]


def ms(seconds) -> str:
    """Seconds as a milliseconds cell."""
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.3g}"


def error(message: str) -> None:
    sys.stderr.write(f"hq-admin: {message}\n")
    sys.stderr.flush()
