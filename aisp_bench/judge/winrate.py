"""Win rates of method A against method B judged pairwise (Tables 2 and 3).

Protocol (Appendix C.2: 100 random prompts, the judge picks the better response, three
trials averaged), with the lineage's flaws fixed:

* **Comparisons**: one per dataset and model/reward pair of the selected runs, between
  ``method_a``'s and ``method_b``'s runs in the one variant both have.
* **Trials**: trial k pairs the k-th seed of A with the same seed of B; prompts are
  joined on ``prompt_id``.
* **Seeded sampling**: per trial, ``num_prompts`` ids drawn from the sorted common ids,
  seeded by (``sample_seed``, trial) through :func:`aisp_bench.seeding.derive_seed`.
* **Position bias**: ``mode=both_orders`` (default) asks twice, A first and B first; a
  win needs both, anything else is a draw. ``random_order``: one seeded order per prompt.
* **Invalid replies** (no two 1-10 scores on the first line) are counted apart, never
  as draws; a request that still fails after retries writes nothing (re-run to retry).

All requests of all comparisons go to the judge as one batch (one budget check, one
model load). Each comparison is written to ``results.judge_file``::

    {"dataset", "model", "reward", "method_a", "method_b", "judge_model", "base_url_host",
     "mode", "num_prompts", "prompt_version", "temperature", "max_tokens", "sample_seed",
     "trials": [{"trial", "run_a", "run_b", "seed", "win", "draw", "loss", "invalid", "n",
                 "num_common", "order_agreement", "judgements": [{"prompt_id", "outcome",
                 "orders", "scores", "words", "cache_keys"}, ...]}, ...],
     "mean": {"win", "draw", "loss", "invalid"}}          # % of n, averaged over trials
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aisp_bench.cli import UserError
from aisp_bench.judge.base import CachedJudge, JudgeError, JudgeReply, JudgeRequest, Plan, Progress
from aisp_bench.metrics.cleaning import clean_response, cleaning_options
from aisp_bench.results import OUTCOMES, judge_file, preference, trial_percentages
from aisp_bench.rundir import Run, read_records, record_prompt, write_json_atomic
from aisp_bench.seeding import derive_seed


@dataclass(frozen=True)
class Protocol:
    """What to ask: the keys ``mode``, ``num_prompts``, ``trials``, ``sample_seed`` of conf/judge.yaml
    (checked by ``validate.check``)."""

    mode: str = "both_orders"  # or "random_order"
    num_prompts: int = 100
    trials: int = 3
    sample_seed: int = 0


# -- seeded choices -------------------------------------------------------------------
def sample_prompt_ids(ids: Iterable[str], num: int, sample_seed: int, trial: int) -> list[str]:
    """``num`` ids (all if fewer), drawn from the sorted ids by a RNG seeded by (seed, trial)."""
    pool = sorted(set(ids))
    rng = random.Random(derive_seed(sample_seed, "", "judge_prompts", trial))
    return rng.sample(pool, min(num, len(pool)))


def a_shown_first(sample_seed: int, trial: int, prompt_id: str) -> bool:
    """The random order of ``random_order`` mode for one prompt (seeded, per prompt)."""
    return random.Random(derive_seed(sample_seed, prompt_id, "judge_order", trial)).random() < 0.5


# -- verdicts -------------------------------------------------------------------------
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


# -- comparisons ------------------------------------------------------------------------
@dataclass
class _Item:
    prompt_id: str
    orders: list[tuple[bool, JudgeRequest]]  # (A shown first?, request)
    words: tuple[int, int]  # whitespace-separated words of A's and B's cleaned answers


@dataclass
class _Trial:
    trial: int
    run_a: Run
    run_b: Run
    items: list[_Item]
    num_common: int


@dataclass
class Comparison:
    """One win-rate file: A's seed runs against B's of one dataset and pair."""

    method_a: str
    method_b: str
    out: Path
    trials: list[_Trial]


def find_comparisons(runs: Sequence[Run], method_a: str, methods_b: Sequence[str]) -> list[tuple[list[Run], list[Run]]]:
    """(A's runs, B's runs) per dataset, pair and method B, in the one variant both have (a cell
    without A or B is left out, with a warning when A has runs; several such variants: an error)."""
    cells: dict[tuple[str, str], dict[tuple[str, str], list[Run]]] = {}
    for r in runs:
        cells.setdefault((r.dataset, r.pair), {}).setdefault((r.method, r.variant), []).append(r)
    out = []
    for (dataset, pair), by in cells.items():
        for method_b in methods_b:
            variants = sorted({v for m, v in by if m == method_a} & {v for m, v in by if m == method_b})
            if len(variants) > 1:
                raise UserError(f"{dataset}/{pair}: {method_a} and {method_b} both have the variants "
                                f"{', '.join(variants)}; choose one with select.variant=...")
            if not variants:
                if any(m == method_a for m, _ in by):
                    warnings.warn(f"{dataset}/{pair}: no {method_b} run in a variant of {method_a}'s", stacklevel=2)
                continue
            out.append((by[(method_a, variants[0])], by[(method_b, variants[0])]))
    if not out:
        raise UserError(f"no runs of both {method_a} and {' or '.join(methods_b)} in one variant among the selected runs")
    return out


def pair_runs(runs_a: Sequence[Run], runs_b: Sequence[Run], trials: int) -> list[tuple[Run, Run]]:
    """Pairs (A seed k, B seed k) for the ``trials`` smallest seeds both have."""
    a, b = {r.seed: r for r in runs_a}, {r.seed: r for r in runs_b}
    common = sorted(set(a) & set(b))
    if not common:
        raise UserError(f"no seed in common between {runs_a[0].method} {sorted(a)} and {runs_b[0].method} {sorted(b)}")
    if len(common) < trials:
        warnings.warn(
            f"only {len(common)} seed(s) in common ({common}); running {len(common)} trial(s), not {trials}",
            stacklevel=2,
        )
    return [(a[s], b[s]) for s in common[:trials]]


def build_items(protocol: Protocol, trial: int, run_a: Run, run_b: Run) -> tuple[list[_Item], int]:
    """The prompts of one trial and the request(s) for each; also the common-id count."""
    recs_a = {str(r["prompt_id"]): r for r in read_records(run_a.path)}
    recs_b = {str(r["prompt_id"]): r for r in read_records(run_b.path)}
    common = set(recs_a) & set(recs_b)
    if len(common) < protocol.num_prompts:
        warnings.warn(
            f"trial {trial}: only {len(common)} prompts in common, fewer than num_prompts={protocol.num_prompts}",
            stacklevel=2,
        )
    opts_a, opts_b = cleaning_options(run_a.config), cleaning_options(run_b.config)
    items = []
    for pid in sample_prompt_ids(common, protocol.num_prompts, protocol.sample_seed, trial):
        prompt = record_prompt(recs_a[pid])
        if record_prompt(recs_b[pid]).messages != prompt.messages:
            raise UserError(f"prompt {pid!r} differs between {run_a.path} and {run_b.path}")
        ans_a = clean_response(recs_a[pid].get("response"), **opts_a)
        ans_b = clean_response(recs_b[pid].get("response"), **opts_b)
        flags = [True, False] if protocol.mode == "both_orders" else [a_shown_first(protocol.sample_seed, trial, pid)]
        orders = [(f, JudgeRequest(prompt, ans_a, ans_b) if f else JudgeRequest(prompt, ans_b, ans_a)) for f in flags]
        items.append(_Item(pid, orders, (len(ans_a.split()), len(ans_b.split()))))
    return items, len(common)


def build_comparison(protocol: Protocol, runs_a: Sequence[Run], runs_b: Sequence[Run], results_dir: str | Path):
    """The trials and requests of A's runs against B's (one dataset and pair); a sharded run
    with a shard missing or unfinished is refused (it would be judged on part of its prompts)."""
    trials = []
    for k, (ra, rb) in enumerate(pair_runs(runs_a, runs_b, protocol.trials)):
        for r in (ra, rb):
            if r.unfinished:
                raise UserError(f"{r.path}: {r.unfinished}; finish them before judging this run")
        trials.append(_Trial(k, ra, rb, *build_items(protocol, k, ra, rb)))
    a = runs_a[0]
    out = judge_file(results_dir, a.dataset, a.pair, a.method, runs_b[0].method)
    return Comparison(a.method, runs_b[0].method, out, trials)


# -- tallies --------------------------------------------------------------------------
def _display_path(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _tally(t: _Trial, replies: dict[int, JudgeReply]) -> dict[str, Any]:
    """One trial of the win-rate file (see the module docstring)."""
    counts = dict.fromkeys(OUTCOMES, 0)
    agree = both = 0
    judgements = []
    for it in t.items:
        scores = [replies[id(req)].scores for _, req in it.orders]
        prefs = [preference(s, a_first) for (a_first, _), s in zip(it.orders, scores, strict=True)]
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
                "scores": [None if s is None else list(s) for s in scores],  # per order; null = invalid
                "words": list(it.words),  # [A, B]: the cleaned answers' lengths (the bias report)
                "cache_keys": [replies[id(r)].key for _, r in it.orders],
            }
        )
    return {"trial": t.trial, "run_a": _display_path(t.run_a.path), "run_b": _display_path(t.run_b.path),
            "seed": t.run_a.seed, **counts, "n": len(t.items), "num_common": t.num_common,
            "order_agreement": (agree / both) if both else None, "judgements": judgements}  # fmt: skip


def result(judge: CachedJudge, protocol: Protocol, comp: Comparison, replies: dict[int, JudgeReply]) -> dict:
    """The win-rate file's contents (see the module docstring); ``mean``: percent of n per trial
    for each outcome, averaged over the trials with n > 0."""
    trials = [_tally(t, replies) for t in comp.trials]
    pct = trial_percentages(trials)
    a = comp.trials[0].run_a
    return {
        "dataset": a.dataset, "model": a.model, "reward": a.reward, "method_a": comp.method_a,
        "method_b": comp.method_b, "judge_model": judge.model, "base_url_host": judge.base_url_host,
        "mode": protocol.mode, "num_prompts": protocol.num_prompts, "prompt_version": judge.version,
        "temperature": getattr(judge, "temperature", None), "max_tokens": judge.max_tokens,
        "sample_seed": protocol.sample_seed, "trials": trials,
        "mean": {k: math.fsum(p[k] for p in pct) / len(pct) if pct else None for k in OUTCOMES},
    }  # fmt: skip


def run_comparisons(
    judge: CachedJudge, protocol: Protocol, comps: Sequence[Comparison], *, dry_run: bool = False,
    progress: Progress | None = None,
) -> tuple[Plan, list[dict[str, Any]]]:
    """Judge every comparison (one batch), write and return their win-rate dicts; ``dry_run``:
    (plan, []), nothing sent or written. ``JudgeError`` also when some request still failed
    after retries (nothing written; the replies received stay cached)."""
    requests = [req for c in comps for t in c.trials for it in t.items for _, req in it.orders]
    plan = judge.plan(requests)
    if dry_run:
        return plan, []
    replies_list = judge.judge(requests, progress=progress)
    failed = [r for r in replies_list if not r.ok]
    if failed:
        raise JudgeError(
            f"{len(failed)} of {len(replies_list)} judge requests failed after retries "
            f"(first: {failed[0].error}); nothing written, re-run to retry them (replies so far are cached)"
        )
    replies = {id(req): rep for req, rep in zip(requests, replies_list, strict=True)}
    results = [result(judge, protocol, c, replies) for c in comps]
    for c, res in zip(comps, results, strict=True):
        write_json_atomic(c.out, res)
    return plan, results
