"""Jobs: what each client process does in its timed loop, and how it checks answers.

Client-side cost. The clients share the 2 cores with the server, so everything they can
do before the release is done in the parent (:mod:`keys`): a client's timed loop holds
only the hq client call, ``time.perf_counter()`` around it, and one C-level list or
string comparison against the precomputed answer (per-item checks run only when that
comparison fails). The burst client also derives each next wave (a concatenation per
item and one ``join`` + sha256 per wave). How this was checked: one client's timed loop
run in-process under cProfile against a real stack (2 workers, ipc), summing the own
time of every frame in ``hq/bench``: burst 2 ms of 12 ms process CPU for 9,000 lookups
(~0.2 µs per item, the client API ~1.1 µs per item, the server ~3.5 µs per item);
single and report under 0.5% of the profiled time. Every run also reports
``client_cpu_s`` next to ``server_cpu_s``: when the clients' CPU rivals the server's,
the machine's cores are the limit, not hq.
"""

from __future__ import annotations

import itertools
import time

from . import keys
from .keys import METHOD

SAMPLES = 5  # wrong answers kept per client, to show what went wrong
WAIT_PHASE_S = 120.0  # fairness: longest wait for the other side of a phase change


def batched_calls(taskhashes: list, expected: list, batch: int) -> list:
    """(get_unihash_batch argument, taskhashes, expected answers) per call of ``batch``."""
    return [
        ([(METHOD, t) for t in taskhashes[i : i + batch]], taskhashes[i : i + batch], expected[i : i + batch])
        for i in range(0, len(taskhashes), batch)
    ]


class Check:
    """Wrong and missing answers of one client, with a few examples."""

    def __init__(self):
        self.wrong = 0
        self.missing = 0
        self.samples: list = []

    def compare(self, taskhashes, got, expected) -> None:
        """The slow path, only after a whole-list comparison failed."""
        if len(got) < len(expected):
            self.missing += len(expected) - len(got)
        for taskhash, value, want in zip(taskhashes, got, expected):
            if value == want:
                continue
            if value is None:
                self.missing += 1
            else:
                self.wrong += 1
            if len(self.samples) < SAMPLES:
                self.samples.append({"key": taskhash, "expected": want, "got": value})

    def result(self, **more) -> dict:
        return {"wrong": self.wrong, "missing": self.missing, "samples": self.samples, **more}


