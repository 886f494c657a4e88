"""Bootstrap intervals (aisp_bench.report.stats) against bootstrap distributions enumerated by hand.

Each example is small enough that every equally likely resample can be listed
(itertools.product over the indices drawn), which gives the exact bootstrap distribution;
the module's Monte Carlo resampling must match it, and its percentile interval must be
the exact distribution's quantiles.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from aisp_bench.report import stats


def exact_pmf(values: list[float]) -> dict[float, float]:
    """The distribution of equally likely outcomes, rounded so that equal means merge."""
    c = Counter(round(v, 9) for v in values)
    return {v: k / len(values) for v, k in sorted(c.items())}


def exact_quantile(pmf: dict[float, float], q: float, margin: float = 0.005) -> float:
    """The smallest atom whose CDF reaches q; asserts that no CDF step lies within ``margin``
    of q (with 100,000 resamples a CDF estimate has a standard error of at most 0.0016, about
    0.0005 near q = 0.025: Monte Carlo noise cannot move the quantile to a neighbouring atom)."""
    cdf = 0.0
    for v, p in pmf.items():
        assert abs(cdf - q) > margin and abs(cdf + p - q) > margin, "example too close to a CDF step"
        cdf += p
        if cdf >= q:
            return v
    raise AssertionError("unreachable")


def assert_matches(dist: np.ndarray, pmf: dict[float, float], tol: float = 0.015) -> None:
    got = exact_pmf(list(dist))
    assert set(got) <= set(pmf)
    for v, p in pmf.items():
        assert got.get(v, 0.0) == pytest.approx(p, abs=tol), v


def test_cluster_bootstrap_of_one_seed_is_binomial():
    # five prompts, differences 0,0,0,0,1: the resampled mean is Binomial(5, 1/5) / 5
    d = [0.0, 0.0, 0.0, 0.0, 1.0]
    pmf = exact_pmf([sum(d[i] for i in idx) / 5 for idx in itertools.product(range(5), repeat=5)])
    assert pmf == pytest.approx({k / 5: math.comb(5, k) * 0.2**k * 0.8 ** (5 - k) for k in range(6)})
    dist = stats.cluster_distribution(np.array(d), np.ones(5), resamples=20_000, seed=1)
    assert_matches(dist, pmf)
    iv = stats.cluster_bootstrap(np.array(d), np.ones(5), resamples=20_000, seed=1)
    assert iv.mean == pytest.approx(0.2) and iv.n == 5
    assert (iv.lo, iv.hi) == pytest.approx((exact_quantile(pmf, 0.025), exact_quantile(pmf, 0.975)))
    assert (iv.lo, iv.hi) == pytest.approx((0.0, 0.6))


def test_clusters_of_unequal_size_are_weighted_by_their_values():
    # prompt A: one seed with difference 1; prompt B: two seeds, differences 1 and 3 (sum 4)
    sums, counts = np.array([1.0, 4.0]), np.array([1.0, 2.0])
    draws = itertools.product(range(2), repeat=2)
    pmf = exact_pmf([sums[list(i)].sum() / counts[list(i)].sum() for i in draws])
    assert pmf == pytest.approx({1.0: 0.25, round(5 / 3, 9): 0.5, 2.0: 0.25})
    assert_matches(stats.cluster_distribution(sums, counts, resamples=20_000, seed=3), pmf)
    iv = stats.cluster_bootstrap(sums, counts, resamples=20_000, seed=3)
    assert iv.mean == pytest.approx(5 / 3) and (iv.lo, iv.hi) == (1.0, 2.0)


def test_paired_differences_resample_prompts_not_prompt_seed_pairs():
    rng = np.random.default_rng(0)
    diff = rng.normal(0.5, 1.0, size=40)
    a1 = {0: {str(i): float(x) + 2 for i, x in enumerate(diff)}}
    b1 = {0: {str(i): 2.0 for i in range(40)}}
    one_seed = stats.paired_difference(a1, b1, resamples=4000, seed=5)
    # a second seed repeating every prompt's difference adds no information: same interval
    a2, b2 = {**a1, 1: dict(a1[0])}, {**b1, 1: dict(b1[0])}
    ids, sums, counts = stats.paired_clusters(a2, b2)
    assert len(ids) == 40 and (counts == 2).all()
    two_seeds = stats.paired_difference(a2, b2, resamples=4000, seed=5)
    assert (two_seeds.mean, two_seeds.lo, two_seeds.hi) == pytest.approx((one_seed.mean, one_seed.lo, one_seed.hi))
    assert two_seeds.mean == pytest.approx(diff.mean())
    # resampling the 80 (prompt, seed) pairs independently would be narrower, wrongly
    naive = stats.cluster_bootstrap(np.concatenate([diff, diff]), np.ones(80), resamples=4000, seed=5)
    assert (two_seeds.hi - two_seeds.lo) > 1.25 * (naive.hi - naive.lo)
    # only pairs both methods have count; a missing or NaN value drops that pair only
    b2[1]["3"] = math.nan
    del a2[0]["4"]
    _, sums, counts = stats.paired_clusters(a2, b2)
    assert counts.sum() == 78 and sums.sum() == pytest.approx(2 * diff.sum() - diff[3] - diff[4])


def test_trials_bootstrap_resamples_within_trials_and_averages():
    win, draw, loss = 0, 1, 2
    trials = [np.array([win, loss]), np.array([win, win, loss, draw])]
    # every equally likely resample: 2^2 draws of trial 0 times 4^4 of trial 1
    stats_win, stats_loss = [], []
    for i in itertools.product(range(2), repeat=2):
        for j in itertools.product(range(4), repeat=4):
            t0, t1 = trials[0][list(i)], trials[1][list(j)]
            stats_win.append((100 * np.mean(t0 == win) + 100 * np.mean(t1 == win)) / 2)
            stats_loss.append((100 * np.mean(t0 == loss) + 100 * np.mean(t1 == loss)) / 2)
    pmf_win, pmf_loss = exact_pmf(stats_win), exact_pmf(stats_loss)
    dist = stats.trials_distribution(trials, 3, resamples=100_000, seed=2)
    assert_matches(dist[:, win], pmf_win)
    assert_matches(dist[:, loss], pmf_loss)
    w, d, lo = stats.trials_bootstrap(trials, 3, resamples=100_000, seed=2)
    assert (w.mean, d.mean, lo.mean) == pytest.approx(((50 + 50) / 2, (0 + 25) / 2, (50 + 25) / 2))
    assert w.n == 6
    assert (w.lo, w.hi) == pytest.approx((exact_quantile(pmf_win, 0.025), exact_quantile(pmf_win, 0.975)))
    assert (lo.lo, lo.hi) == pytest.approx((exact_quantile(pmf_loss, 0.025), exact_quantile(pmf_loss, 0.975)))


def test_seeded_and_empty():
    s, c = np.random.default_rng(0).normal(size=30), np.ones(30)
    assert stats.cluster_bootstrap(s, c, 500, seed=7) == stats.cluster_bootstrap(s, c, 500, seed=7)
    assert stats.cluster_bootstrap(s, c, 500, seed=7) != stats.cluster_bootstrap(s, c, 500, seed=8)
    assert math.isnan(stats.cluster_bootstrap(np.zeros(0), np.zeros(0)).mean)
    assert all(math.isnan(iv.lo) for iv in stats.trials_bootstrap([], 4))
    assert "95% percentile bootstrap interval, 10,000 resamples, numpy Generator seed 0" in stats.Bootstrap().describe()
