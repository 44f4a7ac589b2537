"""README's examples, run as a new user runs them: the quick start's client snippet, then the
hq-admin lines of "Operating hq", against a real hq-server."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import REPO, script

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
