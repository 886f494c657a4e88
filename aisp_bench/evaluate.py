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
``force=true`` rescores).

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
bytes, encoder, evaluation and gold rewards, base_logprob policy, metric names, cleaning
settings, ``EVALUATE_VERSION``); a run whose fingerprint matches (in its per-prompt file
too) is left alone.

**Coherence** needs SimCSE from the hub (``encoder=simcse``); where it cannot load the
error says so, and ``encoder=minilm`` is the labelled offline stand-in, never a silent
fallback. Exit codes: 0 done, 1 a run, the encoder, a reward model or the policy failed,
2 bad input.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from aisp_bench.cli import UserError, first_line, instantiate_node, launch, run_app, select_runs
from aisp_bench.config import CONF_DIR, get_path
from aisp_bench.metrics import DEFAULT_METRICS, METRICS, EvalBatch, metric_values
from aisp_bench.metrics.cleaning import clean_response, cleaning_options
from aisp_bench.results import read_prompt_metrics
from aisp_bench.rundir import (
    PROMPT_METRICS, SUMMARY, Run, read_json_or_none, read_summary, record_checkpoints, record_prompt, records_sha256,
    write_json_atomic,
)  # fmt: skip
from aisp_bench.types import Prompt
from aisp_bench.validate import check

EVALUATE_VERSION = 3  # 3: gold reward, base_logprob, metrics_per_prompt.json
REWARD_CHUNK = 256  # pairs scored between two writes of a score cache
POLICY_METRICS = ("base_logprob",)  # metrics computed by the run's policy, beside aisp_bench.metrics.METRICS


class RewardUnavailableError(RuntimeError):
    """The evaluation reward model cannot be loaded (missing weights, no hub access)."""


# -- score caches (evaluation rewards, log-probabilities) -------------------------------------
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def eval_rewards_path(run_dir: Path, reward_name: str) -> Path:
    """``run_dir/eval_rewards_<name>.json`` (unsafe characters become ``_``)."""
    return Path(run_dir) / f"eval_rewards_{_safe(reward_name)}.json"


def eval_logprobs_path(run_dir: Path, model_name: str) -> Path:
    """``run_dir/eval_logprobs_<model>.json``: base_logprob's per-response cache."""
    return Path(run_dir) / f"eval_logprobs_{_safe(model_name)}.json"


