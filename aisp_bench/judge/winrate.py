"""Win rates of method A against method B judged pairwise (Tables 2 and 3).

Protocol (Appendix C.2 of the paper: 100 prompts drawn at random, GPT-4 picks the better
response, three trials averaged), with the lineage's flaws fixed:

* **Trials**: trial k pairs the k-th seed run of A with the same seed's run of B (seeds
  matched by their ``seed`` in the manifest, else the ``seed<k>`` folder name); prompts
  are joined on ``prompt_id``.
* **Seeded sampling**: per trial, ``num_prompts`` ids drawn from the sorted common ids
  with a RNG seeded by (``sample_seed``, trial); the lineage's ``random.sample`` was
  unseeded.
* **Position bias**: ``mode=both_orders`` (default) asks twice, A first then B first; A
  wins only if it wins both, B likewise, anything else is a draw. ``mode=random_order``
  is the lineage's single order per prompt, drawn from (``sample_seed``, trial,
  prompt id). The output names the mode.
* **Invalid replies**: a reply whose first line is not two scores 1-10 makes the
  prompt *invalid* (in ``both_orders``, if either reply is), counted and reported apart;
  the lineage scored such replies 0-0, i.e. a draw.
* **Failures**: a request that still fails after the client's retries is not a verdict:
  the comparison is not written, and a re-run (which reuses every cached reply) retries
  just those.

Each comparison is written to
``results/judge/<dataset>/<model>__<reward>/<method_a>_vs_<method_b>.json``::

    {"dataset", "model", "reward", "method_a", "method_b", "judge_model", "base_url_host",
     "mode", "num_prompts", "prompt_version", "temperature", "max_tokens", "sample_seed",
     "trials": [{"trial", "run_a", "run_b", "seed", "win", "draw", "loss", "invalid", "n",
                 "num_common", "order_agreement", "judgements": [...]}, ...],
     "mean": {"win", "draw", "loss", "invalid"}}          # % of n, averaged over trials

"win" is method A winning. :func:`winrate_dataframe` turns such files into a table.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aisp_bench.judge.client import JudgeReply, JudgeRequest, PairwiseJudge, Plan
from aisp_bench.judge.prompts import Scores
from aisp_bench.metrics.cleaning import clean_response, cleaning_options
from aisp_bench.metrics.records import MANIFEST_FILE, get_path, read_json, read_records, write_json_atomic

OUTCOMES = ("win", "draw", "loss", "invalid")


# -- runs -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    path: Path
    dataset: str
    model: str
    reward: str
    method: str
    seed: int | None
    config: dict[str, Any]


def _seed_from_dirname(path: Path) -> int | None:
    m = re.fullmatch(r"seed(\d+)", path.name)
    return int(m.group(1)) if m else None


def run_info(run_dir: str | os.PathLike[str]) -> RunInfo:
    """Dataset, model, reward, method and seed of a run folder (from its manifest)."""
    path = Path(run_dir)
    manifest = path / MANIFEST_FILE
    config = read_json(manifest).get("config", {}) if manifest.is_file() else {}
    seed = config.get("seed")
    seed = int(seed) if isinstance(seed, int) else _seed_from_dirname(path)
    parts = path.parts  # .../<dataset>/<model>__<reward>/<method>/<variant>/seed<k>
    model_reward = parts[-4].split("__", 1) if len(parts) >= 4 else ["", ""]
    return RunInfo(
        path=path,
        dataset=str(get_path(config, "dataset.name") or (parts[-5] if len(parts) >= 5 else "unknown")),
        model=str(get_path(config, "model.name") or model_reward[0] or "unknown"),
        reward=str(get_path(config, "reward.name") or (model_reward[1] if len(model_reward) > 1 else "unknown")),
        method=str(get_path(config, "method.name") or (parts[-3] if len(parts) >= 3 else "unknown")),
        seed=seed,
        config=config,
    )


def pair_runs(runs_a: Sequence[RunInfo], runs_b: Sequence[RunInfo], trials: int) -> list[tuple[RunInfo, RunInfo]]:
    """Pairs (A seed k, B seed k) for the ``trials`` smallest seeds both have."""
    for side, runs in (("A", runs_a), ("B", runs_b)):
        seeds = [r.seed for r in runs]
        if None in seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"runs of {side} need distinct seeds (manifest 'seed' or a seed<k> folder): {seeds}")
    a = {r.seed: r for r in runs_a}
    b = {r.seed: r for r in runs_b}
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"no seed in common between A {sorted(a)} and B {sorted(b)}")
    if len(common) < trials:
        warnings.warn(
            f"only {len(common)} seed(s) in common ({common}); running {len(common)} trial(s), not {trials}",
            stacklevel=2,
        )
    for x, y in ((a[s], b[s]) for s in common):
        for attr in ("dataset", "model", "reward"):
            if getattr(x, attr) != getattr(y, attr):
                raise ValueError(
                    f"{attr} differs between {x.path} ({getattr(x, attr)}) and {y.path} ({getattr(y, attr)})"
                )
    return [(a[s], b[s]) for s in common[:trials]]


# -- seeded choices -------------------------------------------------------------------
def derive_seed(*parts: object) -> int:
    """A 64-bit seed from its parts (stable across Python runs and versions)."""
    blob = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def sample_prompt_ids(ids: Iterable[str], num: int, sample_seed: int, trial: int) -> list[str]:
    """``num`` ids (all if fewer), drawn from the sorted ids by a RNG seeded by (seed, trial)."""
    pool = sorted(set(ids))
    rng = random.Random(derive_seed(sample_seed, "prompts", trial))
    return rng.sample(pool, min(num, len(pool)))


def a_shown_first(sample_seed: int, trial: int, prompt_id: str) -> bool:
    """The random order of ``random_order`` mode for one prompt (seeded, per prompt)."""
    return random.Random(derive_seed(sample_seed, "order", trial, prompt_id)).random() < 0.5


# -- verdicts -------------------------------------------------------------------------
def preference(scores: Scores | None, a_first: bool) -> str | None:
    """'A', 'B' or 'tie' from one reply's scores (None if invalid)."""
    if scores is None:
        return None
    sa, sb = (scores.first, scores.second) if a_first else (scores.second, scores.first)
    return "A" if sa > sb else "B" if sb > sa else "tie"


