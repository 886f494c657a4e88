"""Per-prompt curves of Figure 2 and the equal-compute view, and their averaging.

Averaging (both figures): per run (one seed), a curve is averaged over prompts (prompts
whose curve is shorter are left out beyond their length); the plotted line is the mean
over seeds of those per-seed means. The band is

* ``"seeds"``: ± one sample standard deviation (ddof=1) over seeds of the per-seed
  means (the spread behind Table 1's std); needs two or more seeds;
* ``"prompts"``: ± one standard error over prompts of the per-prompt curves (each first
  averaged over the seeds that have that prompt id);
* ``"auto"`` (default): ``"seeds"`` when every curve has ≥ 2 seeds, else ``"prompts"``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .common import as_float_array, finite_or_nan


# --------------------------------------------------------------------------- per-prompt curves


def aisp_curves(record: dict[str, Any]) -> dict[str, np.ndarray]:
    """AISP's per-iteration curves for one prompt, k = 1..K, from its record's ``iterations``:
    Mean at k = 1/n Σ_i r(x, y(V^i)) (``mean``), Best at k = max_i r(x, y(V^i)) (``max``) and
    Best so far (``best_so_far``: y_best of Algorithm 1 at k)."""
    its = sorted(record.get("iterations") or [], key=lambda it: it.get("k", 0))
    keys = {"aisp_mean_at_k": "mean", "aisp_best_at_k": "max", "aisp_best_so_far": "best_so_far"}
    return {name: np.array([finite_or_nan(it.get(key)) for it in its]) for name, key in keys.items()}


def bon_prefix_curve(sample_rewards: Sequence[float], n: int, K: int | None = None) -> np.ndarray:
    """BoN at N = n·k from one run's i.i.d. samples: entry k-1 is the max over the first
    n·k sample rewards (non-finite rewards ignored, as the methods' best-of does; NaN
    while there is none), for k = 1..K (K defaults to len // n; k with n·k beyond the
    samples on disk are NaN)."""
    r = _finite_rewards(list(sample_rewards))
    K = len(r) // n if K is None else K
    out = np.full(K, math.nan)
    k = min(K, len(r) // n)  # k with all n·k samples on disk
    out[:k] = np.fmax.accumulate(r)[n - 1:n * k:n]  # fmax: a NaN reward never hides the best so far
    return out


def _finite_rewards(values) -> np.ndarray:
    """Rewards as a float array with NaN for every non-finite one (±inf too: a failed reward call)."""
    r = as_float_array(values)
    return np.where(np.isfinite(r), r, math.nan)


def _sample_tokens(record: dict[str, Any], num: int) -> np.ndarray:
    """Generated tokens per sample; without ``sample_tokens``, ``num_tokens`` split evenly."""
    st = as_float_array(record.get("sample_tokens"))
    if len(st) >= num:
        return np.nan_to_num(st[:num])
    return np.full(num, finite_or_nan(record.get("num_tokens")) / max(num, 1))


def _pro_rata(seconds: float, tokens: np.ndarray) -> np.ndarray:
    """Split ``seconds`` over samples in proportion to their tokens (equally if none)."""
    if len(tokens) == 0:
        return np.zeros(0)
    tot = float(np.nansum(tokens))
    if tot > 0:
        return seconds * np.nan_to_num(tokens) / tot
    return np.full(len(tokens), seconds / len(tokens))


def compute_curve(record: dict[str, Any], n: int | None = None) -> dict[str, np.ndarray]:
    """Best reward so far against cumulative compute for one prompt, sample by sample in
    generation order: ``best`` = running max of the finite ``sample_rewards``, ``tokens`` =
    cumulative ``sample_tokens``, ``seconds`` = cumulative wall seconds.

    Seconds per sample: with AISP ``iterations[].seconds``, iteration k's seconds are
    split over its n samples pro rata by tokens, and what remains of the prompt's
    ``seconds`` (the final y(U*) candidate, overheads) over the remaining samples; else
    the prompt's ``seconds`` are split over all samples pro rata by tokens.
    """
    r = _finite_rewards(record.get("sample_rewards"))
    tokens = _sample_tokens(record, len(r))
    total = finite_or_nan(record.get("seconds"))
    iters = sorted(record.get("iterations") or [], key=lambda it: it.get("k", 0))
    it_secs = [finite_or_nan(it.get("seconds")) for it in iters]
    if iters and n and np.isfinite(it_secs).all():
        rest = max(0.0, total - sum(it_secs)) if np.isfinite(total) else 0.0  # the y(U*) candidate, overheads
        secs = np.concatenate([_pro_rata(s, tokens[i * n:(i + 1) * n]) for i, s in enumerate(it_secs)]
                              + [_pro_rata(rest, tokens[n * len(iters):])])
    else:
        secs = _pro_rata(total, tokens)
    return {"best": np.fmax.accumulate(r), "tokens": np.cumsum(tokens), "seconds": np.cumsum(secs)}


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
