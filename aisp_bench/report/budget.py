"""Budget curves: the response each method would return as its budget grows, by the reward it
optimised (proxy) and a held-out gold reward, and against its distance from the base model.

Per dataset and pair, per method and budget point (samples spent), over prompts and seeds:

* **proxy**: the returned response's reward under the run's own reward model; for best-of-N
  the expected best of m samples drawn from the run's pool (:mod:`.bestof`: unbiased, and
  defined at every m <= N, so BoN also gets AISP's budgets n·k), else the checkpoint's
  recorded reward (``proxy_checkpoint``, for every method, is that recorded reward);
* **gold**: ``evaluate gold_reward=NAME``'s score of the checkpoint's (cleaned) response;
* **base_logprob**: ``evaluate``'s mean per-token log-probability of the checkpoint's response
  under the noise-free policy;
* **kl**: for BoN the bound log m − (m−1)/m on best-of-m's KL from the policy; for AISP
  KL(Q_Û‖P) = ‖Û‖²/(2σ²) of its noise distribution after iteration k (y(U*): after κ), mean
  over prompts (``kl_kind`` says which: they are not the same quantity).

The budget points are the records' ``checkpoints`` (``rundir.record_checkpoints``). A run
without them (recorded before they existed) still gives its end point (the record's response,
whose gold reward and base log-prob ``metrics_per_prompt.json`` holds), AISP's best so far
after each k (proxy only) and BoN's unbiased proxy; the notes name what is missing. Means and
95% intervals: ``Bootstrap.pooled_mean`` (prompts resampled as clusters with all their seeds;
the same prompt set and seed give the same resamples at every point, so the bands are paired),
and AISP minus each baseline at the budgets both have (and at their end points):
``Bootstrap.paired_difference``, seed k with seed k on the same prompt.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aisp_bench.results import read_prompt_metrics
from aisp_bench.rundir import Run, record_checkpoints

from .bestof import bon_kl_bound, expected_best
from .common import (
    DASH, best_of_pool, dataset_key, display_dataset, display_method, display_pair, finite_or_nan, fmt_interval,
    fmt_num, method_key, one_scale, pair_key, render_markdown, select_variants, write_texts,
)  # fmt: skip
from .costs import method_n
from .stats import Bootstrap

METRICS = ("proxy", "gold", "base_logprob")  # with intervals
SCORERS = {"gold": "gold_reward_model", "base_logprob": "base_logprob_model"}  # in summary.json's metrics
COMPARED = "aisp"
Points = dict[int, dict[str, float]]  # samples -> metric -> value (one prompt)


def _item(values: Sequence | None, i: int | None) -> Any:
    """``values[i]``, None where there is no such item."""
    return values[i] if values is not None and i is not None and 0 <= i < len(values) else None


def _aisp_kl(record: dict[str, Any], samples: int, n: int | None) -> float:
    """KL(Q_Û‖P) after the iteration a checkpoint at ``samples`` closes (y(U*): the last one)."""
    its = sorted(record.get("iterations") or [], key=lambda it: it.get("k", 0))
    if not its or not n:
        return math.nan
    return finite_or_nan(its[min(max(samples // n, 1), len(its)) - 1].get("kl"))


def prompt_points(record: dict[str, Any], n: int | None, pool: bool, gold: Sequence | None, logprob: Sequence | None,
                  end: tuple[float | None, float | None], extra: Sequence[int] = ()) -> Points:
    """One prompt's budget points. ``gold``/``logprob``: its checkpoints' values (None: not evaluated);
    ``end``: the record response's (gold, base_logprob); ``extra``: more budgets for a pool's proxy."""
    points: Points = {}
    cps = record_checkpoints(record)
    for j, c in enumerate(cps):
        points[int(c["samples"])] = {"proxy_checkpoint": finite_or_nan(c.get("reward")),
                                     "gold": finite_or_nan(_item(gold, j)),
                                     "base_logprob": finite_or_nan(_item(logprob, j))}
    if not cps:  # recorded before checkpoints: AISP's best so far (proxy), and the end point
        for it in (record.get("iterations") or []) if n else []:
            points[int(it.get("k", 0)) * n] = {"proxy_checkpoint": finite_or_nan(it.get("best_so_far"))}
        points[int(record.get("num_samples") or len(record.get("sample_rewards") or []))] = {
            "proxy_checkpoint": finite_or_nan(record.get("reward")), "gold": finite_or_nan(end[0]),
            "base_logprob": finite_or_nan(end[1])}
    rewards = record.get("sample_rewards") or []
    budgets = sorted(set(points) | {m for m in extra if m <= len(rewards)}) if pool else sorted(points)
    unbiased = dict(zip(budgets, expected_best(rewards, budgets))) if pool and budgets else {}
    for m in budgets:
        p = points.setdefault(m, {})
        p["proxy"] = unbiased[m] if pool else p.get("proxy_checkpoint", math.nan)
        p["kl"] = bon_kl_bound(m) if pool else _aisp_kl(record, m, n)
    return points


def run_points(run: Run, extra: Sequence[int] = (), scored: dict[str, bool] | None = None) -> dict[str, Points]:
    """Every prompt's budget points of one run: ``{prompt_id: points}``; ``scored[metric]`` False drops
    that metric (scored by another model than the rest of the block)."""
    per = read_prompt_metrics(run.path, run.metrics.get("fingerprint")) or {}
    row = {str(p): i for i, p in enumerate(per.get("prompt_ids") or [])}
    cps, n, pool = per.get("checkpoints") or {}, method_n(run), best_of_pool(run.method)
    out = {}
    for rec in run.records:
        pid = str(rec.get("prompt_id"))
        i = row.get(pid)
        points = prompt_points(rec, n, pool, _item(cps.get("gold_reward"), i), _item(cps.get("base_logprob"), i),
                               (_item(per.get("gold_reward"), i), _item(per.get("base_logprob"), i)), extra)
        for metric in (m for m, ok in (scored or {}).items() if not ok):
            for p in points.values():
                p[metric] = math.nan
        out[pid] = points
    return out


def _scorers(runs: Sequence[Run]) -> tuple[dict[Path, dict[str, bool]], dict[str, str], list[str]]:
    """Per run, which of ``SCORERS`` it keeps (the model most runs of the block were scored by), the
    scorer per metric, and a note per run left out."""
    keep: dict[Path, dict[str, bool]] = {r.path: {} for r in runs}
    names, notes = {}, []
    for metric, key in SCORERS.items():
        scored = [r for r in runs if r.metrics.get(key)]
        kept, names[metric] = one_scale(scored, lambda r, key=key: str(r.metrics[key]))
        for r in runs:
            keep[r.path][metric] = r in kept
        notes += [f"{metric} of {display_method(r.method)} seed {r.seed} ({r.metrics[key]}) left out: the others are "
                  f"scored by {names[metric]}" for r in scored if r not in kept]
    return keep, names, notes


def _missing(run: Run) -> list[str]:
    """What the budget view lacks for this run."""
    recs = run.records
    label = f"{display_method(run.method)} seed {run.seed}"
    if not recs:
        return []
    if not any(r.get("checkpoints") for r in recs):
        return [f"{label}: no budget checkpoints recorded (a run made before they were): gold reward and base "
                "log-prob at its end point only"]
    cps = (read_prompt_metrics(run.path, run.metrics.get("fingerprint")) or {}).get("checkpoints") or {}
    return [f"{label}: {what} of the checkpoints not evaluated ({how})" for what, key, how in (
        ("gold reward", "gold_reward", "python -m aisp_bench.evaluate gold_reward=NAME"),
        ("base log-prob", "base_logprob", "evaluate with the base_logprob metric")) if key not in cps]


def _gather(rs: Sequence[Run], extra: Sequence[int], keep: dict) -> dict[int, dict[str, dict[int, dict[str, float]]]]:
    """``{samples: {metric: {seed: {prompt_id: value}}}}`` over the seeds ``rs`` of one method."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in rs:
        for pid, points in run_points(r, extra, keep[r.path]).items():
            for m, vals in points.items():
                for metric, v in vals.items():
                    out[m][metric].setdefault(r.seed, {})[pid] = v
    return out


