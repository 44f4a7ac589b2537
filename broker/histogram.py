"""Latency histograms with log-spaced buckets: cheap to record, mergeable, differenceable.

Bucket ``i`` holds durations up to ``BOUNDS[i]`` seconds; the bounds grow by 2^(1/4)
(about 19 %) from 8 microseconds to about 70 s, and one last bucket takes the rest. A
percentile is read as the upper bound of the bucket where it falls, so it is at most 19 %
high. Counts only grow: ``reset-stats`` keeps a copy and reports the difference
(:meth:`Histogram.minus`), so the Prometheus endpoint can export them as true counters.
"""

from __future__ import annotations

import math

_STEPS_PER_OCTAVE = 4
_LOWEST = 2.0**-17  # 7.6 us
_N = 23 * _STEPS_PER_OCTAVE + 1  # up to 2^6 s = 64 s, then +Inf
BOUNDS = [_LOWEST * 2.0 ** (i / _STEPS_PER_OCTAVE) for i in range(_N)] + [math.inf]
_SCALE = _STEPS_PER_OCTAVE / math.log(2.0)
_LOG_LOWEST = math.log(_LOWEST)

#: The bounds the Prometheus endpoint exports: every octave from 2^-14 s (61 us) to 32 s.
EXPORT_BOUNDS = [b for i, b in enumerate(BOUNDS[:-1]) if i % _STEPS_PER_OCTAVE == 0 and b >= 2.0**-14 - 1e-12]


def bucket(seconds: float) -> int:
    if seconds <= _LOWEST:
        return 0
    i = math.ceil((math.log(seconds) - _LOG_LOWEST) * _SCALE - 1e-9)
    return i if i < _N else _N


class Histogram:
    __slots__ = ("counts", "count", "sum", "max")

    def __init__(self):
        self.counts = [0] * len(BOUNDS)
        self.count = 0
        self.sum = 0.0
        self.max = 0.0  # since the last reset_max()

    def add(self, seconds: float) -> None:
        self.counts[bucket(seconds)] += 1
        self.count += 1
        self.sum += seconds
        if seconds > self.max:
            self.max = seconds

    def copy(self) -> Histogram:
        h = Histogram()
        h.counts = list(self.counts)
        h.count, h.sum, h.max = self.count, self.sum, self.max
        return h

    def minus(self, base: Histogram | None) -> Histogram:
        """The samples recorded since ``base`` (an earlier copy of this histogram)."""
        if base is None:
            return self
        h = Histogram()
        h.counts = [a - b for a, b in zip(self.counts, base.counts)]
        h.count, h.sum, h.max = self.count - base.count, self.sum - base.sum, self.max
        return h

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the q-quantile (0 when empty; max if beyond)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if n and seen >= rank:
                return min(BOUNDS[i], self.max) if self.max else BOUNDS[i]
        return self.max

    def cumulative(self, bounds=EXPORT_BOUNDS) -> list:
        """[(upper bound, samples <= bound)] for ``bounds``, then (inf, count)."""
        out, seen, i = [], 0, 0
        for bound in bounds:
            while BOUNDS[i] <= bound * (1 + 1e-9):
                seen += self.counts[i]
                i += 1
            out.append((bound, seen))
        out.append((math.inf, self.count))
        return out

    def summary(self) -> dict:
        return {
            "count": self.count,
            "sum_s": self.sum,
            "p50_s": self.quantile(0.50),
            "p90_s": self.quantile(0.90),
            "p99_s": self.quantile(0.99),
            "max_s": self.max,
        }
