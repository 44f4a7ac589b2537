# For hq's real-build tests (tests/e2e/test_bitbake_builds.py), on BitBake's fake recipes
# (lib/bb/tests/runqueue-tests), what OE-core's sstate code does in a real build:
# - The recipes report a task's output hash only when BB_HASHSERVE is set in the task's data,
#   and bitbake-worker sets it there to None for any server but the one "auto" starts. OE-core
#   reports whatever it is, so it is set back here.
# - bitbake-worker runs a task without [network] in a private network namespace, where no TCP
#   address is reachable. OE-core sets [network] on its sstate tasks, the ones that report.
# - HQ_TEST_FLAVOUR goes into a1:do_install's signature only: a build directory with another
#   flavour has other taskhashes for a1 and everything after it, and the same output hashes.

HQ_TEST_FLAVOUR ??= ""
HQ_TEST_REPORTING_TASKS = "package package_qa packagedata package_write_ipk package_write_rpm populate_lic populate_sysroot"

python () {
    d.setVar("BB_HASHSERVE", d.getVar("BB_HASHSERVE") or "external")
    for task in d.getVar("HQ_TEST_REPORTING_TASKS").split():
        d.setVarFlag("do_" + task, "network", "1")
    if d.getVar("PN") == "a1":
        d.appendVarFlag("do_install", "vardeps", " HQ_TEST_FLAVOUR")
}
