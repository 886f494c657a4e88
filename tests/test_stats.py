"""Bootstrap intervals (aisp_bench.report.stats) against bootstrap distributions enumerated by hand.

Each example is small enough that every equally likely resample can be listed
(itertools.product over the prompts drawn), which gives the exact bootstrap distribution;
the module's Monte Carlo resampling must match it, and its percentile interval must be
the exact distribution's quantiles (worked out by hand where short).
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


def one_seed(values: list[float]) -> stats.Clusters:
    return stats.prompt_clusters({0: {f"p{i}": v for i, v in enumerate(values)}})


def test_cluster_bootstrap_of_one_seed_is_binomial():
    # five prompts, differences 0,0,0,0,1: the resampled mean is Binomial(5, 1/5) / 5
    d = [0.0, 0.0, 0.0, 0.0, 1.0]
    pmf = exact_pmf([sum(d[i] for i in idx) / 5 for idx in itertools.product(range(5), repeat=5)])
    assert pmf == pytest.approx({k / 5: math.comb(5, k) * 0.2**k * 0.8 ** (5 - k) for k in range(6)})
    boot = stats.Bootstrap(resamples=20_000, seed=1)
    assert_matches(stats.distribution(one_seed(d), boot.resamples, boot.seed)[:, 0], pmf)
    (iv,) = boot.intervals(one_seed(d))
    assert iv.mean == pytest.approx(0.2) and (iv.n, iv.items) == (5, 5)
    assert (iv.lo, iv.hi) == pytest.approx((exact_quantile(pmf, 0.025), exact_quantile(pmf, 0.975)))
    # by hand: P(0) = 0.8^5 = 0.33 > 0.025, P(<= 0.4) = 0.94 < 0.975 <= P(<= 0.6) = 0.99
    assert (iv.lo, iv.hi) == pytest.approx((0.0, 0.6))


def test_seeds_pool_within_their_prompt():
    # prompt A: one seed with value 1; prompt B: two seeds, values 1 and 3 (sum 4). The mean
    # over (prompt, seed) values is 5/3; resamples: AA 1, AB or BA 5/3, BB 2
    values = {0: {"A": 1.0, "B": 1.0}, 1: {"B": 3.0}}
    c = stats.prompt_clusters(values)
    assert c.ids == ["A", "B"] and c.sums.ravel().tolist() == [1.0, 4.0] and c.counts.ravel().tolist() == [1, 2]
    pmf = {1.0: 0.25, round(5 / 3, 9): 0.5, 2.0: 0.25}
    assert_matches(stats.distribution(c, 20_000, 3)[:, 0], pmf)
    iv = stats.Bootstrap(20_000, seed=3).pooled_mean(values)
    assert iv.mean == pytest.approx(5 / 3) and (iv.lo, iv.hi) == (1.0, 2.0) and (iv.n, iv.items) == (2, 3)


def test_paired_differences_resample_prompts_not_prompt_seed_pairs():
    rng = np.random.default_rng(0)
    diff = rng.normal(0.5, 1.0, size=40)
    a1 = {0: {str(i): float(x) + 2 for i, x in enumerate(diff)}}
    b1 = {0: {str(i): 2.0 for i in range(40)}}
    boot = stats.Bootstrap(resamples=4000, seed=5)
    single = boot.paired_difference(a1, b1)
    # a second seed repeating every prompt's difference adds no information: same interval
    a2, b2 = {**a1, 1: dict(a1[0])}, {**b1, 1: dict(b1[0])}
    c = stats.paired_clusters(a2, b2)
    assert len(c.ids) == 40 and (c.counts == 2).all()
    two = boot.paired_difference(a2, b2)
    assert (two.mean, two.lo, two.hi) == pytest.approx((single.mean, single.lo, single.hi))
    assert two.mean == pytest.approx(diff.mean()) and (two.n, two.items) == (40, 80)
    # resampling the 80 (prompt, seed) pairs independently would be narrower, wrongly
    (naive,) = boot.intervals(one_seed(list(np.concatenate([diff, diff]))))
    assert (two.hi - two.lo) > 1.25 * (naive.hi - naive.lo)
    # only pairs both methods have count; a missing or NaN value drops that pair only
    b2[1]["3"] = math.nan
    del a2[0]["4"]
    c = stats.paired_clusters(a2, b2)
    assert c.counts.sum() == 78 and c.sums.sum() == pytest.approx(2 * diff.sum() - diff[3] - diff[4])


def test_shares_average_trials_and_resample_prompts_across_them():
    win, draw, loss = 0, 1, 2
    # trial 0 judged a (win) and b (loss); trial 1 a (win), b (win), c (draw): a prompt judged in
    # both trials is one cluster
    trials = [[("a", win), ("b", loss)], [("a", win), ("b", win), ("c", draw)]]
    codes = [dict(t) for t in trials]
    every = {k: [] for k in (win, draw, loss)}
    for drawn in itertools.product("abc", repeat=3):  # the 27 equally likely resamples of the 3 prompts
        per_trial = [[t[p] for p in drawn if p in t] for t in codes]
        for k in every:  # each trial's percentage, averaged over the trials with a drawn prompt
            every[k].append(np.mean([100 * np.mean(np.equal(x, k)) for x in per_trial if x]))
    boot = stats.Bootstrap(resamples=100_000, seed=2)
    dist = stats.distribution(stats.category_clusters(trials, 3), boot.resamples, boot.seed) * 100
    w, d, lo = boot.shares(trials, 3)
    assert (w.mean, d.mean, lo.mean) == pytest.approx(((50 + 200 / 3) / 2, (0 + 100 / 3) / 2, (50 + 0) / 2))
    assert (w.n, w.items) == (3, 5)
    for k, iv in ((win, w), (draw, d), (loss, lo)):
        pmf = exact_pmf(every[k])
        assert_matches(dist[:, k], pmf)
        assert (iv.lo, iv.hi) == pytest.approx((exact_quantile(pmf, 0.025), exact_quantile(pmf, 0.975)))
    # by hand: the win rate is 0 only for "ccc" (1/27 = 0.037 > 0.025), 100 only for "aaa" (26/27 < 0.975)
    assert (w.lo, w.hi) == (0.0, 100.0)


def test_seeded_and_empty():
    c = one_seed(list(np.random.default_rng(0).normal(size=30)))
    assert stats.Bootstrap(500, seed=7).intervals(c) == stats.Bootstrap(500, seed=7).intervals(c)
    assert stats.Bootstrap(500, seed=7).intervals(c) != stats.Bootstrap(500, seed=8).intervals(c)
    assert math.isnan(stats.Bootstrap().pooled_mean({}).mean)
    assert all(math.isnan(iv.lo) and iv.n == 0 for iv in stats.Bootstrap().shares([], 4))
    assert "95% percentile bootstrap interval, prompts resampled as clusters (each with all of its values), " \
           "10,000 resamples, numpy Generator seed 0" in stats.Bootstrap().describe()
