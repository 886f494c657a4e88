"""What a method spent per prompt, on every axis, from the records and the manifest.

==============  ==============================================================================
axis            per prompt, after the j-th sample (generation order) or in all
==============  ==============================================================================
samples         samples generated (and scored)
tokens          generated tokens, Σ ``sample_tokens``
reward_tokens   tokens the reward model reads: the prompt once (a prompt its samples share is
                counted once) plus every sample's response, in the policy's tokens
                (``prompt_tokens``, as the policy read it; the reward model's own tokenizer and
                template differ, so this is a stand-in, as in ``python -m aisp_bench.plan``)
flops           2 × parameters × tokens for each model: 2·P_policy·(prompt + generated tokens)
                + 2·P_reward·reward_tokens, P from the manifest's ``parameters`` (the forward
                pass's multiply-adds; attention over the context is left out)
depth           sequential depth: dependent decode passes, one after another (``decode_passes``;
                BoN 1, its N rows need nothing from each other; AISP κ + 1 with y(U*)); per
                sample, the pass it came from (AISP's iteration k, y(U*) κ + 1)
seconds         wall seconds (``seconds``, a batch's time split evenly over its prompts), split
                over samples pro rata by tokens (AISP: each iteration's own seconds over its n
                samples, the rest over the y(U*) candidate)
==============  ==============================================================================

A reward-guided decoder (Speculative Rejection, particle filtering: ``paused``) has no cost
per sample: its rows share decoding (a dropped row stops, a resampled particle's prefix is
decoded once) and its reward model also reads partial responses. Its record's totals are
its one point: ``num_samples``, ``num_tokens`` (every token decoded), ``reward_tokens``
(the prompt once plus every response scored, partial ones included), ``decode_passes``,
``seconds``.

A best-of-N pool read through the unbiased best-of-m estimator (:mod:`.bestof`) spends
the *expected* cost of m random samples of the pool: m × the pool's mean per sample (the
prompt once; depth 1). Records written before ``prompt_tokens`` existed have no
reward-model tokens or FLOPs, manifests before ``parameters`` no FLOPs: NaN, and the
compute table says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pathlib import Path

import numpy as np
import pandas as pd

from aisp_bench.rundir import Run

from .common import (
    DASH, as_float_array, dataset_key, display_dataset, display_method, display_pair, finite_or_nan, fmt_num,
    method_key, pair_key, render_markdown, select_variants, write_texts,
)  # fmt: skip

AXES = ("samples", "tokens", "reward_tokens", "flops", "depth", "seconds")
AXIS_LABELS = {"samples": "samples per prompt", "tokens": "generated tokens per prompt",
               "reward_tokens": "reward-model tokens per prompt", "flops": "FLOPs per prompt (policy + reward)",
               "depth": "sequential depth (dependent decode passes)", "seconds": "wall seconds per prompt"}


def parameters(run: Run) -> tuple[float, float]:
    """(policy, reward model) parameter counts from the run's manifest; NaN where not recorded."""
    p = run.manifest.get("parameters") or {}
    return finite_or_nan(p.get("policy")), finite_or_nan(p.get("reward"))


def sample_tokens(record: dict[str, Any]) -> np.ndarray:
    """Generated tokens per sample; without ``sample_tokens``, ``num_tokens`` split evenly."""
    num = len(record.get("sample_rewards") or [])
    st = as_float_array(record.get("sample_tokens"))
    if len(st) >= num:
        return np.nan_to_num(st[:num])
    return np.full(num, finite_or_nan(record.get("num_tokens")) / max(num, 1))


def _pro_rata(seconds: float, tokens: np.ndarray) -> np.ndarray:
    """Split ``seconds`` over samples in proportion to their tokens (equally if none)."""
    if len(tokens) == 0:
        return np.zeros(0)
    tot = float(np.nansum(tokens))
    return seconds * np.nan_to_num(tokens) / tot if tot > 0 else np.full(len(tokens), seconds / len(tokens))


def _iterations(record: dict[str, Any]) -> list[dict]:
    return sorted(record.get("iterations") or [], key=lambda it: it.get("k", 0))