def _flat_mean(by_seed: dict[int, dict[str, float]]) -> float:
    x = [v for vals in by_seed.values() for v in vals.values() if np.isfinite(v)]
    return float(np.mean(x)) if x else math.nan


def _row(cell: tuple, kind: str, samples: int, **kw: Any) -> dict[str, Any]:
    return dict(zip(("dataset", "model", "reward", "method"), cell), row=kind, samples=samples, **kw)


def _method_rows(cell: tuple, data: dict, boot: Bootstrap, n_seeds: int) -> list[dict[str, Any]]:
    rows = []
    for m in sorted(data):
        d = data[m]
        stats = {}
        for metric in METRICS:
            iv = boot.pooled_mean(d.get(metric, {}))
            stats.update({metric: iv.mean, f"{metric}_lo": iv.lo, f"{metric}_hi": iv.hi, f"{metric}_n": iv.n})
        rows.append(_row(cell, "method", m, baseline="", baseline_samples=math.nan, checkpoint="proxy_checkpoint" in d,
                         **stats, proxy_checkpoint=_flat_mean(d.get("proxy_checkpoint", {})),
                         kl=_flat_mean(d.get("kl", {})), kl_kind="bon_bound" if best_of_pool(cell[3]) else
                         "aisp_noise" if cell[3] == "aisp" else "", n_seeds=n_seeds))
    return rows


