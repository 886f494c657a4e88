"""Evaluation metrics over a run's records (Table 1): reward, diversity, coherence, length.

Every metric is a pure function of an :class:`EvalBatch` (the records plus their cleaned
responses, see :mod:`aisp_bench.metrics.cleaning`) registered in ``METRICS``::

    batch = EvalBatch.from_records(records, config)     # config: the run's resolved config
    METRICS.get("diversity")(batch)                      # per response; unknown names list the known ones
    compute_metrics(records, config=cfg, encoder=load_encoder("minilm"))

``compute_metrics`` returns the ``"metrics"`` block that ``python -m aisp_bench.evaluate``
writes into each run's ``summary.json``:

=====================  ==========================================================
reward_mean            mean ``reward`` (the run's reward model, chosen response)
diversity              mean over prompts of prod_{n=2..4} (1 - rep_n), NLTK tokens
coherence              mean cosine(prompt, response) under ``coherence_encoder``
coherence_encoder      the encoder's name; the MiniLM stand-in says so
response_tokens_mean   mean ``response_tokens`` (policy tokenizer, as generated)
response_words_mean    mean number of whitespace-separated words, cleaned response
num_records            records the numbers were computed from
=====================  ==========================================================

A metric returns one number, or the per-prompt values (one per record) whose finite mean
it is (reward, diversity, coherence); ``metric_values`` returns those values too, for the
report's bootstrap intervals. ``python -m aisp_bench.evaluate`` adds the evaluation and gold
reward models' keys and ``base_logprob`` (see :mod:`aisp_bench.evaluate`).

Heavy imports (torch, transformers, NLTK) happen inside the metric functions, so this
package imports quickly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aisp_bench.metrics.cleaning import clean_response, cleaning_options
from aisp_bench.registry import Registry

if TYPE_CHECKING:
    from aisp_bench.metrics.coherence import Encoder

__all__ = ["DEFAULT_METRICS", "METRICS", "EvalBatch", "compute_metrics", "metric_values"]


@dataclass(frozen=True)
class EvalBatch:
    """What metrics read: records, their prompts, cleaned responses and the encoder."""

    records: Sequence[dict[str, Any]]
    prompts: Sequence[str]
    responses: Sequence[str]
    encoder: Encoder | None = None

    @classmethod
    def from_records(
        cls, records: Sequence[dict[str, Any]], config: dict[str, Any] | None = None, encoder: Encoder | None = None
    ) -> EvalBatch:
        """Each record's response cleaned with the run's model settings (stop strings, roles)."""
        opts = cleaning_options(config)
        prompts = [str(r.get("prompt", "")) for r in records]
        responses = [clean_response(r.get("response"), **opts) for r in records]
        return cls(records=records, prompts=prompts, responses=responses, encoder=encoder)


METRICS: Registry[Callable[[EvalBatch], Any]] = Registry("metric")


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@METRICS.register("reward_mean")
def prompt_rewards(batch: EvalBatch) -> list[float | None]:
    """Each record's ``reward`` (None where it is missing or not finite)."""
    return [float(r["reward"]) if _finite(r.get("reward")) else None for r in batch.records]


@METRICS.register("diversity")
def prompt_diversity(batch: EvalBatch) -> list[float]:
    """Each cleaned response's diversity (see :mod:`aisp_bench.metrics.diversity`)."""
    from aisp_bench.metrics.diversity import diversity

    return [diversity(t) for t in batch.responses]


@METRICS.register("coherence")
def prompt_coherence(batch: EvalBatch) -> list[float]:
    """Each (prompt, response) cosine similarity under ``batch.encoder`` (required)."""
    if batch.encoder is None:
        raise ValueError("the coherence metric needs an encoder (load_encoder('simcse') or 'minilm')")
    from aisp_bench.metrics.coherence import coherence_scores

    return coherence_scores(batch.prompts, batch.responses, batch.encoder)


@METRICS.register("response_tokens_mean")
def response_tokens_mean(batch: EvalBatch) -> float:
    """Mean ``response_tokens`` (chosen response, policy tokenizer) where recorded."""
    return _mean([float(r["response_tokens"]) for r in batch.records if _finite(r.get("response_tokens"))])


@METRICS.register("response_words_mean")
def response_words_mean(batch: EvalBatch) -> float:
    """Mean count of whitespace-separated words in the cleaned responses."""
    return _mean([float(len(t.split())) for t in batch.responses])


@METRICS.register("num_records")
def num_records(batch: EvalBatch) -> int:
    return len(batch.records)


DEFAULT_METRICS: tuple[str, ...] = (
    "reward_mean",
    "diversity",
    "coherence",
    "response_tokens_mean",
    "response_words_mean",
    "num_records",
)


def _json_number(x: Any) -> Any:
    """NaN/inf -> None, so summary.json stays strict JSON."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def metric_values(batch: EvalBatch, names: Sequence[str] = DEFAULT_METRICS) -> tuple[dict[str, Any], dict[str, list]]:
    """The ``metrics`` block for one run (undefined values, e.g. no records, are ``None``)
    and, for the metrics that are means over prompts, the per-prompt values they average
    (one per record, in the records' order; None where undefined)."""
    fns = {name: METRICS.get(name) for name in names}  # fail on a typo before any work
    out: dict[str, Any] = {}
    per_prompt: dict[str, list] = {}
    for name, fn in fns.items():
        value = fn(batch)
        if isinstance(value, list):  # per-prompt values, keyed "reward" for reward_mean
            per_prompt[name.removesuffix("_mean")] = [_json_number(v) for v in value]
            value = _mean([v for v in value if v is not None and math.isfinite(v)])
        out[name] = _json_number(value)
        if name == "coherence":
            out["coherence_encoder"] = batch.encoder.label if batch.encoder is not None else None
    return out, per_prompt


def compute_metrics(records: Sequence[dict[str, Any]], *, config: dict[str, Any] | None = None,
                    encoder: Encoder | None = None, names: Sequence[str] = DEFAULT_METRICS) -> dict[str, Any]:
    """The ``metrics`` block of :func:`metric_values` alone."""
    return metric_values(EvalBatch.from_records(records, config, encoder), names)[0]
