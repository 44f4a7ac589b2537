"""PROTOCOL.md and hq.protocol must agree; the packing benchmark must run.

Each check is a function that returns a list of problems, so the tests below can also show
that the checks catch drift (a command, status, limit or version missing from the text).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hq import protocol as p

SPEC_PATH = Path(__file__).resolve().parents[2] / "PROTOCOL.md"
LIMIT_NAMES = sorted(name for name in vars(p) if name.startswith("MAX_"))
WORKER_MESSAGES = (p.READY, p.HEARTBEAT, p.REQUEST, p.REPLY, p.DISCONNECT)
TINY_BENCH = "--items 10 --repeats 1 --batches 2 --json"


@pytest.fixture(scope="module")
def spec() -> str:
    return SPEC_PATH.read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    """The body of the ``## N. title`` section (up to the next ``## ``)."""
    match = re.search(rf"^## (?:\d+\. )?{re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    return match.group(1) if match else ""


def table_rows(text: str) -> list:
    """Cells of every markdown table row, header and separator rows excluded."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|") or re.fullmatch(r"\|[\s|:-]*\|", line):
            continue
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[1:] if rows else rows  # drop the header


# --- the checks ---------------------------------------------------------------------------


def missing_commands(text: str) -> list:
    return sorted(c.decode() for c in p.CLIENT_COMMANDS if f"`{c.decode()}`" not in text)


def status_table_problems(text: str) -> list:
    rows = table_rows(section(text, "Status codes"))
    table = {}
    for cells in rows:
        if cells and cells[0].isdigit():
            table[int(cells[0])] = cells
    problems = []
    for code, name in p.STATUS_NAMES.items():
        cells = table.get(code)
        if cells is None:
            problems.append(f"status {code} {name} not in the status table")
            continue
        if cells[1].strip("`") != name:
            problems.append(f"status {code} is named {cells[1]!r}, protocol says {name}")
        if code != p.OK:
            retryable = cells[2].lower() == "yes"
            if retryable != (code in p.RETRYABLE_STATUSES):
                problems.append(f"status {code}: retryable column says {cells[2]!r}")
    for code in table.keys() - p.STATUS_NAMES.keys():
        problems.append(f"status table lists {code}, which hq.protocol does not define")
    return problems


def limit_problems(text: str) -> list:
    rows = {}
    for cells in table_rows(section(text, "Limits")):
        rows[cells[0].strip("`")] = " | ".join(cells[1:])
    problems = []
    for name in LIMIT_NAMES:
        value = getattr(p, name)
        row = rows.get(name)
        if row is None:
            problems.append(f"{name} has no row in the limits table")
        elif not re.search(rf"(?<![\d.]){value}(?![\d.])", row):
            problems.append(f"{name} row does not state its value {value}")
    return problems


def missing_worker_messages(text: str) -> list:
    names = [m.decode() for m in WORKER_MESSAGES] + [p.CLIENT_PROTOCOL.decode(), p.WORKER_PROTOCOL.decode()]
    return [name for name in names if f"`{name}`" not in text]


def title_problems(text: str) -> list:
    title = next((line for line in text.splitlines() if line.startswith("# ")), "")
    if not re.search(rf"(?<![\d.]){re.escape(p.SPEC_VERSION)}(?![\d.])", title):
        return [f"title {title!r} does not carry spec version {p.SPEC_VERSION}"]
    return []


CHECKS = [missing_commands, status_table_problems, limit_problems, missing_worker_messages, title_problems]


# --- the spec agrees with the code ---------------------------------------------------------


def test_every_command_is_a_code_span(spec):
    assert len(p.CLIENT_COMMANDS) == 27
    assert missing_commands(spec) == []


def test_status_table_matches_protocol(spec):
    assert status_table_problems(spec) == []


def test_every_limit_and_its_value_is_in_the_limits_table(spec):
    assert len(LIMIT_NAMES) >= 11
    assert limit_problems(spec) == []


def test_worker_messages_and_protocol_ids_appear(spec):
    assert missing_worker_messages(spec) == []


def test_title_carries_the_spec_version(spec):
    assert title_problems(spec) == []


def test_spec_names_the_row_keys_and_extra_fields(spec):
    row = section(spec, "Client protocol (HQC01)")
    keys = ["id", "method", "taskhash", "outhash", "created", *p.REPORT_EXTRA_FIELDS, "unihash", "gc_mark"]
    assert [k for k in keys if f"`{k}`" not in row] == []


def test_spec_has_the_sections_the_style_guide_asks_for(spec):
    titles = ("Known weaknesses", "Status codes", "Limits", "Broker behaviour", "Client behaviour", "Packing")
    for title in titles:
        assert section(spec, title).strip(), f"PROTOCOL.md has no section {title!r}"


# --- the checks catch drift ----------------------------------------------------------------


@pytest.mark.parametrize(
    "old, new, check",
    [
        ("`reset-stats`", "reset stats", missing_commands),
        ("| 503 | UNAVAILABLE | yes |", "| 503 | UNAVAILABLE | no |", status_table_problems),
        ("| 429 | BUSY |", "| 430 | BUSY |", status_table_problems),
        ("| 65536 |", "| 65535 |", limit_problems),
        ("`HEARTBEAT`", "HEARTBEAT", missing_worker_messages),
    ],
)
def test_checks_detect_drift(spec, old, new, check):
    assert old in spec
    assert check(spec) == []
    assert check(spec.replace(old, new)) != []


def test_title_check_detects_a_stale_version(spec):
    title = next(line for line in spec.splitlines() if line.startswith("# "))
    assert title_problems(spec.replace(title, title.replace(p.SPEC_VERSION, p.SPEC_VERSION + ".1"))) != []


# --- the packing benchmark runs ------------------------------------------------------------


def test_bench_packing_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "hq.bench.packing", *TINY_BENCH.split(), str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(b)" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["configuration"]["items"] == 10
    assert {"platform", "cpu_count_logical", "python", "pyzmq", "libzmq"} <= doc["machine"].keys()
    assert set(doc["results"]) == {"a", "b", "c"}
    for result in doc["results"].values():
        us = result["us_per_1000_hashes"]
        assert 0 < us["min"] <= us["median"] <= us["max"]
    assert doc["results"]["b"]["median_ratio_to_b"] == pytest.approx(1.0)
    assert doc["results"]["a"]["request_body_frames"] == 10
    assert doc["results"]["b"]["request_body_frames"] == doc["results"]["c"]["request_body_frames"] == 1