def _pair_key(messages: Any, response: str) -> str:
    blob = json.dumps({"messages": messages, "response": response}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _pairs(records: Sequence[dict[str, Any]], responses: Sequence[str]) -> tuple[list[Prompt], list[str]]:
    """Each record's prompt and the cache key of (its prompt, the response)."""
    prompts = [record_prompt(r) for r in records]
    return prompts, [_pair_key(p.to_json(), resp) for p, resp in zip(prompts, responses, strict=True)]


def cached_scores(path: Path, header: dict[str, str], records: Sequence[dict[str, Any]], responses: Sequence[str],
                  score: Callable[[list, list], list], *, field: str, force: bool = False) -> list[float | None]:
    """``score(prompts, responses)`` of each (record prompt, response), cached in ``path`` under
    ``field`` by a hash of (messages, response) and reused unless ``force``. New pairs are scored
    ``REWARD_CHUNK`` at a time, the file rewritten after each chunk with the current records'
    entries only. Non-finite values are ``None``."""
    prompts, keys = _pairs(records, responses)
    cache = None if force else read_json_or_none(path)
    known = {k: v.get(field) for k, v in (cache or {}).get("scores", {}).items() if isinstance(v, dict)}
    todo = list({k: i for i, k in enumerate(keys) if k not in known}.values())  # a pair twice: scored once
    for s in range(0, len(todo), REWARD_CHUNK):
        idx = todo[s : s + REWARD_CHUNK]
        for i, v in zip(idx, score([prompts[i] for i in idx], [responses[i] for i in idx]), strict=True):
            known[keys[i]] = float(v) if v is not None and math.isfinite(v) else None
        entries = {k: {"prompt_id": str(rec.get("prompt_id", "")), field: known[k]}
                   for k, rec in zip(keys, records, strict=True) if k in known}
        write_json_atomic(path, {**header, "scores": entries})
    return [known[k] for k in keys]


def evaluation_rewards(run_dir: Path, records: Sequence[dict[str, Any]], responses: Sequence[str], reward: Any,
                       force: bool) -> list[float | None]:
    """``reward``'s scores via ``cached_scores``; ``RewardUnavailableError`` when it cannot be loaded."""
    reward_name = _name(reward)

    def score(prompts, resps):
        try:
            reward.load()  # loads once: a loaded reward returns at once
        except Exception as e:  # noqa: BLE001 - missing weights, no hub: one line, stop everything
            raise RewardUnavailableError(f"cannot load evaluation reward {reward_name!r}: {first_line(e)}") from None
        return [float(x) for x in reward.score(prompts, resps).tolist()]

    return cached_scores(eval_rewards_path(run_dir, reward_name), {"reward": reward_name}, records, responses, score,
                         field="reward", force=force)


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return math.fsum(finite) / len(finite) if finite else None


@dataclass(frozen=True)
class Scored:
    """What the gold reward and base_logprob score: each record's response, then each record's budget
    checkpoints' (``record_checkpoints``); ``raw[i]`` answers ``records[i]``; checkpoints per record."""

    records: list[dict[str, Any]]
    raw: list[str]
    counts: list[int]

    @classmethod
    def of(cls, records: Sequence[dict[str, Any]]) -> Scored:
        texts = [[c["response"] for c in record_checkpoints(r)] for r in records]
        return cls([*records, *(r for r, t in zip(records, texts) for _ in t)],
                   [str(r.get("response") or "") for r in records] + [x for t in texts for x in t],
                   [len(t) for t in texts])

    def cleaned(self, batch: EvalBatch, config: dict[str, Any]) -> list[str]:
        """The responses as the metrics see them (the records' already cleaned in ``batch``)."""
        opts = cleaning_options(config)
        return [*batch.responses, *(clean_response(x, **opts) for x in self.raw[len(batch.records):])]

    def split(self, values: list) -> tuple[list, list[list]]:
        """(one value per record, per record its checkpoints' values) of ``values`` in this order."""
        ends = list(itertools.accumulate(self.counts, initial=len(self.counts)))
        return values[: len(self.counts)], [values[a:b] for a, b in zip(ends, ends[1:])]


# -- the base model's log-probabilities -------------------------------------------------------
class PolicyUnavailableError(RuntimeError):
    """The run's policy cannot be built or loaded for base_logprob."""


class BasePolicy:
    """``base_logprob`` on the runs' own policies (their manifests' model configs), each loaded
    once; ``overrides`` (``policy.device``/``dtype``; None keeps the run's) say where. ``prepare``
    scores many runs at once, each prompt prefilled once for all their responses (every method
    and seed answers the same prompts); ``logprobs`` then reads them from memory."""

    def __init__(self, overrides: dict[str, Any] | None = None, batch_rows: int = 16) -> None:
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self.batch_rows = int(batch_rows)
        self._policies: dict[str, Any] = {}
        self._engines: dict[str, Any] = {}
        self._memo: dict[str, dict[str, float | None]] = {}  # engine key -> pair key -> mean log-prob

    @staticmethod
    def label(run: Run) -> str:
        """The run's ``model.name``, as the fingerprint and cache file record it."""
        return str(get_path(run.config, "model.name") or run.model)

    def _key(self, run: Run) -> str:
        """What an engine depends on: the model config, the room its context leaves a prompt."""
        gen = get_path(run.config, "generation", {}) or {}
        node = {**(get_path(run.config, "model") or {}), **self.overrides}
        return json.dumps([node, gen.get("max_new_tokens"), gen.get("prompt_overflow")], sort_keys=True, default=str)

    def engine(self, run: Run):
        from aisp_bench.models.policy import build_engine

        node, key, gen = get_path(run.config, "model"), self._key(run), get_path(run.config, "generation", {}) or {}
        if not isinstance(node, dict) or "_target_" not in node:
            raise PolicyUnavailableError(f"{run.path}: base_logprob needs the run's model config in its manifest")
        policy_key = json.dumps({**node, **self.overrides}, sort_keys=True, default=str)
        try:
            if policy_key not in self._policies:
                self._policies[policy_key] = instantiate_node(OmegaConf.create({**node, **self.overrides}), "policy")
            if key not in self._engines:
                self._engines[key] = build_engine(
                    self._policies[policy_key], max_new_tokens=int(gen.get("max_new_tokens", 128)),
                    batch_rows=self.batch_rows, prompt_overflow=str(gen.get("prompt_overflow", "truncate_left")))
        except (UserError, OSError, RuntimeError, ValueError) as e:
            raise PolicyUnavailableError(f"cannot load the policy of {run.path} for base_logprob: "
                                         f"{first_line(e)}") from None
        return self._engines[key]

    def _score(self, run: Run, prompts: Sequence[Prompt], responses: Sequence[Sequence[str]]) -> None:
        """Into the memo: ``responses[i]`` after ``prompts[i]`` (each prompt prefilled once)."""
        memo = self._memo.setdefault(self._key(run), {})
        for prompt, texts, got in zip(prompts, responses, self.engine(run).response_logprobs(prompts, responses)):
            memo.update({_pair_key(prompt.to_json(), t): g.mean for t, g in zip(texts, got)})

    def prepare(self, runs: Sequence[Run], force: bool = False) -> None:
        """Score the responses of ``runs`` missing from their caches (all with ``force``), by prompt."""
        todo: dict[str, tuple[Run, dict[str, tuple[Prompt, dict[str, str]]]]] = {}
        for run in (r for r in runs if not _unready(r)):
            cached = {} if force else (read_json_or_none(eval_logprobs_path(run.path, self.label(run))) or {})
            have = set(cached.get("scores", {}))
            scored = Scored.of(_records(run))
            prompts, keys = _pairs(scored.records, scored.raw)
            by_prompt = todo.setdefault(self._key(run), (run, {}))[1]
            for p, k, raw in zip(prompts, keys, scored.raw):
                if k not in have and k not in self._memo.get(self._key(run), {}):
                    by_prompt.setdefault(json.dumps(p.to_json(), sort_keys=True), (p, {}))[1][k] = raw
        for run, by_prompt in (v for v in todo.values() if v[1]):
            self._score(run, [p for p, _ in by_prompt.values()], [list(t.values()) for _, t in by_prompt.values()])

    def logprobs(self, run: Run, scored: Scored, force: bool = False) -> list[float | None]:
        """Mean per-token log-probability of each (raw) response of ``scored``, cached per run."""
        memo = self._memo.setdefault(self._key(run), {})

        def score(prompts, responses):
            new = [i for i, (p, r) in enumerate(zip(prompts, responses)) if _pair_key(p.to_json(), r) not in memo]
            if new:
                self._score(run, [prompts[i] for i in new], [[responses[i]] for i in new])
            return [memo[_pair_key(p.to_json(), r)] for p, r in zip(prompts, responses)]

        return cached_scores(eval_logprobs_path(run.path, self.label(run)), {"policy": self.label(run)},
                             scored.records, scored.raw, score, field="base_logprob", force=force)


def _unready(run: Run) -> str | None:
    """Why a run cannot be evaluated yet (None: it can)."""
    if run.unfinished:
        return f"{run.unfinished}; a sharded run is evaluated once every shard is complete"
    return "no summary.json (run unfinished or crashed)" if run.summary is None else None


def _records(run: Run) -> list[dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line is expected after a crash
        return run.records


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


def _reward_metrics(run: Run, metrics: dict, per: dict, batch: EvalBatch, reward: Any, gold: Any, force: bool,
                    scored: Scored) -> dict:
    """``metrics`` with reward_mean (the run's own, or ``reward``'s) and its provenance keys right after
    it, then the gold reward's; ``per`` gets the per-prompt scores (checkpoints': ``per["checkpoints"]``)."""
    run_mean, own = metrics.get("reward_mean"), get_path(run.config, "reward.name")
    if reward is None:
        mean, model, source = run_mean, None if own is None else str(own), "run"
    else:
        per["eval_reward"] = evaluation_rewards(run.path, batch.records, batch.responses, reward, force)
        mean, model, source = _mean(per["eval_reward"]), _name(reward), "evaluated"
    provenance = dict(reward_mean=mean, reward_model=model, reward_source=source, run_reward_mean=run_mean)
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        out.update(provenance if k == "reward_mean" else {k: v})
    if gold is not None:
        if _name(gold) == own:
            warnings.warn(f"{run.path}: gold_reward={_name(gold)} is the reward this run optimised (not held out)",
                          stacklevel=2)
        values = evaluation_rewards(run.path, scored.records, scored.cleaned(batch, run.config), gold, force)
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
) -> tuple[str, dict[str, Any] | None]:
    """Write the metrics block into ``summary.json`` and its per-prompt values into
    ``metrics_per_prompt.json`` (``reward``, ``gold_reward``, ``policy``: the module docstring).
    Returns (status, metrics), status ``"updated"``, ``"up to date"`` or ``"skipped: <why>"``."""
    run = run if isinstance(run, Run) else Run.at(run)
    if reward is not None and "reward_mean" not in names:
        raise UserError(f"reward={_name(reward)} needs the reward_mean metric in metrics")
    if "base_logprob" in names and policy is None:
        raise UserError("the base_logprob metric needs the run's policy (BasePolicy)")
    why = _unready(run)
    if why:
        return f"skipped: {why}", None
    label, records = encoder.label if encoder is not None else None, _records(run)
    scored = Scored.of(records)
    fp = fingerprint(run.path, label, names, run.config, _name(reward), _name(gold_reward),
                     BasePolicy.label(run) if "base_logprob" in names else None, any(scored.counts))
    old = run.metrics
    if not force and isinstance(old, dict) and old.get("fingerprint") == fp and read_prompt_metrics(run.path, fp):
        return "up to date", old
    batch = EvalBatch.from_records(records, run.config, encoder)  # the responses cleaned once
    metrics, per = metric_values(batch, [n for n in names if n not in POLICY_METRICS])
    per["checkpoints"] = {}  # per metric, per record: its checkpoints' values (in the file when some were recorded)
    if "reward_mean" in metrics:
        metrics = _reward_metrics(run, metrics, per, batch, reward, gold_reward, force, scored)
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


def _setup(cfg: DictConfig) -> tuple[list[str], Any, Any, Any, BasePolicy | None]:
    """(metric names, encoder, evaluation reward, gold reward, base policy; None where unused)."""
    from aisp_bench.metrics.coherence import ENCODERS
    from aisp_bench.models.loading import resolve_device

    names = [str(n) for n in (cfg.metrics if OmegaConf.is_list(cfg.metrics) else [cfg.metrics])]
    [METRICS.get(n) for n in names if n not in POLICY_METRICS]  # unknown names: an error before any work
    encoder_class = ENCODERS.get(str(cfg.encoder))
    reward = None if cfg.get("reward") is None else instantiate_node(cfg.reward, "reward")
    gold = None if cfg.get("gold_reward") is None else instantiate_node(cfg.gold_reward, "gold_reward")
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
        policy = BasePolicy({"device": p.device, "dtype": p.dtype}, int(p.batch_rows))
    try:  # constructed now (its label is known), loaded on first use
        encoder = encoder_class(device=cfg.device, batch_size=cfg.batch_size) if "coherence" in names else None
    except ValueError as e:
        raise UserError(f"encoder: {e}") from None
    return names, encoder, reward, gold, policy


def main(cfg: DictConfig) -> int:
    from aisp_bench.metrics.coherence import EncoderUnavailableError

    check(cfg)
    runs = select_runs(cfg)
    names, encoder, reward, gold, policy = _setup(cfg)
    counts = dict.fromkeys(("updated", "up to date", "skipped", "failed"), 0)
    unavailable = (EncoderUnavailableError, RewardUnavailableError, PolicyUnavailableError)  # stop everything
    try:
        if policy is not None:  # base_logprob: every run's responses at once, each prompt prefilled once
            policy.prepare(runs, force=bool(cfg.force))
        for run in runs:
            try:
                status, m = evaluate_run(run, encoder, names=names, force=bool(cfg.force), reward=reward,
                                         gold_reward=gold, policy=policy)
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
