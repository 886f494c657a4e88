"""The caches ``evaluate`` scores into, per run folder and (prompt, response) pair.

* ``eval_rewards_<reward>.json``: an evaluation or gold reward's score of each pair;
* ``eval_logprobs_<model>.json``: ``base_logprob``, the response's mean per-token
  log-probability under the run's own policy without noise (``BasePolicy``).

``Scored`` lists what is scored: each record's response, then its budget checkpoints'.
A pair is keyed by a hash of (messages, response), so a rerun scores only new pairs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from aisp_bench.cli import UserError, first_line, instantiate_node
from aisp_bench.config import get_path
from aisp_bench.metrics import EvalBatch
from aisp_bench.metrics.cleaning import clean_response, cleaning_options
from aisp_bench.rundir import Run, read_json_or_none, record_checkpoints, record_prompt, write_json_atomic
from aisp_bench.types import Prompt

log = logging.getLogger(__name__)

REWARD_CHUNK = 256  # pairs scored between two writes of a score cache


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
    ``field`` by a hash of (messages, response) and reused unless ``force``, or unless the cache was
    scored with other ``settings`` (``header["settings"]``: a digest of what changes the scores; a
    cache written before settings were recorded is taken as it is, and stamped). New pairs are scored
    ``REWARD_CHUNK`` at a time, the file rewritten after each chunk with the current records'
    entries only. Non-finite values are ``None``."""
    prompts, keys = _pairs(records, responses)
    cache = None if force else read_json_or_none(path)
    if cache and cache.get("settings") not in (None, header.get("settings")):
        log.info("%s: scored with other settings of %s; scoring again", path, header.get("reward") or field)
        cache = None
    known = {k: v.get(field) for k, v in (cache or {}).get("scores", {}).items() if isinstance(v, dict)}
    todo = list({k: i for i, k in enumerate(keys) if k not in known}.values())  # a pair twice: scored once

    def write() -> None:
        entries = {k: {"prompt_id": str(rec.get("prompt_id", "")), field: known[k]}
                   for k, rec in zip(keys, records, strict=True) if k in known}
        write_json_atomic(path, {**header, "scores": entries})

    for s in range(0, len(todo), REWARD_CHUNK):
        idx = todo[s : s + REWARD_CHUNK]
        for i, v in zip(idx, score([prompts[i] for i in idx], [responses[i] for i in idx]), strict=True):
            known[keys[i]] = float(v) if v is not None and math.isfinite(v) else None
        write()
    if not todo and cache and "settings" not in cache and "settings" in header:
        write()  # a cache from before settings were recorded: stamped with them
    return [known[k] for k in keys]


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
    and seed answers the same prompts); ``logprobs`` then reads them from memory. ``tuning``: the
    engine's ``attention`` etc. (the ``engine:`` block)."""

    def __init__(self, overrides: dict[str, Any] | None = None, batch_rows: int = 16,
                 tuning: dict[str, Any] | None = None) -> None:
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self.batch_rows = int(batch_rows)
        self.tuning = dict(tuning or {})
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
                    batch_rows=self.batch_rows, prompt_overflow=str(gen.get("prompt_overflow", "truncate_left")),
                    **self.tuning)
        except (UserError, OSError, RuntimeError, ValueError) as e:
            raise PolicyUnavailableError(f"cannot load the policy of {run.path} for base_logprob: "
                                         f"{first_line(e)}") from None
        return self._engines[key]

    def response_logprobs(self, run: Run, prompts: Sequence[Prompt], responses: Sequence[Sequence[str]]) -> list:
        """``prefix_scoring.response_logprobs`` under the run's policy: ``ResponseLogProb`` lists."""
        from aisp_bench.prefix_scoring import response_logprobs

        return response_logprobs(self.engine(run), prompts, responses)

    def _score(self, run: Run, prompts: Sequence[Prompt], responses: Sequence[Sequence[str]]) -> None:
        """Into the memo: ``responses[i]`` after ``prompts[i]`` (each prompt prefilled once)."""
        memo = self._memo.setdefault(self._key(run), {})
        for prompt, texts, got in zip(prompts, responses, self.response_logprobs(run, prompts, responses)):
            memo.update({_pair_key(prompt.to_json(), t): g.mean for t, g in zip(texts, got)})

    def prepare(self, runs: Sequence[Run], force: bool = False) -> None:
        """Score the responses of ``runs`` missing from their caches (all with ``force``), by prompt."""
        todo: dict[str, tuple[Run, dict[str, tuple[Prompt, dict[str, str]]]]] = {}
        for run in (r for r in runs if not unready(r)):
            cached = {} if force else (read_json_or_none(eval_logprobs_path(run.path, self.label(run))) or {})
            have = set(cached.get("scores", {}))
            scored = Scored.of(quiet_records(run))
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


def unready(run: Run) -> str | None:
    """Why a run cannot be evaluated yet (None: it can)."""
    if run.unfinished:
        return f"{run.unfinished}; a sharded run is evaluated once every shard is complete"
    return "no summary.json (run unfinished or crashed)" if run.summary is None else None


def quiet_records(run: Run) -> list[dict[str, Any]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line is expected after a crash
        return run.records
