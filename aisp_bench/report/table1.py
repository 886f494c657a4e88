"""Table 1 of the paper: mean (std) over seeds of reward, diversity and coherence, the
paper's values beside ours. A pure function of run folders.

Per-seed values come from ``summary.json``'s ``metrics`` (the evaluation step). Reward
falls back to the mean over prompts of the chosen response's reward in
``records.jsonl`` (the run's own reward model) when ``metrics.reward_mean`` is absent.
"""

from __future__ import annotations

import functools
import math
from importlib import resources
from io import StringIO
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from aisp_bench.rundir import Run

from .common import (
    DASH, dataset_key, display_dataset, display_method, display_pair, finite_or_nan, fmt_mean_std, mean_std,
    method_key, one_scale, pair_key, prompt_source, records_mean, render_latex, render_markdown, select_variants,
    tex_escape, unfinished_shards, write_texts,
)  # fmt: skip

METRICS = ("reward", "diversity", "coherence")
METRIC_NAMES = {"reward": "Reward", "diversity": "Diversity", "coherence": "Coherence"}
METRIC_DECIMALS = {"reward": 2, "diversity": 3, "coherence": 3}
PAPER_SOURCE = ('Kanai, Yoshida, Hashimoto, "Inference-time alignment of language models by importance '
                'sampling on pre-logit space", Table 1')


# --------------------------------------------------------------------------- paper data


@functools.cache
def load_paper_table1() -> pd.DataFrame:
    """The paper's Table 1 as data (read once; do not modify): columns dataset, model, reward,
    method, metric, mean, std (floats), mean_text, std_text (as printed in the paper) and source."""
    text = resources.files("aisp_bench.report").joinpath("paper_table1.csv").read_text(encoding="utf-8")
    df = pd.read_csv(StringIO(text), dtype=str, keep_default_na=False).rename(
        columns={"mean": "mean_text", "std": "std_text"})
    df["mean"] = df["mean_text"].astype(float)
    df["std"] = df["std_text"].astype(float)
    return df


# --------------------------------------------------------------------------- table 1


def seed_values(run: Run) -> dict[str, Any]:
    """Per-seed Table 1 values of one run.

    reward: ``summary.metrics.reward_mean`` when present (``reward_source`` =
    "metrics"), else the mean over prompts of ``records[].reward`` ("records"), else
    ``summary.mean_reward`` ("summary"). diversity / coherence: ``summary.metrics``
    only (NaN when evaluation has not run).
    """
    metrics, summary = run.metrics, run.summary or {}
    reward, source, n_prompts = finite_or_nan(metrics.get("reward_mean")), "metrics", len(run.records)
    if not np.isfinite(reward):
        reward, source = records_mean(run.records, "reward"), "records"
    if not np.isfinite(reward):
        reward, source = finite_or_nan(summary.get("mean_reward")), "summary"
        n_prompts = int(summary.get("num_done") or 0)
    return dict(reward=reward, reward_source=source,
                reward_model=str(metrics.get("reward_model") or run.reward) if source == "metrics" else run.reward,
                coherence_encoder=metrics.get("coherence_encoder"), diversity=finite_or_nan(metrics.get("diversity")),
                coherence=finite_or_nan(metrics.get("coherence")), n_prompts=n_prompts, complete=run.complete)


