"""Bootstrap intervals for the tables: pure numpy, a seeded ``numpy.random.Generator``.

One scheme for every interval of the report: a **cluster bootstrap over prompts** with a
percentile interval. Every value a table averages belongs to a prompt (a prompt's
difference between two methods in seed k, a prompt's verdict in judge trial k, ...); a
prompt is a cluster holding all of its values. A resample draws P prompts with
replacement out of the P, each bringing all of its values; the interval is the
``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the statistic over the
resamples (``numpy.quantile``'s default linear interpolation). The point estimate is
the statistic on the data as it is.

The statistic is a ratio of sums, per stratum, averaged over strata::

    stat = mean over strata s of  Σ_p w_p · sums[p, s] / Σ_p w_p · counts[p, s]

with w_p the number of times prompt p was drawn (1 for the point estimate), ``sums[p,
s]`` the sum of prompt p's values in stratum s and ``counts[p, s]`` their number. A
stratum with no value in a resample is left out of that resample's mean.

* Table 1 (extended) and the sensitivity table: one stratum, the values of every seed
  pooled: the mean over (prompt, seed) values (``Bootstrap.pooled_mean``,
  ``Bootstrap.paired_difference`` for AISP minus a baseline on the same prompt and seed).
* Tables 2-3 and the judge bias: one stratum per judge trial, one value per judged
  prompt (1 if the verdict is in the category, else 0): the percentage of each trial,
  averaged over trials as in the tables (``Bootstrap.shares``). A prompt judged in
  several trials (when trials draw from the same prompts) is one cluster.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000  # the tables' default number of resamples
LEVEL = 0.95
_CHUNK = 1_000  # resamples drawn at once (memory: chunk x prompts)

Values = Mapping[int, Mapping[str, float | None]]  # {seed: {prompt_id: value}}


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap interval (NaN where undefined: no data)."""

    mean: float
    lo: float
    hi: float
    n: int  # clusters (prompts)
    items: int  # values over all clusters (e.g. (prompt, seed) pairs, judged prompts over trials)


@dataclass(frozen=True)
class Clusters:
    """Per prompt (cluster) and stratum, the sum and the number of its values.

    ============  =========  ==============================================
    field         shape      meaning
    ============  =========  ==============================================
    ids           (P,)       the prompt ids, sorted
    sums          (P, S, C)  sum of prompt p's values in stratum s (C
                             statistics at once, e.g. win, draw, loss)
    counts        (P, S)     how many values prompt p has in stratum s
    ============  =========  ==============================================
    """

    ids: list[str]
    sums: np.ndarray
    counts: np.ndarray


def ratio(weights: np.ndarray, c: Clusters) -> np.ndarray:
    """(m, C): the statistic of the module docstring for each row of ``weights`` (m, P)."""
    P, S, C = c.sums.shape
    num = (weights @ c.sums.reshape(P, S * C)).reshape(-1, S, C)
    den = (weights @ c.counts)[:, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        per_stratum = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    used = (den > 0).sum(1)
    return np.where(used > 0, np.nansum(per_stratum, 1) / np.maximum(used, 1), np.nan)


def distribution(c: Clusters, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, C): the statistic over ``resamples`` cluster resamples, drawn ``_CHUNK`` at a time as
    weights (m, P): how many times each of the P clusters is drawn (P draws with replacement)."""
    rng, P = np.random.default_rng(seed), len(c.ids)
    out = []
    for s in range(0, resamples, _CHUNK):
        m = min(_CHUNK, resamples - s)
        idx = rng.integers(0, P, size=(m, P)) + P * np.arange(m)[:, None]
        out.append(ratio(np.bincount(idx.ravel(), minlength=m * P).reshape(m, P).astype(float), c))
    return np.concatenate(out)


# --------------------------------------------------------------------------- the clusters


def prompt_clusters(values: Values) -> Clusters:
    """One stratum: per prompt, the sum and count of its finite values over seeds
    (``values``: ``{seed: {prompt_id: value}}``; a prompt without one is left out)."""
    per: dict[str, list[float]] = {}
    for seed in sorted(values):
        for pid, x in values[seed].items():
            if x is not None and math.isfinite(x):
                per.setdefault(str(pid), []).append(float(x))
    ids = sorted(per)
    sums = np.array([math.fsum(per[p]) for p in ids], dtype=float).reshape(len(ids), 1, 1)
    return Clusters(ids, sums, np.array([len(per[p]) for p in ids], dtype=float).reshape(len(ids), 1))


def paired_clusters(a: Values, b: Values) -> Clusters:
    """:func:`prompt_clusters` of ``a - b`` over the (seed, prompt) pairs both have."""
    diff = {s: {p: x - b[s][p] for p, x in a[s].items() if x is not None and b[s].get(p) is not None}
            for s in set(a) & set(b)}
    return prompt_clusters(diff)


def category_clusters(trials: Sequence[Sequence[tuple[str, int]]], categories: int) -> Clusters:
    """One stratum per trial: per prompt, how many of its verdicts fall in each category
    (``trials[k]``: (prompt id, category code 0..categories-1) per judged prompt)."""
    ids = sorted({str(p) for t in trials for p, _ in t})
    row = {p: i for i, p in enumerate(ids)}
    sums = np.zeros((len(ids), len(trials), categories))
    for s, t in enumerate(trials):
        for p, code in t:
            sums[row[str(p)], s, int(code)] += 1
    return Clusters(ids, sums, sums.sum(axis=2))


# --------------------------------------------------------------------------- the intervals


@dataclass(frozen=True)
class Bootstrap:
    """How the report's intervals are drawn (``bootstrap.*`` of conf/report.yaml)."""

    resamples: int = RESAMPLES
    seed: int = 0
    level: float = LEVEL

    def describe(self) -> str:
        """The notes' sentence on how an interval was computed."""
        return (f"[lo, hi]: {100 * self.level:g}% percentile bootstrap interval, prompts resampled as clusters "
                f"(each with all of its values), {self.resamples:,} resamples, numpy Generator seed {self.seed}")

    def intervals(self, c: Clusters) -> list[Interval]:
        """Per statistic (the last axis of ``c.sums``): the point estimate and its interval."""
        C = c.sums.shape[-1]
        if not len(c.ids) or not c.counts.sum():
            return [Interval(math.nan, math.nan, math.nan, 0, 0)] * C
        point = ratio(np.ones((1, len(c.ids))), c)[0]
        lo, hi = np.quantile(distribution(c, self.resamples, self.seed), [(1 - self.level) / 2, (1 + self.level) / 2],
                             axis=0)  # the percentile interval, per statistic
        return [Interval(float(point[k]), float(lo[k]), float(hi[k]), len(c.ids), int(c.counts.sum()))
                for k in range(C)]

    def pooled_mean(self, values: Values) -> Interval:
        """Mean over the (prompt, seed) values (``{seed: {prompt_id: value}}``)."""
        return self.intervals(prompt_clusters(values))[0]

    def paired_difference(self, a: Values, b: Values) -> Interval:
        """Mean of ``a - b`` over the (prompt, seed) pairs both have."""
        return self.intervals(paired_clusters(a, b))[0]

    def shares(self, trials: Sequence[Sequence[tuple[str, int]]], categories: int) -> list[Interval]:
        """Per category, its percentage of the judged prompts of each trial, averaged over trials
        (``trials[k]``: (prompt id, category code) per judged prompt of trial k)."""
        ivs = self.intervals(category_clusters([t for t in trials if len(t)], categories))
        return [Interval(100 * iv.mean, 100 * iv.lo, 100 * iv.hi, iv.n, iv.items) for iv in ivs]
