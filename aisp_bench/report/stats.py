"""Bootstrap intervals for the tables: pure numpy, a seeded ``numpy.random.Generator``.

Two resampling schemes, both with percentile intervals (the ``(1 - level) / 2`` and
``(1 + level) / 2`` quantiles of the resampled statistic, ``numpy.quantile``'s default
linear interpolation):

* :func:`cluster_bootstrap`, Table 1's differences between methods. The unit is the
  prompt: each prompt is a cluster holding its per-seed values (e.g. AISP minus BoN on
  that prompt in seed k, for every seed both methods have). A resample draws P prompts
  with replacement out of the P, each bringing all of its seeds; the statistic is the
  mean over the drawn (prompt, seed) values, ``Σ sums[idx] / Σ counts[idx]`` (with as
  many seeds on every prompt: the mean of the per-prompt means). The point estimate is
  the same statistic on the data as it is.
* :func:`trials_bootstrap`, the win rates of Tables 2-3. Per trial, the judged prompts
  are resampled with replacement (n of n) and each outcome's share of them taken in
  percent; the statistic is the mean over trials, as in the tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000  # the tables' default number of resamples
LEVEL = 0.95
_CHUNK = 1_000  # resamples drawn at once (memory: chunk x prompts indices)


@dataclass(frozen=True)
class Bootstrap:
    """How the report's intervals are drawn (``bootstrap.*`` of conf/report.yaml)."""

    resamples: int = RESAMPLES
    seed: int = 0
    level: float = LEVEL

    def describe(self) -> str:
        """The notes' sentence on how an interval was computed."""
        return (f"[lo, hi]: {100 * self.level:g}% percentile bootstrap interval, {self.resamples:,} resamples, "
                f"numpy Generator seed {self.seed}")


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval (NaN where undefined: no data)."""

    mean: float
    lo: float
    hi: float
    n: int  # clusters (prompts) or judged prompts it was computed from

    @classmethod
    def empty(cls) -> Interval:
        return cls(math.nan, math.nan, math.nan, 0)


def percentile_interval(stats: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``stats``."""
    lo, hi = np.quantile(np.asarray(stats, dtype=float), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def cluster_distribution(sums: np.ndarray, counts: np.ndarray, resamples: int = RESAMPLES,
                         seed: int = 0) -> np.ndarray:
    """(resamples,) resampled statistics of :func:`cluster_bootstrap` (see the module docstring).

    ``sums[i]`` and ``counts[i]``: the sum and the number of the values of cluster i.
    """
    sums, counts = np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)
    rng = np.random.default_rng(seed)
    P, out = len(sums), np.empty(resamples)
    for s in range(0, resamples, _CHUNK):
        idx = rng.integers(0, P, size=(min(_CHUNK, resamples - s), P))
        out[s : s + len(idx)] = sums[idx].sum(1) / counts[idx].sum(1)
    return out


def cluster_bootstrap(sums: np.ndarray, counts: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> Interval:
    """Mean over all values of the clusters and its percentile interval, resampling clusters."""
    sums, counts = np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    if not len(sums):
        return Interval.empty()
    lo, hi = percentile_interval(cluster_distribution(sums, counts, resamples, seed), level)
    return Interval(float(sums.sum() / counts.sum()), lo, hi, len(sums))


def prompt_clusters(values: Mapping[int, Mapping[str, float]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per prompt, the sum and count of its finite values over seeds.

    ``values``: ``{seed: {prompt_id: value}}``. Returns (prompt ids, sums, counts), prompts
    sorted; a prompt without a finite value is left out.
    """
    per: dict[str, list[float]] = {}
    for seed in sorted(values):
        for pid, x in values[seed].items():
            if x is not None and math.isfinite(x):
                per.setdefault(pid, []).append(x)
    ids = sorted(per)
    return ids, np.array([math.fsum(per[p]) for p in ids]), np.array([len(per[p]) for p in ids], dtype=float)


def paired_clusters(a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]]
                    ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """:func:`prompt_clusters` of ``a - b`` over the (seed, prompt) pairs both have."""
    diff = {s: {p: x - b[s][p] for p, x in a[s].items() if p in b[s] and b[s][p] is not None and x is not None}
            for s in set(a) & set(b)}
    return prompt_clusters(diff)


def pooled_mean(values: Mapping[int, Mapping[str, float]], resamples: int = RESAMPLES, seed: int = 0,
                level: float = LEVEL) -> Interval:
    """Mean over the (prompt, seed) values, prompts resampled as clusters."""
    _, sums, counts = prompt_clusters(values)
    return cluster_bootstrap(sums, counts, resamples, seed, level)


def paired_difference(a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]],
                      resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """Mean of ``a - b`` over the (prompt, seed) pairs both have, prompts resampled as clusters."""
    _, sums, counts = paired_clusters(a, b)
    return cluster_bootstrap(sums, counts, resamples, seed, level)


def trials_distribution(trials: Sequence[np.ndarray], categories: int, resamples: int = RESAMPLES,
                        seed: int = 0) -> np.ndarray:
    """(resamples, categories): per resample, each category's percentage of the resampled
    judged prompts of every trial, averaged over trials (see the module docstring).

    ``trials``: per trial, the category code (0..categories-1) of each judged prompt.
    """
    rng = np.random.default_rng(seed)
    trials = [np.asarray(t, dtype=int) for t in trials if len(t)]
    out = np.zeros((resamples, categories))
    for s in range(0, resamples, _CHUNK):
        m = min(_CHUNK, resamples - s)
        for codes in trials:
            onehot = np.eye(categories)[codes]  # (n, categories)
            idx = rng.integers(0, len(codes), size=(m, len(codes)))
            out[s : s + m] += 100.0 * onehot[idx].mean(1)
    return out / max(1, len(trials))


def trials_bootstrap(trials: Sequence[np.ndarray], categories: int, resamples: int = RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> list[Interval]:
    """Per category: the mean over trials of its percentage and the percentile interval."""
    trials = [np.asarray(t, dtype=int) for t in trials if len(t)]
    if not trials:
        return [Interval.empty()] * categories
    n = sum(len(t) for t in trials)
    point = np.mean([100.0 * np.bincount(t, minlength=categories)[:categories] / len(t) for t in trials], axis=0)
    dist = trials_distribution(trials, categories, resamples, seed)
    return [Interval(float(point[c]), *percentile_interval(dist[:, c], level), n) for c in range(categories)]
