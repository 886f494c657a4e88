"""Shared-prefix attention: many rows attend to one prefilled copy of their prompt's KV.

The engine's decode steps use it (one query per row: ``engine.steps``), and so does the
scoring of given responses (many tokens per row: ``aisp_bench.prefix_scoring``, for the
decoder rewards and ``base_logprob``). Rather than copying a prompt's KV to each of its
rows and re-concatenating it at every step (``generate`` with repeated inputs, a
``DynamicCache``):

* the prompt part stays as prefilled, one copy per prompt, (H_kv, P, L, D) per layer
  (``prompt_kv``), its left padding masked (``padding_bias``);
* each row's own part (generated or suffix tokens) lives in a preallocated buffer
  (rows, H_kv, T, D) written in place (``RowKV``, the model's cache while decoding);
* attention scores against the prompt (one matrix product per prompt for all its rows,
  query heads and positions; grouped-query heads share their KV head) and against the
  row's own tokens share one softmax, so
  out = (Σ exp(s_p − m) V_p + Σ exp(s_s − m) V_s) / (Σ exp(s_p − m) + Σ exp(s_s − m))
  is exactly the model's attention over [prompt | own].

Words used here: a **row** is one entry of the batch (a decode step's lane, a scored
response); a **cell** is one place of the P x R prompt-major grid that the prompt products
run on (R rows per prompt; ``group_rows`` puts each row in a cell of its prompt).

It is switched on (``active``) as the ``transformers`` attention implementation
``ATTN_NAME`` around the forwards that use it. Exact for decoder-only Llama-style
attention without softcapping or attention sinks, without a sliding window shorter than
the sequences, on a model held by one device (``supported``); elsewhere the engine copies
the prompt KV to each row (``engine.steps.CopyStep``) and the rewards score in full.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_NAME = "aisp_shared_prefix"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_ACTIVE: list = []  # the AttentionState of the forward in progress


def supported(model, max_tokens: int | None = None) -> bool:
    """Whether shared-prefix attention computes exactly what ``model``'s attention does (a
    ``transformers`` model or its backbone), for sequences of at most ``max_tokens`` tokens
    (default: the model's context length; a sliding window that no sequence exceeds changes
    nothing, e.g. Mistral's 4096 for a reward model reading 2048 tokens). The model must sit
    on one device: the prompt KV and the row layout are kept beside one layer's weights."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    window = getattr(config, "sliding_window", None)
    use_window = getattr(config, "use_sliding_window", window is not None)
    longest = max_tokens if max_tokens is not None else getattr(config, "max_position_embeddings", 0)
    if window is not None and use_window and window < longest:
        return False
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    return len({p.device for p in model.parameters()}) == 1


class RowKV:
    """Per layer, each row's own keys and values: a preallocated (rows, H_kv, T, D) buffer
    written in place.

    Eager (``t`` is None): ``update`` writes at the count of tokens so far and returns
    views of the filled part. Static (``t`` a (1,) long tensor on the device holding the
    step, buffers zero-filled): ``update`` writes at ``t`` and returns the first ``span``
    positions of the first rows; the attention masks the part not written yet. The static
    form reads no device value on the host, so a CUDA graph can capture its forward.
    """

    def __init__(self, num_layers: int, capacity: int, t: torch.Tensor | None = None, rows: int | None = None) -> None:
        self.capacity = capacity
        self.t = t
        self.rows = rows  # static: the rows the buffers hold (else the first batch's)
        self.span = capacity
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        b, q = key_states.shape[0], key_states.shape[-2]
        if self.k[layer_idx] is None:  # static: zeros, as masked positions are still read
            h, d = key_states.shape[1], key_states.shape[-1]
            new = key_states.new_empty if self.t is None else key_states.new_zeros
            self.k[layer_idx] = new((self.rows or b, h, self.capacity, d))
            self.v[layer_idx] = new((self.rows or b, h, self.capacity, value_states.shape[-1]))
        k, v = self.k[layer_idx][:b], self.v[layer_idx][:b]
        if self.t is not None:
            k.index_copy_(2, self.t, key_states)
            v.index_copy_(2, self.t, value_states)
            return k[:, :, : self.span], v[:, :, : self.span]
        n = self.lengths[layer_idx]
        if n + q > self.capacity:
            raise RuntimeError(f"RowKV full: {n} + {q} > {self.capacity}")
        k[:, :, n : n + q] = key_states
        v[:, :, n : n + q] = value_states
        self.lengths[layer_idx] = n + q
        return k[:, :, : n + q], v[:, :, : n + q]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def keep(self, rows: torch.Tensor, filled: int) -> None:
        """Only these rows stay, in this order, moved to the front (their first ``filled``
        positions are copied)."""
        m = rows.numel()
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            if k is None:
                continue
            if self.t is None:  # eager: new buffers of m rows
                self.k[i], self.v[i] = k.new_empty((m, *k.shape[1:])), v.new_empty((m, *v.shape[1:]))
            self.k[i][:m, :, :filled] = k[rows, :, :filled]
            self.v[i][:m, :, :filled] = v[rows, :, :filled]

    def lanes(self, n: int, filled: int) -> list[torch.Tensor]:
        """Views of the first n rows' first ``filled`` positions, k and v of each layer in turn
        (none before the first forward)."""
        if filled == 0 or self.k[0] is None:
            return []
        return [x[:n, :, :filled] for pair in zip(self.k, self.v) for x in pair]

    def load(self, kv: list[torch.Tensor], filled: int) -> None:
        """Rows 0..m-1 now hold ``kv`` (``lanes``' layout: (m, H_kv, filled, D) per layer); eager
        buffers are new (m rows), static ones allocated (``rows``) where there are none yet."""
        for j, x in enumerate(kv):
            bufs, i = (self.k, self.v)[j % 2], j // 2
            if self.t is None:
                bufs[i] = x.new_empty((x.shape[0], x.shape[1], self.capacity, x.shape[3]))
            elif bufs[i] is None:
                bufs[i] = x.new_zeros((self.rows or x.shape[0], x.shape[1], self.capacity, x.shape[3]))
            bufs[i][: x.shape[0], :, :filled] = x
        self.lengths = [filled if kv else 0] * len(self.k)


@dataclass
class AttentionState:
    """What ``attention`` reads for one forward (a decode step or a batch of suffixes).

    ============  ==================  ================================================
    field         shape               meaning
    ============  ==================  ================================================
    k, v          per layer           prompt keys/values (``prompt_kv``): one copy per
                  (H_kv, P, L, D)     prompt, not per row
    row_of_cell   (P·R,)              the row in each of the P x R prompt-major cells
                                      (R rows per prompt; unused cells: any row)
    cell_of_row   (B,)                the cell of each row
    row_bias      (B, 1, q, L + S)    0 or -inf for [prompt | own] keys of each of the
                                      row's q queries: the prompt's left padding,
                                      unwritten static steps, causality and right
                                      padding of a multi-token suffix
    prompt_of_row (B,) or None        each row's prompt: ``attention`` gathers their KV
                                      and makes one ``scaled_dot_product_attention``
                                      call (``fused_attention``); None: split products
    ============  ==================  ================================================
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    row_of_cell: torch.Tensor
    cell_of_row: torch.Tensor
    rows_per_prompt: int
    row_bias: torch.Tensor | None = None
    prompt_of_row: torch.Tensor | None = None


def prompt_kv(prefill_cache, prompts: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """These prompts' (None: all) keys and values from a prefill cache, as (H_kv, P, L, D) per layer."""
    def part(x: torch.Tensor) -> torch.Tensor:
        return (x if prompts is None else x.index_select(0, prompts)).transpose(0, 1).contiguous()

    return [part(lay.keys) for lay in prefill_cache.layers], [part(lay.values) for lay in prefill_cache.layers]


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(P, 1, 1, L) additive bias: 0 on prompt tokens, -inf on left padding."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask == 0, float("-inf"))
    return bias[:, None, None, :]


def group_rows(prompt_of_row: torch.Tensor, P: int, R: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(row_of_cell (P·R,), cell_of_row (B,), R) for rows whose prompts are ``prompt_of_row``.

    Row b of prompt p takes cell p·R + (its rank among p's rows); R defaults to the most
    rows any prompt has. Computed on the host (the engine calls it where it has synced).
    """
    rp = prompt_of_row.cpu()
    counts = torch.bincount(rp, minlength=P)
    R = max(1, int(counts.max())) if R is None else R
    order = torch.argsort(rp, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(rp)
    rank[order] = torch.arange(rp.numel()) - starts[rp[order]]
    cell_of_row = rp * R + rank
    row_of_cell = torch.zeros(P * R, dtype=torch.long)
    row_of_cell[cell_of_row] = torch.arange(rp.numel())
    return row_of_cell, cell_of_row, R


def attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """Shared-prefix attention over [the row's prompt | the row's own keys], q queries per row.

    query (B, H, q, D): the row's last q tokens (a decode step: q = 1); key, value
    (B, H_kv, S, D): the row's own part (its generated or suffix tokens, or the static
    capacity with ``row_bias`` masking the rest). The prompt part is one
    (R·g·q x D) @ (D x L) product per prompt and KV head; both parts share one softmax.
    Returns (output (B, q, H, D), None).
    """
    st = _ACTIVE[-1]
    kp, vp = st.k[module.layer_idx], st.v[module.layer_idx]
    if st.prompt_of_row is not None:
        return fused_attention(st, kp, vp, query, key, value, scaling), None
    B, H, q_len, D = query.shape
    Hkv, P, L, _ = kp.shape
    g, R = H // Hkv * q_len, st.rows_per_prompt  # queries per row and KV head: heads x positions
    q = (query * (scaling if scaling is not None else D**-0.5)).reshape(B, Hkv, g, D)
    qg = q.transpose(0, 1).index_select(1, st.row_of_cell).view(Hkv, P, R * g, D)
    sp = torch.matmul(qg, kp.transpose(-1, -2)).view(Hkv, P * R, g, L).index_select(1, st.cell_of_row)
    ss = torch.matmul(q, key.transpose(-1, -2))  # (B, Hkv, g, S)
    scores = torch.cat([sp.transpose(0, 1), ss], dim=-1)
    if q_len == 1:
        w = torch.softmax(scores + st.row_bias, dim=-1)
    else:  # the bias differs per query position: (B, 1, 1, q, L + S) against (B, Hkv, H/Hkv, q, .)
        w = torch.softmax(scores.view(B, Hkv, g // q_len, q_len, -1) + st.row_bias[:, :, None], dim=-1)
        w = w.view(B, Hkv, g, -1)
    wp = w[..., :L].transpose(0, 1).index_select(1, st.row_of_cell).view(Hkv, P, R * g, L)
    op = torch.matmul(wp, vp).view(Hkv, P * R, g, -1).index_select(1, st.cell_of_row)
    out = torch.matmul(w[..., L:], value) + op.transpose(0, 1)  # (B, Hkv, g, Dv)
    if q_len == 1:
        return out.reshape(B, 1, H, -1), None
    return out.view(B, Hkv, g // q_len, q_len, -1).permute(0, 3, 1, 2, 4).reshape(B, q_len, H, -1), None


def fused_attention(st: AttentionState, kp, vp, query, key, value, scaling=None) -> torch.Tensor:
    """The same attention in one ``scaled_dot_product_attention`` call (a fused kernel), each
    row's prompt keys and values gathered next to its own: (B, H_kv, L + S, D), a copy
    that the split products avoid; for multi-token suffixes (reward scoring), where the
    split path's score tensors cost more than the copy. Returns (B, q, H, D)."""
    k = torch.cat([kp.index_select(1, st.prompt_of_row).transpose(0, 1), key], dim=2)
    v = torch.cat([vp.index_select(1, st.prompt_of_row).transpose(0, 1), value], dim=2)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=st.row_bias.to(query.dtype), scale=scaling,
                                         enable_gqa=query.shape[1] != k.shape[1])
    return out.transpose(1, 2)


AttentionInterface.register(ATTN_NAME, attention)


@contextlib.contextmanager
def active(model_config, state: AttentionState):
    """Route the model's attention through ``attention`` with ``state`` for this block."""
    previous = model_config._attn_implementation
    _ACTIVE.append(state)
    model_config._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        model_config._attn_implementation = previous
        _ACTIVE.pop()


def cache_keyword(backbone) -> str:
    """The name of a decoder's KV-cache argument (``past_key_values``, renamed ``cache`` in
    transformers 5.x; the old name is deprecated there)."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
