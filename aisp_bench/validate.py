"""Every value of the four commands' configs checked in one place, before anything is done.

``check(cfg)`` is the first thing each command does (and the front door's pre-flight,
``cli.launch``, calls it on the composed config before Hydra writes anything): every
numeric, boolean and choice key of every config group is checked against ``RULES``, one
table keyed by dotted path (``*`` matches any part), plus the rules between keys in
``CROSS_RULES`` and one general rule (no ``inf``/``nan`` anywhere). Keys absent from a
command's config are not checked, so one table serves run, evaluate, judge and report.
Every problem found is named in one line: ``method.sigma must be a finite number > 0,
got inf; seed must be an integer >= 0, got -1``.

A new numeric or boolean key in a YAML needs a rule here (``tests/test_validate.py``
fails until it has one); the classes the config builds do not re-check these values.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class UserError(Exception):
    """A bad input; reported as one line on stderr with exit code 2 (``cli.run_app``)."""


@dataclass(frozen=True)
class Rule:
    """What a key accepts: ``kind`` int, real, bool, choice (one word), choices (one word or a non-empty
    list of them) or path, bounds, null, extra words."""

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False  # low itself excluded
    open_high: bool = False
    null: bool = False  # None accepted
    words: tuple[str, ...] = ()  # accepted words: "auto" beside a number, the options of a choice
    many: bool = False  # a non-empty list of such values is accepted too

    def describe(self) -> str:
        """``an integer >= 1 or 'auto'``, ``a finite number in (0, 1]``, ``true or false`` ..."""
        if self.kind == "bool":
            text = "true or false"
        elif self.kind in ("choice", "choices"):
            text = ("one of " if self.kind == "choice" else "one or a list of ") + ", ".join(self.words)
        elif self.kind == "path":
            text = "a folder path"
        else:
            text = ("an integer" if self.kind == "int" else "a finite number") + self._bounds()
        words = [] if self.kind in ("choice", "choices") else [repr(w) for w in self.words]
        extra = words + (["null"] if self.null else [])
        return text + "".join(f" or {e}" for e in extra) + (" or a list of them" if self.many else "")

    def _bounds(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f" in {'(' if self.open_low else '['}{lo:g}, {hi:g}{')' if self.open_high else ']'}"
        if lo is not None:
            return f" {'>' if self.open_low else '>='} {lo:g}"
        return "" if hi is None else f" {'<' if self.open_high else '<='} {hi:g}"

    def accepts(self, value: Any) -> bool:
        if self.many and isinstance(value, list):
            return bool(value) and all(not isinstance(v, list) and self.accepts(v) for v in value)
        if value is None:
            return self.null
        if isinstance(value, str) and value in self.words:
            return True
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choices" and isinstance(value, list):
            return bool(value) and all(isinstance(v, str) and v in self.words for v in value)
        if self.kind in ("choice", "choices"):
            return False
        if self.kind == "path":
            return isinstance(value, str) and bool(value)
        number = (int,) if self.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number) or not math.isfinite(value):
            return False
        lo_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        return lo_ok and (self.high is None or (value < self.high if self.open_high else value <= self.high))


def integer(low: int = 1, *, null: bool = False, words: tuple[str, ...] = (), many: bool = False) -> Rule:
    return Rule("int", low=low, null=null, words=words, many=many)


def real(low: float | None = None, high: float | None = None, *, open_low: bool = False,
         open_high: bool = False) -> Rule:
    return Rule("real", low=low, high=high, open_low=open_low, open_high=open_high)


POSITIVE = real(0, open_low=True)
BOOL, OPTIONAL_BOOL = Rule("bool"), Rule("bool", null=True)
PATH = Rule("path")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")

# The one table: dotted path (``*`` matches any part) -> what it accepts.
RULES: dict[str, Rule] = {
    # run (conf/config.yaml)
    "seed": integer(0),
    "budget.n": integer(), "budget.kappa": integer(), "budget.tau": integer(), "budget.num_samples": integer(),
    "lam_table.*": POSITIVE, "lam_factor": POSITIVE,
    "generation.max_new_tokens": integer(), "generation.batch_rows": integer(words=("auto",)),
    "generation.prompt_overflow": Rule("choice", words=("truncate_left", "skip")),
    "batch_prompts": integer(words=("auto",)), "progress": BOOL, "overwrite": BOOL,
    "results_dir": PATH, "run_dir": PATH,
    # the tuning block (conf/engine.yaml; run and evaluate)
    "engine.decode_step": Rule("choice", words=("auto", "eager", "static", "cuda_graph")),
    "engine.attention": Rule("choice", words=("auto", "shared_prefix", "copy")),
    "engine.sync_every": integer(words=("auto",)),
    "engine.reward_attention": Rule("choice", words=("auto", "split", "sdpa", "full")),
    # method group
    "method.n": integer(), "method.kappa": integer(), "method.tau": integer(), "method.num_samples": integer(),
    "method.lam": POSITIVE, "method.alpha": real(0, 1, open_low=True), "method.sigma": POSITIVE,
    "method.final_candidate": BOOL, "method.sigma2": POSITIVE, "method.temperature": POSITIVE,
    "method.top_p": real(0, 1, open_low=True),
    "method.rejection_rate": real(0, 1, open_high=True), "method.decision_tokens": integer(many=True),
    "method.num_particles": integer(), "method.segment_tokens": integer(many=True),
    "method.reward_temperature": POSITIVE, "method.resampling": Rule("choice", words=("multinomial", "systematic")),
    # model group
    "model.max_context": integer(null=True), "model.add_special_tokens": BOOL,
    "model.dtype": Rule("choice", words=DTYPES, null=True),
    # reward group (also evaluate's and the judge's reward=NAME)
    "reward.batch_size": integer(), "reward.max_length": integer(), "reward.max_batch_tokens": integer(),
    "reward.response_tokens": integer(0),
    "reward.last_turn_only": BOOL, "reward.add_special_tokens": OPTIONAL_BOOL, "reward.empty_score": real(),
    "reward.dtype": Rule("choice", words=DTYPES, null=True),
    "reward.padding_side": Rule("choice", words=("left", "right")),
    # dataset group (num_shards/shard: prompt shards, where the config has them)
    "dataset.num_prompts": integer(null=True), "dataset.sample_seed": integer(0),
    "dataset.num_shards": integer(), "dataset.shard": integer(0),
    # evaluate (conf/evaluate.yaml)
    "batch_size": integer(), "force": BOOL,
    "policy.batch_rows": integer(), "policy.dtype": Rule("choice", words=DTYPES, null=True),
    # judge (conf/judge.yaml and the judge group)
    "num_prompts": integer(), "trials": integer(), "sample_seed": integer(0), "dry_run": BOOL,
    "mode": Rule("choice", words=("both_orders", "random_order")),
    "judge.temperature": real(0, 2), "judge.max_tokens": integer(), "judge.max_requests": integer(0, null=True),
    "judge.concurrency": integer(), "judge.timeout": POSITIVE, "judge.max_retries": integer(0),
    "judge.tie_margin": real(0), "judge.cache_dir": PATH,
    # plan (conf/plan.yaml)
    "plan.tokens_per_second": Rule("real", low=0, open_low=True, null=True), "plan.tokenizer": BOOL,
    "plan.chars_per_token": POSITIVE, "plan.gpus": integer(null=True),
    # report (conf/report.yaml)
    "band": Rule("choice", words=("seeds", "prompts", "auto")), "out": PATH,
    "bootstrap.resamples": integer(100), "bootstrap.seed": integer(0),
    "bootstrap.level": real(0, 1, open_low=True, open_high=True),
    "figure2.prompts": integer(words=("all",)), "figure2.seed": integer(0),
    "compute.axes": Rule("choices", words=("samples", "tokens", "reward_tokens", "flops", "depth", "seconds")),
    # experiment=sensitivity: n·κ held at this budget
    "sensitivity_budget": integer(),
}  # fmt: skip


def _context_fits(v: Mapping[str, Any]) -> str | None:
    ctx, new = v.get("model.max_context"), v.get("generation.max_new_tokens")
    if isinstance(ctx, int) and isinstance(new, int) and ctx <= new:
        return (f"model.max_context ({ctx}) must be larger than generation.max_new_tokens ({new}): "
                "no room is left for the prompt")
    return None


def _shard_in_range(v: Mapping[str, Any]) -> str | None:
    shard, num = v.get("dataset.shard"), v.get("dataset.num_shards")
    if isinstance(shard, int) and isinstance(num, int) and shard >= num:
        return f"dataset.shard must be < dataset.num_shards ({num}), got {shard}"
    return None


CROSS_RULES: tuple[Callable[[Mapping[str, Any]], str | None], ...] = (_context_fits, _shard_in_range)


def rule_for(path: str) -> Rule | None:
    """The rule of a dotted path (an exact entry first, else the first pattern that matches);
    ``gold_reward.*`` (evaluate) has the ``reward.*`` rules."""
    path = path.removeprefix("gold_")
    if path in RULES:
        return RULES[path]
    return next((r for p, r in RULES.items() if "*" in p and fnmatch.fnmatchcase(path, p)), None)


def walk(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any, bool]]:
    """(dotted path, resolved value, is an interpolation) of every key below ``node``, depth first;
    lists and interpolated nodes (walked where defined) are leaves; an unresolvable key: ``UserError``."""
    for key in node:
        path = f"{prefix}{key}"
        try:
            value = node[key]
        except OmegaConfBaseException as e:
            raise UserError(f"{path}: {str(e).strip().splitlines()[0]}") from None
        interpolated = OmegaConf.is_interpolation(node, str(key))
        yield path, value, interpolated
        if isinstance(value, DictConfig) and not interpolated:
            yield from walk(value, path + ".")


def _plain(path: str, value: Any) -> Any:
    """A plain value (a node's keys are walked on their own: only shown, not resolved)."""
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=False)
    try:
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
    except OmegaConfBaseException as e:
        raise UserError(f"{path}: {str(e).strip().splitlines()[0]}") from None


