"""Shared-prefix attention: many rows attend to one prefilled copy of their prompt's KV.

Used by the engine's decode steps (one query per row) and by the decoder rewards
(``rewards/batching.py``: each response, a multi-token suffix, runs against its prompt's
KV prefilled once, ``prefill`` and ``forward_suffix``). Rather than copying a prompt's
KV n times (``generate`` with repeated inputs) and re-concatenating it at every step
(``DynamicCache``):

* the prompt part stays as prefilled, one copy per prompt, (H_kv, P, L, D) per layer,
  its left padding masked;
* each row's own part (generated or suffix tokens) lives in a preallocated buffer
  (rows, H_kv, T, D) written in place (``RowKV``, the model's cache while decoding);
* attention scores against the prompt (one matrix product per prompt for all its rows,
  query heads and positions; grouped-query heads share their KV head) and against the
  row's own tokens (causal, right padding masked) share one softmax, so
  out = (Σ exp(s_p − m) V_p + Σ exp(s_s − m) V_s) / (Σ exp(s_p − m) + Σ exp(s_s − m))
  is exactly the model's attention over [prompt | own].

It is switched on (``active``) as the ``transformers`` attention implementation
``ATTN_NAME`` around the forwards that use it. Exact for decoder-only Llama-style
attention without softcapping or attention sinks, and without a sliding window shorter
than the sequences (``supported``); otherwise the engine copies the cache and the
rewards score in full.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache

ATTN_NAME = "aisp_shared_prefix"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_ACTIVE: list = []  # the RowState of the forward in progress


def supported(config, max_tokens: int | None = None) -> bool:
    """Whether shared-prefix attention computes exactly what the model's attention does,
    for sequences of at most ``max_tokens`` tokens (default: the model's context length;
    a sliding window that no sequence exceeds changes nothing, e.g. Mistral's 4096 for
    a reward model reading 2048 tokens)."""
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    window = getattr(config, "sliding_window", None)
    use_window = getattr(config, "use_sliding_window", window is not None)
    longest = max_tokens if max_tokens is not None else getattr(config, "max_position_embeddings", 0)
    if window is not None and use_window and window < longest:
        return False
    return getattr(config, "attn_logit_softcapping", None) is None


# The prompt KV is laid out (H_kv, P, L, D): each prompt's rows are one matrix product with
# no copy of the cache, and few kernels per layer (eager decoding is bound by kernel launches).


class RowKV:
    """Per layer, each row's generated keys and values: a preallocated (rows, H_kv, T, D)
    buffer written in place.

    Eager (``step`` is None): ``update`` writes at the count of tokens so far and returns
    views of the filled part. Static (``step`` a (1,) long tensor on the device, buffers
    zero-filled): ``update`` writes at ``step`` and returns the first ``span`` positions
    of the first rows; the attention masks the part not written yet. The static form
    reads no device value on the host, so a CUDA graph can capture its forward.
    """

    def __init__(self, num_layers: int, capacity: int, step: torch.Tensor | None = None) -> None:
        self.capacity = capacity
        self.step = step
        self.span = capacity
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        b, q = key_states.shape[0], key_states.shape[-2]
        if self.k[layer_idx] is None:  # static: zeros, as masked positions are still read
            h, d = key_states.shape[1], key_states.shape[-1]
            new = key_states.new_empty if self.step is None else key_states.new_zeros
            self.k[layer_idx] = new((b, h, self.capacity, d))
            self.v[layer_idx] = new((b, h, self.capacity, value_states.shape[-1]))
        k, v = self.k[layer_idx][:b], self.v[layer_idx][:b]
        if self.step is not None:
            k.index_copy_(2, self.step, key_states)
            v.index_copy_(2, self.step, value_states)
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
        """Only these rows stay, moved to the front (the first ``filled`` steps are copied)."""
        m = rows.numel()
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            if k is None:
                continue
            if self.step is None:  # eager: new buffers of m rows
                self.k[i], self.v[i] = k.new_empty((m, *k.shape[1:])), v.new_empty((m, *v.shape[1:]))
            self.k[i][:m, :, :filled] = k[rows, :, :filled]
            self.v[i][:m, :, :filled] = v[rows, :, :filled]


@dataclass
class RowState:
    """What ``attention`` reads for one forward (a decode step or a batch of suffixes).

    ============  ==================  ================================================
    field         shape               meaning
    ============  ==================  ================================================
    k, v          per layer           prompt keys/values, (H_kv, P, L, D) (one copy
                  (H_kv, P, L, D)     per prompt, not per row)
    row_of_slot   (P·R,)              the row in each of the P x R prompt-major slots
                                      (R rows per prompt; unused slots: any row)
    slot_of_row   (B,)                the slot of each row
    row_bias      (B, 1, q, L + S)    0 or -inf for [prompt | own] keys of each of the
                                      row's q queries: the prompt's left padding,
                                      unwritten static steps, causality and right
                                      padding of a multi-token suffix
    row_prompt    (B,) or None        each row's prompt: ``attention`` gathers their KV
                                      and makes one ``scaled_dot_product_attention``
                                      call (``fused_attention``); None: split products
    ============  ==================  ================================================
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    row_of_slot: torch.Tensor
    slot_of_row: torch.Tensor
    rows_per_prompt: int
    row_bias: torch.Tensor | None = None
    row_prompt: torch.Tensor | None = None


