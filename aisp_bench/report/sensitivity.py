"""AISP at a fixed budget n·κ: how the split (n, κ) and σ change the final reward, the
closeness to the base model and the time (``experiment=sensitivity``, ``make sensitivity``).

The runs are AISP runs whose variant starts with ``sensitivity``; each is placed by its
manifest's ``method.n``, ``method.kappa`` and ``method.sigma``. Per (dataset, pair, n,
κ, σ), over the seeds on disk:

* final reward: the chosen response's reward under the run's own reward model;
* base log-prob: ``evaluate``'s per-prompt ``base_logprob`` (mean per-token
  log-probability of the response under the noise-free policy);
* both as the mean over (prompt, seed) values with a bootstrap interval, prompts
  resampled as clusters (``Bootstrap.pooled_mean`` of :mod:`aisp_bench.report.stats`);
* seconds and generated tokens per prompt: means over prompts and seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from aisp_bench.rundir import Run

from .common import (
    dataset_key, display_dataset, display_pair, fmt_interval, fmt_num, pair_key, records_mean, render_markdown,
    write_texts,
)  # fmt: skip
from .figures import plot_sensitivity
from .stats import Bootstrap
from .table1_extended import prompt_values

PREFIX = "sensitivity"  # the experiment's variants


def _setting(run: Run) -> tuple[int, int, float] | None:
    n, kappa, sigma = (run.method_param(k) for k in ("n", "kappa", "sigma"))
    try:
        return int(n), int(kappa), float(sigma)
    except (TypeError, ValueError):
        return None


def sensitivity_table(runs: Sequence[Run], boot: Bootstrap | None = None) -> pd.DataFrame:
    """One row per (dataset, model, reward, n, kappa, sigma): n_seeds, n_prompts, budget
    (n·κ), final_reward / base_logprob (mean, lo, hi), seconds and tokens per prompt."""
    boot = boot or Bootstrap()
    cells: dict[tuple, list[Run]] = {}
    for r in runs:
        setting = _setting(r)
        if r.method == "aisp" and r.variant.startswith(PREFIX) and setting is not None:
            cells.setdefault((r.dataset, r.model, r.reward, *setting), []).append(r)
    rows = []
    for key in sorted(cells, key=lambda k: (dataset_key(k[0]), pair_key(k[1:3]), k[3], k[5])):
        rs = sorted(cells[key], key=lambda r: r.seed)
        vals = {r.seed: prompt_values(r) for r in rs}
        row: dict[str, Any] = dict(zip(("dataset", "model", "reward", "n", "kappa", "sigma"), key),
                                   budget=key[3] * key[4], n_seeds=len(rs), seeds=",".join(str(r.seed) for r in rs),
                                   n_prompts=len({p for v in vals.values() for p in v["reward"]}))
        for m, col in (("reward", "final_reward"), ("base_logprob", "base_logprob")):
            iv = boot.pooled_mean({s: v[m] for s, v in vals.items()})
            row.update({col: iv.mean, f"{col}_lo": iv.lo, f"{col}_hi": iv.hi})
        for m, field in (("seconds", "seconds"), ("tokens", "num_tokens")):
            row[m] = records_mean([x for r in rs for x in r.records], field)
        rows.append(row)
    return pd.DataFrame(rows)


def _notes(df: pd.DataFrame, boot: Bootstrap) -> list[str]:
    budgets = ", ".join(str(b) for b in sorted(set(df["budget"])))
    return [f"AISP with n·κ held fixed (n·κ = {budgets}; plus the y(U*) candidate), the split (n, κ) and σ varied "
            "(experiment=sensitivity).",
            "Final reward: the chosen response's reward under the run's own reward model. Base log-prob/token: mean "
            "per-token log-probability of the response under the noise-free policy (evaluate's base_logprob). "
            "Both: mean over (prompt, seed) values; " + boot.describe() + ".",
            "Seconds and tokens: per prompt (generated tokens, every sample), mean over prompts and seeds."]


def write_sensitivity(df: pd.DataFrame, out_dir: Path | str, fig_dir: Path | str, boot: Bootstrap,
                      name: str = "sensitivity") -> list[Path]:
    """Write ``<name>.csv``, ``<name>.md`` to ``out_dir`` and ``<name>_<dataset>.png`` to ``fig_dir``."""
    header = ["Dataset", "Models", "n × κ", "σ", "Seeds", "Prompts", "Final reward", "Base log-prob/token",
              "Seconds/prompt", "Tokens/prompt"]
    body = [[display_dataset(r.dataset), display_pair(r.model, r.reward), f"{r.n} × {r.kappa}", f"{r.sigma:g}",
             str(r.n_seeds), str(r.n_prompts), fmt_interval(r.final_reward, r.final_reward_lo, r.final_reward_hi, 3),
             fmt_interval(r.base_logprob, r.base_logprob_lo, r.base_logprob_hi, 3), fmt_num(r.seconds, 2),
             fmt_num(r.tokens, 0)] for r in df.itertuples()]
    md = render_markdown(header, body, title="Fixed-budget sensitivity of AISP: split (n, κ) and σ",
                         notes=_notes(df, boot), align=["l", "l", "l"] + ["r"] * 7)
    paths = write_texts(out_dir, name, {"md": md, "csv": df.to_csv(index=False)})
    for ds in sorted(set(df["dataset"]), key=dataset_key):
        paths.append(plot_sensitivity(df[df["dataset"] == ds], Path(fig_dir) / f"{name}_{ds}.png"))
    return paths
