"""What a worker does with one job: decode the body, call the store, encode the reply.

No sockets here. :meth:`Handlers.handle` never raises: a bad body becomes its protocol
error code, a refused write becomes STORAGE, and anything unexpected becomes INTERNAL
with a logged traceback, so one bad request never takes a worker down.
"""

from __future__ import annotations

import logging
import sqlite3

from hq import protocol as p

from .store import Store

log = logging.getLogger(__name__)


def _method(frame) -> str:
    return p.decode_text(frame, "method", p.MAX_METHOD_BYTES)


def _hash(frame, what: str) -> str:
    return p.decode_text(frame, what, p.MAX_HASH_BYTES)


def _extra(body: list, index: int) -> dict:
    if len(body) <= index:
        return {}
    extra = p.decode_json_object(body[index], "extra")
    out = {}
    for name in p.REPORT_EXTRA_FIELDS:
        value = extra.get(name)
        if value is not None:
            value = value if isinstance(value, str) else str(value)
            try:
                value.encode("utf-8")  # JSON may carry lone surrogates, which SQLite refuses
            except UnicodeEncodeError:
                raise p.ProtocolError(p.E_INVALID, f"extra field {name} is not valid Unicode") from None
            out[name] = value
    return out


class Handlers:
    def __init__(self, store: Store):
        self.store = store
        self.table = {
            p.PING: self.ping,
            p.GET: self.get,
            p.EXISTS: self.exists,
            p.GET_FULL: self.get_full,
            p.GET_OUTHASH: self.get_outhash,
            p.REPORT: self.report,
            p.REPORT_EQUIV: self.report_equiv,
        }

    def handle(self, command: bytes, credentials: bytes, body: list) -> tuple:
        """Return (status, reply body frames) for one job."""
        handler = self.table.get(command)
        if handler is None:
            return p.E_UNKNOWN_COMMAND, [b"unknown command %s" % command[:40]]
        try:
            p.check_body_shape(command, body)
            return p.OK, handler(body)
        except p.ProtocolError as exc:
            return exc.code, [exc.message.encode("utf-8", "replace")[: p.MAX_ERROR_BYTES]]
        except sqlite3.OperationalError as exc:
            # Locked past busy_timeout, disk full, read-only file, file gone: the caller
            # may retry; the text never says "database is locked" to a client.
            log.warning("storage error on %s: %s", command.decode(errors="replace"), exc)
            return p.E_STORAGE, [b"storage unavailable: " + _storage_reason(exc)]
        except sqlite3.DatabaseError as exc:
            log.error("database error on %s: %s", command.decode(errors="replace"), exc)
            return p.E_STORAGE, [b"storage error"]
        except Exception:
            log.exception("internal error handling %s", command.decode(errors="replace"))
            return p.E_INTERNAL, [b"internal error"]

    # --- one method per command -------------------------------------------------------
    def ping(self, body: list) -> list:
        return []

    def get(self, body: list) -> list:
        out = []
        for i in range(0, len(body), 2):
            method = _method(body[i])
            taskhashes = p.unpack_items(body[i + 1], "taskhash")
            out.append(p.pack_unihashes(self.store.get_unihashes(method, taskhashes)))
        return out

    def exists(self, body: list) -> list:
        out = []
        for frame in body:
            unihashes = p.unpack_items(frame, "unihash")
            out.append(p.pack_flags(self.store.unihashes_exist(unihashes)))
        return out

    def get_full(self, body: list) -> list:
        row = self.store.get_full(_method(body[0]), _hash(body[1], "taskhash"))
        return [p.encode_json(row)]

    def get_outhash(self, body: list) -> list:
        method = _method(body[0])
        outhash = _hash(body[1], "outhash")
        _hash(body[2], "taskhash")  # used only by an upstream lookup, which hq lacks so far
        row = self.store.get_outhash(method, outhash, p.decode_flag(body[3], "with_unihash"))
        return [p.encode_json(row)]

    def report(self, body: list) -> list:
        method = _method(body[0])
        taskhash = _hash(body[1], "taskhash")
        outhash = _hash(body[2], "outhash")
        unihash = p.decode_unihash(body[3])
        extra = _extra(body, 4)
        return [self.store.report(method, taskhash, outhash, unihash, extra).encode()]

    def report_equiv(self, body: list) -> list:
        method = _method(body[0])
        taskhash = _hash(body[1], "taskhash")
        unihash = p.decode_unihash(body[2])
        _extra(body, 3)  # accepted and ignored, as the reference does
        return [self.store.report_equiv(method, taskhash, unihash).encode()]


def _storage_reason(exc: Exception) -> bytes:
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return b"database busy"
    if "full" in text:
        return b"database or disk is full"
    if "readonly" in text or "read-only" in text:
        return b"database is read-only"
    return text[:200].encode()
