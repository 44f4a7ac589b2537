import os

import psutil
import pytest

from helpers import Stack


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
        return [p for p in psutil.Process(os.getpid()).children(recursive=True) if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
    from helpers import wait_for
    try:
        wait_for(lambda: not leaked(), timeout=5, what="child processes to exit")
    except AssertionError:
        names = [(p.pid, p.name()) for p in leaked()]
        for p in leaked():
            p.kill()
        pytest.fail(f"test leaked processes: {names}")
