"""Table 1's extended view: what the paper's table does not show, per dataset and pair.

Rows: each method's mean (std over seeds) and, for AISP against each BoN, the mean
difference with its paired bootstrap interval. Columns (per prompt, then averaged):

* **Optimised reward**: the chosen response's reward under the run's own reward model
  (``records.jsonl``), the reward the method maximised;
* **Gold reward**: a held-out reward model's score of the same cleaned response
  (``evaluate gold_reward=NAME``), so that reward hacking shows as a gap between the two;
* **Diversity**, **Coherence**: Table 1's metrics, per prompt;
* **Base log-prob**: the response's mean per-token log-probability under the noise-free
  base policy (``evaluate``'s ``base_logprob``): how far the method moved from the model;
* **KL(Q_Û‖P)**: AISP's ‖Û‖²/(2σ²) after its last iteration (``iterations[-1].kl``);
* **Samples**, **Generated tokens**, **Reward-model tokens**, **Seconds**: what the method
  spent per prompt (:func:`.costs.totals`), so that methods compared at an equal budget in
  one unit (samples or generated tokens) show what they spent in the others.

Per-prompt values come from the records and from ``metrics_per_prompt.json`` (written by
``evaluate`` under the fingerprint of ``summary.json``'s metrics; a stale file is not
used). Differences pair AISP's seed k with the baseline's seed k on the same prompt
(``Bootstrap.paired_difference`` of :mod:`aisp_bench.report.stats`: prompts resampled as
clusters, pooled over seeds).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from aisp_bench.results import read_prompt_metrics
from aisp_bench.rundir import Run

from .common import (
    dataset_key, display_dataset, display_method, display_pair, finite_or_nan, fmt_interval, fmt_mean_std, mean_std,
    method_key, one_scale, pair_key, render_latex, render_markdown, select_variants, tex_escape, write_texts,
)  # fmt: skip
from .costs import method_n, parameters, totals
from .stats import Bootstrap

COSTS = ("samples", "tokens", "reward_tokens", "seconds")  # axes of .costs, per prompt
METRICS = ("reward", "gold_reward", "diversity", "coherence", "base_logprob", "kl", *COSTS)
NAMES = {"reward": "Optimised reward", "gold_reward": "Gold reward", "diversity": "Diversity",
         "coherence": "Coherence", "base_logprob": "Base log-prob/token", "kl": "KL(Q_Û‖P)", "samples": "Samples",
         "tokens": "Generated tokens", "reward_tokens": "Reward-model tokens", "seconds": "Seconds"}
GROUPS = {"reward": "Reward", "gold_reward": "Reward", "diversity": "Table 1", "coherence": "Table 1",
          "base_logprob": "Closeness to the base model", "kl": "Closeness to the base model"} | dict.fromkeys(
    COSTS, "Compute per prompt")
TEX_NAMES = {"reward": "optimised", "gold_reward": "gold", "diversity": "Diversity", "coherence": "Coherence",
             "base_logprob": "log-prob/token", "kl": r"KL$(Q_{\hat U}\Vert P)$", "samples": "samples",
             "tokens": "generated", "reward_tokens": "reward-model tokens", "seconds": "seconds"}
DECIMALS = {"samples": 1, "tokens": 0, "reward_tokens": 0, "seconds": 2}  # others: 3
COMPARED = "aisp"  # the method whose differences against each baseline get intervals


def prompt_values(run: Run) -> dict[str, dict[str, float]]:
    """Per metric, ``{prompt_id: value}`` of one run (finite values only; see the module docstring)."""
    out: dict[str, dict[str, float]] = {m: {} for m in METRICS}
    for rec in run.records:
        pid = str(rec.get("prompt_id"))
        out["reward"][pid] = finite_or_nan(rec.get("reward"))
        its = rec.get("iterations") or []
        if its:
            out["kl"][pid] = finite_or_nan(its[-1].get("kl"))
        spent = totals(rec, method_n(run), parameters(run))
        for m in COSTS:
            out[m][pid] = spent[m]
    per = read_prompt_metrics(run.path, run.metrics.get("fingerprint")) or {}  # lists aligned with prompt_ids
    for m in ("gold_reward", "diversity", "coherence", "base_logprob"):
        out[m] = {str(p): float(v) for p, v in zip(per.get("prompt_ids") or [], per.get(m) or []) if v is not None}
    return {m: {p: v for p, v in d.items() if math.isfinite(v)} for m, d in out.items()}


SCORER_KEYS = {"gold_reward": "gold_reward_model", "coherence": "coherence_encoder",
               "base_logprob": "base_logprob_model"}  # metric -> who scored it, in summary.json's metrics


def _one_scorer(runs: dict[str, list[Run]], vals: dict[str, dict[int, dict]]
                ) -> tuple[dict[int, dict], dict[str, str], list[str]]:
    """One block's values with each metric on one scale: per metric of ``SCORER_KEYS``, the
    scorer most of the block's runs share (``one_scale``); a run scored by another has that
    metric dropped. Returns (the values, per metric the scorer, one note per run left out)."""
    everyone = [(m, r) for m, rs in runs.items() for r in rs]
    scorers, notes = {"reward": everyone[0][1].reward}, []
    vals = {m: {s: dict(v) for s, v in by_seed.items()} for m, by_seed in vals.items()}
    for metric, key in SCORER_KEYS.items():
        scored = [(m, r) for m, r in everyone if r.metrics.get(key)]
        kept, scorers[metric] = one_scale(scored, lambda mr, key=key: str(mr[1].metrics[key]))
        for m, r in (x for x in scored if x not in kept):
            vals[m][r.seed][metric] = {}
            notes.append(f"{NAMES[metric]} of {display_method(m)} seed {r.seed} ({r.metrics[key]}) left out: "
                         f"the others are scored by {scorers[metric]}")
    return vals, scorers, notes


def _rows(cell: tuple, a: dict[int, dict], scorers: dict[str, str], boot: Bootstrap, baseline: str = "",
          b: dict[int, dict] | None = None) -> list[dict[str, Any]]:
    """Per metric, the method row of ``a`` (``{seed: prompt_values}``), or with ``b`` the
    difference row of ``a`` minus ``b``."""
    rows = []
    for m in METRICS:
        sa = {s: v[m] for s, v in a.items()}
        if b is None:
            per_seed = [float(np.mean(list(v.values()))) for v in sa.values() if v]
            mean, std = mean_std(per_seed)
            stats = dict(mean=mean, std=std, lo=math.nan, hi=math.nan, n_seeds=len(per_seed),
                         n_prompts=len({p for v in sa.values() for p in v}))
        else:
            sb = {s: v[m] for s, v in b.items()}
            iv = boot.paired_difference(sa, sb)
            stats = dict(mean=iv.mean, std=math.nan, lo=iv.lo, hi=iv.hi,
                         n_seeds=sum(1 for s in set(sa) & set(sb) if set(sa[s]) & set(sb[s])), n_prompts=iv.n)
        kind = "method" if b is None else "difference"
        rows.append(dict(zip(("dataset", "model", "reward", "method"), cell), row=kind, baseline=baseline, metric=m,
                         **stats, scored_by=scorers.get(m, "")))
    return rows


def table1_extended(runs: Sequence[Run], boot: Bootstrap | None = None) -> pd.DataFrame:
    """The extended view as a tidy frame: one row per (dataset, pair, method row, metric).

    Columns: dataset, model, reward, method, row ("method" or "difference"), baseline
    (the BoN of a difference row), metric, mean, std (over seeds, method rows), lo, hi
    (bootstrap interval, difference rows), n_seeds, n_prompts, scored_by.
    """
    boot = boot or Bootstrap()
    chosen, _ = select_variants(runs)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for ds, model, reward in sorted({c[:3] for c in chosen}, key=lambda c: (dataset_key(c[0]), pair_key(c[1:]))):
        methods = sorted((c[3] for c in chosen if c[:3] == (ds, model, reward)), key=method_key)
        vals = {m: {r.seed: prompt_values(r) for r in chosen[(ds, model, reward, m)]} for m in methods}
        vals, scorers, left_out = _one_scorer({m: chosen[(ds, model, reward, m)] for m in methods}, vals)
        notes += [f"{display_dataset(ds)}, {display_pair(model, reward)}: {n}." for n in left_out]
        for m in methods:
            rows += _rows((ds, model, reward, m), vals[m], scorers, boot)
        for b in (m for m in methods if m != COMPARED and COMPARED in vals):
            rows += _rows((ds, model, reward, COMPARED), vals[COMPARED], scorers, boot, b, vals[b])
    df = pd.DataFrame(rows)
    df.attrs["notes"] = notes
    return df


def _layout(df: pd.DataFrame, latex: bool) -> list[list[str]]:
    body = []
    for (ds, model, reward), block in df.groupby(["dataset", "model", "reward"], sort=False):
        label = f"{display_dataset(ds)}, {display_pair(model, reward)}"
        for i, ((kind, method, baseline), rows) in enumerate(block.groupby(["row", "method", "baseline"],
                                                                           sort=False)):
            name = display_method(method, latex)
            if kind == "difference":
                name += f" {'$-$' if latex else '−'} {display_method(baseline, latex)}"
            places = {r.metric: DECIMALS.get(r.metric, 3) for r in rows.itertuples()}
            cells = {r.metric: (fmt_interval(r.mean, r.lo, r.hi, places[r.metric], sign=True) if kind == "difference"
                                else fmt_mean_std(r.mean, r.std, places[r.metric])) for r in rows.itertuples()}
            first = (tex_escape(label) if latex else label) if i == 0 else ""
            body.append([first, name, *(cells.get(m, "—") for m in METRICS)])
    return body


def _notes(df: pd.DataFrame, boot: Bootstrap) -> list[str]:
    scored = []
    for (ds, model, reward), block in df.groupby(["dataset", "model", "reward"], sort=False):
        by = {r.metric: r.scored_by for r in block.itertuples()}
        scored.append(f"{display_dataset(ds)}, {display_pair(model, reward)}: optimised {by.get('reward') or '—'}, "
                      f"gold {by.get('gold_reward') or '— (evaluate gold_reward=NAME)'}, base log-prob under "
                      f"{by.get('base_logprob') or '— (evaluate with the base_logprob metric)'}")
    return ["Method rows: mean (std) over seeds of the per-seed mean over prompts (std ddof=1). Difference rows: "
            "mean over (prompt, seed) pairs of AISP's value minus the baseline's on the same prompt in the same seed. "
            f"{boot.describe()} (a prompt brings all of its seeds; aisp_bench/report/stats.py).",
            "Optimised reward: the run's own reward model, the one each method maximised. Gold reward: a held-out "
            "reward model's score of the same cleaned response. Base log-prob/token: mean per-token log-probability "
            "of the response under the noise-free policy (temperature 1). KL(Q_Û‖P) = ‖Û‖²/(2σ²) after AISP's last "
            "iteration.",
            "Compute per prompt: samples generated (Speculative Rejection: rows started), generated tokens (every "
            "token decoded), reward-model tokens (the prompt once plus every response scored, partial ones included, "
            "in the policy's tokens), wall seconds; aisp_bench/report/costs.py.",
            "Scored by: " + "; ".join(scored) + ".", "—: not available (evaluate not run with that metric, or no "
            "such value for the method).", *df.attrs.get("notes", [])]


def write_table1_extended(df: pd.DataFrame, out_dir: Path | str, boot: Bootstrap,
                          name: str = "table1_extended") -> list[Path]:
    """Write ``<name>.csv`` (the tidy frame), ``<name>.md`` and ``<name>.tex``."""
    notes = _notes(df, boot)
    header = ["Dataset, models", "Method", *(NAMES[m] for m in METRICS)]
    title = ("Table 1, extended: optimised and gold reward, closeness to the base model, AISP minus each BoN "
             f"with {100 * boot.level:g}% intervals")
    md = render_markdown(header, _layout(df, latex=False), title=title, notes=notes,
                         align=["l", "l"] + ["r"] * len(METRICS))
    levels = [["", "", *(GROUPS[m] for m in METRICS)], ["Dataset, models", "Method", *(TEX_NAMES[m] for m in METRICS)]]
    tex = render_latex(levels, _layout(df, latex=True), caption="Optimised and held-out rewards, closeness to the "
                       "base model, and AISP minus each BoN with paired bootstrap intervals.",
                       label="tab:table1_extended", notes=notes, align="ll" + "r" * len(METRICS))
    return write_texts(out_dir, name, {"csv": df.to_csv(index=False), "md": md, "tex": tex})