def table1(runs: Sequence[Run]) -> pd.DataFrame:
    """Table 1: mean (std) over seeds of reward, diversity and coherence per
    dataset × (model, reward) pair × method, with the paper's value beside ours.

    One row per (dataset, model, reward, method); the variant used per cell follows
    :func:`aisp_bench.report.common.select_variants`. Columns: dataset, model, reward,
    method, variant, seeds, n_seeds, prompts (where they came from, :func:`~aisp_bench.report.common.prompt_source`),
    n_prompts (min over seeds), complete (every seed's
    summary says complete), reward_source ("metrics" / "records" / "summary" /
    "mixed" for the last two), and for m in reward/diversity/coherence: ``m_mean``,
    ``m_std`` (ddof=1), ``m_n`` (seeds with a value), ``m_paper_mean``,
    ``m_paper_std`` (NaN where the paper has no such cell).

    No mean mixes scales: when at least one seed has ``metrics.reward_mean`` only those
    seeds are averaged (the own-reward fallback is used only when no seed of the cell has
    been evaluated), and of those only the seeds scored by the reward model most of them
    share (:func:`~aisp_bench.report.common.one_scale`); coherence likewise per encoder.
    ``reward_left_out`` / ``coherence_left_out`` name the seeds left out ("" for none).
    """
    paper_idx = {(r.dataset, r.model, r.reward, r.method, r.metric): (r.mean, r.std)
                 for r in load_paper_table1().itertuples()}
    chosen, notes = select_variants(runs)
    rows = []
    for (dataset, model, reward, method), rs in chosen.items():
        vals = [seed_values(r) | {"seed": r.seed} for r in rs]
        # Never mix scales: the evaluation reward over the own one, then one scorer per mean.
        evaluated = [v for v in vals if v["reward_source"] == "metrics"]
        reward_vals, reward_model = one_scale(evaluated or vals, lambda v: str(v["reward_model"]))
        scored = [v for v in vals if np.isfinite(v["coherence"])]
        coherence_vals, encoder = one_scale(scored, lambda v: str(v["coherence_encoder"]))
        sources = sorted({v["reward_source"] for v in reward_vals})
        row: dict[str, Any] = dict(
            dataset=dataset, model=model, reward=reward, method=method, variant=rs[0].variant,
            seeds=",".join(str(r.seed) for r in rs), n_seeds=len(rs),
            prompts=" | ".join(sorted({prompt_source(r) for r in rs})),
            n_prompts=min(v["n_prompts"] for v in vals), complete=all(v["complete"] for v in vals),
            reward_source=sources[0] if len(sources) == 1 else "mixed",
            reward_model=reward_model, coherence_encoder=encoder if encoder != "None" else "",
            reward_left_out=_left_out(evaluated, reward_vals, "reward_model"),
            coherence_left_out=_left_out(scored, coherence_vals, "coherence_encoder"),
        )
        for m in METRICS:
            src = {"reward": reward_vals, "coherence": coherence_vals}.get(m, vals)
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std(v[m] for v in src)
            row[f"{m}_n"] = sum(1 for v in src if np.isfinite(v[m]))
            row[f"{m}_paper_mean"], row[f"{m}_paper_std"] = paper_idx.get((dataset, model, reward, method, m),
                                                                         (math.nan, math.nan))
        rows.append(row)
    rows.sort(key=lambda r: (dataset_key(r["dataset"]), pair_key((r["model"], r["reward"])), method_key(r["method"])))
    df = pd.DataFrame(rows)
    df.attrs["notes"] = notes + unfinished_shards(r for rs in chosen.values() for r in rs)
    return df


def _left_out(candidates: list[dict], kept: list[dict], scorer: str) -> str:
    """The seeds of ``candidates`` not in ``kept``, each with its scorer: "seed 1 (rm), ..."."""
    return ", ".join(f"seed {v['seed']} ({v[scorer]})" for v in candidates if v not in kept)


def _table1_cell(cell: pd.DataFrame, m: str, flags: set[str]) -> str:
    """One of our Table 1 cells (``cell``: its row, if any), with its marks (flags collects the marks used)."""
    if cell.empty:
        return DASH
    c = cell.iloc[0]
    text = fmt_mean_std(c[f"{m}_mean"], c[f"{m}_std"], METRIC_DECIMALS[m])
    if m != "reward" and not np.isfinite(c[f"{m}_mean"]):
        flags.add("missing_metric")
    if m == "reward" and c["reward_source"] != "metrics" and np.isfinite(c["reward_mean"]):
        text += "†"
        flags.add("dagger")
    if c.get(f"{m}_left_out"):
        text += "‡"
        flags.add("mixed")
    if not c["complete"] and np.isfinite(c[f"{m}_mean"]):
        text += "*"
        flags.add("star")
    if np.isfinite(c[f"{m}_mean"]) and c[f"{m}_n"] != 3:
        text += f" [n={c[f'{m}_n']}]"
        flags.add("nseeds")
    return text


TABLE1_MARKS = {
    "dagger": "†: no seed of this cell has evaluation metrics yet; reward is the mean over prompts of the "
              "chosen response's reward under the run's own reward model (records.jsonl).",
    "missing_metric": "—: not available; diversity/coherence need the evaluation step "
                      "(summary.json has no metrics for these runs yet).",
    "mixed": "‡: seeds scored by another reward model or coherence encoder than most seeds of the cell are left "
             "out, since a mean over different scorers mixes scales (listed below; re-run evaluate on them with the "
             "same scorer).",
    "star": "*: at least one seed is not complete (summary.json missing or complete=false); "
            "its value covers the prompts done so far.",
    "nseeds": "[n=k]: the value averages k seeds, not three (seeds without that value are left out).",
}