def _difference_rows(cell: tuple, a: dict, baseline: str, b: dict, boot: Bootstrap) -> list[dict[str, Any]]:
    """AISP minus ``baseline`` at every budget both have, and at their end points (their largest budgets);
    ``checkpoint``: both are recorded checkpoints (else only BoN's unbiased proxy is there)."""
    pairs = [(m, m) for m in sorted(a) if m in b]
    if a and b and (max(a), max(b)) not in pairs:
        pairs.append((max(a), max(b)))
    rows = []
    for ma, mb in pairs:
        stats = {}
        for metric in METRICS:
            iv = boot.paired_difference(a[ma].get(metric, {}), b[mb].get(metric, {}))
            stats.update({metric: iv.mean, f"{metric}_lo": iv.lo, f"{metric}_hi": iv.hi, f"{metric}_n": iv.n})
        rows.append(_row(cell, "difference", ma, baseline=baseline, baseline_samples=mb, **stats,
                         checkpoint="proxy_checkpoint" in a[ma] and "proxy_checkpoint" in b[mb]))
    return rows


def budget_table(runs: Sequence[Run], boot: Bootstrap | None = None) -> pd.DataFrame:
    """The budget view as a tidy frame, one row per (dataset, pair, method row, budget).

    Columns: dataset, model, reward, method, row ("method" or "difference"), samples, baseline
    and baseline_samples (difference rows), checkpoint (a recorded budget checkpoint, not only
    a budget of BoN's unbiased proxy), per metric of ``METRICS`` mean, _lo, _hi, _n (prompts),
    proxy_checkpoint, kl, kl_kind, n_seeds. ``attrs``: ``notes`` (what is missing or left out),
    ``scorers`` (per metric, who scored it).
    """
    boot = boot or Bootstrap()
    chosen, _ = select_variants(runs)
    rows: list[dict[str, Any]] = []
    notes, scorers = [], {}
    for ds, model, reward in sorted({c[:3] for c in chosen}, key=lambda c: (dataset_key(c[0]), pair_key(c[1:]))):
        methods = sorted((c[3] for c in chosen if c[:3] == (ds, model, reward)), key=method_key)
        block = [r for m in methods for r in chosen[(ds, model, reward, m)]]
        keep, names, left_out = _scorers(block)
        scorers[(ds, model, reward)] = names
        notes += [f"{display_dataset(ds)}, {display_pair(model, reward)}: {x}."
                  for x in left_out + [m for r in block for m in _missing(r)]]
        data = {m: _gather(chosen[(ds, model, reward, m)], (), keep) for m in methods if not best_of_pool(m)}
        grid = sorted(data.get(COMPARED, {}))  # AISP's budgets n·k: BoN's unbiased proxy there too
        data |= {m: _gather(chosen[(ds, model, reward, m)], grid, keep) for m in methods if best_of_pool(m)}
        for m in methods:
            rows += _method_rows((ds, model, reward, m), data[m], boot, len(chosen[(ds, model, reward, m)]))
        for b in (m for m in methods if m != COMPARED and COMPARED in data):
            rows += _difference_rows((ds, model, reward, COMPARED), data[COMPARED], b, data[b], boot)
    df = pd.DataFrame(rows)
    df.attrs.update(notes=notes, scorers=scorers)
    return df


