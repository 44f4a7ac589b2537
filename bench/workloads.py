"""The workloads: which jobs run, what they need pre-populated, and what each reports.

Each workload builds its client jobs (:mod:`jobs`) and the known rows from ``--seed`` in
the parent, once for all repeats; :meth:`Workload.metrics` turns the clients' results
into the figures of one repeat (the runner adds server CPU, RSS and database size).
"""

from __future__ import annotations

from typing import ClassVar

from . import keys
from .jobs import BurstJob, GreedyJob, LightJob, LookupJob, ReportJob
from .metrics import latency_ms


def _role_figures(results: list, released_at: float, unit: str, latency_prefix: str = "latency") -> dict:
    items = sum(r["items"] for r in results)
    wall = max(r["finished"] for r in results) - released_at if results else float("nan")
    latencies = [x for r in results for x in r["latencies"]]
    return {
        f"{unit}_per_s": items / wall if wall > 0 else float("nan"),
        **latency_ms(latencies, latency_prefix),
        "_items": items,
        "_wall_s": wall,
    }


class Workload:
    """Base: a workload builds its jobs and known rows, and turns results into metrics."""

    name = ""
    events: tuple = ()
    key_metrics: tuple = ()
    #: metric -> (operator, value): the issue's targets, shown next to the figures.
    targets: ClassVar[dict] = {}

    def __init__(self, opts):
        self.opts = opts
        self.rows = keys.Rows()
        self.jobs: list = []

    def batch(self) -> int:
        return getattr(self.opts, "batch", 1)

    def total_items(self) -> int:
        raise NotImplementedError

    def drive(self, pool, deadline: float, tick) -> dict:
        pool.release()
        return pool.wait_for("result", range(len(self.jobs)), deadline, tick)

    def metrics(self, results: list, released_at: float) -> tuple:
        """(metrics, items): the figures of one repeat and the item count for CPU per item."""
        raise NotImplementedError


class Burst(Workload):
    name = "burst"
    key_metrics = ("wall_s", "lookups_per_s")
    targets: ClassVar[dict] = {"wall_s": ("<=", 1.0), "rss_mb_total": ("<=", 122.0), "bad_answers": ("<=", 0)}

    def __init__(self, opts):
        super().__init__(opts)
        if opts.waves < 1 or opts.tasks < opts.waves:
            raise ValueError("--tasks must be at least --waves, and --waves at least 1")
        # With --configs N, client c builds configuration c % N: clients of one configuration
        # ask the same taskhashes in the same waves, as builders of one machine/distro do.
        configs = getattr(opts, "configs", 0) or opts.clients
        chains = [
            keys.BurstChain(opts.seed, c, opts.tasks, opts.waves, opts.hit_ratio, self.rows)
            for c in range(min(configs, opts.clients))
        ]
        self.jobs = [BurstJob(chains[c % len(chains)]) for c in range(opts.clients)]

    def batch(self) -> int:
        return self.opts.tasks // self.opts.waves

    def title(self) -> str:
        o = self.opts
        shared = f", {o.configs} configurations shared by the clients" if getattr(o, "configs", 0) else ""
        return (
            f"burst: {o.clients} clients x {o.tasks} tasks in {o.waves} waves of ~{self.batch()} "
            f"(one get_unihash_batch per wave), hit ratio {o.hit_ratio:g}{shared}"
        )

    def total_items(self) -> int:
        return self.opts.clients * self.opts.tasks

    def metrics(self, results, released_at):
        figures = _role_figures(results, released_at, "lookups")
        items, wall = figures.pop("_items"), figures.pop("_wall_s")
        return {"wall_s": wall, "lookups": items, **figures}, items


