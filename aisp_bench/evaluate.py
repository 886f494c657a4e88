"""``python -m aisp_bench.evaluate [key=value ...]``: Table 1's metrics into each run's ``summary.json``.

Usage::

    python -m aisp_bench.evaluate                                        # every run under results_dir
    python -m aisp_bench.evaluate select.dataset=shp select.method=aisp  # a selection (conf/app.yaml)
    python -m aisp_bench.evaluate encoder=minilm                         # offline coherence stand-in
    python -m aisp_bench.evaluate reward=ultrarm gold_reward=eurus policy.device=cuda:0  # on a GPU

Each selected run with a ``summary.json`` (others are skipped: still going or crashed)
gets a ``metrics`` block in it, its other keys kept. A sharded run is evaluated as one
once every shard is complete (until then skipped with a warning naming the shards to
finish), into the run folder's own ``summary.json``.

**Which reward.** Table 1 reports every row's reward under one model, UltraRM.
``reward=NAME`` (the ``reward`` group) re-scores each record's (messages, cleaned
response): ``reward_mean`` is that model's mean, ``reward_model`` its name,
``reward_source`` ``"evaluated"``, ``run_reward_mean`` the run's own mean. Without it
``reward_mean`` is the run's own mean, ``reward_source`` ``"run"``. Scores are cached per
run in ``eval_rewards_<name>.json`` (only new (prompt, response) pairs are scored;
``force=true`` rescores, and so does a change of the reward's settings, ``reward_settings``).

**Held-out gold reward** (``gold_reward=NAME``): the same cleaned responses scored by a
reward model the run did not optimise, ``gold_reward_mean`` and ``gold_reward_model``
(cached likewise; the run's own reward gives a warning). **Closeness to the base model**
(``base_logprob``): the mean over prompts of the response's mean per-token log-probability
under the run's own policy without noise (``BasePolicy``; cached in
``eval_logprobs_<model>.json``). See docs/statistics.md.

**Per prompt.** ``metrics_per_prompt.json`` holds the values the means average, one per
record (``reward``: the run's own; ``eval_reward``, ``gold_reward``, ``base_logprob``,
``diversity``, ``coherence``; ``checkpoints``: per budget checkpoint of each record, its
gold reward and base_logprob), under the block's fingerprint, for the report's intervals.

**Idempotent**: the ``fingerprint`` hashes what the block was computed from (records'
bytes, encoder, evaluation and gold rewards with their settings, base_logprob policy, metric names, cleaning
settings, ``EVALUATE_VERSION``); a run whose fingerprint matches (in its per-prompt file
too) is left alone.

**Coherence** needs SimCSE from the hub (``encoder=simcse``); where it cannot load the
error says so, and ``encoder=minilm`` is the labelled offline stand-in, never a silent
fallback. Exit codes: 0 done, 1 a run, the encoder, a reward model or the policy failed,
2 bad input.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from aisp_bench.cli import (
    UserError, engine_options, first_line, instantiate_node, launch, reward_node, run_app, select_runs,
)  # fmt: skip
from aisp_bench.config import CONF_DIR, get_path, semantic_config
from aisp_bench.eval_cache import (  # noqa: F401 - eval_logprobs_path: the caches' names, re-exported
    BasePolicy, PolicyUnavailableError, Scored, cached_scores, eval_logprobs_path, eval_rewards_path, quiet_records,
    unready,
)  # fmt: skip
from aisp_bench.metrics import DEFAULT_METRICS, METRICS, EvalBatch, metric_values
from aisp_bench.metrics.cleaning import cleaning_options
from aisp_bench.results import read_prompt_metrics
from aisp_bench.rundir import PROMPT_METRICS, SUMMARY, Run, read_summary, records_sha256, write_json_atomic
from aisp_bench.validate import check

EVALUATE_VERSION = 3  # 3: gold reward, base_logprob, metrics_per_prompt.json
POLICY_METRICS = ("base_logprob",)  # metrics computed by the run's policy, beside aisp_bench.metrics.METRICS


class RewardUnavailableError(RuntimeError):
    """The evaluation reward model cannot be loaded (missing weights, no hub access)."""


def evaluation_rewards(run_dir: Path, records: Sequence[dict[str, Any]], responses: Sequence[str], reward: Any,
                       force: bool, settings: str | None = None) -> list[float | None]:
    """``reward``'s scores via ``cached_scores`` (``settings``: ``reward_settings`` of its config);
    ``RewardUnavailableError`` when it cannot be loaded."""
    reward_name = _name(reward)

    def score(prompts, resps):
        try:
            reward.load()  # loads once: a loaded reward returns at once
        except Exception as e:  # noqa: BLE001 - missing weights, no hub: one line, stop everything
            raise RewardUnavailableError(f"cannot load evaluation reward {reward_name!r}: {first_line(e)}") from None
        return [float(x) for x in reward.score(prompts, resps).tolist()]

    header = {"reward": reward_name} | ({"settings": settings} if settings else {})
    return cached_scores(eval_rewards_path(run_dir, reward_name), header, records, responses, score,
                         field="reward", force=force)


def reward_settings(node: Any) -> str:
    """A digest of a reward's config without the keys a run may change on resume (``NON_SEMANTIC``:
    ``device``, ``batch_size``, ``max_batch_tokens``): two configs of one name that score
    differently (``max_length``, the template, an explicit ``dtype``, ...) get different digests.
    (``dtype: auto`` follows the device: bf16 on a GPU, fp32 on the CPU, one digest.)"""
    plain = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    kept = semantic_config({"reward": plain})["reward"]
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return math.fsum(finite) / len(finite) if finite else None


# -- one run ------------------------------------------------------------------------------
def fingerprint(run_dir: Path, encoder_label: str | None, names: Sequence[str], config: dict[str, Any] | None,
                reward_name: str | None = None, gold_name: str | None = None, policy: str | None = None,
                checkpoints: bool = False) -> str:
    """Hash of everything the metrics block depends on (see the module docstring); ``checkpoints``:
    the records hold budget checkpoints, scored too (runs without keep their fingerprint)."""
    payload = {
        "version": EVALUATE_VERSION,
        "records_sha256": records_sha256(run_dir),
        "encoder": encoder_label if "coherence" in names else None,
        "eval_reward": reward_name if "reward_mean" in names else None,
        "gold_reward": gold_name,
        "base_logprob": policy if "base_logprob" in names else None,
        "metrics": list(names),
        "cleaning": {k: list(v) for k, v in cleaning_options(config).items()},
    } | ({"checkpoints": 1} if checkpoints else {})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _name(model: Any) -> str | None:
    return None if model is None else str(getattr(model, "name", None) or type(model).__name__)


def _label(model: Any, settings: str | None) -> str | None:
    """What the fingerprint names a reward by: its name, and the digest of its settings when known."""
    name = _name(model)
    return name if name is None or not settings else f"{name}@{settings}"


def _reward_metrics(run: Run, metrics: dict, per: dict, batch: EvalBatch, reward: Any, gold: Any, force: bool,
                    scored: Scored, settings: dict[str, str | None]) -> dict:
    """``metrics`` with reward_mean (the run's own, or ``reward``'s) and its provenance keys right after
    it, then the gold reward's; ``per`` gets the per-prompt scores (checkpoints': ``per["checkpoints"]``)."""
    run_mean, own = metrics.get("reward_mean"), get_path(run.config, "reward.name")
    if reward is None:
        mean, model, source = run_mean, None if own is None else str(own), "run"
    else:
        per["eval_reward"] = evaluation_rewards(run.path, batch.records, batch.responses, reward, force,
                                                settings.get("reward"))
        mean, model, source = _mean(per["eval_reward"]), _name(reward), "evaluated"
    provenance = dict(reward_mean=mean, reward_model=model, reward_source=source, run_reward_mean=run_mean)
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        out.update(provenance if k == "reward_mean" else {k: v})
    if gold is not None:
        if _name(gold) == own:
            warnings.warn(f"{run.path}: gold_reward={_name(gold)} is the reward this run optimised (not held out)",
                          stacklevel=2)
        values = evaluation_rewards(run.path, scored.records, scored.cleaned(batch, run.config), gold, force,
                                    settings.get("gold_reward"))
        per["gold_reward"], per["checkpoints"]["gold_reward"] = scored.split(values)
        out.update(gold_reward_mean=_mean(per["gold_reward"]), gold_reward_model=_name(gold))
    return out


def evaluate_run(
    run: Run | str | Path,
    encoder: Any,
    *,
    names: Sequence[str] = DEFAULT_METRICS,
    force: bool = False,
    reward: Any = None,
    gold_reward: Any = None,
    policy: BasePolicy | None = None,
    settings: dict[str, str | None] | None = None,
) -> tuple[str, dict[str, Any] | None]:
    """Write the metrics block into ``summary.json`` and its per-prompt values into
    ``metrics_per_prompt.json`` (``reward``, ``gold_reward``, ``policy``: the module docstring;
    ``settings``: ``reward_settings`` of the ``reward`` and ``gold_reward`` configs, where known).
    Returns (status, metrics), status ``"updated"``, ``"up to date"`` or ``"skipped: <why>"``."""
    settings = settings or {}
    run = run if isinstance(run, Run) else Run.at(run)
    if reward is not None and "reward_mean" not in names:
        raise UserError(f"reward={_name(reward)} needs the reward_mean metric in metrics")
    if "base_logprob" in names and policy is None:
        raise UserError("the base_logprob metric needs the run's policy (BasePolicy)")
    why = unready(run)
    if why:
        return f"skipped: {why}", None
    label, records = encoder.label if encoder is not None else None, quiet_records(run)
    scored = Scored.of(records)
    fp = fingerprint(run.path, label, names, run.config, _label(reward, settings.get("reward")),
                     _label(gold_reward, settings.get("gold_reward")),
                     BasePolicy.label(run) if "base_logprob" in names else None, any(scored.counts))
    old = run.metrics
    if not force and isinstance(old, dict) and old.get("fingerprint") == fp and read_prompt_metrics(run.path, fp):
        return "up to date", old
    batch = EvalBatch.from_records(records, run.config, encoder)  # the responses cleaned once
    metrics, per = metric_values(batch, [n for n in names if n not in POLICY_METRICS])
    per["checkpoints"] = {}  # per metric, per record: its checkpoints' values (in the file when some were recorded)
    if "reward_mean" in metrics:
        metrics = _reward_metrics(run, metrics, per, batch, reward, gold_reward, force, scored, settings)
    if "base_logprob" in names:
        per["base_logprob"], per["checkpoints"]["base_logprob"] = scored.split(policy.logprobs(run, scored, force))
        metrics.update(base_logprob=_mean(per["base_logprob"]), base_logprob_model=BasePolicy.label(run))
    metrics["fingerprint"] = fp
    per = {k: v for k, v in per.items() if k != "checkpoints" or any(scored.counts)}
    write_json_atomic(run.path / PROMPT_METRICS, {"fingerprint": fp, "prompt_ids": [str(r.get("prompt_id", ""))
                                                                                   for r in records], **per})
    summary = read_summary(run.path)  # re-read: keep whatever else changed meanwhile (sharded: the shards' sum)
    summary["metrics"] = metrics
    write_json_atomic(run.path / SUMMARY, summary)
    return "updated", metrics


# -- the command --------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _report(run: Run, status: str, m: dict[str, Any]) -> str:
    enc = f" [{m['coherence_encoder']}]" if m.get("coherence_encoder") else ""
    rm = f" [{m['reward_model']}]" if m.get("reward_model") else ""
    gold = f" gold {_fmt(m['gold_reward_mean'])} [{m['gold_reward_model']}]" if "gold_reward_model" in m else ""
    base = f" base_logprob {_fmt(m['base_logprob'], '.3f')}" if "base_logprob" in m else ""
    return (f"{run.path}: {status}: reward {_fmt(m.get('reward_mean'))}{rm}{gold} diversity "
            f"{_fmt(m.get('diversity'), '.3f')} coherence {_fmt(m.get('coherence'), '.3f')}{enc}{base} "
            f"({m.get('num_records')} records)")


def _setup(cfg: DictConfig) -> tuple[list[str], Any, Any, Any, BasePolicy | None, dict[str, str | None]]:
    """(metric names, encoder, evaluation reward, gold reward, base policy; None where unused; the
    rewards' ``reward_settings``)."""
    from aisp_bench.metrics.coherence import ENCODERS
    from aisp_bench.models.loading import resolve_device

    names = [str(n) for n in (cfg.metrics if OmegaConf.is_list(cfg.metrics) else [cfg.metrics])]
    [METRICS.get(n) for n in names if n not in POLICY_METRICS]  # unknown names: an error before any work
    encoder_class = ENCODERS.get(str(cfg.encoder))
    reward = None if cfg.get("reward") is None else instantiate_node(reward_node(cfg.reward, cfg.engine), "reward")
    gold = (None if cfg.get("gold_reward") is None
            else instantiate_node(reward_node(cfg.gold_reward, cfg.engine), "gold_reward"))
    if gold is not None and "reward_mean" not in names:
        raise UserError(f"gold_reward={_name(gold)} needs the reward_mean metric in metrics")
    policy = None
    if "base_logprob" in names:
        p = cfg.policy
        try:  # policy.batch_rows and policy.dtype: validate.check
            if p.device is not None:
                resolve_device(p.device)
        except ValueError as e:
            raise UserError(f"policy: {e}") from None
        policy = BasePolicy({"device": p.device, "dtype": p.dtype}, int(p.batch_rows), engine_options(cfg.engine))
    try:  # constructed now (its label is known), loaded on first use
        encoder = encoder_class(device=cfg.device, batch_size=cfg.batch_size) if "coherence" in names else None
    except ValueError as e:
        raise UserError(f"encoder: {e}") from None
    settings = {k: None if cfg.get(k) is None else reward_settings(cfg[k]) for k in ("reward", "gold_reward")}
    return names, encoder, reward, gold, policy, settings


def main(cfg: DictConfig) -> int:
    from aisp_bench.metrics.coherence import EncoderUnavailableError

    check(cfg)
    runs = select_runs(cfg)
    names, encoder, reward, gold, policy, settings = _setup(cfg)
    counts = dict.fromkeys(("updated", "up to date", "skipped", "failed"), 0)
    unavailable = (EncoderUnavailableError, RewardUnavailableError, PolicyUnavailableError)  # stop everything
    try:
        if policy is not None:  # base_logprob: every run's responses at once, each prompt prefilled once
            policy.prepare(runs, force=bool(cfg.force))
        for run in runs:
            try:
                status, m = evaluate_run(run, encoder, names=names, force=bool(cfg.force), reward=reward,
                                         gold_reward=gold, policy=policy, settings=settings)
            except (UserError, *unavailable):
                raise
            except Exception as e:  # noqa: BLE001 - report and go on with the other runs
                counts["failed"] += 1
                print(f"error: {run.path}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            if status.startswith("skipped"):
                counts["skipped"] += 1
                print(f"warning: {run.path}: {status}", file=sys.stderr)
                continue
            counts[status] += 1
            print(_report(run, status, m or {}))
    except unavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(runs)} run(s): " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 1 if counts["failed"] else 0


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def app(cfg: DictConfig) -> None:
    run_app(main, cfg)


if __name__ == "__main__":
    launch(app, "evaluate")
