"""Deterministic hashes and expected answers, computed once in the parent process.

Everything a client process needs is built here before the clients fork, so the clients
spend their time in the hq client API, not in making up data. Every figure is a function
of ``--seed``: the same options give the same keys, rows and answers on every repeat.

A *known* key is one the database holds before the stack starts: key ``k`` is known when
``int(k[-8:], 16) < hit_ratio * 2**32``, a deterministic function of the hash itself.
"""

from __future__ import annotations

import hashlib
import random

METHOD = "bench.do_task"


def rng(seed: int, *purpose) -> random.Random:
    """An independent random stream per (seed, purpose...): str seeds are hashed (sha512)."""
    return random.Random(":".join(map(str, (seed, *purpose))))


def hexes(r: random.Random, n: int, bits: int = 256) -> list:
    width = bits // 4
    return [f"{r.getrandbits(bits):0{width}x}" for _ in range(n)]


def is_known(taskhash: str, hit_ratio: float) -> bool:
    return int(taskhash[-8:], 16) < hit_ratio * 2**32


def wave_prefix(answers_joined: str) -> str:
    """The taskhash prefix of the next wave: sha256 over all answers of this wave.

    BitBake hashes each task's dependencies' unihashes into its taskhash; here a wave's
    tasks all depend on the whole previous wave (one sha256 per wave keeps the client's
    own cost per item near zero, measured 0.8 us per item for a sha256 per task on this
    machine). A single wrong answer changes every taskhash of every later wave.
    """
    return hashlib.sha256(answers_joined.encode("ascii")).hexdigest()[:32]


class Rows:
    """Rows to pre-populate: (taskhash, outhash, unihash) per known key."""

    def __init__(self):
        self.rows: list = []

    def add(self, taskhash: str, outhash: str, unihash: str) -> None:
        self.rows.append((taskhash, outhash, unihash))

    def __len__(self) -> int:
        return len(self.rows)


def lookup_keys(r: random.Random, n: int, hit_ratio: float, rows: Rows) -> tuple:
    """``n`` fresh taskhashes and the answer for each (unihash if known, else None);
    the known ones are added to ``rows``."""
    taskhashes = hexes(r, n)
    unihashes = hexes(r, n)
    outhashes = hexes(r, n)
    expected = []
    for taskhash, unihash, outhash in zip(taskhashes, unihashes, outhashes):
        if is_known(taskhash, hit_ratio):
            rows.add(taskhash, outhash, unihash)
            expected.append(unihash)
        else:
            expected.append(None)
    return taskhashes, expected


class BurstChain:
    """One client's tasks in dependency waves, and the answers each wave must get.

    Wave 0's taskhashes are ``prefix0 + suffix``; wave k+1's are
    ``wave_prefix(answers of wave k) + suffix``, where an answer is the unihash if the
    server has one, else the taskhash (BitBake's fallback). The client derives each wave
    from the answers it really got; ``prefixes`` are what it should derive.
    """

    def __init__(self, seed: int, client: int, tasks: int, waves: int, hit_ratio: float, rows: Rows):
        r = rng(seed, "burst", client)
        sizes = [tasks // waves + (1 if w < tasks % waves else 0) for w in range(waves)]
        self.suffixes = [hexes(r, size, 128) for size in sizes]
        self.prefixes = []
        self.expected = []
        prefix = f"{r.getrandbits(128):032x}"
        for suffixes in self.suffixes:
            self.prefixes.append(prefix)
            answers = []
            expected = []
            for suffix in suffixes:
                taskhash = prefix + suffix
                if is_known(taskhash, hit_ratio):
                    unihash = f"{r.getrandbits(256):064x}"
                    rows.add(taskhash, f"{r.getrandbits(256):064x}", unihash)
                    answers.append(unihash)
                    expected.append(unihash)
                else:
                    answers.append(taskhash)
                    expected.append(None)
            self.expected.append(expected)
            prefix = wave_prefix("".join(answers))

    @property
    def items(self) -> int:
        return sum(len(s) for s in self.suffixes)


class ReportPlan:
    """One client's new reports: (taskhash, outhash, unihash, expected unihash).

    With probability ``equiv`` a report reuses the outhash of the same client's previous
    report (which is acknowledged, hence committed, before this one is sent); the server
    must then answer with the unihash of the first report of that outhash (§7.2), not the
    submitted one. Every other report is answered with its own unihash.
    """

    def __init__(self, seed: int, client: int, n: int, equiv: float):
        r = rng(seed, "report", client)
        self.reports = []
        first_unihash: dict = {}
        previous_outhash = None
        for taskhash, outhash, unihash in zip(hexes(r, n), hexes(r, n), hexes(r, n)):
            if previous_outhash is not None and r.random() < equiv:
                outhash = previous_outhash
            expected = first_unihash.setdefault(outhash, unihash)
            self.reports.append((taskhash, outhash, unihash, expected))
            previous_outhash = outhash

    @property
    def equivalent(self) -> int:
        return sum(1 for _, _, unihash, expected in self.reports if unihash != expected)
