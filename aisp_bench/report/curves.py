"""Per-prompt curves of Figure 2 and the equal-compute view, and their averaging.

Best-of-N curves are never the best of the *first* N samples of a run: they are the expected
best of N samples drawn without replacement from the run's whole pool (:mod:`.bestof`).

Averaging (both figures): per run (one seed), a curve is averaged over prompts (prompts
whose curve is shorter are left out beyond their length); the plotted line is the mean
over seeds of those per-seed means. The band is

* ``"seeds"``: ± one sample standard deviation (ddof=1) over seeds of the per-seed
  means (the spread behind Table 1's std); needs two or more seeds;
* ``"prompts"``: ± one standard error over prompts of the per-prompt curves (each first
  averaged over the seeds that have that prompt id);
* ``"auto"`` (default): ``"seeds"`` when every curve has ≥ 2 seeds, else ``"prompts"``.

A reward-guided decoder (Speculative Rejection, particle filtering) is one point per prompt:
the reward it returned at what it spent in all (:func:`.costs.paused`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .bestof import expected_best
from .common import as_float_array, finite_or_nan
from .costs import cumulative, expected_cumulative, paused


# --------------------------------------------------------------------------- per-prompt curves


def aisp_curves(record: dict[str, Any]) -> dict[str, np.ndarray]:
    """AISP's per-iteration curves for one prompt, k = 1..K, from its record's ``iterations``:
    Mean at k = 1/n Σ_i r(x, y(V^i)) (``mean``), Best at k = max_i r(x, y(V^i)) (``max``) and
    Best so far (``best_so_far``: y_best of Algorithm 1 at k)."""
    its = sorted(record.get("iterations") or [], key=lambda it: it.get("k", 0))
    keys = {"aisp_mean_at_k": "mean", "aisp_best_at_k": "max", "aisp_best_so_far": "best_so_far"}
    return {name: np.array([finite_or_nan(it.get(key)) for it in its]) for name, key in keys.items()}


def compute_curve(record: dict[str, Any], n: int | None = None, params: tuple[float, float] = (math.nan, math.nan),
                  pool: bool = False) -> dict[str, np.ndarray]:
    """Best reward against cumulative compute for one prompt, at j = 1..S samples: ``best`` and,
    per axis of :data:`.costs.AXES`, the cost spent (``params``: the parameter counts for FLOPs).

    ``pool=False``: samples in generation order, ``best`` the running max of the finite
    ``sample_rewards`` (the best so far), costs :func:`.costs.cumulative`. ``pool=True`` (a
    best-of-N run): ``best`` the expected best of j samples drawn from the pool
    (:func:`.bestof.expected_best`), costs their expected cost (:func:`.costs.expected_cumulative`).
    """
    if paused(record):  # a reward-guided decoder: its returned reward at its total cost, one point
        return {"best": np.array([finite_or_nan(record.get("reward"))]), **cumulative(record, n, params)}
    r = as_float_array(record.get("sample_rewards"))
    if pool:
        return {"best": expected_best(r, range(1, len(r) + 1)), **expected_cumulative(record, params)}
    best = np.fmax.accumulate(np.where(np.isfinite(r), r, math.nan)) if len(r) else r
    return {"best": best, **cumulative(record, n, params)}


# --------------------------------------------------------------------------- averaging


def stack(curves: Sequence[np.ndarray]) -> np.ndarray:
    """Rows = curves, NaN-padded to the longest."""
    L = max((len(c) for c in curves), default=0)
    out = np.full((len(curves), L), math.nan)
    for i, c in enumerate(curves):
        out[i, : len(c)] = c
    return out


def nanmean_columns(a: np.ndarray) -> np.ndarray:
    """Column means over finite entries; NaN where a column has none (no warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.where(np.isfinite(a), a, math.nan), axis=0)


def nanstd_columns(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column sample std (ddof=1) over finite entries and the counts; NaN below two."""
    a = np.where(np.isfinite(a), a, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(a, axis=0, ddof=1), np.isfinite(a).sum(axis=0)


def average_curves(by_seed: Sequence[dict[str, np.ndarray]], band: str = "seeds") -> dict[str, np.ndarray]:
    """Average per-prompt curves (``by_seed``: one ``{prompt_id: curve}`` per seed) with ``band``
    "seeds" or "prompts": ``mean`` (the mean over seeds of the per-seed means over prompts, or
    over prompts of the per-prompt means over seeds; equal when every seed has every prompt and
    full-length curves), ``lo``/``hi`` (mean ∓ the band; NaN where undefined) and ``count``
    (seeds or prompts contributing at each point)."""
    if band == "seeds":
        rows = [nanmean_columns(stack(list(d.values()))) for d in by_seed if d]
    else:
        ids: dict[Any, list[np.ndarray]] = {}
        for d in by_seed:
            for pid, c in d.items():
                ids.setdefault(pid, []).append(c)
        rows = [nanmean_columns(stack(cs)) for cs in ids.values()]
    per = stack(rows)  # per seed or per prompt
    mean = nanmean_columns(per)
    sd, cnt = nanstd_columns(per)
    if band == "prompts":
        with np.errstate(all="ignore"):
            sd = sd / np.sqrt(cnt)  # the standard error
    return {"mean": mean, "lo": mean - sd, "hi": mean + sd, "count": cnt}


def resolve_band(band: str, seed_counts: Iterable[int]) -> str:
    if band != "auto":
        return band
    counts = list(seed_counts)
    return "seeds" if counts and min(counts) >= 2 else "prompts"