def _path_problem(path: str, value: str) -> str | None:
    """Why ``value`` cannot be a folder: it is a file, or sits under one."""
    p = Path(value).expanduser()
    for q in (p, *p.parents):
        if q.exists():
            return None if q.is_dir() else f"{path} {value!r} is {'a file' if q == p else f'under the file {str(q)!r}'}"
    return None


def problems(cfg: DictConfig) -> list[str]:
    """One message per bad key, then the rules between keys. A bad value reached through an
    interpolation (``method.n: ${budget.n}``) is named where it was set; the interpolating key
    only when nothing else explains it."""
    values: dict[str, Any] = {}
    direct, derived = [], []
    for path, value, interpolated in walk(cfg):
        value = _plain(path, value)
        values[path] = value
        rule = rule_for(path) if not isinstance(value, dict) or path in RULES else None
        if rule is not None and not rule.accepts(value):
            msg = f"{path} must be {rule.describe()}, got {value!r}"
        elif rule is not None and rule.kind == "path" and isinstance(value, str):
            msg = _path_problem(path, value)
        elif rule is None and isinstance(value, float) and not math.isfinite(value):
            msg = f"{path} must be finite, got {value!r}"
        else:
            msg = None
        if msg:
            (derived if interpolated else direct).append(msg)
    cross = [m for m in (f(values) for f in CROSS_RULES) if m]
    return (direct or derived) + cross


def check(cfg: DictConfig) -> None:
    """Raise ``UserError`` naming every bad value of ``cfg`` (one line); see the module docstring."""
    found = problems(cfg)
    if found:
        raise UserError("; ".join(found))
