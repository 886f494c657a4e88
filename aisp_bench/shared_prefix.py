"""Shared-prefix attention: many rows attend to one prefilled copy of their prompt's KV.

Used by the engine's decode steps (one query per row) and by the decoder reward models
(``rewards/batching.py``), which run each response (a multi-token suffix) against its
prompt's KV prefilled once (``prefill``, ``forward_suffix``).

While decoding, the n rows of a prompt all attend to the same prompt keys and values.
Copying that prompt KV cache n times (what ``generate`` with repeated inputs does, and a
plain ``DynamicCache.batch_repeat_interleave``) multiplies its memory and the bytes read
at every step by n; concatenating each new token onto it (``DynamicCache``) copies it
again at every step. Here instead:

* the prompt part stays as prefilled, one copy per prompt: K_p, V_p of shape
  (P, H_kv, L_p, D), with the left padding masked;
* each row's generated part lives in a preallocated buffer (rows, H_kv, T, D), written
  in place (``SuffixKV``, the object the model sees as its cache);
* attention is computed in two parts and merged exactly with a shared softmax: scores
  against the prompt, as one matrix product per prompt for all of its rows, query heads
  and query positions (grouped-query heads share their KV head); scores against the
  row's own tokens (causal, its right padding masked); then
  out = (Σ exp(s_p − m) V_p + Σ exp(s_s − m) V_s) / (Σ exp(s_p − m) + Σ exp(s_s − m)).
  A decode step is the case of one query per row (no mask needed: it is the newest
  token); a reward's suffix batch has q_len > 1 (``DecodeState.suffix_mask``).

It plugs into ``transformers`` as an attention implementation registered under
``ATTN_NAME`` (``AttentionInterface``), switched on only around the forwards that use it.
Models for which this is exact: decoder-only Llama-style attention without softcapping
or attention sinks, and without a sliding window shorter than the sequences
(``supported``); the engine falls back to the plain cache copy for others, the rewards
to full scoring.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

ATTN_NAME = "aisp_shared_prefix"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

_ACTIVE: list = []  # DecodeState or RowState of the forward in progress


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


class SuffixKV:
    """Per layer, the generated tokens' keys and values: (rows, H_kv, capacity, D) buffers
    written in place; ``update`` returns views of the filled part."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        n = self.lengths[layer_idx]
        q = key_states.shape[-2]
        if self.k[layer_idx] is None:
            b, h, _, d = key_states.shape
            self.k[layer_idx] = key_states.new_empty((b, h, self.capacity, d))
            self.v[layer_idx] = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
        if n + q > self.capacity:
            raise RuntimeError(f"SuffixKV full: {n} + {q} > {self.capacity}")
        self.k[layer_idx][:, :, n : n + q] = key_states
        self.v[layer_idx][:, :, n : n + q] = value_states
        self.lengths[layer_idx] = n + q
        return self.k[layer_idx][:, :, : n + q], self.v[layer_idx][:, :, : n + q]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only these rows (finished rows leave the batch)."""
        for i, (k, v) in enumerate(zip(self.k, self.v)):
            if k is not None:
                self.k[i], self.v[i] = k.index_select(0, keep), v.index_select(0, keep)


@dataclass
class DecodeState:
    """The prompt KV and the row -> prompt layout of one decode chunk or suffix batch.

    ============  ==================  ============================================
    field         shape               meaning
    ============  ==================  ============================================
    k, v          P x (P, H_kv, L, D) prompt keys/values per layer (not copied)
    bias          (P, 1, 1, L)        0 for prompt tokens, -inf for left padding
    row_prompt    (B,)                prompt index of each live row
    row_pos       (B,)                its position among that prompt's live rows
    groups        (P, R)              live rows of each prompt, padded with row 0
    suffix_mask   (B, T) or None      1 for a row's own tokens, 0 for its right
                                      padding (None: no padding)
    ============  ==================  ============================================
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    bias: torch.Tensor
    row_prompt: torch.Tensor
    row_pos: torch.Tensor
    groups: torch.Tensor
    suffix_mask: torch.Tensor | None = None

    @classmethod
    def build(cls, prefix_cache, prefix_mask: torch.Tensor, slots: torch.Tensor,
              suffix_mask: torch.Tensor | None = None) -> DecodeState:
        layers = prefix_cache.layers
        bias = torch.zeros(prefix_mask.shape, dtype=torch.float32, device=prefix_mask.device)
        bias = bias.masked_fill(prefix_mask == 0, float("-inf"))[:, None, None, :]
        return cls([lay.keys for lay in layers], [lay.values for lay in layers], bias,
                   *row_layout(slots.to(bias.device), bias.shape[0]), suffix_mask)

    def set_rows(self, row_prompt: torch.Tensor) -> None:
        """Recompute the grouping for the live rows (after finished rows left)."""
        self.row_prompt, self.row_pos, self.groups = row_layout(row_prompt.to(self.bias.device), self.bias.shape[0])


