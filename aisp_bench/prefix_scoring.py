"""Scoring given responses against their prompt's KV, prefilled once: the decoder rewards
(``rewards/batching.py``) and ``base_logprob`` (``response_logprobs``).

A batch of right-padded suffixes (responses, or what a reward's rows add to their shared
prefix) runs in one forward against the prompts' KV, each row attending to its prompt's
keys in place (``engine.attention``, many queries per row) and to its own tokens
(causal, the padding masked). The output equals a full forward of prompt + suffix
(tested to float32 rounding).

``response_logprobs``: log p(y | x) = Σ_t log softmax(lm_head(z_t))[y_t] under the
noise-free policy at temperature 1, no top-p, z_t being the pre-logit after the prompt x
and y_<t, for how close a method's chosen responses stay to the base model. Each prompt
is prefilled once by the engine (``Engine.prefill``: the same rendering and left
truncation as for generation); its responses then run as suffixes through shared-prefix
attention where the engine uses it, else against per-row copies of the prompt cache
(``engine.steps.CopyStep``). Log-softmax is taken row by row, so one row's (tokens x
vocabulary) logits are in memory at a time. Records keep the response text, not its ids,
so the text is re-tokenised (``add_special_tokens=False``): its canonical tokenisation,
which can differ from the ids the engine generated where a model produced a
non-canonical split (rare). The end-of-text token is not scored: the recorded text is
what readers, rewards and judges see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from aisp_bench.engine.attention import AttentionState, active, cache_keyword, group_rows, padding_bias, prompt_kv
from aisp_bench.engine.padding import pad
from aisp_bench.engine.steps import CopyStep
from aisp_bench.types import Prompt

if TYPE_CHECKING:
    from aisp_bench.engine import Engine


def prefill(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
    """Run left-padded prompts once through a decoder ``backbone`` (the model's own
    attention); returns their keys and values, (H_kv, P, L, D) per layer (``prompt_kv``)."""
    cache = DynamicCache()  # full layers: callers check ``supported`` for sliding windows
    backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
             **{cache_keyword(backbone): cache})
    return prompt_kv(cache)


def suffix_bias(suffix_mask: torch.Tensor | None, q_len: int, t: int, device) -> torch.Tensor:
    """(B or 1, 1, q_len, t): 0 where query i (the row's token t - q_len + i) may see its
    token j (causal, and not the row's padding), else -inf."""
    i = torch.arange(q_len, device=device)[:, None] + (t - q_len)
    allowed = (torch.arange(t, device=device)[None, :] <= i)[None]  # (1, q_len, t)
    if suffix_mask is not None:
        allowed = allowed & suffix_mask[:, None, :t].to(device=device, dtype=torch.bool)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
    return bias.masked_fill(~allowed, float("-inf"))[:, None]


def suffix_state(kv, prefix_mask: torch.Tensor, prompt_of_row: torch.Tensor, T: int,
                 suffix_mask: torch.Tensor | None = None, fused: bool = False) -> AttentionState:
    """The ``AttentionState`` of a batch of T-token suffixes (rows of the prompts' ``kv``)."""
    P = prefix_mask.shape[0]
    dev = prefix_mask.device
    k, v = kv
    row_of_cell, cell_of_row, R = group_rows(prompt_of_row, P)
    dtype = k[0].dtype
    prompt_of_row = prompt_of_row.to(dev)
    prompt = padding_bias(prefix_mask, dtype).index_select(0, prompt_of_row).expand(-1, -1, T, -1)
    own = suffix_bias(suffix_mask, T, T, dev).to(dtype).expand(prompt_of_row.numel(), -1, -1, -1)
    return AttentionState(k, v, row_of_cell.to(dev), cell_of_row.to(dev), R, torch.cat([prompt, own], dim=-1),
                          prompt_of_row if fused else None)


def forward_suffix(backbone, kv, prefix_mask: torch.Tensor, prompt_of_row: torch.Tensor,
                   input_ids: torch.Tensor, position_ids: torch.Tensor,
                   suffix_mask: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
    """Run each row's suffix tokens against its prompt's prefilled KV (not copied).

    =============  ==========  =====================================================
    argument       shape       meaning
    =============  ==========  =====================================================
    kv             per layer   the left-padded prompts' (keys, values), (H_kv, P, L, D)
                               each (``prefill``, ``prompt_kv``): made once, read by
                               every batch of suffixes
    prefix_mask    (P, L)      1 for prompt tokens, 0 for left padding
    prompt_of_row  (B,)        the prompt of each row (any order)
    input_ids      (B, T)      each row's suffix, right padded
    position_ids   (B, T)      their positions: the prompt's length + 0, 1, ...
    suffix_mask    (B, T)      1 for real suffix tokens (None: no padding)
    fused          bool        one fused attention call per layer (``fused_attention``)
    =============  ==========  =====================================================

    Returns the backbone's last_hidden_state (B, T, d): what the model gives for each
    row's full sequence (prompt + suffix) at the suffix positions.
    """
    state = suffix_state(kv, prefix_mask, prompt_of_row, input_ids.shape[1], suffix_mask, fused)
    with active(backbone.config, state):
        return backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


# ---------------------------------------------------------------------------- base_logprob


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
    """``responses[i]``'s log-probabilities given ``prompts[i]`` under ``engine``'s policy,
    ``max_rows`` responses (default ``engine.max_batch_rows``) per forward pass. A response
    longer than the context leaves after its (truncated) prompt is cut there."""
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
    # the prompt KV read in place (laid out once), or copied per row
    kv = prompt_kv(prefix.cache) if engine.attention == "shared_prefix" else None
    limit = engine.context_length
    for s in range(0, len(jobs), rows):
        chunk = jobs[s : s + rows]
        prompt_of_row = torch.tensor([i for i, _ in chunk], dtype=torch.long)
        ids = [engine.tokenizer(text, add_special_tokens=False)["input_ids"] if text else [] for _, text in chunk]
        if limit:  # at most the room the context leaves after the prompt
            ids = [x[: max(0, int(limit) - prefix.prompt_tokens[i])] for x, (i, _) in zip(ids, chunk)]
        for (i, _), scored in zip(chunk, _score_rows(engine, prefix, kv, prompt_of_row, ids)):
            out[i].append(scored)


def _score_rows(engine: Engine, prefix, kv, prompt_of_row: torch.Tensor, ids: list[list[int]]) -> list[ResponseLogProb]:
    """One forward pass of the responses ``ids`` after their prompts (``prompt_of_row`` into
    ``prefix``; ``kv``: its prompt KV for shared-prefix attention, None: per-row copies)."""
    dev = engine.device
    rows_d = prompt_of_row.to(dev)
    tokens, suffix_mask, pos = pad(ids, engine.pad_token_id, "right", dev)
    pos = prefix.next_pos.index_select(0, rows_d)[:, None] + pos
    if kv is not None:
        hidden = forward_suffix(engine.backbone, kv, prefix.mask, rows_d, tokens, pos, suffix_mask)
        engine.stats["forward_calls"] += 1
    else:
        step = CopyStep(engine, prefix, prompt_of_row)
        hidden = engine.backbone_forward(tokens, torch.cat([step.mask, suffix_mask], dim=1), pos, step.cache)
    z = torch.cat([prefix.last_hidden.index_select(0, rows_d)[:, None], hidden[:, :-1]], dim=1)  # z before token t
    out = []
    for r, x in enumerate(ids):
        if not x:
            out.append(ResponseLogProb(0.0, 0))
            continue
        logp = torch.log_softmax(engine.lm_head(z[r, : len(x)]).float(), dim=-1)
        picked = logp.gather(1, tokens[r, : len(x), None]).squeeze(1)
        out.append(ResponseLogProb(float(picked.double().sum()), len(x)))
    return out