def _failed(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _paced(count: int, interval_s: float):
    """Yield i and the intended send time of request i (open loop); sleeps until then."""
    perf_counter, sleep = time.perf_counter, time.sleep
    start = perf_counter()
    for i in range(count):
        due = start + i * interval_s
        wait = due - perf_counter()
        if wait > 0:
            sleep(wait)
        yield i, due


class BurstJob:
    """One BitBake runqueue: each dependency wave is one get_unihash_batch call; the next
    wave's taskhashes are derived from this wave's answers (see keys.BurstChain)."""

    role = "lookup"

    def __init__(self, chain: keys.BurstChain):
        self.chain = chain

    def setup(self) -> None:
        pass

    def run(self, client, control) -> dict:
        chain, check, progress, index = self.chain, Check(), control.progress, control.index
        get_batch, perf_counter, repeat = client.get_unihash_batch, time.perf_counter, itertools.repeat
        latencies, derailed, unanswered, error, done = [], 0, 0, None, 0
        prefix = chain.prefixes[0]
        for wave, suffixes in enumerate(chain.suffixes):
            taskhashes = [prefix + s for s in suffixes]
            t0 = perf_counter()
            try:
                got = get_batch(zip(repeat(METHOD), taskhashes))
            except (ConnectionError, OSError) as exc:
                error = _failed(exc)
                unanswered = chain.items - done
                break
            latencies.append(perf_counter() - t0)
            if prefix != chain.prefixes[wave]:
                derailed += len(taskhashes)  # asked the wrong questions: every answer is void
            elif got != chain.expected[wave]:
                check.compare(taskhashes, got, chain.expected[wave])
            prefix = keys.wave_prefix("".join([u or t for u, t in zip(got, taskhashes)]))
            done += len(taskhashes)
            progress[index] = done
        return check.result(
            items=done,
            calls=len(latencies),
            latencies=latencies,
            derailed=derailed,
            unanswered=unanswered,
            error=error,
            finished=perf_counter(),
        )


class LookupJob:
    """Closed-loop lookups, one call in flight: single get_unihash calls (batch 1) or
    get_unihash_batch calls of ``batch`` items; with ``interval_s``, open loop at that pace
    and latency counted from each call's intended send time (no coordinated omission)."""

    role = "lookup"

    def __init__(self, taskhashes: list, expected: list, batch: int = 1, interval_s: float = 0.0):
        self.taskhashes = taskhashes
        self.expected = expected
        self.batch = batch
        self.interval_s = interval_s

    def setup(self) -> None:
        if self.batch > 1:
            self.calls = batched_calls(self.taskhashes, self.expected, self.batch)

    def run(self, client, control) -> dict:
        return self.measure(client, control, 0)

    def measure(self, client, control, progress_base: int) -> dict:
        check, progress, index, perf_counter = Check(), control.progress, control.index, time.perf_counter
        latencies, error, items = [], None, 0
        append = latencies.append
        try:
            if self.batch == 1:
                get, taskhashes, expected = client.get_unihash, self.taskhashes, self.expected
                if self.interval_s:
                    for i, due in _paced(len(taskhashes), self.interval_s):
                        got = get(METHOD, taskhashes[i])
                        append(perf_counter() - due)
                        if got != expected[i]:
                            check.compare([taskhashes[i]], [got], [expected[i]])
                        items = i + 1
                        progress[index] = progress_base + items
                else:
                    for i, taskhash in enumerate(taskhashes):
                        t0 = perf_counter()
                        got = get(METHOD, taskhash)
                        append(perf_counter() - t0)
                        if got != expected[i]:
                            check.compare([taskhash], [got], [expected[i]])
                        if not i & 63:
                            progress[index] = progress_base + i
                    items = len(taskhashes)
            else:
                get_batch = client.get_unihash_batch
                pacing = _paced(len(self.calls), self.interval_s) if self.interval_s else None
                for pairs, taskhashes, expected in self.calls:
                    due = next(pacing)[1] if pacing else perf_counter()
                    got = get_batch(pairs)
                    append(perf_counter() - due)
                    if got != expected:
                        check.compare(taskhashes, got, expected)
                    items += len(pairs)
                    progress[index] = progress_base + items
        except (ConnectionError, OSError) as exc:
            error = _failed(exc)
            items = len(latencies) * self.batch
        progress[index] = progress_base + items
        return check.result(
            items=items,
            calls=len(latencies),
            latencies=latencies,
            unanswered=len(self.taskhashes) - items,
            error=error,
            finished=perf_counter(),
        )


class ReportJob:
    """New reports, one in flight; each answer must be the expected unihash (§7.2)."""

    role = "report"

    def __init__(self, plan: keys.ReportPlan):
        self.plan = plan

    def setup(self) -> None:
        pass

    def run(self, client, control) -> dict:
        check, progress, index, perf_counter = Check(), control.progress, control.index, time.perf_counter
        report = client.report_unihash
        latencies, error, n = [], None, 0
        append = latencies.append
        try:
            for n, (taskhash, outhash, unihash, expected) in enumerate(self.plan.reports, 1):
                t0 = perf_counter()
                got = report(taskhash, METHOD, outhash, unihash)["unihash"]
                append(perf_counter() - t0)
                if got != expected:
                    check.compare([taskhash], [got], [expected])
                if not n & 15:
                    progress[index] = n
        except (ConnectionError, OSError) as exc:
            error = _failed(exc)
            n -= 1
        progress[index] = n
        return check.result(
            items=n,
            calls=len(latencies),
            latencies=latencies,
            unanswered=len(self.plan.reports) - n,
            error=error,
            finished=perf_counter(),
        )


class LightJob(LookupJob):
    """Fairness: paced single lookups unloaded, then again while the greedy client runs."""

    role = "light"

    def __init__(self, taskhashes, expected, requests: int, interval_s: float):
        super().__init__(taskhashes, expected, 1, interval_s)
        self.requests = requests

    def run(self, client, control) -> dict:
        n = self.requests
        everything = (self.taskhashes, self.expected)
        self.taskhashes, self.expected = everything[0][:n], everything[1][:n]
        unloaded = self.measure(client, control, 0)
        control.post("unloaded-done")
        if not control.events["loaded"].wait(WAIT_PHASE_S):
            unloaded["error"] = unloaded["error"] or "greedy client never started"
            return {**unloaded, "loaded_latencies": []}
        self.taskhashes, self.expected = everything[0][n:], everything[1][n:]
        loaded = self.measure(client, control, n)
        return {
            "items": unloaded["items"] + loaded["items"],
            "calls": unloaded["calls"] + loaded["calls"],
            "latencies": unloaded["latencies"],
            "loaded_latencies": loaded["latencies"],
            "wrong": unloaded["wrong"] + loaded["wrong"],
            "missing": unloaded["missing"] + loaded["missing"],
            "samples": unloaded["samples"] + loaded["samples"],
            "unanswered": unloaded["unanswered"] + loaded["unanswered"],
            "error": unloaded["error"] or loaded["error"],
            "finished": loaded["finished"],
        }


class GreedyJob:
    """Fairness: back-to-back ``batch``-hash get_unihash_batch calls from the "load" event
    until the "stop" event; sets "loaded" once its first batch is answered."""

    role = "greedy"

    def __init__(self, taskhashes: list, expected: list, batch: int):
        self.taskhashes = taskhashes
        self.expected = expected
        self.batch = batch

    def setup(self) -> None:
        self.calls = batched_calls(self.taskhashes, self.expected, self.batch)

    def run(self, client, control) -> dict:
        check, perf_counter = Check(), time.perf_counter
        events = control.events
        latencies, error, items = [], None, 0
        if not events["load"].wait(WAIT_PHASE_S):
            return check.result(
                items=0, calls=0, latencies=[], unanswered=0, error="never loaded", finished=perf_counter()
            )
        get_batch, stop = client.get_unihash_batch, events["stop"]
        loaded_at = perf_counter()
        try:
            for pairs, taskhashes, expected in itertools.cycle(self.calls):
                t0 = perf_counter()
                got = get_batch(pairs)
                latencies.append(perf_counter() - t0)
                if got != expected:
                    check.compare(taskhashes, got, expected)
                items += len(pairs)
                if len(latencies) == 1:
                    events["loaded"].set()
                if stop.is_set():
                    break
        except (ConnectionError, OSError) as exc:
            error = _failed(exc)
            events["loaded"].set()
        return check.result(
            items=items,
            calls=len(latencies),
            latencies=latencies,
            unanswered=0,
            error=error,
            loaded_at=loaded_at,
            finished=perf_counter(),
        )
