"""``python -m aisp_bench.evaluate [key=value ...]``: Table 1's metrics into each run's ``summary.json``.

Usage::

    python -m aisp_bench.evaluate                                        # every run under results_dir
    python -m aisp_bench.evaluate select.dataset=shp select.method=aisp  # a selection (conf/app.yaml)
    python -m aisp_bench.evaluate encoder=minilm                         # offline coherence stand-in
    python -m aisp_bench.evaluate reward=ultrarm reward.device=cuda:1    # Table 1: rewards by UltraRM

For each selected run (runs without ``summary.json``, still going or crashed, are
skipped) the ``metrics`` block of :func:`aisp_bench.metrics.compute_metrics` is written
into ``summary.json``, its other keys kept. A sharded run (``dataset.num_shards``) is
evaluated as one run once every shard is complete (until then it is skipped with a
warning naming the shards to finish); its metrics go into the run folder's own
``summary.json``, beside the counts summed over its shards.

**Which reward.** The paper's Table 1 reports every row's reward under one model,
UltraRM. ``reward=NAME`` (the ``reward`` group, as for runs) re-scores each record's
(messages, cleaned response): ``reward_mean`` is then that model's mean,
``reward_model`` its name, ``reward_source`` ``"evaluated"`` and ``run_reward_mean``
the run's own mean. Without it, ``reward_mean`` is the run's own mean and
``reward_source`` ``"run"``. Scores are cached per run in ``eval_rewards_<name>.json``,
so only new (prompt, response) pairs are scored; ``force=true`` rescores.

**Idempotent**: the block's ``fingerprint`` hashes what it was computed from (the
records' bytes, the encoder, the evaluation reward, the metric names, the cleaning
settings, ``EVALUATE_VERSION``); a run whose fingerprint matches is left alone.

**Coherence** needs SimCSE from the hub (``encoder=simcse``); where it cannot load, the
error says so and ``encoder=minilm`` is the labelled offline stand-in, never a silent
fallback. Exit codes: 0 done, 1 a run, the encoder or the reward model failed, 2 bad
input.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from aisp_bench.cli import UserError, first_line, instantiate_node, launch, run_app, select_runs
from aisp_bench.config import CONF_DIR, get_path
from aisp_bench.metrics import DEFAULT_METRICS, METRICS, compute_metrics
from aisp_bench.metrics.cleaning import clean_response, cleaning_options
from aisp_bench.rundir import (
    SUMMARY, Run, read_json_or_none, read_records, read_summary, record_prompt, records_sha256,
    write_json_atomic,
)  # fmt: skip
from aisp_bench.validate import check

EVALUATE_VERSION = 2  # 2: reward_model / reward_source / run_reward_mean, an evaluation reward
REWARD_CHUNK = 256  # pairs scored between two writes of the eval-reward cache


class RewardUnavailableError(RuntimeError):
    """The evaluation reward model cannot be loaded (missing weights, no hub access)."""


# -- the evaluation reward model --------------------------------------------------------
def eval_rewards_path(run_dir: Path, reward_name: str) -> Path:
    """``run_dir/eval_rewards_<name>.json`` (characters unsafe in a file name become ``_``)."""
    return Path(run_dir) / f"eval_rewards_{re.sub(r'[^A-Za-z0-9._-]+', '_', reward_name)}.json"


def _pair_key(messages: Any, response: str) -> str:
    blob = json.dumps({"messages": messages, "response": response}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def evaluation_rewards(
    run_dir: Path,
    records: Sequence[dict[str, Any]],
    responses: Sequence[str],
    reward: Any,
    reward_name: str,
    *,
    force: bool = False,
    chunk: int = REWARD_CHUNK,
) -> list[float | None]:
    """``reward``'s score of each (record prompt, response), via the run's score cache.

    Cached scores (``eval_rewards_<name>.json``, keyed by a hash of the messages and
    the response) are reused unless ``force``; the rest are scored in chunks of
    ``chunk`` pairs, the cache being rewritten after each (it keeps the current records'
    entries only). Non-finite scores are ``None``. Raises ``RewardUnavailableError``
    when the model cannot be loaded.
    """
    prompts = [record_prompt(r) for r in records]
    keys = [_pair_key(p.to_json(), resp) for p, resp in zip(prompts, responses, strict=True)]
    path = eval_rewards_path(run_dir, reward_name)
    cache = None if force else read_json_or_none(path)
    known = {k: v["reward"] for k, v in (cache or {}).get("scores", {}).items()}
    todo = [i for i, k in enumerate(keys) if k not in known]
    if todo:
        try:
            reward.load()
        except Exception as e:  # noqa: BLE001 - missing weights, no hub: one line, stop everything
            raise RewardUnavailableError(f"cannot load evaluation reward {reward_name!r}: {first_line(e)}") from None
    for s in range(0, len(todo), max(1, int(chunk))):
        idx = todo[s : s + chunk]
        scores = reward.score([prompts[i] for i in idx], [responses[i] for i in idx])
        for i, v in zip(idx, [float(x) for x in scores.tolist()], strict=True):
            known[keys[i]] = v if math.isfinite(v) else None
        entries = {k: {"prompt_id": str(rec.get("prompt_id", "")), "reward": known[k]}
                   for k, rec in zip(keys, records, strict=True) if k in known}
        write_json_atomic(path, {"reward": reward_name, "scores": entries})
    return [known[k] for k in keys]


# -- one run ------------------------------------------------------------------------------
def fingerprint(
    run_dir: Path,
    encoder_label: str | None,
    names: Sequence[str],
    config: dict[str, Any] | None,
    reward_name: str | None = None,
) -> str:
    """Hash of everything the metrics block depends on (see the module docstring)."""
    payload = {
        "version": EVALUATE_VERSION,
        "records_sha256": records_sha256(run_dir),
        "encoder": encoder_label if "coherence" in names else None,
        "eval_reward": reward_name if "reward_mean" in names else None,
        "metrics": list(names),
        "cleaning": {k: list(v) for k, v in cleaning_options(config).items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _reward_metrics(run: Run, metrics: dict, records: list, reward: Any, reward_name: str | None, force: bool):
    """``metrics`` with reward_mean (the run's own, or ``reward``'s) and its provenance keys right after it."""
    run_mean, model, source, mean = metrics["reward_mean"], get_path(run.config, "reward.name"), "run", None
    if reward is None:
        mean, model = run_mean, None if model is None else str(model)
    else:
        opts = cleaning_options(run.config)
        responses = [clean_response(r.get("response"), **opts) for r in records]
        finite = [s for s in evaluation_rewards(run.path, records, responses, reward, reward_name, force=force)
                  if s is not None]
        mean, model, source = (math.fsum(finite) / len(finite) if finite else None), reward_name, "evaluated"
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if k == "reward_mean":
            out.update(reward_mean=mean, reward_model=model, reward_source=source, run_reward_mean=run_mean)
        else:
            out[k] = v
    return out


def evaluate_run(
    run: Run | str | Path,
    encoder: Any,
    *,
    names: Sequence[str] = DEFAULT_METRICS,
    force: bool = False,
    reward: Any = None,
) -> tuple[str, dict[str, Any] | None]:
    """Write the metrics block into the run's ``summary.json``.

    ``reward`` (a ``RewardModel``, named by its ``name``) re-scores the records for
    ``reward_mean`` (see the module docstring); ``None`` keeps the run's own rewards.
    Returns (status, metrics): status is ``"updated"``, ``"up to date"`` or
    ``"skipped: <why>"``.
    """
    run = run if isinstance(run, Run) else Run.at(run)
    reward_name = None if reward is None else str(getattr(reward, "name", None) or type(reward).__name__)
    if reward is not None and "reward_mean" not in names:
        raise UserError(f"reward={reward_name} needs the reward_mean metric in metrics")
    summary_path = run.path / SUMMARY
    if run.shards is not None and not run.complete:
        return f"skipped: {run.shards.describe()}; a sharded run is evaluated once every shard is complete", None
    if read_summary(run.path) is None:
        return "skipped: no summary.json (run unfinished or crashed)", None
    label = encoder.label if encoder is not None else None
    fp = fingerprint(run.path, label, names, run.config, reward_name)
    old = (read_json_or_none(summary_path) or {}).get("metrics")
    if not force and isinstance(old, dict) and old.get("fingerprint") == fp:
        return "up to date", old
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line is expected after a crash
        records = read_records(run.path)
    metrics = compute_metrics(records, config=run.config, encoder=encoder, names=names)
    if "reward_mean" in metrics:
        metrics = _reward_metrics(run, metrics, records, reward, reward_name, force)
    metrics["fingerprint"] = fp
    summary = read_summary(run.path)  # re-read: keep whatever else changed meanwhile (sharded: the shards' sum)
    summary["metrics"] = metrics
    write_json_atomic(summary_path, summary)
    return "updated", metrics


# -- the command --------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _report(run: Run, status: str, m: dict[str, Any]) -> str:
    enc = f" [{m['coherence_encoder']}]" if m.get("coherence_encoder") else ""
    rm = f" [{m['reward_model']}]" if m.get("reward_model") else ""
    return (f"{run.path}: {status}: reward {_fmt(m.get('reward_mean'))}{rm} diversity "
            f"{_fmt(m.get('diversity'), '.3f')} coherence {_fmt(m.get('coherence'), '.3f')}{enc} "
            f"({m.get('num_records')} records)")


def _setup(cfg: DictConfig) -> tuple[list[str], Any, Any]:
    """(metric names, encoder or None, evaluation reward or None); bad input raises."""
    from aisp_bench.metrics.coherence import ENCODERS

    names = [str(n) for n in (cfg.metrics if OmegaConf.is_list(cfg.metrics) else [cfg.metrics])]
    for n in names:
        METRICS.get(n)
    encoder_class = ENCODERS.get(str(cfg.encoder))
    reward = None if cfg.get("reward") is None else instantiate_node(cfg.reward, "reward")
    try:  # constructed now (its label is known), loaded on first use
        encoder = encoder_class(device=cfg.device, batch_size=cfg.batch_size) if "coherence" in names else None
    except ValueError as e:
        raise UserError(f"encoder: {e}") from None
    return names, encoder, reward


def main(cfg: DictConfig) -> int:
    from aisp_bench.metrics.coherence import EncoderUnavailableError

    check(cfg)
    runs = select_runs(cfg)
    names, encoder, reward = _setup(cfg)
    counts = dict.fromkeys(("updated", "up to date", "skipped", "failed"), 0)
    for run in runs:
        try:
            status, m = evaluate_run(run, encoder, names=names, force=bool(cfg.force), reward=reward)
        except (EncoderUnavailableError, RewardUnavailableError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except UserError:
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
    print(f"{len(runs)} run(s): " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 1 if counts["failed"] else 0


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def app(cfg: DictConfig) -> None:
    run_app(main, cfg)


if __name__ == "__main__":
    launch(app, "evaluate")
