"""Each OEHASHEQUIV normal-mode command as hq requests, with the reference's replies and
error texts (bitbake-hashserv-protocol.md §6-§7).

A handler takes the connection's :class:`~hq.gateway.link.Link` and the command's argument
and returns the JSON value to answer. :class:`Invoke` is an invoke-error (sent, then the
connection closes); :class:`~hq.oehashequiv.Drop` closes without a reply, as the reference
does for a missing field, a wrong type or an unknown command.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import time

from hq import protocol as p
from hq.oehashequiv import Drop


class Invoke(Exception):
    """The reference's ``{"invoke-error": {"message": text}}``, then a close."""


def _field(args, name: str, kind=str):
    if not isinstance(args, dict) or name not in args:
        raise Drop(f"missing field {name}")
    value = args[name]
    if kind is str:
        return str(value)
    if not isinstance(value, kind):
        raise Drop(f"field {name} has the wrong type")
    return value


def _enc(value) -> bytes:
    try:  # (lines are strict UTF-8: a surrogate can only come from a JSON \u escape)
        return str(value).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in the JSON): the reference's
        raise Drop("a value that is not valid Unicode") from None  # database fails on it too


async def ask(link, command: bytes, body=(), deadline: float | None = None) -> list:
    """The broker's OK body; a refusal (401, 403, 422) is an invoke-error with hq's text
    (the reference's texts: hq keeps them); any other error closes the connection."""
    status, reply = await link.call(command, body, deadline)
    if status == p.OK:
        return reply
    if status in (p.E_UNAUTHORIZED, p.E_FORBIDDEN, p.E_INVALID):
        raise Invoke(p.error_text(reply))
    raise Drop(f"hq answered {p.STATUS_NAMES.get(status, status)}: {p.error_text(reply)}")


async def backfill_wait(link, args):
    """With an upstream: ``{"tasks": 0}`` once every mapping it answered is stored (the
    reference's answer, after its backfill queue drained); without one the connection closes
    with no reply, as the reference's does (§13)."""
    deadline = time.monotonic() + link.timeout_s
    while True:
        upstream = _json(await ask(link, p.STATS))["broker"].get("upstream")
        if upstream is None:
            raise Drop("backfill-wait needs an upstream")
        if upstream.get("backfill_pending", 0) <= 0:
            return {"tasks": 0}
        if time.monotonic() > deadline:
            raise Drop("the backfill did not drain within --timeout")
        await asyncio.sleep(BACKFILL_POLL_S)


#: How often backfill-wait asks the broker whether the backfill has drained.
BACKFILL_POLL_S = 0.05


def _json(body: list):
    return json.loads(bytes(body[0]))


async def ping(link, args):
    await ask(link, p.PING)
    return {"alive": True}


def storable(text: str) -> bool:
    """Could hq hold this method or hash (PROTOCOL.md §3.2)? A lookup of one it could not is
    answered as a miss, as the reference answers it, instead of an error."""
    return (
        bool(text) and text.isprintable() and len(text.encode("utf-8", "surrogatepass")) <= p.MAX_HASH_BYTES
    )


async def _miss(link):
    """A lookup of what hq could not hold: a miss, once the caller may read (a command of the
    same permission, as for the stream modes: the reference checks @read first)."""
    await ask(link, p.STATS)
    return None


async def get(link, args):
    method, taskhash = _field(args, "method"), _field(args, "taskhash")
    body = [_enc(method), _enc(taskhash)]  # (a lone surrogate closes, as there)
    if not (storable(method) and storable(taskhash)):
        return await _miss(link)
    if args.get("all", False):
        return _json(await ask(link, p.GET_FULL, body))
    (frame,) = await ask(link, p.GET, body)
    unihash = bytes(frame).decode("ascii")
    return {"taskhash": taskhash, "method": method, "unihash": unihash} if unihash else None


async def get_outhash(link, args):
    method, outhash, taskhash = _field(args, "method"), _field(args, "outhash"), _field(args, "taskhash")
    body = [_enc(method), _enc(outhash), _enc(taskhash)]  # (a lone surrogate closes, as there)
    if not (storable(method) and storable(outhash)):
        return await _miss(link)
    if not storable(taskhash):  # unused but for an upstream's lookup; the reference ignores it
        body[2] = b"0"
    flag = p.encode_flag(bool(args.get("with_unihash", True)))
    return _json(await ask(link, p.GET_OUTHASH, [*body, flag]))


def _unihash(args) -> bytes:
    if not isinstance(args, dict):  # the reference fails on it and closes, without a reply
        raise Drop("an argument that is not an object")
    value = args.get("unihash")
    if not p.is_unihash(value):
        raise Invoke("Invalid unihash")
    return value.encode("ascii")


async def report(link, args):
    unihash = _unihash(args)
    method, taskhash, outhash = _field(args, "method"), _field(args, "taskhash"), _field(args, "outhash")
    extra = {k: args[k] for k in p.REPORT_EXTRA_FIELDS if k in args}
    body = [_enc(method), _enc(taskhash), _enc(outhash), unihash, p.encode_json(extra)]
    (frame,) = await ask(link, p.REPORT, body)
    return {"taskhash": taskhash, "method": method, "unihash": bytes(frame).decode("ascii")}


async def report_equiv(link, args):
    unihash = _unihash(args)
    method, taskhash = _field(args, "method"), _field(args, "taskhash")
    (frame,) = await ask(link, p.REPORT_EQUIV, [_enc(method), _enc(taskhash), unihash])
    return {"taskhash": taskhash, "method": method, "unihash": bytes(frame).decode("ascii")}


async def get_stats(link, args):
    return {"requests": _json(await ask(link, p.STATS))["requests"]}