def row_layout(rp: torch.Tensor, P: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_prompt, row_pos, groups) for rows whose prompts are ``rp`` (any order)."""
    counts = torch.bincount(rp, minlength=P)
    order = torch.argsort(rp, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(rp)
    pos[order] = torch.arange(rp.numel(), device=rp.device) - starts[rp[order]]
    groups = torch.zeros((P, max(1, int(counts.max()))), dtype=torch.long, device=rp.device)
    groups[rp, pos] = torch.arange(rp.numel(), device=rp.device)
    return rp, pos, groups


def attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """Shared-prefix attention for q_len queries per row (a decode step: q_len = 1).

    ``key``/``value`` (B, H_kv, t, D) are the row's own tokens, the queries being its
    last q_len; returns (output (B, q_len, H, D), None).
    """
    st = _ACTIVE[-1]
    layer = module.layer_idx
    kp, vp = st.k[layer], st.v[layer]
    B, H, q_len, D = query.shape
    P, Hkv, L, _ = kp.shape
    g = H // Hkv * q_len  # queries per row and KV head: query heads x positions
    R = st.groups.shape[1]
    scale = scaling if scaling is not None else D**-0.5
    q = query.reshape(B, Hkv, g, D)
    # scores against the prompt: one (R·g x D) @ (D x L) product per prompt and KV head
    qg = q[st.groups].permute(0, 2, 1, 3, 4).reshape(P, Hkv, R * g, D)
    sp = torch.matmul(qg, kp.transpose(-1, -2)).float() * scale + st.bias
    sp = sp.view(P, Hkv, R, g, L).permute(0, 2, 1, 3, 4)[st.row_prompt, st.row_pos]  # (B, Hkv, g, L)
    # scores against the row's own tokens
    ss = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # (B, Hkv, g, t)
    if q_len > 1 or st.suffix_mask is not None:
        ss = ss + suffix_bias(st.suffix_mask, q_len, key.shape[-2], ss.device).repeat(1, 1, g // q_len, 1)
    m = torch.maximum(sp.amax(-1, keepdim=True), ss.amax(-1, keepdim=True))
    ep, es = torch.exp(sp - m), torch.exp(ss - m)
    den = ep.sum(-1, keepdim=True) + es.sum(-1, keepdim=True)
    # weighted values: the prompt part per prompt again, the generated part per row
    epg = ep.to(vp.dtype)[st.groups].permute(0, 2, 1, 3, 4).reshape(P, Hkv, R * g, L)
    op = torch.matmul(epg, vp).view(P, Hkv, R, g, -1).permute(0, 2, 1, 3, 4)[st.row_prompt, st.row_pos]
    os_ = torch.matmul(es.to(value.dtype), value)
    out = (op.float() + os_.float()) / den  # (B, Hkv, g, Dv)
    return out.to(query.dtype).reshape(B, H, q_len, -1).transpose(1, 2), None


def suffix_bias(suffix_mask: torch.Tensor | None, q_len: int, t: int, device) -> torch.Tensor:
    """(B or 1, 1, q_len, t): 0 where query i (the row's token t - q_len + i) may see its
    token j (causal, and not the row's padding), else -inf."""
    i = torch.arange(q_len, device=device)[:, None] + (t - q_len)
    allowed = (torch.arange(t, device=device)[None, :] <= i)[None]  # (1, q_len, t)
    if suffix_mask is not None:
        allowed = allowed & suffix_mask[:, None, :t].to(device=device, dtype=torch.bool)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
    return bias.masked_fill(~allowed, float("-inf"))[:, None]


# ---------------------------------------------------------------------------- row layout
# The engine's decode path. Same two-part attention as ``attention`` above, in fewer
# kernels (13 per layer instead of 32 in bf16: eager decoding is bound by kernel
# launches on a GPU), with the prompt KV laid out (H_kv, P, L, D) so that each prompt's rows are
# one matrix product without any copy of the cache, and a form with static shapes
# (``RowKV`` with a device ``step``) that a CUDA graph can capture.

ROWS_ATTN_NAME = "aisp_shared_prefix_rows"


class RowKV:
    """Per layer, each row's generated keys and values: a preallocated (rows, H_kv, T, D)
    buffer written in place (zero-filled in the static form).

    Eager (``step`` is None): ``update`` writes at the count of tokens so far and returns
    views of the filled part. Static (``step`` a (1,) long tensor on the device):
    ``update`` writes at ``step`` and returns the first ``span`` positions of the first
    rows (as many as the keys it is given); the attention masks the part not written
    yet. The static form reads no device value on the host, so its forward can be
    captured in a CUDA graph.
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
    """What ``rows_attention`` reads for one decode forward.

    ============  ==================  ================================================
    field         shape               meaning
    ============  ==================  ================================================
    k, v          per layer           prompt keys/values, (H_kv, P, L, D) (one copy
                  (H_kv, P, L, D)     per prompt, not per row)
    row_of_slot   (P·R,)              the row in each of the P x R prompt-major slots
                                      (R rows per prompt; unused slots: any row)
    slot_of_row   (B,)                the slot of each row
    row_bias      (B, 1, 1, L + S)    0 or -inf for [prompt | generated] keys: the
                                      prompt's left padding, unwritten static steps
    ============  ==================  ================================================
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    row_of_slot: torch.Tensor
    slot_of_row: torch.Tensor
    rows_per_prompt: int
    row_bias: torch.Tensor | None = None


def prompt_kv(prefix_cache, prompts: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """These prompts' keys and values from a prefill cache, as (H_kv, P, L, D) per layer."""
    k = [lay.keys.index_select(0, prompts).transpose(0, 1).contiguous() for lay in prefix_cache.layers]
    v = [lay.values.index_select(0, prompts).transpose(0, 1).contiguous() for lay in prefix_cache.layers]
    return k, v


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


def rows_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """One decode step (one query per row) over [the row's prompt | its generated keys].

    query (B, H, 1, D); key, value (B, H_kv, S, D): the row's own generated part (S the
    steps so far, or the static capacity with ``row_bias`` masking the rest). The prompt
    part is one (R·g x D) @ (D x L) product per prompt and KV head; both parts share
    one softmax. Returns (output (B, 1, H, D), None).
    """
    st = _ACTIVE[-1]
    kp, vp = st.k[module.layer_idx], st.v[module.layer_idx]
    B, H, q_len, D = query.shape
    if q_len != 1:
        raise RuntimeError("shared-prefix attention handles decode steps (one query per row) only")
    Hkv, P, L, _ = kp.shape
    g, R = H // Hkv, st.rows_per_prompt
    q = (query * (scaling if scaling is not None else D**-0.5)).view(B, Hkv, g, D)
    qg = q.transpose(0, 1).index_select(1, st.row_of_slot).view(Hkv, P, R * g, D)
    sp = torch.matmul(qg, kp.transpose(-1, -2)).view(Hkv, P * R, g, L).index_select(1, st.slot_of_row)
    ss = torch.matmul(q, key.transpose(-1, -2))  # (B, Hkv, g, S)
    w = torch.softmax(torch.cat([sp.transpose(0, 1), ss], dim=-1) + st.row_bias, dim=-1)
    wp = w[..., :L].transpose(0, 1).index_select(1, st.row_of_slot).view(Hkv, P, R * g, L)
    op = torch.matmul(wp, vp).view(Hkv, P * R, g, -1).index_select(1, st.slot_of_row)
    out = torch.matmul(w[..., L:], value) + op.transpose(0, 1)  # (B, Hkv, g, Dv)
    return out.reshape(B, 1, H, -1), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, attention)
    AttentionInterface.register(ROWS_ATTN_NAME, rows_attention)


_register()


@contextlib.contextmanager
def active(model_config, state, name: str = ATTN_NAME):
    """Route the model's attention through ``attention`` (or the one registered as
    ``name``) with ``state`` for this block."""
    previous = model_config._attn_implementation
    _ACTIVE.append(state)
    model_config._attn_implementation = name
    try:
        yield
    finally:
        model_config._attn_implementation = previous
        _ACTIVE.pop()


def prefill(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
    """Run left-padded prompts once through a decoder ``backbone`` (the model's own
    attention); returns (KV cache, P x (P, H_kv, L, D) per layer, last_hidden_state)."""
    from transformers import DynamicCache

    cache = DynamicCache()  # full layers: callers check ``supported`` for sliding windows
    params = inspect.signature(backbone.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{cache_kw: cache}).last_hidden_state
    return cache, hidden


def forward_suffix(backbone, prefix_cache, prefix_mask: torch.Tensor, slots: torch.Tensor,
                   input_ids: torch.Tensor, position_ids: torch.Tensor,
                   suffix_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run each row's suffix tokens against its prompt's prefilled KV (not copied).

    ============  ==========  =====================================================
    argument      shape       meaning
    ============  ==========  =====================================================
    prefix_cache  P rows      ``prefill``'s cache of the left-padded prompts
    prefix_mask   (P, L)      1 for prompt tokens, 0 for left padding
    slots         (B,)        prompt index of each row (any order)
    input_ids     (B, T)      each row's suffix, right padded
    position_ids  (B, T)      their positions: the prompt's length + 0, 1, ...
    suffix_mask   (B, T)      1 for real suffix tokens (None: no padding)
    ============  ==========  =====================================================

    Returns the backbone's last_hidden_state (B, T, d): what the model gives for each
    row's full sequence (prompt + suffix) at the suffix positions.
    """
    state = DecodeState.build(prefix_cache, prefix_mask, slots, suffix_mask)
    with active(backbone.config, state):
        return backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
