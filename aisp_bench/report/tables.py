"""Tables 1-3 of the paper and the λ-sweep table, as pure functions of files on disk.

Each builder returns a tidy ``pandas.DataFrame`` (one row per table row, numeric
columns; notes in ``df.attrs["notes"]``); each writer renders it to Markdown, CSV and
(except the λ sweep) LaTeX. Markdown and LaTeX are written here (no ``tabulate``).

Conventions
-----------
* "mean (std) over seeds": the mean over seeds of a per-seed value, and the *sample*
  standard deviation over seeds (``ddof=1``); undefined (NaN, shown "—") with one seed.
* Table 1's per-seed values come from ``summary.json``'s ``metrics`` (the evaluation
  step). Reward falls back to the mean over prompts of the chosen response's reward in
  ``records.jsonl`` (the run's own reward model) when ``metrics.reward_mean`` is absent.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from .io import (
    Run,
    dataset_key,
    discover_judge,
    discover_runs,
    display_dataset,
    display_method,
    display_pair,
    as_float_array,
    finite_or_nan,
    group_runs,
    method_key,
    pair_key,
    select_variants,
    tex_escape,
)

METRICS = ("reward", "diversity", "coherence")
METRIC_NAMES = {"reward": "Reward", "diversity": "Diversity", "coherence": "Coherence"}
METRIC_DECIMALS = {"reward": 2, "diversity": 3, "coherence": 3}
DASH = "—"
PAPER_SOURCE = ('Kanai, Yoshida, Hashimoto, "Inference-time alignment of language models by importance '
                'sampling on pre-logit space", Table 1')


# --------------------------------------------------------------------------- helpers


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (``ddof=1``) of the finite values; NaN where undefined."""
    x = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), (float(x.std(ddof=1)) if x.size > 1 else math.nan)


