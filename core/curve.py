"""CURVE keys for hq's sockets: encryption on the wire and who may connect.

Keys are ZeroMQ certificates in ``zmq.auth``'s format: ``NAME.key`` holds the public key,
``NAME.key_secret`` the public and the secret key (``hq-admin keygen`` makes a pair). A
public key may also be given as its 40-character Z85 text.

* The broker is the CURVE server on its frontend (and on a tcp:// backend): it takes its
  ``.key_secret`` file; clients and workers take its public key.
* A client without a key of its own uses a fresh one per socket (encryption only); with an
  allow-list on the broker it needs its own ``.key_secret``, whose public half is listed.

``zmq.auth`` is imported only when keys are used: BitBake's processes load it only then.
"""

from __future__ import annotations

import os

import zmq

Z85_KEY_CHARS = 40

SERVER_KEY_ENV = "HQ_SERVER_KEY"
CLIENT_KEY_ENV = "HQ_CLIENT_KEY"


class BadKey(ValueError):
    """A key file or text that cannot be used; the text says which and why, in one line."""


def _certs():
    import zmq.auth.certs

    return zmq.auth.certs


def available() -> bool:
    return bool(zmq.has("curve"))


def load_secret(path: str) -> tuple:
    """``(public, secret)`` Z85 bytes from a ``.key_secret`` certificate file."""
    try:
        public, secret = _certs().load_certificate(path)
    except (OSError, ValueError) as exc:
        raise BadKey(f"cannot read the CURVE secret key file {path}: {exc}") from None
    if not secret:
        raise BadKey(f"{path} holds no secret key (give the .key_secret file, not the .key)")
    return public, secret


def load_public(text: str) -> bytes:
    """A public key: 40 Z85 characters, or a ``.key`` (or ``.key_secret``) file."""
    text = text.strip()
    if len(text) == Z85_KEY_CHARS and not os.path.exists(text):
        try:
            if len(zmq.utils.z85.decode(text.encode("ascii"))) == 32:
                return text.encode("ascii")
        except (ValueError, UnicodeEncodeError, KeyError, IndexError):
            pass
        raise BadKey("the CURVE public key is not 40 characters of Z85")
    try:
        public, _ = _certs().load_certificate(text)
    except (OSError, ValueError) as exc:
        raise BadKey(f"cannot read the CURVE public key file {text}: {exc}") from None
    return public


def load_allowed(directory: str) -> frozenset:
    """The public keys of every ``*.key`` certificate in ``directory``."""
    if not os.path.isdir(directory):
        raise BadKey(f"no directory {directory} of allowed CURVE public keys")
    try:
        keys = _certs().load_certificates(directory)
    except (OSError, ValueError) as exc:
        raise BadKey(f"cannot read the CURVE public keys in {directory}: {exc}") from None
    return frozenset(key for key, allowed in keys.items() if allowed)


def create(directory: str, name: str) -> tuple:
    """Write ``name.key`` and ``name.key_secret`` (mode 0600) in ``directory``; their paths.
    A name that is not a plain file name, or a directory that cannot be written, is BadKey."""
    if not name or name in (".", "..") or os.sep in name or "\0" in name:
        raise BadKey(f"key name {name!r}: a plain file name is needed, without {os.sep}")
    try:
        os.makedirs(directory, exist_ok=True)
        for suffix in (".key", ".key_secret"):
            if os.path.exists(os.path.join(directory, name + suffix)):
                raise BadKey(f"{os.path.join(directory, name + suffix)} exists; not overwriting it")
        public_path, secret_path = _certs().create_certificates(directory, name)
        os.chmod(secret_path, 0o600)
    except OSError as exc:
        raise BadKey(f"cannot write keys in {directory}: {exc.strerror or exc}") from None
    return public_path, secret_path


def serve(sock: zmq.Socket, secret_file: str) -> None:
    """Make ``sock`` a CURVE server with the key pair in ``secret_file``."""
    public, secret = load_secret(secret_file)
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def connect_as(sock: zmq.Socket, server_key: bytes, secret_file: str | None = None) -> None:
    """Make ``sock`` a CURVE client of the server ``server_key``, with the key pair of
    ``secret_file`` or a fresh one."""
    public, secret = load_secret(secret_file) if secret_file else zmq.curve_keypair()
    sock.curve_serverkey = server_key
    sock.curve_publickey = public
    sock.curve_secretkey = secret