def prompt_kv(prefix_cache, prompts: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """These prompts' (None: all) keys and values from a prefill cache, as (H_kv, P, L, D) per layer."""
    def part(x: torch.Tensor) -> torch.Tensor:
        return (x if prompts is None else x.index_select(0, prompts)).transpose(0, 1).contiguous()

    return [part(lay.keys) for lay in prefix_cache.layers], [part(lay.values) for lay in prefix_cache.layers]


def suffix_bias(suffix_mask: torch.Tensor | None, q_len: int, t: int, device) -> torch.Tensor:
    """(B or 1, 1, q_len, t): 0 where query i (the row's token t - q_len + i) may see its
    token j (causal, and not the row's padding), else -inf."""
    i = torch.arange(q_len, device=device)[:, None] + (t - q_len)
    allowed = (torch.arange(t, device=device)[None, :] <= i)[None]  # (1, q_len, t)
    if suffix_mask is not None:
        allowed = allowed & suffix_mask[:, None, :t].to(device=device, dtype=torch.bool)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
    return bias.masked_fill(~allowed, float("-inf"))[:, None]


def padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(P, 1, 1, L) additive bias: 0 on prompt tokens, -inf on left padding."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask == 0, float("-inf"))
    return bias[:, None, None, :]


def group_rows(row_prompt: torch.Tensor, P: int, R: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(row_of_slot (P·R,), slot_of_row (B,), R) for rows whose prompts are ``row_prompt``.

    Row b of prompt p takes slot p·R + (its rank among p's rows); R defaults to the most
    rows any prompt has. Computed on the host (the engine calls it where it has synced).
    """
    rp = row_prompt.cpu()
    counts = torch.bincount(rp, minlength=P)
    R = max(1, int(counts.max())) if R is None else R
    order = torch.argsort(rp, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(rp)
    rank[order] = torch.arange(rp.numel()) - starts[rp[order]]
    slot_of_row = rp * R + rank
    row_of_slot = torch.zeros(P * R, dtype=torch.long)
    row_of_slot[slot_of_row] = torch.arange(rp.numel())
    return row_of_slot, slot_of_row, R


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
    if st.row_prompt is not None:
        return fused_attention(st, kp, vp, query, key, value, scaling), None
    B, H, q_len, D = query.shape
    Hkv, P, L, _ = kp.shape
    g, R = H // Hkv * q_len, st.rows_per_prompt  # queries per row and KV head: heads x positions
    q = (query * (scaling if scaling is not None else D**-0.5)).reshape(B, Hkv, g, D)
    qg = q.transpose(0, 1).index_select(1, st.row_of_slot).view(Hkv, P, R * g, D)
    sp = torch.matmul(qg, kp.transpose(-1, -2)).view(Hkv, P * R, g, L).index_select(1, st.slot_of_row)
    ss = torch.matmul(q, key.transpose(-1, -2))  # (B, Hkv, g, S)
    scores = torch.cat([sp.transpose(0, 1), ss], dim=-1)
    if q_len == 1:
        w = torch.softmax(scores + st.row_bias, dim=-1)
    else:  # the bias differs per query position: (B, 1, 1, q, L + S) against (B, Hkv, H/Hkv, q, .)
        w = torch.softmax(scores.view(B, Hkv, g // q_len, q_len, -1) + st.row_bias[:, :, None], dim=-1)
        w = w.view(B, Hkv, g, -1)
    wp = w[..., :L].transpose(0, 1).index_select(1, st.row_of_slot).view(Hkv, P, R * g, L)
    op = torch.matmul(wp, vp).view(Hkv, P * R, g, -1).index_select(1, st.slot_of_row)
    out = torch.matmul(w[..., L:], value) + op.transpose(0, 1)  # (B, Hkv, g, Dv)
    if q_len == 1:
        return out.reshape(B, 1, H, -1), None
    return out.view(B, Hkv, g // q_len, q_len, -1).permute(0, 3, 1, 2, 4).reshape(B, q_len, H, -1), None


def fused_attention(st: RowState, kp, vp, query, key, value, scaling=None) -> torch.Tensor:
    """The same attention in one ``scaled_dot_product_attention`` call (a fused kernel), each
    row's prompt keys and values gathered next to its own: (B, H_kv, L + S, D), a copy
    that the split products avoid; for multi-token suffixes (reward scoring), where the
    split path's score tensors cost more than the copy. Returns (B, q, H, D)."""
    k = torch.cat([kp.index_select(1, st.row_prompt).transpose(0, 1), key], dim=2)
    v = torch.cat([vp.index_select(1, st.row_prompt).transpose(0, 1), value], dim=2)
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=st.row_bias.to(query.dtype), scale=scaling,
                                         enable_gqa=query.shape[1] != k.shape[1])
    return out.transpose(1, 2)


AttentionInterface.register(ATTN_NAME, attention)


@contextlib.contextmanager
def active(model_config, state: RowState):
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


def prefill(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
    """Run left-padded prompts once through a decoder ``backbone`` (the model's own
    attention); returns their keys and values, (H_kv, P, L, D) per layer (``prompt_kv``)."""
    cache = DynamicCache()  # full layers: callers check ``supported`` for sliding windows
    backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
             **{cache_keyword(backbone): cache})
    return prompt_kv(cache)


def forward_suffix(backbone, kv, prefix_mask: torch.Tensor, slots: torch.Tensor,
                   input_ids: torch.Tensor, position_ids: torch.Tensor,
                   suffix_mask: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
    """Run each row's suffix tokens against its prompt's prefilled KV (not copied).

    ============  ==========  =====================================================
    argument      shape       meaning
    ============  ==========  =====================================================
    kv            per layer   the left-padded prompts' (keys, values), (H_kv, P, L, D)
                              each (``prefill``, ``prompt_kv``): made once, read by
                              every batch of suffixes
    prefix_mask   (P, L)      1 for prompt tokens, 0 for left padding
    slots         (B,)        prompt index of each row (any order)
    input_ids     (B, T)      each row's suffix, right padded
    position_ids  (B, T)      their positions: the prompt's length + 0, 1, ...
    suffix_mask   (B, T)      1 for real suffix tokens (None: no padding)
    fused         bool        one fused attention call per layer (``fused_attention``)
    ============  ==========  =====================================================

    Returns the backbone's last_hidden_state (B, T, d): what the model gives for each
    row's full sequence (prompt + suffix) at the suffix positions.
    """
    state = suffix_state(kv, prefix_mask, slots, input_ids.shape[1], suffix_mask, fused)
    with active(backbone.config, state):
        return backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state


def suffix_state(kv, prefix_mask: torch.Tensor, slots: torch.Tensor, T: int,
                 suffix_mask: torch.Tensor | None = None, fused: bool = False) -> RowState:
    """The ``RowState`` of a batch of T-token suffixes (rows ``slots`` of the prompts' ``kv``)."""
    P = prefix_mask.shape[0]
    dev = prefix_mask.device
    k, v = kv
    row_of_slot, slot_of_row, R = group_rows(slots, P)
    dtype = k[0].dtype
    slots = slots.to(dev)
    prompt = padding_bias(prefix_mask, dtype).index_select(0, slots).expand(-1, -1, T, -1)
    own = suffix_bias(suffix_mask, T, T, dev).to(dtype).expand(slots.numel(), -1, -1, -1)
    return RowState(k, v, row_of_slot.to(dev), slot_of_row.to(dev), R, torch.cat([prompt, own], dim=-1),
                    slots if fused else None)
