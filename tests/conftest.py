import os
import sys

import psutil
import pytest

from helpers import Stack, bitbake_missing, find_bitbake


@pytest.fixture
def stack(tmp_path):
    """A running hq-server (broker + 2 workers) over TCP on a fresh database."""
    s = Stack(tmp_path).start()
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(params=["tcp", "ipc"])
def any_stack(request, tmp_path):
    """A running hq-server on a fresh database, once over tcp:// and once over ipc://."""
    bind = "tcp://127.0.0.1:*" if request.param == "tcp" else f"ipc://{tmp_path}/hq.ipc"
    s = Stack(tmp_path, bind=bind).start()
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def shared_stack(tmp_path_factory):
    """One hq-server for a whole module, for tests that only add fresh keys."""
    s = Stack(tmp_path_factory.mktemp("stack")).start()
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(autouse=True)
def no_leaked_processes():
    """A test that leaves a child process running fails."""
    before = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    yield

    def leaked():
        return [
            p
            for p in psutil.Process(os.getpid()).children(recursive=True)
            if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE
        ]

    from helpers import wait_for

    try:
        wait_for(lambda: not leaked(), timeout=5, what="child processes to exit")
    except AssertionError:
        names = [(p.pid, p.name()) for p in leaked()]
        for p in leaked():
            p.kill()
        pytest.fail(f"test leaked processes: {names}")


@pytest.fixture(scope="session")
def bitbake():
    """The path of BitBake's source tree. Without one the test is skipped, saying how to give
    it; with HQ_REQUIRE_BITBAKE=1 (set by .ci/run where BitBake is present) it fails instead,
    so a run where BitBake was there never passes by skipping its tests."""
    path = find_bitbake()
    if path is None:
        bitbake_missing(
            "needs BitBake (2.x): set HQ_BITBAKE to a BitBake source tree (with bin/ and lib/), "
            "or put one at ../shared/bitbake next to this repository"
        )
    return path


@pytest.fixture(scope="module")
def hashserv(bitbake):
    """BitBake's own hash-equivalence package (its client: ``hashserv.create_client``)."""
    sys.path.insert(0, os.path.join(bitbake, "lib"))
    import hashserv

    yield hashserv
    sys.path.remove(os.path.join(bitbake, "lib"))
