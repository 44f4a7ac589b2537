"""Database administration through a real hq-server and the real hq-admin console script: the
collection a farm admin runs (mark what the sstate cache holds, sweep, clean unused reports),
lookups of single tasks, JSON output and exit codes."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import script
from hq.client import InvokeError, create_client

pytestmark = pytest.mark.timeout(120)

M = "TestMethod"


def taskhash(i: int) -> str:
    return "%040x" % (0x5EED0000 + i)


def outhash(i: int) -> str:
    return "%064x" % (0x0A7000 + i)


def unihash(i: int) -> str:
    return "%064x" % (0xC0FFEE000 + i)


def admin(stack, *args, stdin: str = "", timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run hq-admin against the stack (an explicit --address in ``args`` wins)."""
    address = [] if "--address" in args else ["--address", stack.address]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HQ_")}
    return subprocess.run(
        [script("hq-admin"), *args, *address],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def admin_json(stack, *args, stdin: str = "", code: int = 0):
    result = admin(stack, *args, "--format", "json", stdin=stdin)
    assert result.returncode == code, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_sstate_driven_collection(stack):
    """20 tasks reported, 10 of them still in the "sstate cache": mark, sweep, clean."""
    with create_client(stack.address, timeout=10) as c:
        for i in range(20):
            assert c.report_unihash(taskhash(i), M, outhash(i), unihash(i))["unihash"] == unihash(i)
        c.report_unihash_equiv(taskhash(100), M, unihash(0))  # a second mapping of unihash 0

    assert admin_json(stack, "gc-status") == {"keep": 21, "remove": 0, "mark": None}
    usage = admin_json(stack, "db-usage")
    assert usage["unihashes"] == {"rows": 21} and usage["outhashes"] == {"rows": 20}
    assert set(admin_json(stack, "query-columns")) >= {
        "method",
        "taskhash",
        "unihash",
        "gc_mark",
        "outhash",
        "created",
    }

    # The cache holds unihashes 0-7 (bare lines), 8 as hashclient's "unihash U" and 9 as JSON.
    lines = [unihash(i) for i in range(8)] + [
        f"unihash {unihash(8)}",
        json.dumps({"unihash": unihash(9)}),
        "",
    ]
    lines.append("f" * 64)  # not in the database: matches nothing
    marked = admin_json(stack, "gc-mark-stream", "alive", stdin="\n".join(lines) + "\n")
    assert marked == {"mark": "alive", "rows": 11, "count": 11}  # unihash 0 has two mappings
    assert admin_json(stack, "gc-status") == {"keep": 11, "remove": 10, "mark": "alive"}

    # Without --yes: shows the dry-run count, deletes nothing, exits 1.
    result = admin(stack, "gc-sweep", "alive")
    assert result.returncode == 1, result.stderr
    assert "would delete" in result.stdout and "10" in result.stdout and "--yes" in result.stderr
    assert admin_json(stack, "gc-sweep", "alive", "--dry-run") == {
        "command": "gc-sweep",
        "mark": "alive",
        "count": 10,
        "dry_run": True,
        "done": False,
    }
    assert admin_json(stack, "gc-status") == {"keep": 11, "remove": 10, "mark": "alive"}

    # A mark that is not the current one is refused.
    result = admin(stack, "gc-sweep", "dead", "--yes")
    assert result.returncode == 1
    assert "'dead' is not the current mark. Refusing to sweep" in result.stderr

    swept = admin_json(stack, "gc-sweep", "alive", "--yes")
    assert (swept["count"], swept["done"]) == (10, True)
    assert admin_json(stack, "gc-status")["mark"] is None
    with create_client(stack.address, timeout=10) as c:
        assert c.get_unihash_batch([(M, taskhash(i)) for i in (0, 9, 10, 19, 100)]) == [
            unihash(0),
            unihash(9),
            None,
            None,
            unihash(0),
        ]

    # The 10 reports whose mappings went are young: an age of an hour keeps them.
    assert admin_json(stack, "clean-unused", "--max-age", "1h", "--yes")["count"] == 0
    assert admin(stack, "clean-unused", "--max-age", "0").returncode == 1  # no --yes
    assert admin_json(stack, "db-usage")["outhashes"] == {"rows": 20}
    assert admin_json(stack, "clean-unused", "--max-age", "0", "--yes")["count"] == 10
    usage = admin_json(stack, "db-usage")
    assert usage["unihashes"] == {"rows": 11} and usage["outhashes"] == {"rows": 10}


def test_lookups_and_remove(stack):
    with create_client(stack.address, timeout=10) as c:
        c.report_unihash(taskhash(1), M, outhash(1), unihash(1), {"PN": "zlib", "task": "do_install"})
        c.report_unihash(taskhash(2), M, outhash(1), unihash(2))  # equivalent to task 1
        c.report_unihash_equiv(taskhash(3), M, unihash(3))  # a mapping without a report

    row = admin_json(stack, "get", M, taskhash(1))
    assert (row["taskhash"], row["outhash"], row["unihash"], row["PN"], row["task"], row["gc_mark"]) == (
        taskhash(1),
        outhash(1),
        unihash(1),
        "zlib",
        "do_install",
        "",
    )
    assert admin_json(stack, "get", M, taskhash(3)) == {
        "taskhash": taskhash(3),
        "method": M,
        "unihash": unihash(3),
    }
    table = admin(stack, "get", M, taskhash(2))
    assert table.returncode == 0 and unihash(1) in table.stdout and "created" in table.stdout
    missing = admin(stack, "get", M, taskhash(9))
    assert missing.returncode == 1 and missing.stdout == "" and taskhash(9) in missing.stderr
    assert admin_json(stack, "get", "OtherMethod", taskhash(1), code=1) is None

    row = admin_json(stack, "get-outhash", M, outhash(1))
    assert (row["taskhash"], row["unihash"]) == (taskhash(1), unihash(1))
    assert admin_json(stack, "get-outhash", M, outhash(1), taskhash(2))["taskhash"] == taskhash(1)
    assert admin(stack, "get-outhash", M, outhash(9)).returncode == 1

    # remove: a column typo is a usage error (the server would ignore it and widen the match).
    result = admin(stack, "remove", "--where", f"method={M}", "--where", f"taskhsh={taskhash(1)}", "--yes")
    assert result.returncode == 2 and "taskhsh" in result.stderr
    assert admin(stack, "remove", "--yes").returncode == 2  # no --where at all
    assert admin(stack, "remove", "--where", "method").returncode == 2  # not COLUMN=VALUE

    preview = admin(stack, "remove", "--where", f"taskhash={taskhash(1)}")
    assert preview.returncode == 1 and "would delete" in preview.stdout
    assert admin_json(stack, "get", M, taskhash(1))["unihash"] == unihash(1)
    assert admin_json(stack, "remove", "--where", f"taskhash={taskhash(1)}", "--dry-run")["count"] == 2
    done = admin_json(
        stack, "remove", "--where", f"taskhash={taskhash(1)}", "--where", f"method={M}", "--yes"
    )
    assert (done["count"], done["where"]) == (2, {"taskhash": taskhash(1), "method": M})
    assert admin(stack, "get", M, taskhash(1)).returncode == 1
    assert admin_json(stack, "get", M, taskhash(2))["unihash"] == unihash(1)

    assert admin_json(stack, "gc-mark", "m1", "--where", f"unihash={unihash(1)}") == {
        "mark": "m1",
        "where": {"unihash": unihash(1)},
        "count": 1,
    }
    assert admin_json(stack, "gc-status") == {"keep": 1, "remove": 1, "mark": "m1"}


def test_usage_errors_and_unreachable_server(stack):
    assert admin(stack, "clean-unused", "--max-age", "soon").returncode == 2
    assert admin(stack, "clean-unused").returncode == 2
    bad = admin(stack, "gc-mark-stream", "alive", stdin=f"{unihash(1)}\nnot a row\n")
    assert bad.returncode == 2 and "line 2" in bad.stderr
    bad = admin(stack, "gc-mark-stream", "alive", stdin='{"unihash": 5}\n')
    assert bad.returncode == 2 and "line 1" in bad.stderr
    result = admin(stack, "db-usage", "--address", "tcp://127.0.0.1:1", "--timeout", "0.5")
    assert result.returncode == 3 and "cannot reach" in result.stderr
    # A refusal is not "unreachable": the server answered (here 413, a mark over 256 bytes).
    result = admin(stack, "gc-mark", "m" * 300, "--where", f"unihash={unihash(1)}")
    assert result.returncode == 1 and "refused" in result.stderr and "TOO_LARGE" in result.stderr
    # The common options may come before the subcommand too.
    result = subprocess.run(
        [script("hq-admin"), "--address", stack.address, "--format", "json", "gc-status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and set(json.loads(result.stdout)) == {"keep", "remove", "mark"}


def test_client_api_shapes(stack):
    """BitBake's client names and return shapes; gc_mark_stream in many chunks and requests."""
    with create_client(stack.address, timeout=10, chunk_items=100, request_items=300) as c:
        for i in range(50):
            c.report_unihash_equiv(taskhash(i), M, unihash(i % 25))
        rows = [{"unihash": unihash(i)} for i in range(25)] * 40  # 1000 rows: 10 chunks, 4 requests
        assert c.gc_mark_stream("alive", iter(rows)) == {"count": 2000}
        assert c.gc_mark_stream("alive", [f"unihash {unihash(0)} method {M}"]) == {"count": 2}
        assert c.gc_mark_stream("alive", []) == {"count": 0}
        assert c.gc_status() == {"keep": 50, "remove": 0, "mark": "alive"}
        assert c.gc_mark("next", {"taskhash": taskhash(0), "method": M}) == {"count": 1}
        assert c.gc_sweep("next", dry_run=True) == {"count": 49}
        with pytest.raises(InvokeError, match="Refusing to sweep"):
            c.gc_sweep("alive")
        assert c.gc_sweep("next") == {"count": 49}
        assert c.remove({"taskhash": taskhash(0)}, dry_run=True) == {"count": 1}
        assert c.remove({"taskhash": taskhash(0)}) == {"count": 1}
        assert c.clean_unused(0) == {"count": 0}
        usage = c.get_db_usage()
        assert usage["unihashes"] == {"rows": 0} and set(usage) == {
            "methods",
            "unihashes",
            "outhashes",
            "users",
            "config",
        }
        columns = c.get_db_query_columns()
        for column in columns:
            assert c.remove({column: ""}) == {"count": 0}
        with pytest.raises(TypeError):
            c.remove([("taskhash", taskhash(0))])
        with pytest.raises(ValueError):
            c.clean_unused(-1)