def _table1_notes(df: pd.DataFrame, has_paper: bool, flags: set[str]) -> list[str]:
    notes = ["Values: mean (std) over seeds; std = sample standard deviation over seeds (ddof=1); "
             "a value without std comes from one seed."]
    if has_paper:
        notes.append(f"'paper' columns: {PAPER_SOURCE} (stored in aisp_bench/report/paper_table1.csv). The paper "
                     "(Sec. 3.1) evaluates reward with UltraRM, presumably also for the '& Eurus' pairs.")
    notes.append("Reward: summary.metrics.reward_mean (evaluation step) where present. Scored by: "
                 + "; ".join(f"{display_pair(r.model, r.reward)}: {r.reward_model}"
                             for r in df.drop_duplicates(["model", "reward", "reward_model"]).itertuples()) + ".")
    sources: dict[str, set[str]] = {}
    for r in df.itertuples():
        sources.setdefault(r.dataset, set()).update(r.prompts.split(" | "))
    notes.append("Prompts: " + "; ".join(f"{display_dataset(ds)}: {' | '.join(sorted(src))}"
                                         for ds, src in sources.items()) + ".")
    encoders = sorted({e for e in df["coherence_encoder"] if e})
    if encoders:
        notes.append("Coherence encoder: " + "; ".join(encoders) + ".")
    notes += [text for flag, text in TABLE1_MARKS.items() if flag in flags]
    notes += [f"‡ {display_dataset(r.dataset)}, {display_pair(r.model, r.reward)}, {display_method(r.method)}, "
              f"{m}: left out {getattr(r, f'{m}_left_out')}." for r in df.itertuples()
              for m in ("reward", "coherence") if getattr(r, f"{m}_left_out")]
    return notes + list(df.attrs.get("notes", []))


def write_table1(df: pd.DataFrame, out_dir: Path | str, name: str = "table1") -> list[Path]:
    """Write ``<name>.csv`` (the tidy frame), ``<name>.md`` and ``<name>.tex`` (the paper's layout:
    per dataset and metric our value, and the paper's where it has one)."""
    paper_text = {(r.dataset, r.model, r.reward, r.method, r.metric): f"{r.mean_text} ({r.std_text})"
                  for r in load_paper_table1().itertuples()}
    columns: list[tuple[str, str, str]] = []  # (dataset, metric, "ours" | "paper")
    for ds in sorted(df["dataset"].unique(), key=dataset_key):
        sub = df[df["dataset"] == ds]
        for m in METRICS:
            columns += [(ds, m, "ours")] + ([(ds, m, "paper")] if sub[f"{m}_paper_mean"].notna().any() else [])
    body: list[tuple[str, str, list[str]]] = []  # (pair on a block's first row, method, cells)
    flags: set[str] = set()
    for model, reward in sorted({(m, r) for m, r in zip(df["model"], df["reward"])}, key=pair_key):
        sub = df[(df["model"] == model) & (df["reward"] == reward)]
        for i, method in enumerate(sorted(sub["method"].unique(), key=method_key)):
            mine = sub[sub["method"] == method]
            cells = [paper_text.get((ds, model, reward, method, m), DASH) if kind == "paper"
                     else _table1_cell(mine[mine["dataset"] == ds], m, flags) for ds, m, kind in columns]
            body.append((display_pair(model, reward) if i == 0 else "", method, cells))
    has_paper = any(k == "paper" for _, _, k in columns)
    notes = _table1_notes(df, has_paper, flags)
    header = ["Models", "Methods"] + [
        f"{display_dataset(ds)} {METRIC_NAMES[m]}" + (" (paper)" if k == "paper" else "") for ds, m, k in columns
    ]
    md = render_markdown(header, [[pair, display_method(m), *cells] for pair, m, cells in body], notes=notes,
                         title="Table 1: Average reward, diversity and coherence", align="ll" + "r" * len(columns))
    levels = [[tex_escape(display_dataset(ds)) for ds, _, _ in columns], [METRIC_NAMES[m] for _, m, _ in columns]]
    levels += [[k for _, _, k in columns]] if has_paper else []
    levels = [["", ""] + lv for lv in levels[:-1]] + [["Models", "Methods"] + levels[-1]]
    tex_body = [[tex_escape(pair), display_method(m, latex=True),
                 *(c.replace("†", r"$^\dagger$").replace("‡", r"$^\ddagger$").replace("*", r"$^*$")
                   for c in cells)] for pair, m, cells in body]
    tex = render_latex(levels, tex_body, caption="Average rewards, diversity, and coherence of BoN and AISP.",
                       label="tab:table1", notes=notes, align="ll" + "r" * len(columns))
    return write_texts(out_dir, name, {"csv": df.to_csv(index=False), "md": md, "tex": tex})
