"""Users and permissions: the reference's model (bitbake-hashserv-protocol.md §6), once.

Leaf module (standard library and :mod:`hq.protocol` only): the broker checks permissions
with it, workers store users with it, hq-admin and the client read credentials with it.

* Permissions are ``@read``, ``@report``, ``@db-admin``, ``@user-admin`` and ``@all``;
  ``@none`` is a placeholder dropped on input.
* :data:`REQUIRED` names, for every hq command, the permissions it needs, whether the
  anonymous permissions count (user administration ignores them) and whether a logged-in
  user may run it on themselves without ``@user-admin`` (self-service).
* Tokens are stored only as ``algo:salt:hexdigest`` (sha256 of salt + token), BitBake's
  format, so users imported from a bitbake-hashserv database log in with their tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import netrc
import os
import secrets
from typing import NamedTuple

from hq import protocol as p

NONE = "@none"
READ = "@read"
REPORT = "@report"
DB_ADMIN = "@db-admin"
USER_ADMIN = "@user-admin"
ALL = "@all"
#: Every real permission (what ``@all`` expands to in user objects).
ALL_PERMISSIONS = frozenset({READ, REPORT, DB_ADMIN, USER_ADMIN, ALL})
#: What anonymous users may be given; the reference refuses anything else at start.
ANON_ALLOWED = frozenset({NONE, READ, REPORT, DB_ADMIN})
#: The reference's default anonymous permissions.
DEFAULT_ANON_PERMS = (READ, REPORT, DB_ADMIN)

TOKEN_ALGORITHM = "sha256"
TOKEN_BYTES = 48  # 64 characters of base64
SALT_BYTES = 8


class Rule(NamedTuple):
    perms: tuple  # required, in the order the refusal text lists them
    anon: bool = True  # the anonymous permissions may grant it
    self_service: bool = False  # a logged-in user may run it on their own user
    read_only: bool = True  # available on a read-only server


_R = Rule
#: hq command -> what it needs. Commands absent here need nothing (ping, auth).
REQUIRED = {
    p.GET: _R((READ,)),
    p.EXISTS: _R((READ,)),
    p.GET_FULL: _R((READ,)),
    p.GET_OUTHASH: _R((READ,)),
    p.STATS: _R((READ,)),
    p.REPORT: _R((READ,)),  # + @report to write (otherwise answered as a lookup)
    p.REPORT_EQUIV: _R((READ, REPORT), read_only=False),
    p.RESET_STATS: _R((DB_ADMIN,), read_only=False),
    p.REMOVE: _R((DB_ADMIN,), read_only=False),
    p.CLEAN_UNUSED: _R((DB_ADMIN,), read_only=False),
    p.GC_MARK: _R((DB_ADMIN,), read_only=False),
    p.GC_MARK_STREAM: _R((DB_ADMIN,), read_only=False),
    p.GC_STATUS: _R((DB_ADMIN,), read_only=False),
    p.GC_SWEEP: _R((DB_ADMIN,), read_only=False),
    p.DB_USAGE: _R((DB_ADMIN,)),
    p.QUERY_COLUMNS: _R((DB_ADMIN,)),
    p.IMPORT: _R((DB_ADMIN,), read_only=False),  # the users table also needs @user-admin
    p.IMPORT_STATUS: _R((DB_ADMIN,)),
    p.REFRESH_TOKEN: _R((USER_ADMIN,), anon=False, self_service=True, read_only=False),
    p.SET_USER_PERMS: _R((USER_ADMIN,), anon=False, read_only=False),
    p.GET_USER: _R((USER_ADMIN,), anon=False, self_service=True),
    p.GET_ALL_USERS: _R((USER_ADMIN,), anon=False),
    p.NEW_USER: _R((USER_ADMIN,), anon=False, read_only=False),
    p.DELETE_USER: _R((USER_ADMIN,), anon=False, self_service=True, read_only=False),
    p.BECOME_USER: _R((USER_ADMIN,), anon=False),
}
#: ``import`` of the users table: it can create users with any permission.
IMPORT_USERS_PERMS = (DB_ADMIN, USER_ADMIN)
#: What a ``--read-only`` worker refuses: what a read-only server refuses, and the broker's
#: backfills; a report only when asked to write it. A broker that writes gives none of these
#: to such a worker while one that writes is registered. The admin user a read-only server
#: sets up at start is stored, as the reference's is.
READ_ONLY_REFUSED = frozenset(c for c, rule in REQUIRED.items() if not rule.read_only) | {p.BACKFILL}


class BadPermissions(ValueError):
    """A permission list a user gave is not acceptable; the text is the reference's."""


