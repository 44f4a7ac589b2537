"""Per-client job queues shared fairly: start-time fair queuing, weighted by items.

Each client has a FIFO of jobs. A job gets a *start tag*: the later of the queue's virtual
time and the finish tag (start + items) of the client's previous queued job. The job with
the smallest start tag goes next (ties in arrival order), and the virtual time becomes its
start tag. So every client with work gets the workers in proportion to items, whatever its
batch sizes:

* a client's single lookup arriving behind another client's 10,000-hash batch gets the
  virtual time as its tag, lower than every queued chunk of the batch but the next: it
  waits at most for the chunks already running;
* a client that comes back with its next wave does not jump ahead of clients whose
  waves have waited longer (their tags are older), so none starves.

Only each client's head job is in the heap; entries made stale by a purge or a requeue
are skipped when they surface.
"""

from __future__ import annotations

import heapq
from collections import deque


class FairQueue:
    def __init__(self):
        self.queues: dict = {}  # client_id -> deque[Job]
        self.heap: list = []  # (start, seq, client_id, job): a head job of each queue
        self.vtime = 0
        self.length = 0  # queued jobs, all clients
        self._seq = 0

    def __len__(self) -> int:
        return self.length

    def client_length(self, client_id) -> int:
        queue = self.queues.get(client_id)
        return len(queue) if queue else 0

    def _push_head(self, client_id) -> None:
        queue = self.queues.get(client_id)
        if queue:
            job = queue[0]
            self._seq += 1
            heapq.heappush(self.heap, (job.start, self._seq, client_id, job))

    def push(self, client_id, jobs: list) -> None:
        """Queue a request's jobs at the back of its client's queue."""
        queue = self.queues.get(client_id)
        if queue:
            last = queue[-1]
            start = max(self.vtime, last.start + last.items)
        else:
            queue = self.queues[client_id] = deque()
            start = self.vtime
        was_empty = not queue
        for job in jobs:
            job.start = start
            start += job.items
            queue.append(job)
        self.length += len(jobs)
        if was_empty:
            self._push_head(client_id)

    def push_front(self, job) -> None:
        """Put a job back at the head of its client's queue (its worker was lost)."""
        client_id = job.request.client_id
        queue = self.queues.get(client_id)
        if queue is None:
            queue = self.queues[client_id] = deque()
        queue.appendleft(job)
        self.length += 1
        self._push_head(client_id)  # the old head's entry goes stale

    def _valid(self, entry) -> bool:
        queue = self.queues.get(entry[2])
        return bool(queue) and queue[0] is entry[3]

    def _pop(self, client_id):
        queue = self.queues[client_id]
        job = queue.popleft()
        if not queue:
            del self.queues[client_id]
        self.length -= 1
        return job

    def take(self, mergeable=None, limit: int = 0, eligible=None) -> list:
        """The next job by start tag that is ``eligible`` (default: any), plus (if
        ``mergeable(first, other)``) the next jobs in tag order, of any client (the same
        client's next one too: a gateway's many connections share one client), while they
        are mergeable and the batch stays within ``limit`` items. Heads passed over keep
        their tags, so they go first once eligible. Empty list when no eligible job is
        queued."""
        heap = self.heap
        batch: list = []
        budget = 0
        passed: list = []
        while heap:
            entry = heap[0]
            if not self._valid(entry):
                heapq.heappop(heap)
                continue
            job = entry[3]
            if batch:
                if mergeable is None or not mergeable(batch[0], job) or job.items > budget:
                    break
                budget -= job.items
            elif eligible is not None and not eligible(job):
                passed.append(heapq.heappop(heap))
                continue
            else:
                budget = limit - job.items
            heapq.heappop(heap)
            batch.append(self._pop(entry[2]))
            self._push_head(entry[2])  # its next job, in tag order with the others
            if mergeable is None:
                break
        for entry in passed:
            heapq.heappush(heap, entry)
        if batch:
            self.vtime = max(self.vtime, batch[0].start)
        return batch

    def purge(self, request, keep=None) -> list:
        """Drop every queued job of ``request`` except those ``keep(job)`` is true for;
        return the jobs dropped."""
        client_id = request.client_id
        queue = self.queues.get(client_id)
        if not queue:
            return []
        kept = deque(job for job in queue if job.request is not request or (keep is not None and keep(job)))
        dropped = [job for job in queue if job.request is request and not (keep is not None and keep(job))]
        self.length -= len(dropped)
        if kept:
            head_changed = kept[0] is not queue[0]
            self.queues[client_id] = kept
            if head_changed:
                self._push_head(client_id)
        else:
            del self.queues[client_id]
        return dropped