def outcome(prefs: Sequence[str | None]) -> str:
    """'win'/'draw'/'loss' for A, or 'invalid', from the verdicts of every order asked.

    A wins only if every order prefers A (both orders, or the single one); B likewise;
    a tie or a split is a draw; any invalid reply makes the prompt invalid.
    """
    if not prefs or any(p is None for p in prefs):
        return "invalid"
    if all(p == "A" for p in prefs):
        return "win"
    if all(p == "B" for p in prefs):
        return "loss"
    return "draw"


@dataclass
class _Item:
    trial: int
    prompt_id: str
    orders: list[tuple[bool, JudgeRequest]]  # (A shown first?, request)


def build_items(judge: PairwiseJudge, trial: int, run_a: RunInfo, run_b: RunInfo) -> tuple[list[_Item], int]:
    """The prompts of one trial and the request(s) for each; also the common-id count."""
    recs_a = {str(r["prompt_id"]): r for r in read_records(run_a.path)}
    recs_b = {str(r["prompt_id"]): r for r in read_records(run_b.path)}
    common = set(recs_a) & set(recs_b)
    if len(common) < judge.num_prompts:
        warnings.warn(
            f"trial {trial}: only {len(common)} prompts in common, fewer than num_prompts={judge.num_prompts}",
            stacklevel=2,
        )
    opts_a, opts_b = cleaning_options(run_a.config), cleaning_options(run_b.config)
    items = []
    for pid in sample_prompt_ids(common, judge.num_prompts, judge.sample_seed, trial):
        ra, rb = recs_a[pid], recs_b[pid]
        question = str(ra.get("prompt", ""))
        if str(rb.get("prompt", "")) != question:
            raise ValueError(f"prompt {pid!r} differs between {run_a.path} and {run_b.path}")
        ans_a = clean_response(ra.get("response"), **opts_a)
        ans_b = clean_response(rb.get("response"), **opts_b)
        if judge.mode == "both_orders":
            flags = [True, False]
        else:
            flags = [a_shown_first(judge.sample_seed, trial, pid)]
        orders = [
            (f, JudgeRequest(question, ans_a, ans_b) if f else JudgeRequest(question, ans_b, ans_a)) for f in flags
        ]
        items.append(_Item(trial, pid, orders))
    return items, len(common)


def _tally(items: Sequence[_Item], replies: dict[int, JudgeReply]) -> dict[str, Any]:
    counts = dict.fromkeys(OUTCOMES, 0)
    agree = both = 0
    judgements = []
    for it in items:
        prefs, scores = [], []
        for a_first, req in it.orders:
            s = replies[id(req)].scores
            prefs.append(preference(s, a_first))
            scores.append(None if s is None else [s.first, s.second])
        res = outcome(prefs)
        counts[res] += 1
        if len(prefs) == 2 and None not in prefs:
            both += 1
            agree += prefs[0] == prefs[1]
        judgements.append(
            {
                "prompt_id": it.prompt_id,
                "outcome": res,
                "orders": ["AB" if f else "BA" for f, _ in it.orders],
                "scores": scores,  # [first shown, second shown] per order; null = invalid
                "cache_keys": [replies[id(r)].key for _, r in it.orders],
            }
        )
    return {
        **counts,
        "n": len(items),
        "order_agreement": (agree / both) if both else None,
        "judgements": judgements,
    }


def _pct(count: int, n: int) -> float:
    return 100.0 * count / n if n else math.nan


