"""``python -m aisp_bench.plan [-m] [overrides]``: what a grid of runs costs, before it is submitted.

Give it the run command's overrides (``-m`` crosses the sweeps and the experiment's
sweeper params, as ``python -m aisp_bench -m`` does) and ``plan.*`` keys
(``conf/plan.yaml``)::

    python -m aisp_bench.plan -m experiment=table1 model=llama3_8b reward=ultrarm \\
        dataset.num_shards=16 'dataset.shard=range(16)' plan.tokens_per_second=3000

It loads no model and writes nothing. Per dataset, pair and method it prints:

* **jobs**: runs x the prompt shards the sweep names (one job each, e.g. one Slurm array task);
* **prompts** and **samples** (AISP: n·κ, plus y(U*); best-of-N: N; Speculative Rejection:
  the rows started; particle filtering: the particles, per prompt);
* **generated tokens**, an upper bound: samples x ``generation.max_new_tokens`` (the
  reward-guided decoders: their schedule's tokens, dropped rows stopped early);
* **reward-model tokens**: per scored response its tokens (at most ``max_new_tokens``; the
  reward-guided decoders also score partial responses at each decision point) and its
  prompt, the prompt counted once per scored group where the reward shares it (a decoder
  reward unless ``engine.reward_attention=full``: AISP scores each iteration's n samples
  of a prompt together, best-of-N ``generation.batch_rows`` rows at a time, the
  reward-guided decoders a prompt's rows at each decision point);
* **GPU-hours** = generated tokens / throughput: ``plan.tokens_per_second`` (generated
  tokens per second on one GPU, decoding and scoring included), else each method's
  ``tokens_per_s`` in ``plan.bench`` (``scripts/bench_methods.py`` on a GPU writes it),
  else none; and the longest job, against ``hydra.launcher.timeout_min``;
* **wall time** with ``plan.gpus=G`` (the GPUs that run jobs at once: a Ray machine's or
  cluster's GPUs, the array tasks Slurm runs at once): GPU-hours / G, at least the longest job.

Prompt tokens come from the policy's tokenizer (the reward model's prompt is counted
with it too, a stand-in); where it cannot be loaded (offline, a gated model) or
``plan.tokenizer=false``, they are estimated at ``plan.chars_per_token`` characters of
the prompt's text per token (4, typical of English with Llama/GPT tokenizers), and the
output says so. Exit codes: 0, 2 bad input.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from aisp_bench.cli import (
    UserError, compose_config, first_line, instantiate_node, refuse_moved_keys, reward_node, run_app,
)  # fmt: skip
from aisp_bench.data.datasets import shard_of
from aisp_bench.methods.guided import upper_bounds
from aisp_bench.rundir import read_json_or_none
from aisp_bench.validate import check

SHARD_KEY = "dataset.shard"


# -- counting -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PerPrompt:
    """What one prompt of a run costs at most: ``samples`` (rows started), ``groups`` (reward calls
    that share the prompt), ``scored`` (responses scored), ``generated`` (generated tokens) and
    ``scored_tokens`` (response tokens the reward model reads)."""

    samples: int
    groups: int
    scored: int
    generated: int
    scored_tokens: int


def sampling(method: Any, batch_rows: Any, max_new_tokens: int) -> PerPrompt:
    """AISP n·κ (+1, y(U*)) samples in κ (+1) groups; best-of-N N samples in groups of
    ``batch_rows`` rows (all N for ``auto``); each scored once, at most ``max_new_tokens``
    tokens. A reward-guided decoder (``schedule``: Speculative Rejection, particle
    filtering): its segments' rows, a group per decision point and at the end, its partial
    responses scored too (``methods.guided.upper_bounds``)."""
    T = int(max_new_tokens)
    if hasattr(method, "schedule"):
        b = upper_bounds(method.schedule(T))
        return PerPrompt(method.rows_per_prompt, b["rounds"], b["scored"], b["generated"], b["scored_tokens"])
    if hasattr(method, "kappa"):
        final = int(bool(method.final_candidate))
        n, groups = method.n * method.kappa + final, method.kappa + final
    elif hasattr(method, "num_samples"):
        n = int(method.num_samples)
        rows = batch_rows if isinstance(batch_rows, int) else n  # a number >= 1 (validate.check), or "auto"
        groups = -(-n // min(rows, n))
    else:
        raise UserError(f"plan does not know how method {getattr(method, 'name', method)!r} samples")
    return PerPrompt(n, groups, n, n * T, n * T)


@dataclass
class Counts:
    """What a set of jobs computes (sums; the longest job's hours: a max)."""

    runs: int = 0
    jobs: int = 0
    prompts: int = 0
    samples: int = 0
    generated_tokens: int = 0
    reward_tokens: int = 0
    gpu_hours: float = 0.0
    longest_job_hours: float = 0.0

    def add(self, other: Counts) -> None:
        for k in ("runs", "jobs", "prompts", "samples", "generated_tokens", "reward_tokens", "gpu_hours"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        a, b = self.longest_job_hours, other.longest_job_hours
        self.longest_job_hours = math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def job_counts(prompt_tokens: list[int], per: PerPrompt, shares_prompt: bool, tokens_per_second: float | None) -> Counts:
    """One job (a run, or one prompt shard of it): ``prompt_tokens`` per prompt; ``shares_prompt``:
    the reward reads a group's prompt once (else once per response scored)."""
    n = len(prompt_tokens)
    generated = n * per.generated
    rm = n * per.scored_tokens + sum(prompt_tokens) * (per.groups if shares_prompt else per.scored)
    hours = generated / tokens_per_second / 3600 if tokens_per_second else math.nan
    return Counts(0, 1, n, n * per.samples, generated, rm, hours, hours)


# -- the grid -----------------------------------------------------------------------------
def expand(parser: Any, overrides: list[str], params: dict[str, str], multirun: bool) -> list[list[str]]:
    """The jobs' overrides as Hydra's basic sweeper crosses them: sweeper params, then the command
    line (a later value of a key replaces an earlier one in its place), the first key varying
    slowest; a sweep without ``-m`` is refused."""
    parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + overrides)
    values: dict[str, list[str]] = {}
    for o in parsed:
        key = o.get_key_element()
        if not o.is_sweep_override():
            values[key] = [o.input_line]
            continue
        if not multirun:
            raise UserError(f"{o.input_line} is a sweep: add -m, as for python -m aisp_bench -m")
        if not o.is_discrete_sweep():
            raise UserError(f"{o.input_line}: only lists and range() sweeps can be planned")
        values[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
    return [list(job) for job in itertools.product(*values.values())]


def group_shards(jobs: list[list[str]]) -> dict[tuple[str, ...], list[str]]:
    """Jobs grouped by run (their overrides but ``dataset.shard``): run -> its shard values."""
    runs: dict[tuple[str, ...], list[str]] = {}
    for job in jobs:
        shard = [o.split("=", 1)[1] for o in job if o.startswith(f"{SHARD_KEY}=")]
        runs.setdefault(tuple(o for o in job if not o.startswith(f"{SHARD_KEY}=")), []).extend(shard)
    return runs


# -- prompts and their tokens -------------------------------------------------------------
@dataclass
class Tokens:
    """Prompt token counts per model and dataset, computed once; ``notes`` says how."""

    use_tokenizer: bool
    chars_per_token: float
    notes: set[str] = field(default_factory=set)
    _cache: dict[str, list[int]] = field(default_factory=dict)
    _prompts: dict[str, list] = field(default_factory=dict)
    _tokenizers: dict[str, tuple[Any, Any, str]] = field(default_factory=dict)

    def prompts(self, cfg: DictConfig) -> list:
        """The run's prompts, every shard (the dataset node with ``num_shards=1``)."""
        node = OmegaConf.merge(cfg.dataset, {"num_shards": 1, "shard": 0})
        key = OmegaConf.to_yaml(node)
        if key not in self._prompts:
            from aisp_bench.data.datasets import DatasetError

            try:
                self._prompts[key] = instantiate_node(node, "dataset").load()
            except DatasetError as e:
                raise UserError(str(e)) from None
        return self._prompts[key]

    def counts(self, cfg: DictConfig) -> list[int]:
        """Tokens of each of the run's prompts, as the policy renders them (or estimated)."""
        key = OmegaConf.to_yaml(cfg.model) + OmegaConf.to_yaml(cfg.dataset)
        if key in self._cache:
            return self._cache[key]
        prompts, (policy, tok, why) = self.prompts(cfg), self._tokenizer(cfg)
        if tok is not None:
            self.notes.add(f"prompt tokens: counted with the tokenizer of {policy.name} (the reward model's "
                           "prompts too, a stand-in)")
            out = [len(tok(policy.render(p), add_special_tokens=policy.add_special_tokens)["input_ids"])
                   for p in prompts]
        else:
            self.notes.add(f"prompt tokens: ESTIMATED at {self.chars_per_token:g} characters per token ({why})")
            out = [math.ceil(sum(len(m.content) for m in p.messages) / self.chars_per_token) for p in prompts]
        self._cache[key] = out
        return out

    def _tokenizer(self, cfg: DictConfig) -> tuple[Any, Any, str]:
        """(policy, its tokenizer or None, why not), tried once per model."""
        key = OmegaConf.to_yaml(cfg.model)
        if key not in self._tokenizers:
            policy, tok, why = instantiate_node(cfg.model, "model"), None, "plan.tokenizer=false"
            if self.use_tokenizer:
                try:
                    tok = policy.load_tokenizer()
                except Exception as e:  # noqa: BLE001 - offline, gated, anything: estimate, and say so
                    why = f"the tokenizer of {policy.name} did not load: {first_line(e)[:160]}"
            self._tokenizers[key] = (policy, tok, why)
        return self._tokenizers[key]


# -- throughput -----------------------------------------------------------------------------
def throughput(plan: DictConfig, method: Any) -> tuple[float | None, str]:
    """(generated tokens per second for ``method``, where the figure comes from)."""
    tps = plan.get("tokens_per_second")
    if tps is not None:  # checked by validate.check
        return float(tps), f"throughput: {tps:g} generated tokens/s on one GPU (plan.tokens_per_second)"
    path = Path(str(plan.bench))
    bench = read_json_or_none(path)
    if bench is None:
        return None, (f"GPU-hours not estimated: no {path} (run scripts/bench_methods.py on a GPU to write it), "
                      "and no plan.tokens_per_second=...")
    name, n = method.name, getattr(method, "num_samples", None) or getattr(method, "num_particles", None)
    for label in ([f"{name}/N{n}/default"] if n else []) + [f"{name}/default"]:
        tps = ((bench.get("methods") or {}).get(label) or {}).get("tokens_per_s")
        if isinstance(tps, (int, float)) and tps > 0:
            return float(tps), (f"throughput: {label} {tps:.0f} generated tokens/s, from {path} "
                                f"({bench.get('device', '?')}, {bench.get('date', '?')})")
    return None, f"GPU-hours not estimated for {name}: {path} has no methods.{name}.../default tokens_per_s"


# -- the command ----------------------------------------------------------------------------
def plan_runs(args: list[str]) -> tuple[dict[tuple[str, str, str], Counts], list[str]]:
    """(counts per (dataset, pair, method), notes) of the jobs the command line names."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    bad = [a for a in overrides if a.startswith("-")]
    if bad:
        raise UserError(f"unknown option {bad[0]}; plan takes -m and key=value overrides (--help)")
    rows: dict[tuple[str, str, str], Counts] = defaultdict(Counts)
    notes: list[str] = []
    try:
        parser = OverridesParser.create()
        parsed = parser.parse_overrides(overrides)
        refuse_moved_keys(parsed)
        fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
        base, params = compose_config("plan", fixed)
        timeout = OmegaConf.select(HydraConfig.get(), "launcher.timeout_min")
        tokens = Tokens(bool(base.plan.tokenizer), float(base.plan.chars_per_token))
        for run, shards in group_shards(expand(parser, overrides, params if multirun else {}, multirun)).items():
            cfg = compose_config("plan", list(run))[0]  # the run's own ${hydra:...} resolve
            check(cfg)
            counts, source = run_counts(cfg, shards, tokens)
            rows[(cfg.dataset.name, f"{cfg.model.name}__{cfg.reward.name}", cfg.method.name)].add(counts)
            notes += [source] if source not in notes else []
    except HydraException as e:
        raise UserError(first_line(e)) from None
    longest = max((c.longest_job_hours for c in rows.values()), default=math.nan)
    if timeout and longest * 60 > timeout:
        notes.append(f"the longest job needs about {longest * 60:.0f} min, over hydra.launcher.timeout_min={timeout}: "
                     "it is requeued (max_num_timeout) and resumes, or use more shards")
    gpus, total = base.plan.get("gpus"), sum(c.gpu_hours for c in rows.values())
    if gpus and not math.isnan(total):  # checked by validate.check
        notes.append(f"wall time on {gpus} GPUs at once (plan.gpus; one job per GPU): about "
                     f"{hours(max(total / gpus, longest))} h (GPU-hours / {gpus}, at least the longest job)")
    return rows, sorted(tokens.notes) + notes


def run_counts(cfg: DictConfig, shards: list[str], tokens: Tokens) -> tuple[Counts, str]:
    """The counts of one run's jobs (its shards named on the command line, else its ``dataset.shard``)."""
    k = cfg.dataset.num_shards  # checked by validate.check; the swept shards here
    picked = []
    for v in shards or [str(cfg.dataset.shard)]:
        if not v.isdigit() or int(v) >= k:
            raise UserError(f"dataset.shard must be an integer in [0, {k - 1}] (dataset.num_shards={k}), got {v!r}")
        picked.append(int(v))
    method = instantiate_node(cfg.method, "method")
    per = sampling(method, cfg.generation.get("batch_rows"), int(cfg.generation.max_new_tokens))
    tps, source = throughput(cfg.plan, method)
    per_prompt = tokens.counts(cfg)
    shares_prompt = reward_node(cfg.reward, cfg.engine).get("attention", "full") != "full"
    out = Counts(runs=1)
    for i in picked:
        out.add(job_counts(shard_of(per_prompt, i, k), per, shares_prompt, tps))
    return out, source


def hours(h: float) -> str:
    """GPU-hours as printed: "—" where unknown, three decimals below 1, one below 100."""
    return "—" if math.isnan(h) else f"{h:,.0f}" if h >= 100 else f"{h:.1f}" if h >= 1 else f"{h:.3f}"


def render(rows: dict[tuple[str, str, str], Counts], notes: list[str]) -> str:
    """The plan as a Markdown table (one row per dataset, pair, method, and the total) and notes."""
    import pandas as pd

    total = Counts()
    for c in rows.values():
        total.add(c)
    table = [[*key, f"{c.runs:,}", f"{c.jobs:,}", f"{c.prompts:,}", f"{c.samples:,}", f"{c.generated_tokens:,}",
              f"{c.reward_tokens:,}", hours(c.gpu_hours), hours(c.longest_job_hours)]
             for key, c in [*sorted(rows.items()), (("total", "", ""), total)]]
    header = ["dataset", "pair", "method", "runs", "jobs", "prompts", "samples", "generated tokens (max)",
              "reward-model tokens", "GPU-hours", "longest job (h)"]
    df = pd.DataFrame(table, columns=header)
    text = df.to_markdown(index=False, tablefmt="pipe", colalign=["left"] * 3 + ["right"] * 8, disable_numparse=True)
    return text + "\n" + "".join(f"- {n}\n" for n in notes)


def main(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    rows, notes = plan_runs(args)
    print(render(rows, notes), end="")
    return 0


def app(argv: list[str] | None = None) -> None:
    """The command line (one ``error:`` line and exit 2 for bad input, as the other commands)."""
    run_app(lambda _: main(list(sys.argv[1:] if argv is None else argv)), None)


if __name__ == "__main__":
    app()
