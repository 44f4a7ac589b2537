"""Real ``bitbake`` builds against hq: BitBake's fake-recipe layer (lib/bb/tests/runqueue-tests,
recipes a1 ... h1 whose tasks write their names to task.log) built with hash equivalence, once
through hq-gateway with nothing of BitBake changed (``BB_HASHSERVE = "unix://..."``) and once
through meta-hq, hq's client inside BitBake (``BB_HASHSERVE = "tcp://..."`` and ``"ipc://..."``).

Each step asserts the exact tasks that ran. The fake recipes' "sstate" is a task's stamp file in
the build directory, or an entry ``PN:do_TASK:UNIHASH`` of SSTATEVALID (an sstate mirror that
holds that object); their output hash is a function of the recipe and task alone, so a task
that runs again with another taskhash reports the same output and gets the first unihash.
tests/bitbake/classes/hq-test-builds.bbclass does for them what OE-core's sstate code does."""

from __future__ import annotations

import concurrent.futures
import locale
import os
import subprocess
import sys

import pytest

from helpers import REPO, Stack, bitbake_missing
from hq.bench.stack import free_port

pytestmark = pytest.mark.e2e

TASKS = (
    "fetch unpack patch prepare_recipe_sysroot configure compile install package populate_sysroot "
    "package_qa packagedata package_write_ipk package_write_rpm build"
).split()
SETSCENE = "package package_qa packagedata package_write_ipk package_write_rpm populate_sysroot".split()
AFTER_PACKAGE = ("package_qa", "packagedata", "package_write_ipk", "package_write_rpm")
#: Tasks of a1 and b1 that report an output hash (populate_lic is not part of "build").
REPORTS = 2 * len(SETSCENE)


def everything(*recipes) -> list:
    return sorted(f"{pn}:{task}" for pn in recipes for task in TASKS)


#: After ``bitbake a1 -c install -f``: a1:install's taint gives a1:package and a1:populate_sysroot
#: new taskhashes, so they run; each reports its unchanged output and gets its first unihash, so
#: everything after them is the same as before and comes from sstate (BitBake's own
#: test_hashserv_single asserts this list against its own server).
AFTER_FORCED_INSTALL = sorted(
    [
        "a1:populate_sysroot",
        "a1:package",
        "a1:package_write_rpm_setscene",
        "a1:packagedata_setscene",
        "a1:package_write_ipk_setscene",
        "a1:package_qa_setscene",
        "a1:build",
    ]
)
#: A second build directory whose a1:do_install has another signature (HQ_TEST_FLAVOUR), with
#: the first directory's sstate objects as its mirror: a1 builds up to the two tasks after
#: install, which run, report and get the first directory's unihashes; from there everything,
#: b1 included, is the first directory's and comes from sstate. Only b1's first three tasks,
#: which depend on nothing of a1, have run by then: BitBake starts them at once, while b1 still
#: looks new, and what has run stays run.
SECOND_DIRECTORY = sorted(
    [f"a1:{task}" for task in TASKS[:9]]
    + [f"a1:{task}_setscene" for task in AFTER_PACKAGE]
    + ["a1:build", "b1:fetch", "b1:unpack", "b1:patch"]
    + [f"b1:{task}_setscene" for task in AFTER_PACKAGE]
    + ["b1:populate_sysroot_setscene", "b1:build"]
)
#: The same, when a1:populate_sysroot's report reaches BitBake's runqueue before a1:package's
#: (the two run side by side): between the two, b1:populate_sysroot is known and b1:package
#: not yet, so BitBake goes on with b1's next tasks, which need only the first, until the
#: second report brings b1:package from sstate too. Which report comes first, and how many
#: of b1's tasks start meanwhile, is the machine's timing (seen under load, through the
#: gateway and through meta-hq alike), not the server's answers: b1:package never runs.
SECOND_DIRECTORY_EITHER = [
    sorted([*SECOND_DIRECTORY, *(f"b1:{task}" for task in TASKS[3:n])])
    for n in range(3, TASKS.index("package") + 1)  # b1's prepare_recipe_sysroot ... install
]
#: The same build under BitBake's own "auto" server (a new, empty database) with hq as its
#: upstream, after the second directory: the upstream knows the new taskhashes of a1:package
#: and a1:populate_sysroot too (the second directory reported them), so b1 is known from the
#: start and a1:package is not needed at all. a1:populate_sysroot still runs: these recipes'
#: sstate check goes by taskhash, and a1:build needs its output.
THROUGH_A_LOCAL_SERVER = sorted(
    [f"a1:{task}" for task in TASKS[:7]]
    + ["a1:populate_sysroot"]
    + [f"a1:{task}_setscene" for task in AFTER_PACKAGE]
    + ["a1:build"]
    + [f"b1:{task}_setscene" for task in AFTER_PACKAGE]
    + ["b1:populate_sysroot_setscene", "b1:build"]
)