def sample_seconds(record: dict[str, Any], tokens: np.ndarray, n: int | None) -> np.ndarray:
    """Seconds per sample (the module docstring's ``seconds``)."""
    total, iters = finite_or_nan(record.get("seconds")), _iterations(record)
    it_secs = [finite_or_nan(it.get("seconds")) for it in iters]
    if iters and n and np.isfinite(it_secs).all():
        rest = max(0.0, total - sum(it_secs)) if np.isfinite(total) else 0.0  # the y(U*) candidate, overheads
        return np.concatenate([_pro_rata(s, tokens[i * n:(i + 1) * n]) for i, s in enumerate(it_secs)]
                              + [_pro_rata(rest, tokens[n * len(iters):])])
    return _pro_rata(total, tokens)


def sample_depth(record: dict[str, Any], n: int | None) -> np.ndarray:
    """The decode pass each sample came from: AISP's iteration k (n samples each), then κ + 1 for
    y(U*); other methods' samples all from their last pass (``decode_passes``, else 1)."""
    num, iters = len(record.get("sample_rewards") or []), _iterations(record)
    if iters and n:
        return np.minimum(np.arange(num) // n + 1, len(iters) + 1).astype(float)
    return np.full(num, finite_or_nan(record.get("decode_passes") or 1))


def paused(record: dict[str, Any]) -> bool:
    """A reward-guided decoder's record (its decode paused at ``decision_points``): totals only."""
    return "decision_points" in record


def cumulative(record: dict[str, Any], n: int | None, params: tuple[float, float]) -> dict[str, np.ndarray]:
    """Per axis, the cost spent after each sample j = 1..S in generation order (depth: the passes
    needed so far, a running max); a ``paused`` record: its totals, one point."""
    prompt = finite_or_nan(record.get("prompt_tokens"))
    if paused(record):
        one = {axis: np.array([finite_or_nan(record.get(key))]) for axis, key in (
            ("samples", "num_samples"), ("tokens", "num_tokens"), ("reward_tokens", "reward_tokens"),
            ("depth", "decode_passes"), ("seconds", "seconds"))}
        return _with_flops(one, prompt, params)
    tokens = sample_tokens(record)
    gen = np.cumsum(tokens)
    return _with_flops({"samples": np.arange(1.0, len(tokens) + 1), "tokens": gen, "reward_tokens": prompt + gen,
                        "depth": np.fmax.accumulate(sample_depth(record, n)) if len(tokens) else np.zeros(0),
                        "seconds": np.cumsum(sample_seconds(record, tokens, n))}, prompt, params)


def expected_cumulative(record: dict[str, Any], params: tuple[float, float]) -> dict[str, np.ndarray]:
    """Per axis, the expected cost of m = 1..N samples drawn from a best-of-N pool: m × its mean per
    sample (the prompt once; depth 1)."""
    tokens = sample_tokens(record)
    m = np.arange(1.0, len(tokens) + 1)
    gen, prompt = m * (tokens.mean() if len(tokens) else 0.0), finite_or_nan(record.get("prompt_tokens"))
    seconds = finite_or_nan(record.get("seconds")) / max(len(tokens), 1)
    return _with_flops({"samples": m, "tokens": gen, "reward_tokens": prompt + gen, "depth": np.ones(len(m)),
                        "seconds": m * seconds}, prompt, params)


def _with_flops(costs: dict[str, np.ndarray], prompt: float, params: tuple[float, float]) -> dict[str, np.ndarray]:
    policy, reward = params
    costs["flops_policy"] = 2.0 * policy * (prompt + costs["tokens"])
    costs["flops_reward"] = 2.0 * reward * costs["reward_tokens"]
    costs["flops"] = costs["flops_policy"] + costs["flops_reward"]
    return costs


def totals(record: dict[str, Any], n: int | None, params: tuple[float, float]) -> dict[str, float]:
    """Per axis (and ``flops_policy``, ``flops_reward``), what the prompt cost in all; depth from
    ``decode_passes`` where recorded."""
    out = {k: (float(v[-1]) if len(v) else math.nan) for k, v in cumulative(record, n, params).items()}
    if record.get("decode_passes") is not None:
        out["depth"] = finite_or_nan(record["decode_passes"])
    return out


def cost_means(runs: Sequence[Run], n: int | None) -> dict[str, float]:
    """Per axis, the mean over the runs' prompts (then seeds) of :func:`totals`."""
    per_seed = [[totals(rec, n, parameters(r)) for rec in r.records] for r in runs if r.records]
    out = {}
    for axis in (*AXES, "flops_policy", "flops_reward"):
        seeds = [np.mean([t[axis] for t in ts]) for ts in per_seed]
        out[axis] = float(np.mean(seeds)) if seeds else math.nan
    return out


def method_n(run: Run) -> int | None:
    """AISP's n (samples per iteration) from the run's manifest; None without one."""
    return int(run.method_param("n") or 0) or None


# --------------------------------------------------------------------------- the compute table


def compute_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per (dataset, pair, method) of the chosen variants (``select_variants``): per axis of
    :data:`AXES` (and ``flops_policy``, ``flops_reward``) the mean per prompt over prompts, then seeds;
    ``policy_parameters`` and ``reward_parameters`` from the first seed's manifest; ``paused``: a
    reward-guided decoder's records (their totals: :func:`paused`)."""
    chosen, _ = select_variants(runs)
    rows = []
    for cell in sorted(chosen, key=lambda c: (dataset_key(c[0]), pair_key(c[1:3]), method_key(c[3]))):
        rs = [r for r in chosen[cell] if r.records]
        if rs:
            policy, reward = parameters(rs[0])
            rows.append(dict(zip(("dataset", "model", "reward", "method"), cell), variant=rs[0].variant,
                             n_seeds=len(rs), prompts=sum(len(r.records) for r in rs), policy_parameters=policy,
                             reward_parameters=reward, paused=any(paused(x) for r in rs for x in r.records),
                             **cost_means(rs, method_n(rs[0]))))
    return pd.DataFrame(rows)


def _sci(x: float) -> str:
    return DASH if not np.isfinite(x) else f"{x:.3g}"


def write_compute_table(df: pd.DataFrame, out_dir: Path | str, name: str = "compute") -> list[Path]:
    """``<name>.md`` and ``<name>.csv``: what each method spent per prompt, on every axis."""
    header = ["Dataset", "Models", "Method", "Samples", "Generated tokens", "Reward-model tokens", "FLOPs",
              "Depth", "Seconds"]
    body = [[display_dataset(r.dataset), display_pair(r.model, r.reward), display_method(r.method),
             fmt_num(r.samples, 1), fmt_num(r.tokens, 0), fmt_num(r.reward_tokens, 0), _sci(r.flops),
             fmt_num(r.depth, 1), fmt_num(r.seconds, 2)] for r in df.itertuples()]
    params = "; ".join(sorted({f"{display_pair(r.model, r.reward)}: policy {_sci(r.policy_parameters)}, reward "
                               f"{_sci(r.reward_parameters)}" for r in df.itertuples()}))
    notes = ["Per prompt, mean over prompts then seeds. Samples: generated and scored. Generated tokens: Σ over "
             "samples. Reward-model tokens: the prompt once (shared by its samples) plus every response, counted in "
             "the policy's tokens (a stand-in for the reward model's own tokenizer and template).",
             "FLOPs: 2 × parameters × tokens for the policy (prompt + generated tokens) plus the reward model "
             f"(reward-model tokens); parameters from the manifests ({params}). Depth: dependent decode passes one "
             "after another (BoN 1: its N rows need nothing from each other; AISP κ, plus y(U*)). Seconds: wall time.",
             "—: not recorded (records without prompt_tokens, or manifests without parameters: runs made before "
             "they were recorded)."]
    guided = [display_method(r.method) for r in df.itertuples() if getattr(r, "paused", False)]
    notes += [f"{', '.join(dict.fromkeys(guided))}: the records' totals. Samples: rows started; generated tokens: "
              "every token decoded (a dropped row's up to its rejection, a copied particle's prefix once); "
              "reward-model tokens: the prompt once plus every response scored at every decision point, partial "
              "ones included; depth 1: one decode, paused for scoring (its reward calls in the records)."] if guided else []
    md = render_markdown(header, body, title="Compute per prompt, every axis", notes=notes,
                         align=["l", "l", "l"] + ["r"] * 6)
    return write_texts(out_dir, name, {"md": md, "csv": df.to_csv(index=False)})