def has(granted: frozenset, required) -> bool:
    """Does the set ``granted`` hold every permission of ``required`` (or ``@all``)?"""
    return ALL in granted or all(perm in granted for perm in required)


def parse_list(value) -> list:
    """A permission list from a user (JSON array) -> sorted names, ``@none`` dropped."""
    if not isinstance(value, list):
        raise BadPermissions("Unexpected type for permissions")
    names = {str(v) for v in value} - {NONE}
    unknown = names - ALL_PERMISSIONS
    if unknown:
        raise BadPermissions("Unknown permissions " + ", ".join(sorted(unknown)))
    return sorted(names)


def parse_anon(text: str) -> frozenset:
    """``--anon-perms``: comma- or space-separated; refuses what anonymous users may not have."""
    names = {n.strip() for n in text.replace(",", " ").split() if n.strip()}
    bad = names - ANON_ALLOWED
    if bad:
        raise ValueError(f"Permission(s) {' '.join(sorted(bad))} are not allowed for anonymous users")
    return frozenset(names - {NONE})


def shown(perms) -> list:
    """A user object's permission list: sorted, ``@all`` expanded to every name."""
    return sorted(ALL_PERMISSIONS) if ALL in perms else sorted(perms)


def from_column(text: str) -> list:
    """The users table's permissions column (space-separated, as BitBake stores it)."""
    return sorted(set(text.split()))


def to_column(perms) -> str:
    return " ".join(sorted(perms))


# --- tokens ------------------------------------------------------------------------------


def new_token() -> str:
    """64 characters, BitBake's alphabet (base64 with ``.`` and ``_``, no padding)."""
    return base64.b64encode(secrets.token_bytes(TOKEN_BYTES), b"._").decode("ascii")


def hash_token(token: str, salt: str | None = None, algo: str = TOKEN_ALGORITHM) -> str:
    """``algo:salt:hexdigest`` of ``salt + token`` (a new random salt when none is given)."""
    salt = secrets.token_hex(SALT_BYTES) if salt is None else salt
    digest = hashlib.new(algo)
    digest.update(salt.encode("utf-8"))
    digest.update(token.encode("utf-8", "surrogateescape"))
    return f"{algo}:{salt}:{digest.hexdigest()}"


def token_matches(token: str, stored: str) -> bool:
    """Does ``token`` hash to ``stored``? Constant time in the digest; False for a stored
    value that is not ``algo:salt:hexdigest`` or names an unknown algorithm."""
    try:
        algo, salt, _ = stored.split(":")
        candidate = hash_token(token, salt, algo)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), stored.encode("utf-8"))


# --- where a client finds its credentials ------------------------------------------------

USERNAME_ENV = "BB_HASHSERVE_USERNAME"
PASSWORD_ENV = "BB_HASHSERVE_PASSWORD"


def find_credentials(address: str, username=None, password=None, environ=None):
    """``(username, token)`` as BitBake finds them: the arguments, else
    ``BB_HASHSERVE_USERNAME`` / ``BB_HASHSERVE_PASSWORD``, else ``~/.netrc`` for the server's
    host (tcp:// addresses). ``(None, None)``: anonymous; ``username=""`` asks for that
    explicitly (no variable or file is read)."""
    environ = os.environ if environ is None else environ
    if username == "":
        return None, None
    if username is None and environ.get(USERNAME_ENV):
        username = environ[USERNAME_ENV]
    entry = _netrc_entry(address)
    if username is None:
        if not entry or not entry[0]:
            return None, None
        username = entry[0]
    if password is None:
        # A name without a token: BB_HASHSERVE_PASSWORD, else the host's ~/.netrc entry.
        if PASSWORD_ENV in environ:
            password = environ[PASSWORD_ENV]
        elif entry and entry[0] == username:
            password = entry[2]
    return str(username), str(password or "")


def _netrc_entry(address: str):
    host = _host(address)
    if not host:
        return None
    try:
        return netrc.netrc().authenticators(host)
    except (OSError, netrc.NetrcParseError, UnicodeDecodeError):  # unreadable, as none
        return None


def _host(address: str):
    scheme, _, rest = address.partition("://")
    if scheme != "tcp":
        return None
    host = rest.rpartition(":")[0]
    return host.strip("[]") or None