def has_locale() -> bool:
    """BitBake exits at once without the en_US.UTF-8 locale (bb.utils.check_system_locale)."""
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, ("en_US", "UTF-8"))
        return True
    except locale.Error:
        return False
    finally:
        locale.setlocale(locale.LC_CTYPE, saved)


@pytest.fixture(scope="module")
def bitbake_for_builds(bitbake):
    if not has_locale():
        bitbake_missing(
            "real bitbake builds need the en_US.UTF-8 locale "
            "(Debian: apt-get install locales && locale-gen en_US.UTF-8)"
        )
    return bitbake


class BuildDir:
    """One build directory of the fake-recipe layer; ``conf`` goes into a configuration file
    read after bitbake.conf (``bitbake -R``), as a build's local.conf would be."""

    def __init__(self, bitbake: str, path, conf: dict, layers=()):
        self.bitbake = bitbake
        self.path = path
        (path / "conf").mkdir(parents=True)
        self.conf = path / "conf" / "hq.conf"
        lines = [f'{name} = "{value}"' for name, value in conf.items()]
        self.conf.write_text("\n".join([*lines, 'INHERIT += "hq-test-builds"', ""]))
        if layers:
            # LAYERSERIES_CORENAMES stands in for OE-core's, which these recipes do without.
            (path / "conf" / "bblayers.conf").write_text(
                'LAYERSERIES_CORENAMES = "wrynose"\nBBLAYERS = "%s"\n' % " ".join(layers)
            )

    def run(self, *args: str, sstatevalid: str = "") -> list:
        """``bitbake -R hq.conf ARGS``; the sorted tasks that ran."""
        env = dict(os.environ)
        env.update(
            PATH=os.pathsep.join([os.path.dirname(sys.executable), f"{self.bitbake}/bin", env["PATH"]]),
            LANG="en_US.UTF-8",
            LC_ALL="en_US.UTF-8",
            BBPATH=f"{self.bitbake}/lib/bb/tests/runqueue-tests:{REPO}/tests/bitbake",
            TOPDIR=str(self.path),
            SSTATEVALID=sstatevalid,
            BB_ENV_PASSTHROUGH_ADDITIONS="SSTATEVALID TOPDIR",
        )
        run = subprocess.run(
            ["bitbake", "-R", str(self.conf), *args],
            cwd=self.path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        with open(self.path / "bitbake.out", "a") as out:  # every run's output, for a failure
            out.write(f"$ bitbake {' '.join(args)}\n{run.stdout}{run.stderr}")
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
        assert "Error contacting Hash Equivalence Server" not in run.stdout, run.stdout[-6000:]
        log = self.path / "task.log"
        tasks = sorted(log.read_text().split()) if log.exists() else []
        if log.exists():
            log.unlink()
        return tasks

    def sstate(self) -> str:
        """SSTATEVALID naming every sstate object this directory built (the unihash each
        setscene-capable task first ran with): a mirror of this directory's sstate."""
        objects = []
        for stamp in sorted(self.path.glob("*.run")):
            pn, task = stamp.stem.split(":")
            if task in SETSCENE:
                objects.append(f"{pn}:do_{task}:{stamp.read_text().split()[0]}")
        return " ".join(objects)


def outhash_rows(address: str) -> int:
    from hq.client import create_client

    with create_client(address, timeout=10) as client:
        return client.get_db_usage()["outhashes"]["rows"]


def first_build_then_force(build: BuildDir, address: str) -> None:
    """The first build runs and reports everything; forcing a1:do_install, whose output does
    not change, brings everything after it from sstate."""
    assert build.run("a1", "b1") == everything("a1", "b1")
    assert outhash_rows(address) == REPORTS
    assert build.run("a1", "-c", "install", "-f") == ["a1:install"]
    assert build.run("a1", "b1") == AFTER_FORCED_INSTALL
    assert outhash_rows(address) == REPORTS + 2  # a1:package and a1:populate_sysroot, again


def through_the_gateway(bitbake: str, tmp_path) -> None:
    """BB_HASHSERVE = "unix://..." (hq-gateway), nothing of BitBake changed: the first build,
    a forced task, a restart of hq between builds, a second build directory."""
    (tmp_path / "hq").mkdir(parents=True)
    sock = f"unix://{tmp_path}/hashserv.sock"
    bind = f"tcp://127.0.0.1:{free_port()}"
    conf = {"BB_SIGNATURE_HANDLER": "TestEquivHash", "BB_HASHSERVE": sock}
    first = BuildDir(bitbake, tmp_path / "first", conf)
    with Stack(tmp_path / "hq", bind=bind, args=["--oehashequiv", sock]) as stack:
        first_build_then_force(first, stack.address)
    assert "Traceback" not in stack.log()  # the gateway too stopped cleanly, its clients gone

    # hq restarted: what the first directory reported is all there
    with Stack(tmp_path / "hq", bind=bind, args=["--oehashequiv", sock]) as stack:
        assert outhash_rows(stack.address) == REPORTS + 2
        second = BuildDir(bitbake, tmp_path / "second", {**conf, "HQ_TEST_FLAVOUR": "second"})
        assert second.run("a1", "b1", sstatevalid=first.sstate()) in SECOND_DIRECTORY_EITHER


def through_meta_hq(bitbake: str, tmp_path) -> None:
    """BB_HASHSERVE = "tcp://...,ipc://..." (two addresses of one broker, as a list of
    brokers is written) and "ipc://..." with meta-hq in BBLAYERS (no gateway: BitBake's
    own client cannot even parse a tcp:// address): the first build, a second build
    directory; then BitBake's own "auto" server in front of that hq, through a gateway."""
    (tmp_path / "hq").mkdir(parents=True)
    ipc = f"ipc://{tmp_path}/hq.ipc"
    sock = f"unix://{tmp_path}/hashserv.sock"
    layers = [f"{REPO}/meta-hq"]
    also = f"ipc://{tmp_path}/first.ipc"  # a second address: BB_HASHSERVE may list several brokers
    with Stack(tmp_path / "hq", bind="tcp://127.0.0.1:*", args=["--bind", also]) as stack:
        conf = {"BB_SIGNATURE_HANDLER": "TestEquivHash", "BB_HASHSERVE": f"{stack.address},{also}"}
        first = BuildDir(bitbake, tmp_path / "first", conf, layers)
        assert first.run("a1", "b1") == everything("a1", "b1")
        assert outhash_rows(stack.address) == REPORTS
    with Stack(tmp_path / "hq", bind=ipc, args=["--oehashequiv", sock]) as stack:
        conf = {"BB_SIGNATURE_HANDLER": "TestEquivHash", "BB_HASHSERVE": ipc, "HQ_TEST_FLAVOUR": "second"}
        second = BuildDir(bitbake, tmp_path / "second", conf, layers)
        assert second.run("a1", "b1", sstatevalid=first.sstate()) in SECOND_DIRECTORY_EITHER
        assert outhash_rows(stack.address) == REPORTS + 2

        # BitBake's own local server ("auto", a new database) with the gateway as its upstream
        auto = {
            "BB_SIGNATURE_HANDLER": "TestEquivHash",
            "BB_HASHSERVE": "auto",
            "BB_HASHSERVE_UPSTREAM": sock,
            "HQ_TEST_FLAVOUR": "second",
        }
        local = BuildDir(bitbake, tmp_path / "local", auto)
        assert local.run("a1", "b1", sstatevalid=first.sstate()) == THROUGH_A_LOCAL_SERVER


def test_real_builds_through_the_gateway_and_through_meta_hq(bitbake_for_builds, tmp_path):
    """Both ways at once, on their own hq stacks and build directories (a build mostly waits:
    together they take little more than the longer one)."""
    ways = {"gateway": through_the_gateway, "meta-hq": through_meta_hq}
    with concurrent.futures.ThreadPoolExecutor(len(ways)) as pool:
        futures = {name: pool.submit(way, bitbake_for_builds, tmp_path / name) for name, way in ways.items()}
    failed = {name: future.exception() for name, future in futures.items() if future.exception()}
    for name, error in failed.items():
        raise AssertionError(f"through {name}: {error}") from error
