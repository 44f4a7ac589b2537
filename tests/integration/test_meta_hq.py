"""meta-hq's signature handlers in this process, with BitBake's real datastore and bb.siggen:
which client each address gets, credentials and CURVE keys from the configuration, and one
clear failure for a bad address (tests/e2e/test_bitbake_builds.py runs whole builds)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from helpers import REPO, Stack, script

M = "TestMethod"
T = "35788efcb8dfb0a02659d81cf2bfd695fb30faf9"
O1 = "2765d4a5884be49b28601445c2760c5f21e7e5c0ee2b7e3fce98fd7e5970796f"
U1 = "a69ec97f5af2e21e1a1f9cc8896965515d5559425666f734e245a3d40cee33d9"
PASSWORD = "meta-hq-admin-password"


@pytest.fixture
def siggen(bitbake):
    """bb.siggen with meta-hq's handlers installed; restored afterwards."""
    paths = [os.path.join(bitbake, "lib"), os.path.join(REPO, "meta-hq", "lib")]
    sys.path[:0] = paths
    import bb.data
    import bb.siggen
    import hq_siggen

    saved = dict(vars(bb.siggen))
    installed = hq_siggen.install()
    assert set(installed.split()) >= {"TestEquivHash"}
    assert hq_siggen.install() == installed  # idempotent

    def make(**conf):
        d = bb.data.init()
        for name, value in {"BB_SIGNATURE_HANDLER": "TestEquivHash", **conf}.items():
            d.setVar(name, value)
        return bb.siggen.init(d)

    yield make
    for name in set(vars(bb.siggen)) - set(saved):
        delattr(bb.siggen, name)
    for name, value in saved.items():
        setattr(bb.siggen, name, value)
    for path in paths:
        sys.path.remove(path)


def test_tcp_and_ipc_get_hqs_client_any_other_address_bitbakes(siggen, tmp_path):
    import hq_siggen

    import hq.client

    with Stack(tmp_path) as stack:
        handler = siggen(BB_HASHSERVE=stack.address)
        assert isinstance(handler, hq_siggen.HqClientMixIn) and handler.name == "TestEquivHash"
        with handler.client() as client:
            assert isinstance(client, hq.client.Client)
            assert client.report_unihash(T, M, O1, U1)["unihash"] == U1
        # the calls BitBake's runqueue makes, through its own code
        assert handler.client().__enter__().get_unihash_batch([(M, T), (M, "0" * 40)]) == [U1, None]
        handler.exit()
        assert handler._client is None  # BitBake's exit() closed it
    # BitBake's own client: it connects at once, and there is nothing at that path
    with pytest.raises(FileNotFoundError), siggen(BB_HASHSERVE=f"unix://{tmp_path}/nowhere.sock").client():
        pass


def test_credentials_and_curve_keys_come_from_the_configuration(siggen, tmp_path):
    keys = tmp_path / "keys"
    subprocess.run([script("hq-admin"), "keygen", keys, "--name", "broker"], check=True, capture_output=True)
    args = ["--admin-user", "admin", "--anon-perms", "@read"]
    args += ["--curve-secret-key", str(keys / "broker.key_secret")]
    with Stack(tmp_path, args=args, env={"HQ_ADMIN_PASSWORD": PASSWORD}) as stack:
        conf = {
            "BB_HASHSERVE": stack.address,
            "BB_HASHSERVE_USERNAME": "admin",
            "BB_HASHSERVE_PASSWORD": PASSWORD,
            "HQ_SERVER_KEY": str(keys / "broker.key"),
        }
        handler = siggen(**conf)
        with handler.client() as client:
            client.report_unihash(T, M, O1, U1, {"owner": "ignored"})
            assert client.get_taskhash(M, T, True)["owner"] == "admin"
        handler.exit()
        # the handler's data as bitbake-worker gets it for a task process
        worker = siggen(BB_HASHSERVE="auto")
        worker.set_taskdata(handler.get_taskdata())
        with worker.client() as client:
            assert client.get_user()["username"] == "admin"
        worker.exit()
        # without the broker's key: a ConnectionError at once (BitBake's fallback), not a hang
        plain = siggen(BB_HASHSERVE=stack.address)
        start = time.monotonic()
        with pytest.raises(ConnectionError), plain.client() as client:
            client.get_unihash(M, T)
        assert time.monotonic() - start < 10
        plain.exit()


@pytest.mark.parametrize(
    "conf",
    [
        {"BB_HASHSERVE": "tcp://hashserv"},
        {"BB_HASHSERVE": "tcp://127.0.0.1:99999"},
        {"BB_HASHSERVE": "tcp://127.0.0.1:1", "HQ_SERVER_KEY": "/nonexistent/broker.key"},
    ],
)
def test_a_bad_address_or_key_fails_the_build_at_once_with_the_reason(siggen, caplog, conf):
    import bb

    with pytest.raises(bb.BBHandledException):
        siggen(**conf)
    assert any(conf["BB_HASHSERVE"] in r.getMessage() for r in caplog.records if r.levelname == "CRITICAL")


def test_a_handler_a_layer_adds_later_is_taken_too(siggen, tmp_path):
    """OE-core adds OEEquivHash to bb.siggen's namespace from its own layer's Python, possibly
    after meta-hq's was imported: the class meta-hq adds to INHERIT (parsed after every
    layer.conf) installs again, and the handler named in BB_SIGNATURE_HANDLER gets hq's
    client. (A stand-in for OE-core's class, registered as OE-core's sstatesig.py does.)"""
    import bb.siggen
    import hq_siggen

    import hq.client

    class SignatureGeneratorOEEquivHash(
        bb.siggen.SignatureGeneratorUniHashMixIn, bb.siggen.SignatureGeneratorBasicHash
    ):
        name = "OEEquivHash"

        def init_rundepcheck(self, data):
            super().init_rundepcheck(data)
            self.server = data.getVar("BB_HASHSERVE")
            self.method = "oe.sstatesig.OEOuthashBasic"

    bb.siggen.SignatureGeneratorOEEquivHash = SignatureGeneratorOEEquivHash
    assert "OEEquivHash" in hq_siggen.install().split()
    with Stack(tmp_path) as stack:
        handler = siggen(BB_SIGNATURE_HANDLER="OEEquivHash", BB_HASHSERVE=stack.address)
        assert handler.name == "OEEquivHash" and isinstance(handler, SignatureGeneratorOEEquivHash)
        with handler.client() as client:
            assert isinstance(client, hq.client.Client) and client.ping() == {"alive": True}
        handler.exit()
