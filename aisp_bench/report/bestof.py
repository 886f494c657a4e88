r"""The expected best reward of m samples drawn without replacement from a recorded pool.

A best-of-N run records the rewards r_1..r_N of N i.i.d. samples of one prompt. Best-of-m
for m < N is then not one number but a distribution: the best of whichever m samples one
had drawn. Its mean, over the C(N, m) subsets of m samples, has a closed form over the
order statistics x_(1) <= ... <= x_(N) of the pool::

    E[best of m] = Σ_{i=m}^{N} x_(i) · C(i−1, m−1) / C(N, m)
                 = x_(N) − Σ_{i=1}^{N−1} (x_(i+1) − x_(i)) · C(i, m) / C(N, m)

C(i, m)/C(N, m) is the probability that all m draws sit at or below position i; the
second form sums non-negative terms, and C(i, m)/C(N, m) = Π_{j<m} (i − j)/(N − j) is a
running product of numbers in [0, 1] (no factorial overflows at N = 1024). It is an
unbiased estimate of best-of-m under the sampling policy, with far less variance than the
best of the *first* m samples, and it is exact: it equals the average over every subset.
Ties need nothing special (the best value of a subset does not depend on which tied
sample is kept).

Non-finite rewards (NaN, ±inf: a failed reward call) follow the methods' ``Tracker``: one
never wins unless every sample of the subset has one, and then the subset's best is NaN.
So with F non-finite rewards in the pool, a subset of m <= F samples can hold only those:
the expectation is NaN (undefined) for m <= F, and for m > F it is the formula over the
finite values (the non-finite ones rank below every finite one).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import numpy as np


@functools.lru_cache(maxsize=16)
def _at_or_below(N: int, M: int) -> np.ndarray:
    """(M, N−1), read-only: row m−1, column i−1 holds C(i, m)/C(N, m) for m = 1..M, i = 1..N−1."""
    j = np.arange(M, dtype=float)[:, None]
    i = np.arange(1, N, dtype=float)[None, :]
    out = np.cumprod(np.clip(i - j, 0.0, None) / (N - j), axis=0)
    out.setflags(write=False)
    return out


def expected_best(rewards: Sequence[float | None] | np.ndarray, sizes: Iterable[int]) -> np.ndarray:
    """E[best of m] for each m in ``sizes`` (see the module docstring), m samples drawn without
    replacement from ``rewards`` (None counts as non-finite). NaN where m > N, where m is at most
    the number of non-finite rewards, and everywhere when no reward is finite."""
    r = np.array([math.nan if v is None else float(v) for v in rewards], dtype=float)
    sizes = np.asarray(list(sizes), dtype=int)
    if (sizes < 1).any():
        raise ValueError(f"best-of-m needs m >= 1, got {sizes.min()}")
    out = np.full(len(sizes), math.nan)
    finite = np.isfinite(r)
    N, nonfinite = len(r), int((~finite).sum())
    ok = (sizes > nonfinite) & (sizes <= N)
    if not ok.any():
        return out
    x = np.sort(np.where(finite, r, r[finite].min()))  # non-finite: at the bottom, never the best
    if N == 1:
        out[ok] = x[0]
        return out
    m = sizes[ok]
    out[ok] = x[-1] - _at_or_below(N, int(m.max()))[m - 1] @ np.diff(x)
    return out


def bon_kl_bound(m: int) -> float:
    """log m − (m−1)/m: a bound on the KL divergence of best-of-m's output distribution from the
    sampling policy's (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy")."""
    return math.log(m) - (m - 1) / m
