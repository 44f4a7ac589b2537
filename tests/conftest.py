import os
import sys

import psutil
import pytest

from helpers import (
    PostgresqlServer,
    Stack,
    bitbake_missing,
    find_bitbake,
    find_postgresql,
    postgresql_missing,
)

ENGINES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc):
    """A test that takes ``engine`` runs once per database engine; one marked
    ``sqlite_only`` (it is about SQLite's file, pragmas or trace) runs on SQLite alone."""
    if "engine" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("sqlite_only")
        metafunc.parametrize("engine", ENGINES[:1] if only else ENGINES)


@pytest.fixture(scope="session")
def postgresql_server():
    """The tests' own database on a real PostgreSQL server. Without a server the test is
    skipped, saying how to give one; with HQ_REQUIRE_POSTGRESQL=1 (set by .ci/run where a
    server answers at the usual place) it fails instead."""
    url = find_postgresql()
    if url is None:
        postgresql_missing(
            "needs PostgreSQL: set HQ_POSTGRESQL to postgresql://USER@HOST[:PORT]/DBNAME of a server "
            "where USER may create databases, or run one at 127.0.0.1:5432 (and install hq's "
            "[postgresql] extra)"
        )
    server = PostgresqlServer(url)
    yield server
    server.close()


@pytest.fixture
def postgresql_url(postgresql_server):
    """A fresh, empty schema of the tests' database, as a --db URL."""
    url = postgresql_server.new_url()
    yield url
    postgresql_server.drop_schema(url)


@pytest.fixture
def db_spec(engine, tmp_path, request):
    """A fresh database as ``--db`` takes it: an SQLite file, or a PostgreSQL schema."""
    if engine == "sqlite":
        return str(tmp_path / "hq.db")
    return request.getfixturevalue("postgresql_url")


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
