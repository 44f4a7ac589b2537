"""README's examples, run as a new user runs them: the quick start's client snippet, then the
hq-admin lines of "Operating hq", against a real hq-server."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import REPO, script, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
ADDRESS = "tcp://127.0.0.1:8686"


def blocks(language: str) -> list:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def admin_lines() -> list:
    """The hq-admin command lines of the first sh block of "Operating hq", comments cut."""
    section = README[README.index("## Operating hq") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].split() for line in block.splitlines() if line.startswith("hq-admin")]


def test_quick_start_snippet_then_the_admin_examples(stack):
    snippet = blocks("python")[0]
    assert ADDRESS in snippet
    env = {**os.environ, "HQ_ADDRESS": stack.address}
    run = subprocess.run(
        [sys.executable, "-c", snippet.replace(ADDRESS, stack.address)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert run.returncode == 0, run.stderr
    assert "'unihash': '" + "3" * 64 in run.stdout and "None]" in run.stdout, run.stdout
    lines = admin_lines()
    assert len(lines) >= 4 and any(words[1] == "get-outhash" for words in lines)
    for words in lines:
        if words[1] == "top":
            words += ["-n", "1", "--interval", "0.1"]  # top refreshes until Ctrl-C
        result = subprocess.run(
            [script("hq-admin"), *words[1:]], capture_output=True, text=True, timeout=30, env=env
        )
        assert result.returncode == 0, f"{shlex.join(words)}: {result.stderr}"
        if words[1] == "get-outhash":
            assert "3" * 64 in result.stdout and "oe.sstatesig.OEOuthashBasic" in result.stdout, result.stdout


def test_the_farm_recipe_of_securing_hq(tmp_path):
    """ "Securing hq": the server line's options, then every hq-admin line, as written."""
    from helpers import Stack

    section = README[README.index("## Securing hq") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    server = next(line for line in block.splitlines() if " hq-server " in line)
    args = shlex.split(server.split("hq-server", 1)[1].split("#")[0])
    assert args == ["--anon-perms", "@read", "--admin-user", "admin"]
    lines = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("hq-admin")]
    assert [words[1:3] for words in lines][:2] == [["user", "add"], ["user", "add"]]
    with Stack(tmp_path, args=args, env={"HQ_ADMIN_PASSWORD": "pw"}) as s:
        env = {
            **os.environ,
            "HQ_ADDRESS": s.address,
            "BB_HASHSERVE_USERNAME": "admin",
            "BB_HASHSERVE_PASSWORD": "pw",
        }
        for words in lines:
            result = subprocess.run(
                [script("hq-admin"), *words[1:]], capture_output=True, text=True, timeout=30, env=env
            )
            assert result.returncode == 0, f"{shlex.join(words)}: {result.stderr}"
        anonymous = {k: v for k, v in env.items() if not k.startswith("BB_HASHSERVE")}
        refused = subprocess.run(
            [script("hq-admin"), "user", "list"], capture_output=True, text=True, timeout=30, env=anonymous
        )
        assert refused.returncode == 1 and "Anonymous user is not allowed" in refused.stderr


def test_the_backup_and_restore_lines_of_operating_hq(stack, tmp_path):
    """ "Backing up and restoring": the backup line while the stack serves, then the restore
    line: what was reported before the backup is served again, what came after is not."""
    from hq.client import create_client

    section = README[README.index("**Backing up and restoring") :]
    lines = re.search(r"```sh\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert len(lines) == 2
    live, backup = "/var/lib/hq/hq.db", "/var/backups/hq-1.db"
    assert all(live in line for line in lines) and all(backup in line for line in lines)

    def run(line):
        line = line.replace(live, stack.db).replace(backup, str(tmp_path / "hq-1.db"))
        result = subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{line}: {result.stderr}"

    before = [("%064x" % i, "%064x" % (i + 1000), "%064x" % (i + 2000)) for i in range(20)]
    after = [("%064x" % i, "%064x" % (i + 1000), "%064x" % (i + 2000)) for i in range(20, 40)]
    with create_client(stack.address, timeout=10) as client:
        for t, o, u in before:
            client.report_unihash(t, "M", o, u)
        run(lines[0])
        for t, o, u in after:
            client.report_unihash(t, "M", o, u)
        run(lines[1])
        keys = [("M", t) for t, _, _ in before + after]
        expected = [u for _, _, u in before] + [None] * len(after)
        wait_for(lambda: client.get_unihash_batch(keys) == expected, 10, 0.05, "the restored file served")
        t, o, u = "%064x" % 99, "%064x" % 1099, "%064x" % 2099
        assert client.report_unihash(t, "M", o, u)["unihash"] == u  # writes go to the restored file
    assert os.path.exists(str(tmp_path / "hq-1.db"))  # the copy is kept
