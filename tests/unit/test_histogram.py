"""Log-bucketed latency histograms: quantiles within one bucket, exportable cumulative counts."""

import math
import random

import pytest

from hq.broker.histogram import BOUNDS, EXPORT_BOUNDS, Histogram, bucket


def test_bucket_bounds_hold_their_values():
    rng = random.Random(1)
    for _ in range(5000):
        x = 10 ** rng.uniform(-6, 2)
        i = bucket(x)
        assert x <= BOUNDS[i] * (1 + 1e-9)
        assert i == 0 or x > BOUNDS[i - 1] * (1 - 1e-9)
    assert bucket(1e9) == len(BOUNDS) - 1 and BOUNDS[-1] == math.inf


def test_quantiles_are_within_one_bucket_of_the_exact_value():
    rng = random.Random(2)
    values = sorted(rng.lognormvariate(-7, 1.0) for _ in range(20000))
    h = Histogram()
    for v in values:
        h.add(v)
    for q in (0.5, 0.9, 0.99):
        exact = values[math.ceil(q * len(values)) - 1]
        assert exact <= h.quantile(q) <= exact * 2**0.25 * (1 + 1e-9), q
    assert h.quantile(1.0) == pytest.approx(values[-1])
    assert h.count == len(values) and h.sum == pytest.approx(sum(values))


def test_minus_gives_the_samples_since_a_copy():
    h = Histogram()
    for v in (0.001, 0.002):
        h.add(v)
    base = h.copy()
    h.max = 0.0
    for v in (0.5, 0.6, 0.7):
        h.add(v)
    d = h.minus(base)
    assert d.count == 3 and d.sum == pytest.approx(1.8) and d.max == pytest.approx(0.7)
    assert d.quantile(0.5) >= 0.5  # the old, fast samples are gone
    assert Histogram().summary()["p99_s"] == 0.0


def test_cumulative_export_is_monotonic_and_ends_with_the_count():
    h = Histogram()
    for v in (0.00005, 0.001, 0.001, 0.03, 5.0, 100.0):
        h.add(v)
    cum = h.cumulative()
    assert [b for b, _ in cum[:-1]] == EXPORT_BOUNDS
    counts = [n for _, n in cum]
    assert counts == sorted(counts) and cum[-1] == (math.inf, 6)
    assert dict(cum)[2.0**-9] == 3  # <= 1.95 ms: 50 us and the two 1 ms samples
