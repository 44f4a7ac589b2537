"""hq's ZeroMQ client under BitBake's hash-equivalence signature handlers.

BitBake makes its client in ``SignatureGeneratorUniHashMixIn.client()`` with
``hashserv.create_client(BB_HASHSERVE)``; ``bb.siggen.init()`` picks the handler named by
``BB_SIGNATURE_HANDLER`` among the ``SignatureGenerator`` classes in ``bb.siggen``'s namespace.
``install()`` puts there, under each such handler's own attribute, a subclass with the same
``name`` whose ``client()`` is hq's client for ``tcp://`` and ``ipc://`` addresses. Every call
BitBake makes (the runqueue's batched ``get_unihash_batch``, ``unihash_exists_batch``,
``report_unihash`` in the task processes, ``report_unihash_equiv``) then goes to the broker;
its failures are ``ConnectionError``, which BitBake catches and falls back to the taskhash.
"""

import contextlib

import bb.siggen

#: BB_HASHSERVE addresses that go to hq's client; every other keeps BitBake's own.
SCHEMES = ("tcp://", "ipc://")
#: Configuration variables for hq's CURVE encryption: the broker's public key (40 Z85 characters
#: or its .key file) and this build's .key_secret file. They travel to the task processes with
#: the handler's data (its ``env``), as BitBake's proxy variables do.
CURVE_VARS = ("HQ_SERVER_KEY", "HQ_CLIENT_KEY")
INSTALL_HINT = (
    "hq's client is not installed in BitBake's Python (%s): install it there with "
    "'pip install hq-hashequiv', or point BB_HASHSERVE at an OEHASHEQUIV address (hq-gateway)"
)


def is_hq_address(address) -> bool:
    return isinstance(address, str) and address.startswith(SCHEMES)


class HqClientMixIn:
    """Goes before the handler in the MRO: hq's client for tcp:// and ipc:// addresses."""

    def init_rundepcheck(self, data):
        super().init_rundepcheck(data)
        if not is_hq_address(getattr(self, "server", None)):
            return
        try:
            import hq.client
        except ImportError as exc:
            bb.fatal(INSTALL_HINT % exc)
        # Credentials as OE-core's handler reads them: BB_HASHSERVE_USERNAME and
        # BB_HASHSERVE_PASSWORD from the configuration (OEEquivHash has already read them),
        # then hq's client looks in the environment and ~/.netrc for the broker's host.
        self.username = self.username or data.getVar("BB_HASHSERVE_USERNAME") or None
        self.password = self.password or data.getVar("BB_HASHSERVE_PASSWORD") or None
        for name in CURVE_VARS:
            value = data.getVar(name)
            if value:
                self.env[name] = value
        try:  # a bad address or key file: one clear line now, not a traceback in every task
            hq.client.create_client(self.server, **self._hq_options()).close()
        except ValueError as exc:
            bb.fatal("BB_HASHSERVE %s: %s" % (self.server, exc))

    def _hq_options(self) -> dict:
        return {
            "username": self.username,
            "password": self.password,
            "server_key": self.env.get("HQ_SERVER_KEY"),
            "client_key": self.env.get("HQ_CLIENT_KEY"),
        }

    @contextlib.contextmanager
    def client(self):
        if not is_hq_address(self.server):
            with super().client() as client:
                yield client
            return
        if getattr(self, "_client", None) is None:
            import hq.client

            self._client = hq.client.create_client(self.server, **self._hq_options())
        yield self._client


def install(d=None) -> str:
    """Replace each hash-equivalence handler in ``bb.siggen`` by its hq subclass (idempotent);
    return the handlers' names."""
    names = []
    for attr, cls in list(vars(bb.siggen).items()):
        if not (isinstance(cls, type) and issubclass(cls, bb.siggen.SignatureGenerator)):
            continue
        if not issubclass(cls, bb.siggen.SignatureGeneratorUniHashMixIn):
            continue
        if not issubclass(cls, HqClientMixIn):
            cls = type(cls.__name__, (HqClientMixIn, cls), {"__module__": __name__})
            setattr(bb.siggen, attr, cls)
        names.append(cls.name)
    return " ".join(sorted(names))
