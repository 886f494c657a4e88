"""Log-probabilities of given responses under the noise-free policy (``Engine.response_logprobs``).

For ``base_logprob`` (how close a method's chosen responses stay to the base model):
log p(y | x) = Σ_t log softmax(lm_head(z_t))[y_t] at temperature 1, no noise, no top-p,
where z_t is the pre-logit after the prompt x and y_<t.

Each prompt is prefilled once (``Engine.prefill``: the same rendering and left
truncation as for generation); its responses then run as one batch of right-padded
suffixes against that prompt KV, through shared-prefix attention where it supports the
model (as the decoder rewards score), else against per-row copies (``CopyRows``).
Log-softmax is taken row by row, so one row's (tokens x vocabulary) logits are in memory
at a time.

Records keep the response text, not its ids, so the text is re-tokenised
(``add_special_tokens=False``): its canonical tokenisation, which can differ from the
ids the engine generated where a model produced a non-canonical split (rare). The
end-of-text token is not scored: the recorded text is what readers, rewards and judges see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from aisp_bench import shared_prefix
from aisp_bench.engine.rows import CopyRows
from aisp_bench.types import Prompt

if TYPE_CHECKING:
    from aisp_bench.engine.core import Engine


@dataclass(frozen=True)
class ResponseLogProb:
    """Σ log p of a response's tokens under the policy, and how many tokens."""

    total: float
    tokens: int

    @property
    def mean(self) -> float | None:
        """Mean per-token log-probability (None for an empty response)."""
        return self.total / self.tokens if self.tokens else None


@torch.inference_mode()
def response_logprobs(engine: Engine, prompts: Sequence[Prompt], responses: Sequence[Sequence[str]], *,
                      max_rows: int | None = None) -> list[list[ResponseLogProb]]:
    """``responses[i]``'s log-probabilities given ``prompts[i]``, ``max_rows`` responses
    (default ``engine.max_batch_rows``) per forward pass. A response longer than the
    context leaves after its (truncated) prompt is cut there."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
    rows = max(1, int(max_rows or engine.max_batch_rows))
    out: list[list[ResponseLogProb]] = [[] for _ in prompts]
    start = 0
    while start < len(prompts):  # prompts whose responses fit one pass (a prompt with more: alone, in chunks)
        stop, used = start, 0
        while stop < len(prompts) and (stop == start or used + len(responses[stop]) <= rows):
            used, stop = used + len(responses[stop]), stop + 1
        _score_prompts(engine, prompts[start:stop], responses[start:stop], rows, out[start:stop])
        start = stop
    return out


def _score_prompts(engine: Engine, prompts, responses, rows: int, out: list[list[ResponseLogProb]]) -> None:
    """Prefill ``prompts`` once and score their responses, ``rows`` at a time, into ``out``."""
    jobs = [(i, text) for i, texts in enumerate(responses) for text in texts]
    if not jobs:
        return
    prefix = engine.prefill(list(prompts))
    shared = engine.attention != "copy" and engine._shared_ok  # the prompt KV read in place, laid out once
    kv = shared_prefix.prompt_kv(prefix.cache) if shared else None
    limit = engine.context_length
    for s in range(0, len(jobs), rows):
        chunk = jobs[s : s + rows]
        slots = torch.tensor([i for i, _ in chunk], dtype=torch.long)
        ids = [engine.tokenizer(text, add_special_tokens=False)["input_ids"] if text else [] for _, text in chunk]
        if limit:  # at most the room the context leaves after the prompt
            ids = [x[: max(0, int(limit) - prefix.prompt_tokens[i])] for x, (i, _) in zip(ids, chunk)]
        for (i, _), scored in zip(chunk, _score_rows(engine, prefix, kv, slots, ids)):
            out[i].append(scored)


def _score_rows(engine: Engine, prefix, kv, slots: torch.Tensor, ids: list[list[int]]) -> list[ResponseLogProb]:
    """One forward pass of the responses ``ids`` after their prompts (``slots`` into ``prefix``;
    ``kv``: its prompt KV for shared-prefix attention, None: per-row copies)."""
    dev = engine.device
    slots_d = slots.to(dev)
    T = max(1, max(len(x) for x in ids))
    tokens = torch.full((len(ids), T), engine.pad_token_id, dtype=torch.long)
    suffix_mask = torch.zeros((len(ids), T), dtype=torch.long)
    for r, x in enumerate(ids):
        tokens[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        suffix_mask[r, : len(x)] = 1
    tokens, suffix_mask = tokens.to(dev), suffix_mask.to(dev)
    pos = prefix.next_pos.index_select(0, slots_d)[:, None] + torch.arange(T, device=dev)[None]
    if kv is not None:
        hidden = shared_prefix.forward_suffix(engine.backbone, kv, prefix.mask, slots_d, tokens, pos, suffix_mask)
        engine.stats["forward_calls"] += 1
    else:
        rows = CopyRows(engine, prefix, slots)
        hidden = engine.backbone_forward(tokens, torch.cat([rows.mask, suffix_mask], dim=1), pos, rows.cache)
    z = torch.cat([prefix.last_hidden.index_select(0, slots_d)[:, None], hidden[:, :-1]], dim=1)  # z before token t
    out = []
    for r, x in enumerate(ids):
        if not x:
            out.append(ResponseLogProb(0.0, 0))
            continue
        logp = torch.log_softmax(engine.lm_head(z[r, : len(x)]).float(), dim=-1)
        picked = logp.gather(1, tokens[r, : len(x), None]).squeeze(1)
        out.append(ResponseLogProb(float(picked.double().sum()), len(x)))
    return out
