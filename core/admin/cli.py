"""hq-admin's entry point: common options, subcommand registry, error -> exit code mapping.

Each module in :data:`MODULES` adds its subcommands with ``add_commands(subparsers, common)``
and sets ``func(args, client) -> exit code`` on each; ``client`` is an :class:`hq.client.Client`
for ``--address`` with ``--timeout`` as the deadline of every call.
"""

from __future__ import annotations

import argparse
import os
import sys

from hq.broker.main import DEFAULT_BIND
from hq.client import InvokeError, ServerError, create_client

from . import database, importer, output, status

DEFAULT_TIMEOUT_S = 10.0

#: Subcommand modules, in the order ``--help`` lists them.
MODULES = [status, database, importer]


def _add_common(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every subcommand takes. They may come before the subcommand or after
    it: the copy on the subcommands has no defaults (SUPPRESS), so it only overrides."""
    default = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    parser.add_argument(
        "--address",
        default=default(os.environ.get("HQ_ADDRESS", DEFAULT_BIND)),
        help=f"broker address, tcp://HOST:PORT or ipc://PATH (env HQ_ADDRESS; default {os.environ.get('HQ_ADDRESS', DEFAULT_BIND)})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(None),
        help="deadline of each call to the server, seconds (env HQ_ADMIN_TIMEOUT; default 10, "
        "600 for the commands that scan or rewrite whole tables)",
    )
    parser.add_argument(
        "--format", choices=("table", "json"), default=default("table"), help="output format (default: table)"
    )


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, defaults=False)
    top = argparse.ArgumentParser(
        prog="hq-admin",
        description="Operate an hq service through its broker. Exit codes: 0 done or healthy, "
        "1 refused or unhealthy, 2 usage error, 3 server unreachable.",
    )
    _add_common(top, defaults=True)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in MODULES:
        module.add_commands(sub, common)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.timeout is None:
        env = os.environ.get("HQ_ADMIN_TIMEOUT")
        try:
            args.timeout = float(env) if env else getattr(args, "default_timeout", DEFAULT_TIMEOUT_S)
        except ValueError:
            output.error(f"HQ_ADMIN_TIMEOUT={env!r} is not a number of seconds")
            return output.USAGE
    try:
        with create_client(args.address, timeout=args.timeout) as client:
            return args.func(args, client)
    except BrokenPipeError:  # piped into head: not an error (a ConnectionError subclass)
        sys.stdout = open(os.devnull, "w")
        return output.OK
    except (InvokeError, ServerError) as exc:  # the server answered: it is reachable
        output.error(f"refused: {exc}")
        return output.FAILED
    except ConnectionError as exc:
        output.error(f"cannot reach hq at {args.address}: {exc}")
        return output.UNREACHABLE
    except KeyboardInterrupt:
        return output.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
