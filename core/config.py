"""Daemon options with one precedence: flag > HQ_* environment variable > config file > default.

Each daemon's options are :class:`~hq.options.Option` rows in :mod:`hq.options`; :func:`parse` builds the
argparse parser (``--help`` names each option's environment variable and default), reads
the file named by ``--config`` / ``HQ_CONFIG``, and resolves each value. A bad value exits
with status 2 and a one-line message, as argparse does.

One file serves every daemon (supervisord hands the same ``HQ_CONFIG`` to the broker and
the workers). Its ``[hq]`` section is shared: each daemon takes the keys it knows and
ignores keys that only another hq daemon knows. A ``[hq-broker]``, ``[hq-worker]`` or
``[hq-server]`` section holds keys for that program alone and wins over ``[hq]``. A key no
hq daemon knows, a key in a program section that this program does not know, and a section
that is neither ``[hq]`` nor a program's are errors, so typos never pass silently.
"""

from __future__ import annotations

import argparse
import configparser
import os
import stat
import sys
from typing import Callable

import hq
from hq.options import BOOL, PROGRAMS, Option

CONFIG_OPTION = Option(
    "config", None, "INI file: option = value lines in a shared [hq] section and per-program sections"
)

#: The section every daemon reads.
SHARED_SECTION = "hq"


def all_option_names() -> set:
    """Every option name any hq program accepts."""
    return {opt.name for options in PROGRAMS.values() for opt in options}


def argparse_type(convert: Callable) -> Callable:
    """``convert`` (an option type above, raising ValueError) as an argparse ``type=``, so the
    reason reaches the user: argparse prints only "invalid value" for a plain ValueError."""

    def parse(text):
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    parse.__name__ = convert.__name__
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """Errors are one line on stderr and exit 2 (every hq program's usage-error status): a
    daemon's log should not fill with usage text, and a user reads one line. No
    abbreviations: ``hq-admin --server ADDRESS`` was taken for ``--server-key`` and failed
    reading a key file named like the address; a misspelt option is now named as such."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # An option no parser knows is named first: otherwise its value can be taken for a
        # subcommand ("invalid choice: 'tcp://...'"), which hides the real mistake.
        argv = sys.argv[1:] if args is None else list(args)
        known = _option_strings(self)
        for token in argv:
            if token == "--":
                break
            if token.startswith("--") and token.split("=", 1)[0] not in known:
                self.error(f"unrecognized option {token.split('=', 1)[0]}")
        return super().parse_known_args(args, namespace)

    def error(self, message):
        one_line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
        self.exit(2, f"{self.prog}: error: {one_line} (see --help)\n")


def _option_strings(parser) -> set:
    """Every option string of ``parser`` and of its subcommands, at any depth."""
    found = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: the program's name and hq's version, on stdout, exit 0."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {hq.__version__}")


def build_parser(prog: str, description: str, options: list) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description=description,
        epilog="Precedence: command-line flag > HQ_* environment variable > config file > default.",
    )
    add_version(parser)
    for opt in [CONFIG_OPTION, *options]:
        default = ",".join(opt.default) if opt.multiple and opt.default else opt.default
        text = f"{opt.help} (env {opt.env}; default: {default})"
        kwargs: dict = {"dest": opt.dest, "default": None, "help": text}
        if opt.multiple:
            kwargs["action"] = "append"
        if opt.choices:
            kwargs["choices"] = opt.choices
        if opt.type is BOOL:  # --read-only alone means yes
            kwargs["nargs"] = "?"
            kwargs["const"] = "yes"
        parser.add_argument("--" + opt.name, **kwargs)
    return parser


def _convert(opt: Option, raw, source: str, parser: argparse.ArgumentParser):
    if opt.multiple:
        items = raw if isinstance(raw, list) else [raw]
        values = [v.strip() for item in items for v in str(item).split(",") if v.strip()]
        if not values:
            parser.error(f"bad value for {opt.name} from {source}: {raw!r} (needs at least one value)")
        return [_convert_one(opt, v, source, parser) for v in values]
    return _convert_one(opt, raw, source, parser)


def _convert_one(opt: Option, raw, source: str, parser: argparse.ArgumentParser):
    try:
        value = opt.type(raw)
    except (TypeError, ValueError) as exc:
        parser.error(f"bad value for {opt.name} from {source}: {raw!r} ({exc})")
    if opt.choices and value not in opt.choices:
        parser.error(
            f"bad value for {opt.name} from {source}: {raw!r} (choose from {', '.join(opt.choices)})"
        )
    return value


def parse(prog: str, description: str, options: list, argv=None, environ=None) -> argparse.Namespace:
    environ = os.environ if environ is None else environ
    parser = build_parser(prog, description, options)
    args = parser.parse_args(argv)
    config_path = args.config or environ.get(CONFIG_OPTION.env)
    file_values: dict = {}
    if config_path:
        file_values = read_file(prog, config_path, options, parser)
    resolved = argparse.Namespace(config=config_path)
    for opt in options:
        raw = getattr(args, opt.dest)
        if raw is not None:
            value = _convert(opt, raw, "the command line", parser)
        elif opt.env in environ:
            value = _convert(opt, environ[opt.env], opt.env, parser)
        elif opt.name in file_values:
            section, raw = file_values[opt.name]
            value = _convert(opt, raw, f"[{section}] in {config_path}", parser)
        else:
            value = opt.default
        setattr(resolved, opt.dest, value)
    return resolved


def read_file(prog: str, path: str, options: list, parser: argparse.ArgumentParser) -> dict:
    """``{option name: (section, raw value)}`` for ``prog`` from the file at ``path``.

    ``[prog]`` wins over ``[hq]``. Errors exit 2 through ``parser.error``.
    """
    cp = configparser.ConfigParser(interpolation=None, default_section="hq:no-default-section")
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # /dev/zero, a FIFO: never a wait forever
            parser.error(f"cannot read config file {path}: not a regular file")
        with open(path, encoding="utf-8") as fh:
            cp.read_file(fh)
    except UnicodeDecodeError as exc:
        parser.error(f"cannot read config file {path}: not UTF-8 text (byte {exc.start})")
    except (OSError, configparser.Error) as exc:
        parser.error(f"cannot read config file {path}: {exc}")
    unknown_sections = [s for s in cp.sections() if s != SHARED_SECTION and s not in PROGRAMS]
    if unknown_sections:
        allowed = ", ".join(f"[{s}]" for s in (SHARED_SECTION, *PROGRAMS))
        parser.error(f"unknown section(s) in {path}: {', '.join(unknown_sections)} (allowed: {allowed})")
    known = {opt.name for opt in options}
    values: dict = {}
    for section in (SHARED_SECTION, prog):
        if not cp.has_section(section):
            continue
        items = {key.replace("_", "-"): value for key, value in cp.items(section)}
        unknown = sorted(set(items) - known)
        if unknown and section == SHARED_SECTION:
            # Keys for another hq program are fine in the shared section.
            unknown = sorted(set(unknown) - all_option_names())
        if unknown:
            parser.error(f"unknown option(s) in [{section}] of {path}: {', '.join(unknown)}")
        values.update({name: (section, value) for name, value in items.items() if name in known})
    return values
