"""How many rows a decode holds and which attention path it takes (``"auto"`` settings)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

AUTO_ROWS_CPU = 64  # max_batch_rows="auto" on the CPU
AUTO_ROWS_MAX = 512  # and the most it gives on a GPU


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token adds to the cache over all layers."""
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def auto_attention(*, device_type: str, decode_step: str, supported: bool, prompt_tokens: Sequence[int], rows: int,
                   max_new_tokens: int, kv_bytes_per_token: int, weight_bytes: int) -> str:
    """``attention="auto"``: ``copy`` where shared-prefix attention does not support the
    model; shared-prefix with a static step (its only path) and on the CPU (measured
    faster there: BENCHMARKS.md); on a GPU with the eager step, ``copy`` when the prompts
    have one length (no padding mask, which sends the model's attention to slower
    kernels) and the copied KV, rows x (prompt + new tokens), is at most the weights'
    bytes: eager decoding there is bound by kernel launches, and the copy path launches
    fewer (on an H100, 256 rows of one prompt length: 4.05 s copied against 4.32 s
    shared, BENCHMARKS.md); ``scripts/bench_methods.py`` measures both paths."""
    if not supported:
        return "copy"
    if decode_step != "eager" or device_type != "cuda":
        return "shared_prefix"
    width = max(prompt_tokens)
    copies = rows * (width + max_new_tokens) * kv_bytes_per_token
    return "copy" if all(n == width for n in prompt_tokens) and copies <= weight_bytes else "shared_prefix"


def auto_batch_rows(device: torch.device, *, max_new_tokens: int, kv_bytes_per_token: int, vocab_size: int,
                    hidden_size: int) -> int:
    """64 on the CPU. On a GPU: the rows its free memory holds now, each row needing its
    generated tokens' KV (``max_new_tokens`` x ``kv_bytes_per_token``), logits and
    top-p buffers (24 bytes per vocabulary entry) and pre-logit noise (8 bytes per
    hidden unit and step), after a margin of 10% of the card + 2 GiB; rounded down to
    a multiple of 32, at most 512 (decoding is compute-bound beyond about 256 rows
    on H100/H200-class cards)."""
    if device.type != "cuda":
        return AUTO_ROWS_CPU
    free, total = torch.cuda.mem_get_info(device)
    per_row = kv_bytes_per_token * max_new_tokens + 24 * vocab_size + 8 * hidden_size * max_new_tokens
    rows = int((free - 0.1 * total - 2 * 1024**3) // per_row)
    return min(AUTO_ROWS_MAX, rows // 32 * 32) if rows >= 32 else max(1, rows)
