"""The unbiased best-of-m estimator against brute-force enumeration of every subset of the pool."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from aisp_bench.methods.base import Tracker
from aisp_bench.report.bestof import bon_kl_bound, expected_best
from aisp_bench.types import Sample

NAN, INF = math.nan, math.inf


def best_by_tracker(rewards: list[float]) -> float:
    """What a method returns for these samples: the methods' own best-of (``Tracker``)."""
    t = Tracker("p")
    t.add([Sample([0], f"s{i}", "eos") for i in range(len(rewards))], torch.tensor(rewards, dtype=torch.float64))
    return t.result().reward


def enumerate_subsets(rewards: list[float], m: int) -> float:
    """The mean, over every m-subset of the pool, of the subset's best as the Tracker picks it (NaN if
    some subset has no finite reward)."""
    bests = [best_by_tracker([rewards[i] for i in s]) for s in itertools.combinations(range(len(rewards)), m)]
    return math.nan if any(math.isnan(b) for b in bests) else math.fsum(bests) / len(bests)


def pools():
    rng = np.random.default_rng(0)
    for N in range(1, 13):
        yield [float(x) for x in rng.normal(size=N)]
    yield [1.0, 1.0, 1.0, 1.0]  # all tied
    yield [0.5, 2.0, 2.0, -1.0, 0.5, 2.0, 0.0, 0.5, -1.0, 3.0, 3.0, 0.0]  # ties at the top and below
    yield [float(x) for x in np.round(rng.normal(size=12), 0)]  # many ties
    yield [NAN, 0.3, INF, -INF, 0.7, NAN, 0.7, 0.1, -0.2, 0.3, 1.5, -3.0]  # 4 non-finite, ties among the rest
    yield [NAN, 1.0, 2.0, 0.5, 2.0, INF, 0.0, -1.0, 1.0, 0.25, 0.25]
    yield [NAN, -INF, INF]  # no finite reward
    yield [2.0, NAN]


@pytest.mark.parametrize("rewards", list(pools()), ids=lambda r: f"N{len(r)}")
def test_expected_best_equals_every_subset_enumerated(rewards):
    N = len(rewards)
    got = expected_best(rewards, range(1, N + 1))
    want = np.array([enumerate_subsets(rewards, m) for m in range(1, N + 1)])
    assert np.array_equal(np.isnan(got), np.isnan(want)), (got, want)
    np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=0, atol=1e-12)


def test_nonfinite_rewards_make_small_subsets_undefined():
    r = [NAN, 0.3, INF, -INF, 0.7]
    got = expected_best(r, [1, 2, 3, 4, 5])
    assert np.isnan(got[:3]).all()  # 3 non-finite rewards: some subset of up to 3 holds only those
    assert got[3] == pytest.approx(0.7 * 4 / 5 + 0.3 / 5) and got[4] == 0.7  # the full pool: the method's best
    assert np.isnan(expected_best([NAN, INF], [1, 2])).all() and np.isnan(expected_best([], [1])).all()
    assert expected_best([None, 1.0], [2]) == [1.0]  # a null (non-finite) reward from a record


def test_endpoints_sizes_beyond_the_pool_and_bad_sizes():
    x = np.random.default_rng(1).normal(size=1024)
    got = expected_best(x, [1, 2, 512, 1024, 1025])
    assert got[0] == pytest.approx(x.mean(), abs=1e-12) and got[3] == x.max() and np.isnan(got[4])
    assert x.mean() < got[1] < got[2] < got[3]
    assert expected_best(x, [3, 1]).tolist() == expected_best(x, [3, 1]).tolist()  # any order of sizes
    assert expected_best(x, [1, 3])[::-1].tolist() == expected_best(x, [3, 1]).tolist()
    with pytest.raises(ValueError, match="m >= 1"):
        expected_best(x, [0])


def test_kl_bound():
    assert bon_kl_bound(1) == 0.0
    assert bon_kl_bound(1024) == pytest.approx(math.log(1024) - 1023 / 1024)
