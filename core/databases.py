"""What a ``--db`` value names: an SQLite file (a path, the default) or a PostgreSQL database
(``postgresql://USER@HOST[:PORT]/DBNAME``). One home for telling them apart, for checking a
URL before anything starts, and for showing one without its password.

A PostgreSQL URL goes to libpq as it is, so everything libpq reads works: ``PGPASSWORD``,
``~/.pgpass``, ``?sslmode=require``, ``host=/run/postgresql`` for a Unix socket. A password
written into the URL works too, but it is never shown: not in a log line, a process title,
the statistics or an error.
"""

from __future__ import annotations

import re
import sys
from urllib.parse import parse_qsl, urlsplit

SCHEMES = ("postgresql://", "postgres://")
#: libpq parameters whose values are secrets (a URL's query may carry them).
_SECRET_PARAMS = re.compile(r"(?i)\b(password|sslpassword)=[^&]*")


def is_postgresql(spec: str) -> bool:
    return spec.startswith(SCHEMES)


def hide_unused_drivers(spec: str) -> None:
    """Call before peewee is imported, in a process whose database is ``spec``: when it is an
    SQLite file, psycopg is hidden from peewee, which imports it whenever it is installed
    (measured: a third of a worker's start, for a driver a SQLite worker never uses)."""
    if not is_postgresql(spec) and "peewee" not in sys.modules:
        sys.modules.setdefault("psycopg", None)  # import psycopg: ImportError, as if absent


def redacted(spec: str) -> str:
    """``spec`` fit for a log line: a URL's password (user:PASSWORD@, ?password=) as ``***``."""
    if not is_postgresql(spec):
        return spec
    scheme, _, rest = spec.partition("://")
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    return f"{scheme}://{netloc}{slash}{_SECRET_PARAMS.sub(lambda m: m.group(1) + '=***', tail)}"


def check_postgresql(url: str) -> str:
    """``url`` if it names a database hq can be pointed at; ValueError (a reason a user can act
    on, without the password) otherwise. Nothing is connected to here."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        parse_qsl(parts.query, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ValueError(f"{redacted(url)}: not a PostgreSQL URL ({exc})") from None
    dbname = parts.path.lstrip("/")
    if not dbname or "/" in dbname:
        raise ValueError(f"{redacted(url)}: name the database, as in postgresql://USER@HOST[:PORT]/DBNAME")
    return url


def check(spec: str) -> str:
    """A ``--db`` value: a PostgreSQL URL checked as above, or any other text as a path (the
    worker checks the file when it opens it)."""
    if is_postgresql(spec):
        return check_postgresql(spec)
    if "://" in spec:
        raise ValueError(
            f"{spec.split('://', 1)[0]}:// is not a database hq knows: "
            "give an SQLite file or postgresql://USER@HOST[:PORT]/DBNAME"
        )
    return spec


def without_password(url: str) -> tuple:
    """``(url, password)``: a PostgreSQL URL with the password of its user part taken out
    (``None`` when it has none), so a program can hand the URL to another process on its
    command line and the password in ``PGPASSWORD``, which libpq reads, out of ``ps``."""
    if not is_postgresql(url):
        return url, None
    scheme, _, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    if "@" not in netloc:
        return url, None
    userinfo, host = netloc.rsplit("@", 1)
    if ":" not in userinfo:
        return url, None
    user, password = userinfo.split(":", 1)
    from urllib.parse import unquote

    return f"{scheme}://{user}@{host}{slash}{tail}", unquote(password)