class Single(Workload):
    name = "single"
    key_metrics = ("lookups_per_s", "latency_p99_ms")
    targets: ClassVar[dict] = {
        "lookups_per_s": (">=", 30000.0),
        "rss_mb_total": ("<=", 122.0),
        "bad_answers": ("<=", 0),
    }

    def __init__(self, opts):
        super().__init__(opts)
        interval = 1.0 / opts.rate if opts.rate else 0.0
        distinct = min(getattr(opts, "keys", 0) or opts.requests, opts.requests)
        for c in range(opts.clients):
            taskhashes, expected = keys.lookup_keys(
                keys.rng(opts.seed, "single", c), distinct, opts.hit_ratio, self.rows
            )
            # --keys K: each client asks its K keys in turn until it has made --requests calls.
            rounds = -(-opts.requests // distinct)
            taskhashes = (taskhashes * rounds)[: opts.requests]
            expected = (expected * rounds)[: opts.requests]
            self.jobs.append(LookupJob(taskhashes, expected, opts.batch, interval))

    def title(self) -> str:
        o = self.opts
        what = "get_unihash" if o.batch == 1 else f"get_unihash_batch of {o.batch}"
        pace = (
            f", open loop at {o.rate:g} calls/s per client"
            if o.rate
            else ", closed loop (one in flight each)"
        )
        repeat = f", each client's {o.keys} keys in turn" if getattr(o, "keys", 0) else ""
        return (
            f"single: {o.clients} clients x {o.requests} lookups by {what}{pace}, "
            f"hit ratio {o.hit_ratio:g}{repeat}"
        )

    def total_items(self) -> int:
        return self.opts.clients * self.opts.requests

    def metrics(self, results, released_at):
        figures = _role_figures(results, released_at, "lookups")
        items, wall = figures.pop("_items"), figures.pop("_wall_s")
        return {"wall_s": wall, "lookups": items, **figures}, items


class Report(Workload):
    name = "report"
    key_metrics = ("reports_per_s", "db_bytes_per_row")
    targets: ClassVar[dict] = {
        "reports_per_s": (">=", 8000.0),
        "db_bytes_per_row": ("<=", 300.0),
        "rss_mb_total": ("<=", 122.0),
        "bad_answers": ("<=", 0),
    }

    def __init__(self, opts):
        super().__init__(opts)
        self.jobs = [
            ReportJob(keys.ReportPlan(opts.seed, c, opts.requests, opts.equiv)) for c in range(opts.clients)
        ]

    def title(self) -> str:
        o = self.opts
        equivalent = sum(job.plan.equivalent for job in self.jobs)
        return (
            f"report: {o.clients} clients x {o.requests} new reports, one in flight each "
            f"({equivalent} share an earlier report's outhash)"
        )

    def total_items(self) -> int:
        return self.opts.clients * self.opts.requests

    def metrics(self, results, released_at):
        figures = _role_figures(results, released_at, "reports")
        items, wall = figures.pop("_items"), figures.pop("_wall_s")
        return {"wall_s": wall, "reports": items, **figures}, items


class Mixed(Workload):
    name = "mixed"
    key_metrics = ("lookups_per_s", "reports_per_s")
    targets: ClassVar[dict] = {"bad_answers": ("<=", 0)}

    def __init__(self, opts):
        super().__init__(opts)
        if opts.waves < 1 or opts.tasks < opts.waves:
            raise ValueError("--tasks must be at least --waves, and --waves at least 1")
        self.jobs = [
            BurstJob(keys.BurstChain(opts.seed, c, opts.tasks, opts.waves, opts.hit_ratio, self.rows))
            for c in range(opts.clients)
        ]
        self.jobs += [
            ReportJob(keys.ReportPlan(opts.seed, c, opts.reports, opts.equiv)) for c in range(opts.reporters)
        ]

    def batch(self) -> int:
        return self.opts.tasks // self.opts.waves

    def title(self) -> str:
        o = self.opts
        return (
            f"mixed: {o.clients} burst clients x {o.tasks} tasks in {o.waves} waves, while "
            f"{o.reporters} clients x {o.reports} new reports"
        )

    def total_items(self) -> int:
        o = self.opts
        return o.clients * o.tasks + o.reporters * o.reports

    def metrics(self, results, released_at):
        lookups = [r for job, r in zip(self.jobs, results) if job.role == "lookup"]
        reports = [r for job, r in zip(self.jobs, results) if job.role == "report"]
        lf = _role_figures(lookups, released_at, "lookups", "lookup_latency")
        rf = _role_figures(reports, released_at, "reports", "report_latency")
        wall = max(lf.pop("_wall_s"), rf.pop("_wall_s"))
        items = lf.pop("_items") + rf.pop("_items")
        return {"wall_s": wall, **lf, **rf}, items


class Fairness(Workload):
    name = "fairness"
    events = ("load", "loaded", "stop")
    key_metrics = ("p99_ratio", "loaded_p99_ms")
    targets: ClassVar[dict] = {"p99_ratio": ("<=", 3.0), "bad_answers": ("<=", 0)}

    def __init__(self, opts):
        super().__init__(opts)
        interval = opts.interval_ms / 1000.0
        for c in range(opts.clients):
            taskhashes, expected = keys.lookup_keys(
                keys.rng(opts.seed, "light", c), 2 * opts.requests, opts.hit_ratio, self.rows
            )
            self.jobs.append(LightJob(taskhashes, expected, opts.requests, interval))
        # The greedy client cycles over 10 distinct batches.
        taskhashes, expected = keys.lookup_keys(
            keys.rng(opts.seed, "greedy"), 10 * opts.batch, opts.hit_ratio, self.rows
        )
        self.jobs.append(GreedyJob(taskhashes, expected, opts.batch))

    def title(self) -> str:
        o = self.opts
        return (
            f"fairness: {o.clients} light clients, one get_unihash per {o.interval_ms:g} ms "
            f"({o.requests} unloaded, then {o.requests} while 1 greedy client sends back-to-back "
            f"{o.batch}-hash batches)"
        )

    def total_items(self) -> int:
        return 2 * self.opts.clients * self.opts.requests

    def drive(self, pool, deadline, tick):
        lights = range(len(self.jobs) - 1)
        greedy = len(self.jobs) - 1
        pool.release()
        pool.wait_for("unloaded-done", lights, deadline, tick)
        pool.events["load"].set()
        results = pool.wait_for("result", lights, deadline, tick)
        pool.events["stop"].set()
        results.update(pool.wait_for("result", [greedy], deadline, tick))
        return results

    def metrics(self, results, released_at):
        lights, greedy = results[:-1], results[-1]
        unloaded = latency_ms([x for r in lights for x in r["latencies"]], "unloaded")
        loaded = latency_ms([x for r in lights for x in r["loaded_latencies"]], "loaded")
        ratio = (
            loaded["loaded_p99_ms"] / unloaded["unloaded_p99_ms"]
            if unloaded["unloaded_p99_ms"]
            else float("nan")
        )
        greedy_s = greedy["finished"] - greedy.get("loaded_at", greedy["finished"])
        items = sum(r["items"] for r in results)
        return {
            "p99_ratio": ratio,
            **unloaded,
            **loaded,
            "greedy_lookups_per_s": greedy["items"] / greedy_s if greedy_s > 0 else float("nan"),
            "greedy_batch_p99_ms": latency_ms(greedy["latencies"])["latency_p99_ms"],
            "wall_s": max(r["finished"] for r in results) - released_at,
        }, items


WORKLOADS = {w.name: w for w in (Burst, Single, Report, Mixed, Fairness)}
