"""hq-admin's entry point: common options, subcommand registry, error -> exit code mapping.

Each module in :data:`MODULES` adds its subcommands with ``add_commands(subparsers, common)``
and sets ``func(args, client) -> exit code`` on each; ``client`` is an :class:`hq.client.Client`
for ``--address`` with ``--timeout`` as the deadline of every call.
"""

from __future__ import annotations

import argparse
import os
import sys

from hq import addresses, config, options
from hq.client import InvokeError, ServerError, create_client

from . import database, importer, output, status, users

DEFAULT_TIMEOUT_S = 10.0

#: Subcommand modules, in the order ``--help`` lists them.
MODULES = [status, database, importer, users]


def _add_common(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every subcommand takes. They may come before the subcommand or after
    it: the copy on the subcommands has no defaults (SUPPRESS), so it only overrides."""
    default = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)
    parser.add_argument(
        "--address",
        default=default(None),
        help="broker address, tcp://HOST:PORT or ipc://PATH; several brokers of one database "
        f"separated by commas (env HQ_ADDRESS; default {addresses.DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--timeout",
        type=config.argparse_type(options.POSITIVE_FLOAT),
        default=default(None),
        help="deadline of each call to the server, seconds (env HQ_ADMIN_TIMEOUT; default 10, "
        "600 for the commands that scan or rewrite whole tables)",
    )
    parser.add_argument(
        "--format", choices=("table", "json"), default=default("table"), help="output format (default: table)"
    )
    parser.add_argument(
        "--server-key",
        default=default(None),
        metavar="KEY",
        help="CURVE: the broker's public key, a .key file or 40 Z85 characters (env HQ_SERVER_KEY)",
    )
    parser.add_argument(
        "--client-key",
        default=default(None),
        metavar="FILE",
        help="CURVE: this client's .key_secret file, if the broker lists allowed clients (env HQ_CLIENT_KEY)",
    )
    parser.add_argument(
        "--login",
        default=default(None),
        metavar="USER",
        help="log in as USER (default: $BB_HASHSERVE_USERNAME, else ~/.netrc for the host, else anonymous)",
    )
    parser.add_argument(
        "--password",
        default=default(None),
        metavar="TOKEN",
        help="the user's token (better: $BB_HASHSERVE_PASSWORD or ~/.netrc, which no ps shows)",
    )


def parser() -> argparse.ArgumentParser:
    common = config.ArgumentParser(add_help=False)
    _add_common(common, defaults=False)
    top = config.ArgumentParser(
        prog="hq-admin",
        description="Operate an hq service through its broker. Exit codes: 0 done or healthy, "
        "1 refused or unhealthy, 2 usage error, 3 server unreachable.",
    )
    _add_common(top, defaults=True)
    config.add_version(top)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in MODULES:
        module.add_commands(sub, common)
    return top


def _resolve_environment(args, top: argparse.ArgumentParser) -> None:
    """Fill --address and --timeout from HQ_ADDRESS / HQ_ADMIN_TIMEOUT and the defaults; a
    bad value is a usage error that names where it came from."""
    source = "--address"
    if args.address is None:
        source = "HQ_ADDRESS" if os.environ.get("HQ_ADDRESS") else "the default"
        args.address = os.environ.get("HQ_ADDRESS") or addresses.DEFAULT_ADDRESS
    try:
        addresses.split(args.address)
    except ValueError as exc:
        top.error(f"bad address {args.address!r} from {source}: {exc}")
    if args.timeout is None:
        env = os.environ.get("HQ_ADMIN_TIMEOUT")
        try:
            args.timeout = (
                options.POSITIVE_FLOAT(env) if env else getattr(args, "default_timeout", DEFAULT_TIMEOUT_S)
            )
        except ValueError as exc:
            top.error(f"bad value {env!r} from HQ_ADMIN_TIMEOUT: {exc} (seconds)")


def main(argv=None) -> int:
    top = parser()
    args = top.parse_args(argv)
    _resolve_environment(args, top)
    try:
        if getattr(args, "needs_server", True) is False:
            return args.func(args, None)
        client = create_client(
            args.address,
            args.login,
            args.password,
            timeout=args.timeout,
            server_key=args.server_key,
            client_key=args.client_key,
        )
        with client:
            return args.func(args, client)
    except BrokenPipeError:  # piped into head: not an error (a ConnectionError subclass)
        sys.stdout = open(os.devnull, "w")
        return output.OK
    except (InvokeError, ServerError) as exc:  # the server answered: it is reachable
        output.error(f"refused: {exc}")
        return output.FAILED
    except ConnectionError as exc:
        output.error(
            str(exc) if str(exc).startswith("cannot reach") else f"cannot reach hq at {args.address}: {exc}"
        )
        return output.UNREACHABLE
    except ValueError as exc:  # a key file that cannot be used
        output.error(str(exc))
        return output.USAGE
    except KeyboardInterrupt:
        return output.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