def _cells(r: Any) -> list[str]:
    sign = r.row == "difference"
    return [fmt_interval(getattr(r, m), getattr(r, f"{m}_lo"), getattr(r, f"{m}_hi"), 3, sign=sign) for m in METRICS]


def _notes(df: pd.DataFrame, boot: Bootstrap) -> list[str]:
    who = "; ".join(f"{display_dataset(k[0])}, {display_pair(*k[1:])}: gold {v.get('gold') or DASH}, base log-prob "
                    f"under {v.get('base_logprob') or DASH}" for k, v in df.attrs.get("scorers", {}).items())
    return ["Samples: generated (and scored) when the method would have stopped and returned this response. Proxy: "
            "its reward under the run's own reward model; BoN: the expected best of m samples drawn without "
            "replacement from each run's pool (unbiased). Gold: a held-out reward model's score of the same cleaned "
            "response. Base log-prob/token: its mean per-token log-probability under the noise-free policy.",
            "KL: BoN the bound log m − (m−1)/m (of its output distribution from the policy's); AISP KL(Q_Û‖P) = "
            "‖Û‖²/(2σ²) of its noise distribution after iteration k (not the same quantity).",
            "Method rows: mean over (prompt, seed); difference rows: AISP minus the baseline on the same prompt and "
            f"seed, at equal samples and at both end points (AISP's y(U*) adds one sample). {boot.describe()}.",
            f"Scored by: {who}.", *_end_only(df), *df.attrs.get("notes", [])]


def _end_only(df: pd.DataFrame) -> list[str]:
    """The note on methods with one budget point, their end (Speculative Rejection, particle filtering)."""
    rows = df[df.row == "method"].groupby("method", sort=False)["checkpoint"].sum()
    ends = [display_method(m) for m, k in rows.items() if k == 1 and m not in (COMPARED,) and not best_of_pool(m)]
    return [f"{', '.join(ends)}: one budget point, the end of the run (samples: rows started, particles); a smaller "
            "budget is another run of the method, not a prefix of this one."] if ends else []


def write_budget(df: pd.DataFrame, out_dir: Path | str, fig_dir: Path | str, boot: Bootstrap,
                 name: str = "budget") -> list[Path]:
    """``<name>.csv`` (every budget), ``<name>.md`` (the recorded checkpoints) and ``<name>_<dataset>.png``."""
    from .figures import plot_budget

    header = ["Dataset, models", "Method", "Samples", "Proxy reward", "Gold reward", "Base log-prob/token", "KL"]
    body, last = [], None
    for r in df[df["checkpoint"].astype(bool)].itertuples():
        label = f"{display_dataset(r.dataset)}, {display_pair(r.model, r.reward)}"
        if r.row == "difference":
            name_, samples = f"AISP − {display_method(r.baseline)}", f"{r.samples} vs {int(r.baseline_samples)}"
        else:
            name_, samples = display_method(r.method), str(r.samples)
        body.append([label if label != last else "", name_, samples, *_cells(r),
                     fmt_num(r.kl, 3) if r.row == "method" else ""])
        last = label
    md = render_markdown(header, body, title="Budget curves: the returned response's proxy and gold reward, closeness "
                         f"to the base model, with {100 * boot.level:g}% intervals", notes=_notes(df, boot),
                         align=["l", "l", "r", "r", "r", "r", "r"])
    paths = write_texts(out_dir, name, {"csv": df.to_csv(index=False), "md": md})
    for ds in sorted(set(df["dataset"]), key=dataset_key):
        rows = df[(df["dataset"] == ds) & (df["row"] == "method")]
        paths.append(plot_budget(rows, Path(fig_dir) / f"{name}_{ds}.png"))
    return paths