async def reset_stats(link, args):
    return {"requests": _json(await ask(link, p.RESET_STATS))["requests"]}


async def get_db_usage(link, args):
    return _json(await ask(link, p.DB_USAGE))


async def get_db_query_columns(link, args):
    # hq can also query by "created" (PROTOCOL.md §3.7); the reference lists only its own
    # columns, and so does the gateway. "created" still works in a where.
    columns = _json(await ask(link, p.QUERY_COLUMNS))
    return {"columns": [c for c in columns["columns"] if c != "created"]}


def _where(args) -> bytes:
    where = _field(args, "where", dict)
    return p.encode_json(where)


async def remove(link, args):
    return _json(await ask(link, p.REMOVE, [_where(args)]))


async def clean_unused(link, args):
    """The reference's cutoff is now + age (PROTOCOL.md §3.7): a positive age deletes every
    unused row, a negative one those older than its size, which hq's age (now - age) gives.
    A cutoff past what a date can hold closes the connection, as there."""
    age = _field(args, "max_age_seconds", (int, float))
    try:
        datetime.datetime.now() + datetime.timedelta(seconds=age)
    except (OverflowError, ValueError):
        raise Drop("max_age_seconds out of range") from None
    hq_age = math.ceil(-age) if age < 0 else 0  # (a fraction of a second: rounded to keep)
    return _json(await ask(link, p.CLEAN_UNUSED, [b"%d" % hq_age]))


async def gc_mark(link, args):
    return _json(await ask(link, p.GC_MARK, [_enc(_field(args, "mark")), _where(args)]))


async def gc_status(link, args):
    return _json(await ask(link, p.GC_STATUS))


async def gc_sweep(link, args):
    return _json(await ask(link, p.GC_SWEEP, [_enc(_field(args, "mark"))]))


# --- users ---------------------------------------------------------------------------------


def _perms(args) -> bytes:
    if not isinstance(args, dict) or "permissions" not in args:
        raise Drop("missing field permissions")
    value = args["permissions"]
    if not isinstance(value, list):
        raise Invoke("Unexpected type for permissions")
    if not all(isinstance(v, str) for v in value):  # the reference fails on it and closes
        raise Drop("a permission that is not text")
    return p.encode_json(value)


def _optional_user(args):
    """The user a self-service command names, as the reference reads it: no ``username``
    key is the caller (b"" to hq); any value is its ``str()`` (``null`` is "None"); ""
    (which hq, which refuses an empty user name, takes as the caller) is None. An argument
    that is not an object closes the connection, as there."""
    if not isinstance(args, dict):
        raise Drop("an argument that is not an object")
    if "username" not in args:
        return b""
    name = str(args["username"])
    return _enc(name) if name else None


async def _no_such_user(link, missing):
    """A self-service command naming the user "": no user hq holds, once the caller may act
    on other users (@user-admin, which get-all-users needs too)."""
    await ask(link, p.GET_ALL_USERS)
    if missing is None:
        return None
    raise Invoke(missing)


async def get_user(link, args):
    name = _optional_user(args)
    if name is None:
        return await _no_such_user(link, None)
    return _json(await ask(link, p.GET_USER, [name]))


async def get_all_users(link, args):
    return _json(await ask(link, p.GET_ALL_USERS))


async def new_user(link, args):
    return _json(await ask(link, p.NEW_USER, [_enc(_field(args, "username")), _perms(args)]))


async def set_user_perms(link, args):
    return _json(await ask(link, p.SET_USER_PERMS, [_enc(_field(args, "username")), _perms(args)]))


async def delete_user(link, args):
    name = _optional_user(args)
    if name is None:
        return await _no_such_user(link, "No user named '' exists")
    return _json(await ask(link, p.DELETE_USER, [name]))


async def refresh_token(link, args):
    name = _optional_user(args)
    if name is None:
        return await _no_such_user(link, "No user named '' exists")
    return _json(await ask(link, p.REFRESH_TOKEN, [name]))


#: The reference's dispatch order (§3.3): the first of these names that is a key wins. auth,
#: become-user and the stream entries are the connection's own (they change its state).
READ_ONLY_ORDER = (
    "ping",
    "get",
    "get-outhash",
    "get-stream",
    "exists-stream",
    "get-stats",
    "get-db-usage",
    "get-db-query-columns",
    "report",
    "auth",
    "get-user",
    "get-all-users",
    "become-user",
)
WRITE_ORDER = (
    "report-equiv",
    "reset-stats",
    "backfill-wait",
    "remove",
    "gc-mark",
    "gc-mark-stream",
    "gc-sweep",
    "gc-status",
    "clean-unused",
    "refresh-token",
    "set-user-perms",
    "new-user",
    "delete-user",
)
HANDLERS = {
    "ping": ping,
    "get": get,
    "backfill-wait": backfill_wait,
    "get-outhash": get_outhash,
    "get-stats": get_stats,
    "get-db-usage": get_db_usage,
    "get-db-query-columns": get_db_query_columns,
    "report": report,
    "get-user": get_user,
    "get-all-users": get_all_users,
    "report-equiv": report_equiv,
    "reset-stats": reset_stats,
    "remove": remove,
    "gc-mark": gc_mark,
    "gc-sweep": gc_sweep,
    "gc-status": gc_status,
    "clean-unused": clean_unused,
    "refresh-token": refresh_token,
    "set-user-perms": set_user_perms,
    "new-user": new_user,
    "delete-user": delete_user,
}


def command_of(message) -> str:
    """The command a request names, found as the reference finds it; unknown is dropped."""
    if isinstance(message, dict):
        for name in READ_ONLY_ORDER + WRITE_ORDER:
            if name in message:
                return name
    raise Drop("unknown command")