def _nanmean(x: np.ndarray) -> float:
    """Mean of the finite entries; NaN when there are none (no warning)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def fmt_num(x: float, decimals: int) -> str:
    """Fixed decimals, "—" for NaN."""
    return DASH if x is None or not np.isfinite(x) else f"{x:.{decimals}f}"


def fmt_std(x: float) -> str:
    """A std with two significant digits, no exponent ("0.07", "0.0004", "2.1")."""
    if x is None or not np.isfinite(x):
        return DASH
    if x == 0:
        return "0"
    digits = max(0, 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{digits}f}"


def fmt_mean_std(mean: float, std: float, decimals: int) -> str:
    """``mean (std)``; only ``mean`` when the std is undefined; "—" when the mean is."""
    if mean is None or not np.isfinite(mean):
        return DASH
    return fmt_num(mean, decimals) if not np.isfinite(std) else f"{fmt_num(mean, decimals)} ({fmt_std(std)})"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None,
                    notes: Sequence[str] = (), align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table (``align``: "l"/"r" per column), title and notes."""
    align = list(align or ["l"] * len(header))
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
    lines.append("|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_md_escape(c) for c in row) + " |")
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


_TEX_UNICODE = (("σ²", r"$\sigma^2$"), ("σ", r"$\sigma$"), ("λ", r"$\lambda$"), ("†", r"$^\dagger$"),
                ("≤", r"$\le$"), ("·", r"$\cdot$"), ("±", r"$\pm$"), ("—", "---"))


def tex_text(text: str) -> str:
    """Plain text (a note, a caption) as LaTeX: special characters escaped, the few
    Unicode symbols used in notes (σ², λ, †, ≤, ·, ±, —) as math or dashes."""
    out = tex_escape(text)
    for u, t in _TEX_UNICODE:
        out = out.replace(u, t)
    return out


def render_latex(header_levels: Sequence[Sequence[str]], rows: Sequence[Sequence[str]], *, caption: str = "",
                 label: str = "", notes: Sequence[str] = (), align: str | None = None,
                 group_rows_by_first: bool = False) -> str:
    """A booktabs ``table`` with a multi-level header.

    ``header_levels`` lists header rows top to bottom; consecutive equal labels in a row
    (within the span of the row above) are merged with ``\\multicolumn`` and ruled with
    ``\\cmidrule``. Cells must already be LaTeX (escaped). Needs ``booktabs``.
    """
    ncol = len(header_levels[-1])
    align = align or "l" * ncol
    out = [r"\begin{table}[t]", r"\centering", r"\small"]
    if caption:
        out.append(rf"\caption{{{caption}}}")
    if label:
        out.append(rf"\label{{{label}}}")
    out += [rf"\begin{{tabular}}{{{align}}}", r"\toprule"]
    parent_bounds = [(0, ncol)]
    for level, labels in enumerate(header_levels):
        spans: list[tuple[int, int, str]] = []  # (start, end, label)
        for lo, hi in parent_bounds:
            j = lo
            while j < hi:
                k = j
                while k + 1 < hi and labels[k + 1] == labels[j]:
                    k += 1
                spans.append((j, k + 1, labels[j]))
                j = k + 1
        cells, rules = [], []
        for lo, hi, lab in spans:
            if hi - lo > 1:
                cells.append(rf"\multicolumn{{{hi - lo}}}{{c}}{{{lab}}}")
                if lab:
                    rules.append(rf"\cmidrule(lr){{{lo + 1}-{hi}}}")
            else:
                cells.append(lab)
        out.append(" & ".join(cells) + r" \\")
        if rules and level < len(header_levels) - 1:
            out.append(" ".join(rules))
        parent_bounds = [(lo, hi) for lo, hi, _ in spans]
    out.append(r"\midrule")
    prev = None
    for row in rows:
        if group_rows_by_first and prev is not None and row[0] and row[0] != prev:
            out.append(r"\midrule")
        if row[0]:
            prev = row[0]
        out.append(" & ".join(str(c).replace("—", "---") for c in row) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        out.append(r"\par\smallskip\footnotesize")
        out += [tex_text(n) + r"\\" for n in notes]
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def _write(out_dir: Path | str, name: str, contents: dict[str, str]) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, text in contents.items():
        p = out_dir / f"{name}.{ext}"
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- paper data


def load_paper_table1(path: Path | str | None = None) -> pd.DataFrame:
    """The paper's Table 1 as data: columns dataset, model, reward, method, metric, mean,
    std (floats), mean_text, std_text (as printed in the paper) and source."""
    if path is None:
        text = resources.files("aisp_bench.report").joinpath("paper_table1.csv").read_text(encoding="utf-8")
        from io import StringIO

        raw = pd.read_csv(StringIO(text), dtype=str, keep_default_na=False)
    else:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    df = raw.rename(columns={"mean": "mean_text", "std": "std_text"})
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
    metrics = run.metrics
    out: dict[str, Any] = {}
    reward = finite_or_nan(metrics.get("reward_mean"))
    source = "metrics"
    n_prompts = len(run.records)
    if not np.isfinite(reward):
        rewards = as_float_array([r.get("reward") for r in run.records])
        rewards = rewards[np.isfinite(rewards)]
        if rewards.size:
            reward, source = float(rewards.mean()), "records"
        else:
            reward, source = finite_or_nan((run.summary or {}).get("mean_reward")), "summary"
            n_prompts = int((run.summary or {}).get("num_done") or 0)
    out["reward"], out["reward_source"] = reward, source
    out["reward_model"] = str(metrics.get("reward_model") or run.reward) if source == "metrics" else run.reward
    out["coherence_encoder"] = metrics.get("coherence_encoder")
    out["diversity"] = finite_or_nan(metrics.get("diversity"))
    out["coherence"] = finite_or_nan(metrics.get("coherence"))
    out["n_prompts"] = n_prompts
    out["complete"] = run.complete
    return out


def table1(results: Path | str, *, datasets: Iterable[str] | None = None, pairs: Iterable[str] | None = None,
           methods: Iterable[str] | None = None, variants: Iterable[str] | None = None,
           runs: list[Run] | None = None, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 1: mean (std) over seeds of reward, diversity and coherence per
    dataset × (model, reward) pair × method, with the paper's value beside ours.

    One row per (dataset, model, reward, method); the variant used per cell follows
    :func:`aisp_bench.report.io.select_variants`. Columns: dataset, model, reward,
    method, variant, seeds, n_seeds, n_prompts (min over seeds), complete (every seed's
    summary says complete), reward_source ("metrics" / "records" / "summary" /
    "mixed" for the last two), and for m in reward/diversity/coherence: ``m_mean``,
    ``m_std`` (ddof=1), ``m_n`` (seeds with a value), ``m_paper_mean``,
    ``m_paper_std`` (NaN where the paper has no such cell).

    Reward never mixes scales: when at least one seed has ``metrics.reward_mean``
    only those seeds are averaged; the own-reward fallback is used only when no seed
    of the cell has been evaluated.
    """
    if runs is None:
        runs = discover_runs(results, datasets=datasets, pairs=pairs, methods=methods, variants=variants)
    paper = load_paper_table1() if paper is None else paper
    paper_idx = {(r.dataset, r.model, r.reward, r.method, r.metric): (r.mean, r.std) for r in paper.itertuples()}
    chosen, notes = select_variants(runs)
    rows = []
    for (dataset, model, reward, method), rs in chosen.items():
        vals = [seed_values(r) for r in rs]
        # Never mix reward scales: when any seed has the evaluation reward, only those seeds count.
        evaluated = [v for v in vals if v["reward_source"] == "metrics"]
        reward_vals = evaluated or vals
        sources = sorted({v["reward_source"] for v in reward_vals})
        row: dict[str, Any] = dict(
            dataset=dataset, model=model, reward=reward, method=method, variant=rs[0].variant,
            seeds=",".join(str(r.seed) for r in rs), n_seeds=len(rs),
            n_prompts=min(v["n_prompts"] for v in vals), complete=all(v["complete"] for v in vals),
            reward_source=sources[0] if len(sources) == 1 else "mixed",
            reward_model=",".join(sorted({str(v["reward_model"]) for v in reward_vals})),
            coherence_encoder=",".join(sorted({str(v["coherence_encoder"]) for v in vals if v["coherence_encoder"]})),
        )
        for m in METRICS:
            src = reward_vals if m == "reward" else vals
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std(v[m] for v in src)
            row[f"{m}_n"] = sum(1 for v in src if np.isfinite(v[m]))
            row[f"{m}_paper_mean"], row[f"{m}_paper_std"] = paper_idx.get((dataset, model, reward, method, m),
                                                                         (math.nan, math.nan))
        rows.append(row)
    columns = ["dataset", "model", "reward", "method", "variant", "seeds", "n_seeds", "n_prompts", "complete",
               "reward_source", "reward_model", "coherence_encoder"] + [f"{m}_{k}" for m in METRICS for k in ("mean", "std", "n", "paper_mean", "paper_std")]
    df = pd.DataFrame(rows, columns=columns)
    if len(df):
        order = sorted(range(len(df)), key=lambda i: (dataset_key(df.iloc[i]["dataset"]),
                                                      pair_key((df.iloc[i]["model"], df.iloc[i]["reward"])),
                                                      method_key(df.iloc[i]["method"])))
        df = df.iloc[order].reset_index(drop=True)
    df.attrs["notes"] = notes
    return df


def _table1_layout(df: pd.DataFrame, latex: bool) -> tuple[list[tuple[str, str, str]], list[list[str]], list[str]]:
    """Header tuples (dataset, metric, ours|paper), body rows and notes for Table 1."""
    paper_text = {}
    try:
        pt = load_paper_table1()
        paper_text = {(r.dataset, r.model, r.reward, r.method, r.metric): f"{r.mean_text} ({r.std_text})"
                      for r in pt.itertuples()}
    except FileNotFoundError:  # pragma: no cover - packaged data missing
        pass
    datasets = sorted(df["dataset"].unique(), key=dataset_key)
    pairs = sorted({(m, r) for m, r in zip(df["model"], df["reward"])}, key=pair_key)
    columns: list[tuple[str, str, str]] = []
    for ds in datasets:
        sub = df[df["dataset"] == ds]
        for m in METRICS:
            columns.append((ds, m, "ours"))
            if sub[f"{m}_paper_mean"].notna().any():
                columns.append((ds, m, "paper"))
    body: list[list[str]] = []
    flags = dict(dagger=False, star=False, nseeds=False, missing_metric=False)
    for model, reward in pairs:
        sub = df[(df["model"] == model) & (df["reward"] == reward)]
        methods = sorted(sub["method"].unique(), key=method_key)
        for i, method in enumerate(methods):
            label = display_pair(model, reward)
            row = [(tex_escape(label) if latex else label) if i == 0 else "",
                   display_method(method, latex=latex)]
            for ds, m, kind in columns:
                cell = sub[(sub["method"] == method) & (sub["dataset"] == ds)]
                if kind == "paper":
                    row.append(paper_text.get((ds, model, reward, method, m), DASH))
                    continue
                if cell.empty:
                    row.append(DASH)
                    continue
                c = cell.iloc[0]
                text = fmt_mean_std(c[f"{m}_mean"], c[f"{m}_std"], METRIC_DECIMALS[m])
                if m != "reward" and not np.isfinite(c[f"{m}_mean"]):
                    flags["missing_metric"] = True
                if m == "reward":
                    if c["reward_source"] != "metrics" and np.isfinite(c["reward_mean"]):
                        text += "†"
                        flags["dagger"] = True
                    if not c["complete"]:
                        text += "*"
                        flags["star"] = True
                if np.isfinite(c[f"{m}_mean"]) and c[f"{m}_n"] != 3:
                    text += f" [n={c[f'{m}_n']}]"
                    flags["nseeds"] = True
                row.append(text.replace("†", r"$^\dagger$").replace("*", r"$^*$") if latex else text)
            body.append(row)
    notes = ["Values: mean (std) over seeds; std = sample standard deviation over seeds (ddof=1); "
             "a value without std comes from one seed."]
    if any(k == "paper" for _, _, k in columns):
        notes.append(f"'paper' columns: {PAPER_SOURCE} (stored in aisp_bench/report/paper_table1.csv). The paper "
                     "(Sec. 3.1) evaluates reward with UltraRM, presumably also for the '& Eurus' pairs.")
    notes.append("Reward: summary.metrics.reward_mean (evaluation step) where present. Scored by: "
                 + "; ".join(f"{display_pair(r.model, r.reward)}: {r.reward_model}"
                             for r in df.drop_duplicates(["model", "reward", "reward_model"]).itertuples()) + ".")
    encoders = sorted({e for e in df["coherence_encoder"] if e})
    if encoders:
        notes.append("Coherence encoder: " + "; ".join(encoders) + ".")
    if flags["dagger"]:
        notes.append("†: no seed of this cell has evaluation metrics yet; reward is the mean over prompts of the "
                     "chosen response's reward under the run's own reward model (records.jsonl).")
    if flags["missing_metric"]:
        notes.append("—: not available; diversity/coherence need the evaluation step "
                     "(summary.json has no metrics for these runs yet).")
    if flags["star"]:
        notes.append("*: at least one seed is not complete (summary.json missing or complete=false); "
                     "its value covers the prompts done so far.")
    if flags["nseeds"]:
        notes.append("[n=k]: the value averages k seeds, not three (seeds without that value are left out).")
    notes += list(df.attrs.get("notes", []))
    return columns, body, notes


def write_table1(df: pd.DataFrame, out_dir: Path | str, name: str = "table1") -> list[Path]:
    """Write ``<name>.csv`` (the tidy frame), ``<name>.md`` and ``<name>.tex`` (paper layout)."""
    if df.empty:
        raise ValueError("table 1 has no rows")
    contents: dict[str, str] = {"csv": df.to_csv(index=False)}
    columns, body, notes = _table1_layout(df, latex=False)
    header = ["Models", "Methods"] + [
        f"{display_dataset(ds)} {METRIC_NAMES[m]}" + (" (paper)" if k == "paper" else "") for ds, m, k in columns
    ]
    contents["md"] = render_markdown(header, body, title="Table 1: Average reward, diversity and coherence",
                                     notes=notes, align=["l", "l"] + ["r"] * len(columns))
    columns, body, notes = _table1_layout(df, latex=True)
    has_paper = any(k == "paper" for _, _, k in columns)
    levels = [["", ""] + [tex_escape(display_dataset(ds)) for ds, _, _ in columns],
              ["Models", "Methods"] + [METRIC_NAMES[m] for _, m, _ in columns]]
    if has_paper:
        levels[1] = ["", ""] + [METRIC_NAMES[m] for _, m, _ in columns]
        levels.append(["Models", "Methods"] + [k for _, _, k in columns])
    contents["tex"] = render_latex(levels, body, caption="Average rewards, diversity, and coherence of BoN and AISP.",
                                   label="tab:table1", notes=notes, align="ll" + "r" * len(columns),
                                   group_rows_by_first=True)
    return _write(out_dir, name, contents)


# --------------------------------------------------------------------------- tables 2 / 3

WIN_FIELDS = ("win", "draw", "loss", "invalid")


def trial_percentages(trials: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per-trial percentages of win/draw/loss/invalid.

    A trial whose four counts sum to its ``n`` holds counts (percent = 100·count/n); a
    trial whose four values sum to about 100 already holds percentages. Other trials
    (and ``n`` = 0) are dropped.
    """
    out = []
    for t in trials:
        vals = {k: finite_or_nan(t.get(k, 0)) for k in WIN_FIELDS}
        if not all(np.isfinite(v) for v in vals.values()):
            continue
        total = sum(vals.values())
        n = finite_or_nan(t.get("n"))
        if np.isfinite(n) and n > 0 and abs(total - n) < 1e-9:
            out.append({k: 100.0 * v / n for k, v in vals.items()})
        elif abs(total - 100.0) < 0.5:
            out.append(vals)
    return out


def winrate_table(results: Path | str, method_a: str, method_b: str, *, datasets: Iterable[str] | None = None,
                  pairs: Iterable[str] | None = None) -> pd.DataFrame:
    """Win / draw / loss / invalid (percent, ``method_a``'s view) per dataset × pair,
    averaged over trials, from the judge files ``<a>_vs_<b>.json`` (or ``<b>_vs_<a>.json``
    with win and loss swapped).

    Columns: dataset, model, reward, method_a, method_b, judge_model, mode, num_prompts,
    n_trials, n_mean (judged comparisons per trial), win, draw, loss, invalid (mean over
    trials), ``*_std`` (ddof=1 over trials), source ("trials" when recomputed from the
    per-trial counts, "file" when only the file's ``mean`` was usable), path.
    """
    found: dict[tuple[str, str, str], dict[str, Any]] = {}
    for jr in discover_judge(results, datasets=datasets, pairs=pairs):
        if (jr.method_a, jr.method_b) == (method_a, method_b):
            swap = False
        elif (jr.method_a, jr.method_b) == (method_b, method_a):
            swap = True
        else:
            continue
        key = (jr.dataset, jr.model, jr.reward)
        if key in found and not found[key]["_swap"]:
            continue  # a direct a_vs_b file wins over a reversed one
        d = jr.data
        trials = [t for t in d.get("trials") or [] if isinstance(t, dict)]
        pct = trial_percentages(trials)
        row: dict[str, Any] = dict(dataset=jr.dataset, model=jr.model, reward=jr.reward, method_a=method_a,
                                   method_b=method_b, judge_model=d.get("judge_model"), mode=d.get("mode"),
                                   num_prompts=d.get("num_prompts"), n_trials=len(pct))
        if pct:
            row["n_mean"] = float(np.mean([finite_or_nan(t.get("n")) for t in trials]))
            for k in WIN_FIELDS:
                row[k], row[f"{k}_std"] = mean_std(p[k] for p in pct)
            row["source"] = "trials"
        else:
            mean = d.get("mean") or {}
            row["n_mean"] = math.nan
            for k in WIN_FIELDS:
                row[k], row[f"{k}_std"] = finite_or_nan(mean.get(k)), math.nan
            row["source"] = "file"
        if swap:
            row["win"], row["loss"] = row["loss"], row["win"]
            row["win_std"], row["loss_std"] = row["loss_std"], row["win_std"]
        row["path"] = str(jr.path)
        row["_swap"] = swap
        found[key] = row
    columns = ["dataset", "model", "reward", "method_a", "method_b", "judge_model", "mode", "num_prompts",
               "n_trials", "n_mean"] + list(WIN_FIELDS) + [f"{k}_std" for k in WIN_FIELDS] + ["source", "path"]
    keys = sorted(found, key=lambda k: (dataset_key(k[0]), pair_key((k[1], k[2]))))
    return pd.DataFrame([found[k] for k in keys], columns=columns)


def table2(results: Path | str, **filters: Any) -> pd.DataFrame:
    """Table 2: AISP vs BoN (top-p)."""
    return winrate_table(results, "aisp", "bon_topp", **filters)


def table3(results: Path | str, **filters: Any) -> pd.DataFrame:
    """Table 3: AISP vs BoN (N(0, σ²I))."""
    return winrate_table(results, "aisp", "bon_gaussian", **filters)


def write_winrate(df: pd.DataFrame, out_dir: Path | str, name: str, title: str | None = None) -> list[Path]:
    """Write ``<name>.csv`` (tidy), ``<name>.md`` and ``<name>.tex`` (the paper's layout:
    Datasets | Models | A | Draw | B, plus Invalid and the number of trials)."""
    if df.empty:
        raise ValueError(f"{name} has no rows")
    a, b = df["method_a"].iloc[0], df["method_b"].iloc[0]
    tex_title = tex_text(title) if title else \
        f"Win rate for {display_method(a, latex=True)} vs {display_method(b, latex=True)}."
    title = title or f"Win rate for {display_method(a)} vs {display_method(b)}"

    def body(latex: bool) -> list[list[str]]:
        rows, prev = [], None
        for r in df.itertuples():
            ds = display_dataset(r.dataset)
            pair = display_pair(r.model, r.reward)
            if latex:
                ds, pair = tex_escape(ds), tex_escape(pair)
            rows.append([ds if r.dataset != prev else "", pair, fmt_num(r.win, 1), fmt_num(r.draw, 1),
                         fmt_num(r.loss, 1), fmt_num(r.invalid, 1), str(r.n_trials)])
            prev = r.dataset
        return rows

    judges = sorted({str(j) for j in df["judge_model"].dropna()})
    modes = sorted({str(m) for m in df["mode"].dropna()})
    notes = [f"Percent of judged comparisons, mean over trials ({display_method(a)}'s view: win = "
             f"{display_method(a)} preferred). Invalid = judge answer not parseable; rows need not sum to 100.",
             f"Judge: {', '.join(judges) or 'unknown'}; order mode: {', '.join(modes) or 'unknown'}."]
    if (df["source"] == "file").any():
        notes.append("Rows with 0 trials use the file's stored mean (no usable per-trial counts).")
    contents = {"csv": df.drop(columns=[c for c in df.columns if c.startswith("_")]).to_csv(index=False)}
    header = ["Datasets", "Models", display_method(a), "Draw", display_method(b), "Invalid", "Trials"]
    contents["md"] = render_markdown(header, body(False), title=title, notes=notes, align=["l", "l"] + ["r"] * 5)
    levels = [["", "", "Rate", "Rate", "Rate", "", ""],
              ["Datasets", "Models", display_method(a, latex=True), "Draw", display_method(b, latex=True),
               "Invalid", "Trials"]]
    contents["tex"] = render_latex(levels, body(True), caption=tex_title,
                                   label=f"tab:{name}", notes=notes, align="llrrrrr", group_rows_by_first=True)
    return _write(out_dir, name, contents)


# --------------------------------------------------------------------------- λ sweep


def run_lambda_stats(run: Run) -> dict[str, float]:
    """λ-tuning statistics of one AISP run (Appendix C.1: std of r/λ "about one digit").

    With n = ``method.n`` and K = number of recorded iterations (samples n·K; the final
    y(U*) candidate, if any, is excluded), per prompt: std over the first n sample
    rewards / λ, and over all n·K sample rewards / λ (sample std, ddof=1, NaN-rewards
    ignored); both then averaged over prompts. ``reward_mean``: mean over prompts of
    the chosen response's reward (the run's own reward model).
    """
    lam = finite_or_nan(run.method_param("lam"))
    n = run.method_param("n")
    first, all_, final = [], [], []
    for rec in run.records:
        r = as_float_array(rec.get("sample_rewards"))
        iters = rec.get("iterations") or []
        nn = int(n) if n else (len(r) // len(iters) if iters else len(r))
        total = nn * len(iters) if iters else len(r)
        body = r[: min(total, len(r))]
        final.append(finite_or_nan(rec.get("reward")))
        for dst, x in ((first, body[:nn]), (all_, body)):
            x = x[np.isfinite(x)] / lam if np.isfinite(lam) and lam != 0 else np.zeros(0)
            dst.append(float(x.std(ddof=1)) if x.size > 1 else math.nan)
    return dict(lam=lam, n=float(n) if n else math.nan, n_prompts=len(run.records),
                reward_mean=_nanmean(np.array(final, float)),
                std_r_over_lam_first=_nanmean(np.array(first, float)),
                std_r_over_lam_all=_nanmean(np.array(all_, float)))


def lambda_sweep(results: Path | str, *, datasets: Iterable[str] | None = None, pairs: Iterable[str] | None = None,
                 method: str = "aisp", variants: Iterable[str] | None = None,
                 runs: list[Run] | None = None) -> pd.DataFrame:
    """One row per AISP variant (dataset, pair, override dirname) with its λ: the mean
    over seeds of each run's mean final reward (and its std over seeds, ddof=1), and
    the mean over seeds of ``std_r_over_lam_first`` / ``std_r_over_lam_all`` (see
    :func:`run_lambda_stats`). ``one_digit``: 1 ≤ std_r_over_lam_first < 10, the
    paper's target. Sorted by dataset, pair, λ.
    """
    if runs is None:
        runs = discover_runs(results, datasets=datasets, pairs=pairs, methods=[method], variants=variants)
    runs = [r for r in runs if r.method == method]
    rows = []
    for (dataset, model, reward, meth, variant), rs in group_runs(runs).items():
        stats = [run_lambda_stats(r) for r in rs]
        lams = {s["lam"] for s in stats if np.isfinite(s["lam"])}
        row: dict[str, Any] = dict(dataset=dataset, model=model, reward=reward, method=meth, variant=variant,
                                   lam=(lams.pop() if len(lams) == 1 else math.nan),
                                   n=stats[0]["n"], seeds=",".join(str(r.seed) for r in rs), n_seeds=len(rs),
                                   n_prompts=min(s["n_prompts"] for s in stats))
        row["reward_mean"], row["reward_std"] = mean_std(s["reward_mean"] for s in stats)
        row["std_r_over_lam_first"] = mean_std(s["std_r_over_lam_first"] for s in stats)[0]
        row["std_r_over_lam_all"] = mean_std(s["std_r_over_lam_all"] for s in stats)[0]
        x = row["std_r_over_lam_first"]
        row["one_digit"] = bool(np.isfinite(x) and 1 <= x < 10)
        rows.append(row)
    columns = ["dataset", "model", "reward", "method", "variant", "lam", "n", "seeds", "n_seeds", "n_prompts",
               "reward_mean", "reward_std", "std_r_over_lam_first", "std_r_over_lam_all", "one_digit"]
    df = pd.DataFrame(rows, columns=columns)
    if len(df):
        order = sorted(range(len(df)), key=lambda i: (
            dataset_key(df.iloc[i]["dataset"]), pair_key((df.iloc[i]["model"], df.iloc[i]["reward"])),
            df.iloc[i]["lam"] if np.isfinite(df.iloc[i]["lam"]) else math.inf, df.iloc[i]["variant"]))
        df = df.iloc[order].reset_index(drop=True)
    return df


def write_lambda_sweep(df: pd.DataFrame, out_dir: Path | str, name: str = "lambda_sweep") -> list[Path]:
    """Write ``<name>.csv`` (tidy) and ``<name>.md``."""
    if df.empty:
        raise ValueError("lambda sweep has no rows")
    header = ["Dataset", "Pair", "λ", "Variant", "Seeds", "Prompts", "Final reward", "std(r/λ) first n",
              "std(r/λ) all", "One digit"]
    body = [[display_dataset(r.dataset), display_pair(r.model, r.reward),
             DASH if not np.isfinite(r.lam) else f"{r.lam:g}", r.variant, str(r.n_seeds), str(r.n_prompts),
             fmt_mean_std(r.reward_mean, r.reward_std, 3), fmt_num(r.std_r_over_lam_first, 2),
             fmt_num(r.std_r_over_lam_all, 2), "yes" if r.one_digit else "no"] for r in df.itertuples()]
    notes = ["Final reward: mean over prompts of the chosen response's reward (the run's own reward model), "
             "mean (std) over seeds, std ddof=1.",
             "std(r/λ): per prompt the sample std (ddof=1) of sample_rewards/λ over the first n samples "
             "(iteration 1) or over all n·K iteration samples (the final y(U*) candidate excluded); "
             "mean over prompts, then over seeds.",
             "Appendix C.1: AISP optimizes stably when the std of r/λ is 'approximately one digit' "
             "(One digit: 1 ≤ std(r/λ) first n < 10)."]
    contents = {"csv": df.to_csv(index=False),
                "md": render_markdown(header, body, title="λ sweep (AISP)", notes=notes,
                                      align=["l", "l", "r", "l"] + ["r"] * 5 + ["l"])}
    return _write(out_dir, name, contents)


# --------------------------------------------------------------------------- method comparison


def compare(results: Path | str, *, runs: list[Run] | None = None, **filters: Any) -> pd.DataFrame:
    """One row per (dataset, pair, method, variant): what each method got for its compute.

    Columns: dataset, pair, method, variant, seeds, prompts (records, summed over seeds),
    reward (mean over prompts, then over seeds; the run's own reward model), best-of-first
    (mean reward of the first sample, i.e. what one sample gets), samples, tokens and
    seconds per prompt (means over prompts and seeds).
    """
    if runs is None:
        runs = discover_runs(results, **filters)
    rows = []
    for (dataset, model, reward, method, variant), rs in group_runs(runs).items():
        recs = [rec for r in rs for rec in r.records]
        if not recs:
            continue
        per_seed = [_nanmean(as_float_array([x.get("reward") for x in r.records])) for r in rs if r.records]
        rows.append(dict(
            dataset=dataset, pair=f"{model}__{reward}", method=method, variant=variant,
            seeds=",".join(str(r.seed) for r in rs), prompts=len(recs),
            reward=_nanmean(np.array(per_seed)),
            first_sample=_nanmean(as_float_array([(x.get("sample_rewards") or [np.nan])[0] for x in recs])),
            samples=_nanmean(as_float_array([x.get("num_samples") for x in recs])),
            tokens=_nanmean(as_float_array([x.get("num_tokens") for x in recs])),
            seconds=_nanmean(as_float_array([x.get("seconds") for x in recs])),
        ))
    return pd.DataFrame(rows, columns=["dataset", "pair", "method", "variant", "seeds", "prompts", "reward",
                                       "first_sample", "samples", "tokens", "seconds"])


def render_compare(df: pd.DataFrame) -> str:
    header = ["Dataset", "Pair", "Method", "Variant", "Prompts", "Reward (best)", "Reward (1st sample)",
              "Samples/prompt", "Tokens/prompt", "Seconds/prompt"]
    rows = [[display_dataset(r.dataset), r.pair, display_method(r.method), r.variant, str(r.prompts),
             fmt_num(r.reward, 4), fmt_num(r.first_sample, 4), fmt_num(r.samples, 1), fmt_num(r.tokens, 0),
             fmt_num(r.seconds, 2)] for r in df.itertuples()]
    return render_markdown(header, rows, align="lllllrrrrr", notes=[
        "Reward (best): the chosen response's reward under the run's own reward model, mean over prompts "
        "(and seeds).",
        "Reward (1st sample): the first sample's reward, i.e. what a single sample gets.",
        "Samples and generated tokens are the compute each method spent per prompt (AISP: n·κ + the y(U*) "
        "candidate)."])


def write_compare(df: pd.DataFrame, out_dir: Path | str, name: str = "compare") -> list[Path]:
    return _write(out_dir, name, {"md": render_compare(df), "csv": df.to_csv(index=False)})
