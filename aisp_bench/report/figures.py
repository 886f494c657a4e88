"""The report's figures: Figure 2 (reward against AISP iteration k, BoN at N = n·k), the
equal-compute view and the fixed-budget sensitivity plot.

Pure functions of run folders: the per-prompt curves are computed from
``records.jsonl``, averaged, returned as tidy DataFrames (also written as CSV next to
each PNG) and plotted with matplotlib's Agg backend.

The curves and their averaging (the bands): :mod:`aisp_bench.report.curves`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from aisp_bench.rundir import Run  # noqa: E402

from .bestof import expected_best  # noqa: E402
from .common import (  # noqa: E402
    best_of_pool, dataset_key, display_dataset, display_method, display_pair, method_key, pair_key, select_variants,
)  # fmt: skip
from .costs import AXES, AXIS_LABELS, method_n, parameters  # noqa: E402
from .curves import aisp_curves, average_curves, compute_curve, nanmean_columns, resolve_band, stack  # noqa: E402

AISP_CURVES = ("aisp_mean_at_k", "aisp_best_at_k", "aisp_best_so_far")  # aisp_curves' keys
DEFAULT_N = 32  # the paper's n, the BoN curves' step N = n·k only when no AISP run gives n
BAND_NAMES = {"seeds": "±1 std over seeds (ddof=1)", "prompts": "±1 s.e. over prompts"}
METHOD_COLORS = {"aisp": "C0", "bon_topp": "C1", "bon_gaussian": "C2", "spec_rejection": "C3", "particle_filter": "C4"}
CURVE_STYLE = {
    "aisp_best_so_far": dict(color="C0", ls="-", label="AISP (Best so far)"),
    "aisp_best_at_k": dict(color="C0", ls="--", label="AISP (Best at k)"),
    "aisp_mean_at_k": dict(color="C0", ls=":", label="AISP (Mean at k)"),
    "bon_topp": dict(color="C1", ls="-", label="BoN (top-p), N = n·k"),
    "bon_gaussian": dict(color="C2", ls="-", label="BoN (N(0,σ²I)), N = n·k"),
}


# --------------------------------------------------------------------------- figure 2


def sample_prompt_ids(runs: Sequence[Run], num: int | None, seed: int = 0) -> tuple[set[str], int]:
    """(the prompt ids Figure 2 averages, how many prompts every run in ``runs`` has): ``num``
    ids drawn without replacement by ``numpy.random.default_rng(seed)`` from the sorted ids
    every run has, or all of them when ``num`` is None or at least their number. Every curve
    averages these same prompts, so a partial run does not compare curves over other prompts."""
    pool = sorted(set.intersection(*({str(rec.get("prompt_id")) for rec in r.records} for r in runs)) if runs else ())
    if num is None or num >= len(pool):
        return set(pool), len(pool)
    picked = np.random.default_rng(seed).choice(len(pool), size=num, replace=False)
    return {pool[i] for i in picked}, len(pool)


def figure2_data(runs: Sequence[Run], dataset: str, band: str = "auto", prompts: int | None = None,
                 seed: int = 0) -> pd.DataFrame:
    """Figure 2's curves for one dataset, one block per (model, reward) pair.

    AISP: per prompt :func:`aisp_curves` (Mean at k, Best at k, Best so far). BoN (each
    BoN method on disk): per prompt the expected best of N = n·k samples drawn from the
    run's pool (:func:`.bestof.expected_best`), n = AISP's ``method.n`` (32 when the pair
    has no AISP run), k = 1..K, K = AISP's largest iteration count (else len // n).
    Averaged by :func:`average_curves` over ``prompts`` prompts drawn with ``seed``
    (:func:`sample_prompt_ids`) from the prompts every chosen run of the dataset has
    (None: all of those). Columns: dataset, model, reward, curve, method,
    variant, k, N (= n·k), mean, lo, hi, count, n_seeds, band, prompts (used; 0: all),
    prompts_total, prompt_seed.
    """
    chosen, _ = select_variants([r for r in runs if r.dataset == dataset])
    keep, total = sample_prompt_ids([r for rs in chosen.values() for r in rs], prompts, seed)
    if chosen and not total:
        raise ValueError(f"the {dataset} runs share no prompt, so Figure 2 has none to average: "
                         "select runs of one prompt set (select.*)")
    drawn = len(keep) if len(keep) < total else 0

    def use(rec: dict) -> bool:
        return str(rec.get("prompt_id")) in keep

    pairs = sorted({(c[1], c[2]) for c in chosen}, key=pair_key)
    seed_counts = [len(rs) for c, rs in chosen.items() if c[3] == "aisp" or c[3].startswith("bon")]
    band = resolve_band(band, seed_counts)
    frames = []
    for model, reward in pairs:
        aisp = chosen.get((dataset, model, reward, "aisp"), [])
        n = next((x for x in (method_n(r) for r in aisp) if x), None)
        per_run = [{rec.get("prompt_id", i): aisp_curves(rec) for i, rec in enumerate(filter(use, r.records))}
                   for r in aisp]
        K = max((len(c["aisp_best_so_far"]) for d in per_run for c in d.values()), default=0)
        curves: dict[str, tuple[list[dict[Any, np.ndarray]], str, str, int]] = {
            name: ([{p: c[name] for p, c in d.items()} for d in per_run], "aisp", aisp[0].variant, len(aisp))
            for name in (AISP_CURVES if aisp else ())}
        n = n or DEFAULT_N
        for method in sorted({c[3] for c in chosen if c[:3] == (dataset, model, reward) and c[3] != "aisp"},
                             key=method_key):
            rs = chosen[(dataset, model, reward, method)]
            bs = [{rec.get("prompt_id", i): _bon_at_nk(rec, n, K) for i, rec in enumerate(filter(use, r.records))}
                  for r in rs]
            curves[method] = (bs, method, rs[0].variant, len(rs))
        for name, (bs, method, variant, n_seeds) in curves.items():
            avg = average_curves(bs, band)
            k = np.arange(1, len(avg["mean"]) + 1)
            frames.append(pd.DataFrame(dict(dataset=dataset, model=model, reward=reward, curve=name, method=method,
                                            variant=variant, k=k, N=n * k, mean=avg["mean"], lo=avg["lo"],
                                            hi=avg["hi"], count=avg["count"], n_seeds=n_seeds, band=band,
                                            prompts=drawn, prompts_total=total, prompt_seed=seed)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _bon_at_nk(record: dict, n: int, K: int) -> np.ndarray:
    """A BoN prompt's expected best of N = n·k samples of its pool, k = 1..K (K = 0: len // n)."""
    r = record.get("sample_rewards") or []
    return expected_best(r, n * np.arange(1, (K or len(r) // n) + 1))


def _band_note(band: str, df: pd.DataFrame) -> str:
    seeds = sorted({int(s) for s in df["n_seeds"]})
    return (f"mean over prompts and seeds; band: {BAND_NAMES.get(band, band)}; "
            f"seeds per curve: {', '.join(map(str, seeds)) or '—'}")


def _prompts_note(df: pd.DataFrame) -> str:
    """Which prompts Figure 2 averages (its caption's first words)."""
    used, total, seed = (int(df[c].iloc[0]) for c in ("prompts", "prompts_total", "prompt_seed"))
    if used:
        return f"{used} of {total} prompts drawn with seed {seed} (figure2.prompts=all: every prompt); "
    return f"all {total} prompts; "


def _legend(nhandles: int, width: float) -> tuple[int, float]:
    """A bottom legend that fits ``width`` inches (about 2 inches an entry): its columns and
    the inches reserved under the axes for it and the note."""
    ncol = max(1, min(nhandles, int(width // 2.0)))
    return ncol, 0.35 + 0.2 * math.ceil(max(nhandles, 1) / ncol)


def _figure(nrows: int, ncols: int, width: float, height: float, nhandles: int) -> tuple[Any, np.ndarray]:
    """A grid of axes ``height`` inches tall plus room for the legend and note at the bottom."""
    return plt.subplots(nrows, ncols, figsize=(width, height + 0.3 + _legend(nhandles, width)[1]), squeeze=False)


def _band(ax: Any, x: pd.Series, c: pd.DataFrame, max_markers: int, **style: Any) -> Any:
    """The curve ``c["mean"]`` against ``x`` with its ``lo``-``hi`` band (one point: a marker and
    its bar); returns the line."""
    if len(c) == 1:
        err = np.nan_to_num(np.abs([c["mean"] - c["lo"], c["hi"] - c["mean"]]))
        return ax.errorbar(x, c["mean"], yerr=err, marker="D", ms=5, capsize=3, ls="none", **style)
    (h,) = ax.plot(x, c["mean"], lw=1.6, marker="o" if len(c) <= max_markers else None, ms=3, **style)
    if np.isfinite(c["lo"]).any():
        ax.fill_between(x, c["lo"], c["hi"], color=h.get_color(), alpha=0.15, lw=0)
    return h


def _finish(fig: Any, path: Path | str, title: str, handles: dict[str, Any], note: str) -> Path:
    """Title, the legend and a one-line note at the bottom, then :func:`save`."""
    h, w = fig.get_figheight(), fig.get_figwidth()
    ncol, reserved = _legend(len(handles), w)
    fig.suptitle(title, fontsize=11)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=ncol, fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 0.2 / h))
    fig.text(0.5, 0.05 / h, note, ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, (reserved - 0.05) / h, 1, 0.97))
    return save(fig, path)


def save(fig: Any, path: Path | str) -> Path:
    """Write ``fig`` as a PNG (130 dpi) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _log_axis(ax: Any, lo: float, hi: float) -> None:
    """Log x axis with plain labels (1-2-5 ticks over up to two decades, decades beyond)."""
    ax.set_xscale("log")
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 0.0
    ax.xaxis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0,) if decades > 2 else (1.0, 2.0, 5.0)))
    ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda x, _: _si(x)))


def _si(x: float) -> str:
    """A tick label: 500, 20k, 3.5M, 1.2G, 45T."""
    return next((f"{x / v:.3g}{u}" for v, u in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e4, "k")) if x >= v), f"{x:g}")


def plot_figure2(df: pd.DataFrame, path: Path | str) -> Path:
    """Plot :func:`figure2_data` output: one subplot per pair, reward against iteration k
    (top axis: BoN's N = n·k)."""
    pairs = list(df.groupby(["model", "reward"], sort=False))
    ncols = min(4, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig, axes = _figure(nrows, ncols, max(4.2 * ncols, 7.0), 3.4 * nrows, len(set(df["curve"])))
    handles: dict[str, Any] = {}
    for ax, ((model, reward), sub) in zip(axes.flat, pairs):
        for name in sorted(sub["curve"].unique(), key=lambda c: list(CURVE_STYLE).index(c) if c in CURVE_STYLE
                           else len(CURVE_STYLE)):
            style = CURVE_STYLE.get(name, dict(ls="-", label=name))
            c = sub[sub["curve"] == name]
            handles.setdefault(style["label"], _band(ax, c["k"], c, 4, color=style.get("color"), ls=style["ls"]))
        ax.set_title(display_pair(model, reward), fontsize=10)
        ax.set_xlabel("iteration k")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        kmax = int(sub["k"].max())
        ax.set_xlim(1, max(kmax, 2))
        ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
        n_per_k = sub["N"].iloc[0] / sub["k"].iloc[0]
        sec = ax.secondary_xaxis("top", functions=(lambda k, m=n_per_k: k * m, lambda N, m=n_per_k: N / m))
        ks = [k for k in ax.xaxis.get_major_locator().tick_values(1, max(kmax, 2)) if 1 <= k <= max(kmax, 2)]
        sec.set_xticks([k * n_per_k for k in ks])  # N at the k ticks
        sec.xaxis.set_major_formatter(mticker.FuncFormatter(lambda x, _: f"{x:g}"))
        sec.set_xlabel(f"BoN N = n·k (n = {n_per_k:g})", fontsize=8)
        sec.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(pairs):]:
        ax.set_visible(False)
    return _finish(fig, path, f"Reward against iteration on {display_dataset(df['dataset'].iloc[0])}", handles,
                   _prompts_note(df) + _band_note(df["band"].iloc[0], df) + "; BoN at N: the expected best of N "
                   "samples drawn from each run's pool (unbiased)")


# --------------------------------------------------------------------------- equal compute


def compute_data(runs: Sequence[Run], dataset: str, band: str = "auto") -> pd.DataFrame:
    """Equal-compute curves for one dataset: per pair and method, the best reward against
    the j-th sample, j = 1..S, with x on every axis of :data:`.costs.AXES` (the cost after
    sample j, mean over prompts then seeds) and y its mean (:func:`compute_curve`,
    :func:`average_curves`). AISP (and any method not best-of-N): the best so far among its
    first j samples; best-of-N: the expected best of j samples drawn from the run's pool,
    at their expected cost.

    Each run is cut to its shortest prompt (samples per prompt should be equal within a
    run). Columns: dataset, model, reward, method, variant, sample (j, 1-based), one per
    axis, mean, lo, hi, count, n_seeds, band.
    """
    chosen, _ = select_variants([r for r in runs if r.dataset == dataset])
    band = resolve_band(band, [len(rs) for rs in chosen.values()])
    frames = []
    for (ds, model, reward, method) in sorted(chosen, key=lambda c: (pair_key((c[1], c[2])), method_key(c[3]))):
        rs = chosen[(ds, model, reward, method)]
        per_run = [{rec.get("prompt_id", i): compute_curve(rec, method_n(r), parameters(r), best_of_pool(method))
                    for i, rec in enumerate(r.records)} for r in rs]
        per_run = [cs for cs in per_run if cs]
        if not per_run:
            continue
        L = min(len(c["best"]) for cs in per_run for c in cs.values())
        avg = average_curves([{pid: c["best"][:L] for pid, c in cs.items()} for cs in per_run], band)
        x = {k: nanmean_columns(stack([nanmean_columns(stack([c[k][:L] for c in cs.values()])) for cs in per_run]))
             for k in AXES}
        frames.append(pd.DataFrame(dict(dataset=ds, model=model, reward=reward, method=method, variant=rs[0].variant,
                                        sample=np.arange(1, L + 1), **x, mean=avg["mean"], lo=avg["lo"],
                                        hi=avg["hi"], count=avg["count"], n_seeds=len(rs), band=band)))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def plot_compute(df: pd.DataFrame, path: Path | str, axes: Sequence[str] = ("tokens", "seconds")) -> Path:
    """Plot :func:`compute_data`: one row per pair, one column per axis of ``axes`` (log x):
    the best reward against that cost; an axis with no recorded value says so."""
    pairs = list(df.groupby(["model", "reward"], sort=False))
    fig, grid = _figure(len(pairs), len(axes), max(4.75 * len(axes), 7.0), 3.3 * len(pairs), len(set(df["method"])))
    handles: dict[str, Any] = {}
    for row, ((model, reward), sub) in zip(grid, pairs):
        for ax, xcol in zip(row, axes):
            for method in sorted(sub["method"].unique(), key=method_key):
                c = sub[(sub["method"] == method) & np.isfinite(sub[xcol]) & (sub[xcol] > 0)]
                if not c.empty:
                    handles.setdefault(display_method(method),
                                       _band(ax, c[xcol], c, 16, color=METHOD_COLORS.get(method)))
            xs = sub[xcol][np.isfinite(sub[xcol]) & (sub[xcol] > 0)]
            if xs.empty:
                ax.text(0.5, 0.5, "not recorded by these runs", ha="center", va="center", transform=ax.transAxes,
                        fontsize=8, color="0.4")
            _log_axis(ax, float(xs.min()) if len(xs) else 1.0, float(xs.max()) if len(xs) else 10.0)
            ax.set_xlabel(AXIS_LABELS[xcol] + " (cumulative)", fontsize=8)
            ax.set_ylabel("best reward")
            ax.set_title(display_pair(model, reward), fontsize=10)
            ax.grid(alpha=0.3, which="major")
            ax.grid(alpha=0.08, which="minor")
    return _finish(fig, path, f"Best reward against compute on {display_dataset(df['dataset'].iloc[0])}", handles,
                   _band_note(df["band"].iloc[0], df) + "; x: mean over prompts; BoN: expected best of j samples "
                   "of its pool (unbiased), at their expected cost" + _points_note(df))


def _points_note(df: pd.DataFrame) -> str:
    """The note on methods drawn as one point (their whole run; ``costs.paused``)."""
    single = [m for m, c in df.groupby("method", sort=False) if c["sample"].max() == 1]
    return "" if not single else ("; " + ", ".join(display_method(m) for m in sorted(single, key=method_key))
                                  + ": one point, the reward returned at all it spent")


# --------------------------------------------------------------------------- budget curves


BUDGET_PANELS = (("proxy", "proxy reward (optimised)"), ("gold", "gold reward (held out)"))


def _errors(c: pd.DataFrame, col: str) -> np.ndarray:
    """(2, len(c)) error bar lengths from ``col``'s interval (0 where there is none)."""
    y = c[col].to_numpy(float)
    return np.nan_to_num(np.abs([y - c[f"{col}_lo"].to_numpy(float), c[f"{col}_hi"].to_numpy(float) - y]))


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="0.4")


def plot_budget(df: pd.DataFrame, path: Path | str) -> Path:
    """Plot the method rows of :func:`.budget.budget_table` for one dataset: one row per pair, the
    proxy and the gold reward of the returned response against the samples spent (log x), and the
    frontier, gold reward against base log-prob, each method's budget points joined in order of
    samples (the first and last labelled); bands and bars: the bootstrap intervals."""
    pairs = list(df.groupby(["model", "reward"], sort=False))
    fig, grid = _figure(len(pairs), 3, 13.5, 3.4 * len(pairs), len(set(df["method"])))
    handles: dict[str, Any] = {}
    for row, ((model, reward), sub) in zip(grid, pairs):
        methods = sorted(sub["method"].unique(), key=method_key)
        for ax, (col, label) in zip(row, BUDGET_PANELS):
            for method in methods:
                c = sub[(sub["method"] == method) & np.isfinite(sub[col])].sort_values("samples")
                c = c.rename(columns={col: "mean", f"{col}_lo": "lo", f"{col}_hi": "hi"})
                if not c.empty:
                    handles.setdefault(display_method(method),
                                       _band(ax, c["samples"], c, 40, color=METHOD_COLORS.get(method)))
            if not np.isfinite(sub[col]).any():
                _empty(ax, f"{label.split(' (')[0]} not evaluated")
            _log_axis(ax, float(sub["samples"].min()), float(sub["samples"].max()))
            ax.set(xlabel="samples spent per prompt", ylabel=label, title=display_pair(model, reward))
            ax.grid(alpha=0.3)
        ax = row[2]
        for method in methods:
            c = sub[(sub["method"] == method) & np.isfinite(sub["gold"]) & np.isfinite(sub["base_logprob"])]
            c = c.sort_values("samples")
            if c.empty:
                continue
            ax.errorbar(c["base_logprob"], c["gold"], xerr=_errors(c, "base_logprob"), yerr=_errors(c, "gold"),
                        marker="o", ms=3, lw=1, capsize=2, elinewidth=0.6, color=METHOD_COLORS.get(method))
            for i in {0, len(c) - 1}:
                ax.annotate(f"{int(c['samples'].iloc[i])}", (c["base_logprob"].iloc[i], c["gold"].iloc[i]),
                            textcoords="offset points", xytext=(3, 3), fontsize=6, color=METHOD_COLORS.get(method))
        if not (np.isfinite(sub["gold"]) & np.isfinite(sub["base_logprob"])).any():
            _empty(ax, "gold reward or base log-prob not evaluated")
        ax.set(xlabel="base log-prob / token of the response", ylabel="gold reward (held out)",
               title="frontier (labels: samples)")
        ax.grid(alpha=0.3)
    return _finish(fig, path, f"Budget curves on {display_dataset(df['dataset'].iloc[0])}", handles,
                   "mean over prompts and seeds; bands and bars: bootstrap intervals over prompts; BoN proxy: the "
                   "expected best of m samples of its pool (unbiased); gold and base log-prob: the recorded "
                   "checkpoints")


# --------------------------------------------------------------------------- fixed-budget sensitivity


SENSITIVITY_PANELS = (("final_reward", "final reward"), ("base_logprob", "base log-prob / token"),
                      ("seconds", "seconds / prompt"))


def plot_sensitivity(df: pd.DataFrame, path: Path) -> Path:
    """One row of panels per pair: final reward, base log-prob and seconds against the split
    (n × κ, n increasing), one line per σ; bars: the bootstrap intervals."""
    pairs = list(df.groupby(["model", "reward"], sort=False))
    fig, axes = plt.subplots(len(pairs), 3, figsize=(12, 3.2 * len(pairs) + 0.6), squeeze=False)
    for row, ((model, reward), sub) in zip(axes, pairs):
        splits = sorted({(int(n), int(k)) for n, k in zip(sub["n"], sub["kappa"])})
        sigmas = sorted(set(sub["sigma"]))
        for ax, (col, label) in zip(row, SENSITIVITY_PANELS):
            for i, sigma in enumerate(sigmas):
                c = sub[sub["sigma"] == sigma].sort_values("n")
                dodge = 0.04 * (i - (len(sigmas) - 1) / 2)  # the bars of one split side by side
                x = [splits.index((int(n), int(k))) + dodge for n, k in zip(c["n"], c["kappa"])]
                y = c[col].to_numpy(float)
                err = np.abs([y - c[f"{col}_lo"].to_numpy(float), c[f"{col}_hi"].to_numpy(float) - y]) \
                    if f"{col}_lo" in c else None
                ax.errorbar(x, y, yerr=None if err is None or not np.isfinite(err).any() else err, marker="o",
                            ms=4, capsize=3, color=f"C{i}", label=f"σ = {sigma:g}")
            ax.set_xticks(range(len(splits)), [f"{n}×{k}" for n, k in splits], fontsize=8)
            ax.set_xlabel("n × κ (samples per iteration × iterations)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        row[0].set_title(display_pair(model, reward), fontsize=10, loc="left")
        row[0].legend(fontsize=8)
    fig.suptitle(f"AISP at a fixed budget n·κ on {display_dataset(df['dataset'].iloc[0])} "
                 "(bars: bootstrap intervals over prompts)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return save(fig, path)


# --------------------------------------------------------------------------- entry points


def write_figure2(runs: Sequence[Run], out_dir: Path | str, band: str = "auto", prompts: int | None = None,
                  seed: int = 0) -> list[Path]:
    """``figure2_<dataset>.png`` (+ ``.csv`` with the plotted numbers) for every dataset
    with an AISP run, averaged over ``prompts`` prompts drawn with ``seed`` (None: all);
    returns the written paths."""
    datasets = sorted({r.dataset for r in runs if r.method == "aisp"}, key=dataset_key)
    return _write(out_dir, "figure2", (figure2_data(runs, ds, band, prompts, seed) for ds in datasets), plot_figure2)


def write_compute(runs: Sequence[Run], out_dir: Path | str, band: str = "auto",
                  axes: Sequence[str] = ("tokens", "seconds")) -> list[Path]:
    """``compute_<dataset>.png`` (x: each of ``axes``) and ``.csv`` (every axis) for every dataset with runs."""
    datasets = sorted({r.dataset for r in runs}, key=dataset_key)
    return _write(out_dir, "compute", (compute_data(runs, ds, band) for ds in datasets),
                  lambda df, path: plot_compute(df, path, axes))


def _write(out_dir: Path | str, name: str, frames: Iterable[pd.DataFrame], plot: Callable) -> list[Path]:
    paths = []
    for df in (df for df in frames if len(df)):
        out = Path(out_dir) / f"{name}_{df['dataset'].iloc[0]}.png"
        paths.append(plot(df, out))  # creates out_dir
        df.to_csv(out.with_suffix(".csv"), index=False)
        paths.append(out.with_suffix(".csv"))
    return paths
