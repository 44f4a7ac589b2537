"""The broker's mapping cache (broker/cache.py): exact under any interleaving.

The property test drives a real :class:`Scheduler` whose workers are real
:class:`Handlers` over one real SQLite file, and lets hypothesis choose the interleaving:
lookups, reports, report-equivs, removes, gc mark and sweep, clean-unused, workers running
the jobs they hold at any later moment, workers restarted (their jobs re-dispatched),
workers that are expired while holding an admin write and run it afterwards (a frozen
process waking up), and broker restarts. After every step, every cached mapping must be
the database's; and every lookup's answer must be a value its key's mapping had at some
moment between the lookup's arrival and its reply, which is what a server without the
cache guarantees.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hq import options
from hq import protocol as p
from hq.broker.cache import MappingCache
from hq.broker.scheduler import Scheduler
from hq.workers.handlers import Handlers
from hq.workers.schema import open_database
from hq.workers.store import Store

M = b"TestMethod"
KEYS = ["%064x" % (0xA0 + i) for i in range(4)]
UNIHASHES = ["%064x" % (0xB0 + i) for i in range(4)]
OUTHASHES = ["%064x" % (0xC0 + i) for i in range(2)]
EXAMPLES = int(os.environ.get("HQ_FUZZ_EXAMPLES", "600")) // 2 or 1


# --- MappingCache alone ----------------------------------------------------------------------
def test_answers_only_when_every_item_is_known():
    cache = MappingCache(10)
    cache.learn(0, 0, M, b"t1\nt2\nt3", b"u1\n\nu3")
    assert cache.answer(M, b"t1") == b"u1"
    assert cache.answer(M, b"t1\nt3") == b"u1\nu3"
    assert cache.answer(M, b"t2") == b""  # a known miss
    assert cache.answer(M, b"t1\nt2") == b"u1\n"
    assert cache.answer(M, b"t1\nt4") is None
    assert cache.answer(b"other", b"t1") is None
    assert cache.hits == 6


def test_an_answer_from_before_an_invalidation_is_not_learned():
    cache = MappingCache(10)
    epoch = cache.epoch
    cache.invalidate()
    cache.learn(epoch, 0, M, b"t1", b"u1")
    assert cache.answer(M, b"t1") is None
    cache.learn(cache.epoch, 0, M, b"t1", b"u1")
    assert cache.answer(M, b"t1") == b"u1"


def test_an_insert_voids_misses_but_not_mappings():
    cache = MappingCache(10)
    cache.learn(0, 0, M, b"t1\nt2", b"u1\n")
    cache.inserting([(M, b"t2"), (M, b"t1")])
    assert cache.answer(M, b"t2") is None  # the report may create it: ask a worker
    assert cache.answer(M, b"t1") == b"u1"  # a mapping never changes
    cache.learn(0, 0, M, b"t3\nt4", b"\nu4")  # read before that insert: its miss is void
    assert cache.answer(M, b"t3") is None and cache.answer(M, b"t4") == b"u4"
    cache.learn(0, -1, M, b"t5", b"")  # an insert was in flight at dispatch
    assert cache.answer(M, b"t5") is None
    cache.learn(0, cache.inserts, M, b"t5", b"")
    assert cache.answer(M, b"t5") == b""


def test_memory_is_bounded_oldest_first():
    cache = MappingCache(3)
    for i in range(5):
        cache.learn(0, 0, M, b"t%d" % i, b"u%d" % i)
    assert list(cache.entries) == [M + b"\nt2", M + b"\nt3", M + b"\nt4"]
    # A bigger cache drops its oldest eighth at once, and never holds more than its bound.
    big = MappingCache(16)
    for i in range(40):
        big.learn(0, 0, M, b"t%d" % i, b"u%d" % i)
        assert len(big.entries) <= 16
        assert big.answer(M, b"t%d" % i) == b"u%d" % i  # the newest is always kept
    assert list(big.entries) == [M + b"\nt%d" % i for i in range(24, 40)]
    assert big.answer(M, b"t23") is None
    off = MappingCache(0)
    off.learn(0, 0, M, b"t", b"u")
    assert not off.entries


# --- the scheduler with the cache, step by step ----------------------------------------------
class Sim:
    """A broker (Scheduler) with workers that run their jobs when told to, on one database."""

    def __init__(self, path: str, seeded: bool = False):
        self.db = open_database(path)
        self.handlers = Handlers(Store(self.db))
        if seeded:  # mappings from before this broker: lookups find something at once
            for i in (0, 1):
                body = [M, KEYS[i].encode(), UNIHASHES[i].encode()]
                self.handlers.handle_jobs(p.REPORT_EQUIV, b"", [(b"seed", body)])
        self.peek = sqlite3.connect(path)
        self.sched = None
        self.held: dict = {}  # worker id -> REQUEST frames it holds, not run yet
        self.outbox: dict = {}  # worker id -> replies it has made (committed), not delivered yet
        self.zombies: list = []  # (worker id, REQUEST frames) of workers the broker expired
        self.requests: dict = {}  # request id -> (key index, step of arrival)
        self.answers: list = []  # (key index, answer, step of arrival, step of reply)
        self.history: list = []  # per step: {key index: unihash or None}
        self.next_id = 0
        self.now = 0.0
        self.workers = [b"w0", b"w1"]
        self.generation = 0
        self.start_broker()

    # the database as it is
    def mappings(self) -> dict:
        rows = self.peek.execute("SELECT taskhash, unihash FROM unihashes").fetchall()
        found = {bytes(t).hex(): bytes(u).hex() for t, u in rows}
        return {i: found.get(k) for i, k in enumerate(KEYS)}

    def start_broker(self):
        settings = options.namespace(options.BROKER, cache_entries=3, merge_items=4)
        self.sched = Scheduler(settings, now=self.now)
        self.held = {}
        self.outbox = {}
        self.requests = {}  # the old broker's requests are gone (their clients would resend)
        self.generation += 1
        self.workers = [b"w0-%d" % self.generation, b"w1-%d" % self.generation]
        for worker in self.workers:
            self.register(worker)

    def register(self, worker: bytes):
        self.sched.on_worker([worker, *p.encode_ready({"name": worker.decode(), "pid": 1})], self.now)
        self.route()

    def route(self):
        """Move the broker's outboxes: REQUESTs to the workers' hands, replies to clients."""
        for frames in self.sched.to_workers:
            worker, rest = frames[0], frames[1:]
            if rest[1] == p.REQUEST and worker in self.workers:
                self.held.setdefault(worker, []).append(rest)
        self.sched.to_workers.clear()
        for frames in self.sched.to_clients:
            reply = p.decode_reply(frames[1:])
            entry = self.requests.pop(reply.request_id, None)
            if entry is None or reply.status != p.OK:
                continue
            if len(reply.body) == 1 and entry[0] is not None:  # a lookup
                (answer,) = p.unpack_unihashes(reply.body[0], 1)
                self.answers.append((entry[0], answer, entry[1], len(self.history)))
        self.sched.to_clients.clear()

    def client(self, command: bytes, body: list, key=None):
        self.next_id += 1
        request_id = b"%x" % self.next_id
        self.requests[request_id] = (key, len(self.history) - 1)  # the state it arrived in
        self.sched.on_client([b"client", *p.encode_request(request_id, command, body)], self.now)
        self.route()

    def execute(self, frames: list) -> list:
        """Run a REQUEST on the database (reads and commits happen now); its REPLY frames."""
        _, (command, credentials, jobs) = p.decode_broker_message(frames)
        return p.encode_results(self.handlers.handle_jobs(command, credentials, jobs))

    def deliver(self, worker: bytes, reply: list):
        self.sched.on_worker([worker, *reply], self.now)
        self.route()

    def run(self, frames: list, worker: bytes):
        self.deliver(worker, self.execute(frames))

    # the steps hypothesis chooses from
    def step(self, action):
        kind, a, b = action
        if kind == "lookup":
            self.client(p.GET, [M, KEYS[a].encode()], key=a)
        elif kind == "report":
            body = [M, KEYS[a].encode(), OUTHASHES[b % 2].encode(), UNIHASHES[a].encode()]
            self.client(p.REPORT, body)
        elif kind == "report-equiv":
            self.client(p.REPORT_EQUIV, [M, KEYS[a].encode(), UNIHASHES[b].encode()])
        elif kind == "remove":
            self.client(p.REMOVE, [p.encode_json({"taskhash": KEYS[a]})])
        elif kind == "gc-mark":
            self.client(p.GC_MARK, [b"mark%d" % b, p.encode_json({"taskhash": KEYS[a]})])
        elif kind == "gc-sweep":
            self.client(p.GC_SWEEP, [b"mark%d" % b])
        elif kind == "clean-unused":
            self.client(p.CLEAN_UNUSED, [b"0"])
        elif kind == "run":  # a worker runs the oldest REQUEST it holds; the reply waits
            worker = self.workers[a % 2]
            if self.held.get(worker):
                self.outbox.setdefault(worker, []).append(self.execute(self.held[worker].pop(0)))
        elif kind == "deliver":  # ... until its reply reaches the broker
            worker = self.workers[a % 2]
            if self.outbox.get(worker):
                self.deliver(worker, self.outbox[worker].pop(0))
        elif kind == "restart-worker":  # it dies: what it held is re-dispatched elsewhere
            worker = self.workers[a % 2]
            self.held.pop(worker, None)
            self.outbox.pop(worker, None)  # done, maybe committed, never answered
            self.sched.on_worker([worker, *p.DISCONNECT_MESSAGE], self.now)
            self.route()
            self.register(worker)
        elif kind == "freeze-worker":  # expired while frozen; it runs what it held later
            worker = self.workers[a % 2]
            self.zombies += [(worker, frames) for frames in self.held.pop(worker, [])]
            self.outbox.pop(worker, None)
            self.now += 10.0  # past every expiry; the other worker must not expire with it
            other = self.workers[1 - a % 2]
            self.sched.on_worker([other, *p.HEARTBEAT_MESSAGE], self.now - 0.1)
            self.sched.tick(self.now)
            self.route()
            self.register(worker)  # its process comes back as a new registration
            self.workers[a % 2] = worker
        elif kind == "zombie" and self.zombies:  # the frozen one wakes: commits, then replies
            worker, frames = self.zombies.pop(0)
            self.run(frames, worker + b"-old")
        elif kind == "restart-broker":
            self.start_broker()

    def check(self):
        state = self.mappings()
        self.history.append(state)
        for key, unihash in self.sched.cache.entries.items():
            method, _, taskhash = key.rpartition(b"\n")
            assert method == M
            cached = unihash.decode() or None  # b"": a cached miss
            assert state[KEYS.index(taskhash.decode())] == cached, "a cached answer is stale"


#: Weighted by repetition: the common steps often, the rare ones (restarts) now and then.
KINDS = (
    ["lookup"] * 4
    + ["run"] * 5
    + ["deliver"] * 5
    + ["report-equiv"] * 2
    + ["remove"] * 2
    + ["report", "gc-mark", "gc-sweep", "clean-unused"]
    + ["restart-worker", "freeze-worker", "zombie", "restart-broker"]
)
ACTIONS = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, 1),  # two keys and two workers: collisions are what find races
    st.integers(0, 3),
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.booleans(), st.lists(ACTIONS, min_size=1, max_size=80))
def test_answers_equal_a_cacheless_servers_under_any_interleaving(seeded, actions):
    directory = tempfile.mkdtemp(prefix="hq-cache-")
    sim = Sim(os.path.join(directory, "hq.db"), seeded)
    try:
        sim.check()
        for action in actions:
            sim.step(action)
            sim.check()
        # Let the workers finish everything, then a lookup of every key must be right.
        for _ in range(200):
            waiting = [w for w in sim.workers if sim.outbox.get(w)]
            if waiting:
                sim.deliver(waiting[0], sim.outbox[waiting[0]].pop(0))
            else:
                busy = [w for w in sim.workers if sim.held.get(w)]
                if not busy:
                    break
                sim.run(sim.held[busy[0]].pop(0), busy[0])
            sim.check()
        for answer_key, answer, arrived, replied in sim.answers:
            seen = {sim.history[i][answer_key] for i in range(arrived, replied + 1)}
            assert answer in seen, (answer_key, answer, seen)
    finally:
        sim.db.close()
        sim.peek.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_a_repeated_lookup_is_answered_by_the_broker(tmp_path):
    sim = Sim(str(tmp_path / "hq.db"))
    sim.check()
    sim.step(("report-equiv", 0, 0))
    for worker in sim.workers:
        while sim.held.get(worker):
            sim.run(sim.held[worker].pop(0), worker)
    sim.step(("lookup", 0, 0))
    for worker in sim.workers:
        while sim.held.get(worker):
            sim.run(sim.held[worker].pop(0), worker)
    assert sim.answers[-1][1] == UNIHASHES[0]
    sim.step(("lookup", 0, 0))  # now no worker is asked
    assert not any(sim.held.values())
    assert sim.answers[-1][1] == UNIHASHES[0]
    assert sim.sched.counters["cache.hits"] == 1
    # An admin write empties the cache as soon as it is dispatched.
    sim.step(("remove", 0, 0))
    assert not sim.sched.cache.entries
    sim.step(("lookup", 0, 0))
    assert sim.sched.counters["cache.hits"] == 1


def play(tmp_path, steps) -> Sim:
    sim = Sim(str(tmp_path / "hq.db"))
    sim.check()
    for step in steps:
        sim.step(step)
        sim.check()
    return sim


SETUP = [("report-equiv", 0, 0), ("run", 0, 0), ("deliver", 0, 0), ("run", 1, 0), ("deliver", 1, 0)]


# The races the property test is there for, spelled out (each fails if its guard is removed).
def test_a_lookup_read_before_a_delete_and_answered_after_is_not_learned(tmp_path):
    sim = play(tmp_path, SETUP + [("lookup", 0, 0), ("run", 0, 0), ("run", 1, 0)])  # read: found
    delete = [("remove", 0, 0), ("run", 0, 0), ("run", 1, 0)]
    sim = _continue(sim, [*delete, ("deliver", 0, 0), ("deliver", 1, 0)])
    assert sim.answers[-1][1] == UNIHASHES[0] and not sim.sched.cache.entries


def test_nothing_is_learned_while_an_admin_write_is_in_flight(tmp_path):
    sim = play(tmp_path, SETUP + [("remove", 0, 0), ("lookup", 0, 0)])
    # One worker holds the remove, the other the lookup: the lookup reads first.
    order = sorted(sim.workers, key=lambda w: sim.held[w][0][2] != b"get")
    steps = [("run", sim.workers.index(order[0]), 0), ("deliver", sim.workers.index(order[0]), 0)]
    sim = _continue(sim, steps + [("run", sim.workers.index(order[1]), 0)])  # the delete commits
    assert sim.answers[-1][1] == UNIHASHES[0] and not sim.sched.cache.entries


def test_a_frozen_workers_late_delete_empties_the_cache(tmp_path):
    sim = play(tmp_path, SETUP + [("remove", 0, 0)])
    holder = next(i for i, w in enumerate(sim.workers) if sim.held.get(w))
    sim = _continue(sim, [("freeze-worker", holder, 0)])  # expired; its remove is re-dispatched
    for _ in range(4):
        sim = _continue(sim, [("run", 0, 0), ("deliver", 0, 0), ("run", 1, 0), ("deliver", 1, 0)])
    sim = _continue(sim, [("report-equiv", 0, 0)])
    for _ in range(2):
        sim = _continue(sim, [("run", 0, 0), ("deliver", 0, 0), ("run", 1, 0), ("deliver", 1, 0)])
    sim = _continue(sim, [("lookup", 0, 0)])
    for _ in range(2):
        sim = _continue(sim, [("run", 0, 0), ("deliver", 0, 0), ("run", 1, 0), ("deliver", 1, 0)])
    assert sim.sched.cache.entries, "the lookup after the re-report was learned"
    sim = _continue(sim, [("zombie", 0, 0)])  # wakes, deletes the mapping again, replies late
    assert not sim.sched.cache.entries


def _continue(sim: Sim, steps) -> Sim:
    for step in steps:
        sim.step(step)
        sim.check()
    return sim


def _drain(sim: Sim) -> Sim:
    for _ in range(20):
        sim = _continue(sim, [("run", 0, 0), ("deliver", 0, 0), ("run", 1, 0), ("deliver", 1, 0)])
    return sim


def test_a_miss_read_before_a_report_and_answered_after_is_not_learned(tmp_path):
    sim = play(tmp_path, [("lookup", 1, 0)])
    reader = next(i for i, w in enumerate(sim.workers) if sim.held.get(w))
    sim = _continue(sim, [("run", reader, 0), ("report-equiv", 1, 1)])  # read: a miss
    writer = next(i for i, w in enumerate(sim.workers) if sim.held.get(w))
    sim = _continue(sim, [("run", writer, 0), ("deliver", writer, 0), ("deliver", reader, 0)])
    assert sim.answers[-1][1] is None
    assert not sim.sched.cache.entries  # the miss was read before the report: void


def test_no_miss_is_learned_while_a_report_is_in_flight(tmp_path):
    sim = play(tmp_path, [("report-equiv", 1, 1), ("lookup", 1, 0)])
    reader = next(i for i, w in enumerate(sim.workers) if sim.held.get(w) and sim.held[w][0][2] == b"get")
    sim = _continue(sim, [("run", reader, 0), ("deliver", reader, 0)])  # reads before the report runs
    assert sim.answers[-1][1] is None and not sim.sched.cache.entries
    sim = _drain(sim)
    assert sim.mappings()[1] == UNIHASHES[1]


def test_a_cached_miss_goes_when_its_key_is_reported(tmp_path):
    sim = _drain(play(tmp_path, [("lookup", 1, 0)]))
    assert sim.sched.cache.entries == {M + b"\n" + KEYS[1].encode(): b""}
    sim = _continue(sim, [("lookup", 1, 0)])
    assert sim.sched.counters["cache.hits"] == 1 and sim.answers[-1][1] is None
    sim = _continue(sim, [("report-equiv", 1, 2)])  # dispatched: the miss is dropped at once
    assert not sim.sched.cache.entries
    sim = _drain(_continue(_drain(sim), [("lookup", 1, 0)]))
    assert sim.answers[-1][1] == UNIHASHES[2]


def _beat(sim: Sim, index: int, db_id: str) -> None:
    worker = sim.workers[index]
    sim.sched.on_worker([worker, *p.encode_heartbeat({"db": {"id": db_id}})], sim.now)
    sim.route()


def test_a_database_file_replaced_under_the_workers_empties_the_cache(tmp_path):
    """Workers report which file they answer from (Store.identity) in their heartbeats. When
    one changes, the cache forgets everything, and it learns nothing until all agree again."""
    sim = play(tmp_path, SETUP)
    _beat(sim, 0, "A")
    _beat(sim, 1, "A")
    sim = _drain(_continue(sim, [("lookup", 0, 0)]))
    assert sim.sched.cache.entries and sim.sched.same_db
    _beat(sim, 0, "B")  # worker 0 reopened a new file at the path; worker 1 has not noticed
    assert not sim.sched.cache.entries and not sim.sched.same_db
    sim = _drain(_continue(sim, [("lookup", 0, 0), ("lookup", 1, 0)]))
    assert not sim.sched.cache.entries  # answers from either file: none is learned
    _beat(sim, 1, "B")
    assert sim.sched.same_db
    sim = _drain(_continue(sim, [("lookup", 0, 0)]))
    assert sim.sched.cache.entries
