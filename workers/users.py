"""The users table: log-in checks and user administration (ref. §6, §7.9), for one worker.

The broker decides who may run what (:mod:`hq.broker.access`); a worker only runs what it
is sent, for the user the REQUEST's actor frame names. Tokens are made here, returned once
and stored only as ``algo:salt:hexdigest`` (:func:`hq.permissions.hash_token`). Refusals
carry the reference's texts: 401 for a failed log-in, 422 for the rest (the client raises
them as ``InvokeError``, as BitBake's client does).
"""

from __future__ import annotations

import json
import re

from hq import permissions as perms
from hq import protocol as p

from .store import Store

_STORED_TOKEN = re.compile(r"[a-z0-9]{1,16}:[0-9a-f]{1,64}:[0-9a-f]{32,128}")


def _name(frame) -> str:
    return p.decode_text(frame, "username", p.MAX_USERNAME_BYTES)


def _perm_list(frame) -> list:
    try:
        value = json.loads(bytes(frame))
    except (ValueError, RecursionError):
        raise p.ProtocolError(p.E_INVALID, "Unexpected type for permissions") from None
    try:
        return perms.parse_list(value)
    except perms.BadPermissions as exc:
        raise p.ProtocolError(p.E_INVALID, str(exc)) from None


def _refuse(text: str):
    raise p.ProtocolError(p.E_INVALID, text)


def _user(username: str, column: str) -> dict:
    return {"username": username, "permissions": perms.shown(perms.from_column(column))}


# --- parsing one job's body (the broker has filled in the caller for self-service) ---------


def parse_auth(body: list) -> tuple:
    token = bytes(body[1])
    if len(token) > p.MAX_TOKEN_BYTES:
        raise p.ProtocolError(p.E_TOO_LARGE, "token too long")
    return _name(body[0]), token.decode("utf-8", "surrogateescape")


def parse_name(body: list) -> tuple:
    return (_name(body[0]),)


def parse_name_perms(body: list) -> tuple:
    return _name(body[0]), _perm_list(body[1])


def parse_bootstrap(body: list) -> tuple:
    """The broker's own request: user name and the password's ``algo:salt:hexdigest``."""
    if len(body) != 2:
        raise p.ProtocolError(p.E_BAD_REQUEST, "admin-bootstrap takes 2 body frames")
    stored = bytes(body[1]).decode("ascii", "replace")
    if not _STORED_TOKEN.fullmatch(stored):
        raise p.ProtocolError(p.E_INVALID, "malformed token hash")
    return _name(body[0]), stored


class Users:
    def __init__(self, store: Store):
        self.store = store

    def _row(self, username: str):
        """``(permissions column, token column)`` or None."""
        sql = "SELECT permissions, token FROM users WHERE username = ?"
        rows = self.store._sql(sql, (username,)).fetchall()
        return rows[0] if rows else None

    def _write(self, sql: str, params) -> int:
        with self.store.write_transaction():
            return self.store._sql(sql, params).rowcount

    # --- log-in ---------------------------------------------------------------------------
    def auth(self, username: str, token: str) -> dict:
        row = self._row(username)
        if row is None or not perms.token_matches(token, row[1]):
            raise p.ProtocolError(p.E_UNAUTHORIZED, f"Unable to authenticate as {username}")
        # The stored set, not expanded (as the reference answers auth).
        return {"result": True, "username": username, "permissions": perms.from_column(row[0])}

    def become(self, username: str) -> dict:
        row = self._row(username)
        if row is None:
            _refuse(f"User {username} doesn't exist")
        return _user(username, row[0])

    # --- reads ----------------------------------------------------------------------------
    def get(self, username: str):
        row = self._row(username)
        return None if row is None else _user(username, row[0])

    def get_all(self) -> dict:
        rows = self.store._sql("SELECT username, permissions FROM users ORDER BY id").fetchall()
        return {"users": [_user(name, column) for name, column in rows]}

    # --- writes ---------------------------------------------------------------------------
    def new(self, username: str, permissions: list) -> dict:
        token = perms.new_token()
        inserted = self._write(
            "INSERT INTO users (username, token, permissions) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            (username, perms.hash_token(token), perms.to_column(permissions)),
        )
        if not inserted:
            _refuse(f"Cannot create new user '{username}'")
        return {"username": username, "permissions": perms.shown(permissions), "token": token}

    def set_perms(self, username: str, permissions: list) -> dict:
        if not self._write(
            "UPDATE users SET permissions = ? WHERE username = ?", (perms.to_column(permissions), username)
        ):
            _refuse(f"No user named '{username}' exists")
        return {"username": username, "permissions": perms.shown(permissions)}

    def refresh_token(self, username: str) -> dict:
        token = perms.new_token()
        sql = "UPDATE users SET token = ? WHERE username = ?"
        if not self._write(sql, (perms.hash_token(token), username)):
            _refuse(f"No user named '{username}' exists")
        return {"username": username, "token": token}

    def delete(self, username: str) -> dict:
        if not self._write("DELETE FROM users WHERE username = ?", (username,)):
            _refuse(f"No user named '{username}' exists")
        return {"username": username}

    def bootstrap(self, username: str, token_hash: str) -> dict:
        """The admin of ``--admin-user``: created with ``@all``, or reset to ``@all`` and the
        given password (as the reference does at every start)."""
        with self.store.write_transaction():
            created = self.store._sql(
                "INSERT INTO users (username, token, permissions) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                (username, token_hash, perms.ALL),
            ).rowcount
            if not created:
                self.store._sql(
                    "UPDATE users SET token = ?, permissions = ? WHERE username = ?",
                    (token_hash, perms.ALL, username),
                )
        return {"username": username, "created": bool(created)}