def mean_percentages(trials: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Percent of n per trial for each outcome, averaged over trials with n > 0."""
    out: dict[str, float | None] = {}
    for k in OUTCOMES:
        vals = [_pct(int(t[k]), int(t["n"])) for t in trials if int(t.get("n", 0)) > 0]
        out[k] = math.fsum(vals) / len(vals) if vals else None
    return out


def _display_path(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def default_output(results_dir: str | os.PathLike[str], a: RunInfo, b: RunInfo) -> Path:
    return Path(results_dir) / "judge" / a.dataset / f"{a.model}__{a.reward}" / f"{a.method}_vs_{b.method}.json"


def run_comparison(
    judge: PairwiseJudge,
    runs_a: Sequence[str | os.PathLike[str]],
    runs_b: Sequence[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str] | None = None,
    results_dir: str | os.PathLike[str] = "results",
    dry_run: bool = False,
    progress: Any = None,
) -> tuple[Plan, dict[str, Any] | None, Path]:
    """Judge A against B over the paired seed runs; write and return the win-rate dict.

    With ``dry_run`` nothing is sent or written: returns (plan, None, output path).
    Raises ``JudgeError``/``BudgetExceededError`` from the judge, and ``JudgeError`` if
    some request still failed after retries (replies received so far stay cached).
    """
    from aisp_bench.judge.client import JudgeError

    pairs = pair_runs([run_info(p) for p in runs_a], [run_info(p) for p in runs_b], judge.trials)
    a0, b0 = pairs[0]
    out_path = Path(out) if out is not None else default_output(results_dir, a0, b0)
    per_trial = []
    requests: list[JudgeRequest] = []
    for trial, (ra, rb) in enumerate(pairs):
        items, num_common = build_items(judge, trial, ra, rb)
        per_trial.append((trial, ra, rb, items, num_common))
        requests.extend(req for it in items for _, req in it.orders)
    plan = judge.plan(requests)
    if dry_run:
        return plan, None, out_path
    replies_list = judge.judge(requests, progress=progress)
    failed = [r for r in replies_list if not r.ok]
    if failed:
        raise JudgeError(
            f"{len(failed)} of {len(replies_list)} judge requests failed after retries "
            f"(first: {failed[0].error}); nothing written, re-run to retry them (replies so far are cached)"
        )
    replies = {id(req): rep for req, rep in zip(requests, replies_list, strict=True)}
    trials = []
    for trial, ra, rb, items, num_common in per_trial:
        t = _tally(items, replies)
        trials.append(
            {
                "trial": trial,
                "run_a": _display_path(ra.path),
                "run_b": _display_path(rb.path),
                "seed": ra.seed,
                **{k: t[k] for k in (*OUTCOMES, "n")},
                "num_common": num_common,
                "order_agreement": t["order_agreement"],
                "judgements": t["judgements"],
            }
        )
    result = {
        "dataset": a0.dataset,
        "model": a0.model,
        "reward": a0.reward,
        "method_a": a0.method,
        "method_b": b0.method,
        "judge_model": judge.model,
        "base_url_host": judge.base_url_host,
        "mode": judge.mode,
        "num_prompts": judge.num_prompts,
        "prompt_version": judge.settings()["prompt_version"],
        "temperature": judge.temperature,
        "max_tokens": judge.max_tokens,
        "sample_seed": judge.sample_seed,
        "trials": trials,
        "mean": mean_percentages(trials),
    }
    write_json_atomic(out_path, result)
    return plan, result, out_path


# -- tables -----------------------------------------------------------------------------
WINRATE_COLUMNS = [
    "dataset", "model", "reward", "method_a", "method_b", "judge_model", "mode",
    "trials", "n", "win", "draw", "loss", "invalid",
    "win_count", "draw_count", "loss_count", "invalid_count", "path",
]  # fmt: skip


def winrate_dataframe(items: Iterable[str | os.PathLike[str] | dict[str, Any]]):
    """One row per win-rate JSON (paths or loaded dicts): percentages averaged over trials.

    Columns: ``dataset, model, reward, method_a, method_b, judge_model, mode, trials``
    (number of trials), ``n`` (prompts judged, all trials), ``win, draw, loss, invalid``
    (mean over trials of % of that trial's n; recomputed from the trials, so the file's
    ``mean`` is not trusted blindly), the summed counts ``*_count``, and ``path``.
    """
    import pandas as pd

    rows = []
    for item in items:
        path = None
        if not isinstance(item, dict):
            path = str(item)
            item = read_json(item)
        trials = item.get("trials", [])
        mean = mean_percentages(trials)
        rows.append(
            {
                **{
                    k: item.get(k)
                    for k in ("dataset", "model", "reward", "method_a", "method_b", "judge_model", "mode")
                },
                "trials": len(trials),
                "n": sum(int(t.get("n", 0)) for t in trials),
                **{k: (math.nan if mean[k] is None else mean[k]) for k in OUTCOMES},
                **{f"{k}_count": sum(int(t.get(k, 0)) for t in trials) for k in OUTCOMES},
                "path": path,
            }
        )
    return pd.DataFrame(rows, columns=WINRATE_COLUMNS)
