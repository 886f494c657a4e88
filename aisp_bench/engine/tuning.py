"""How the engine decodes on this model and device: the ``auto`` rules.

None of these choices changes what a run computes in fp32 (the tests check every path
against ``transformers``' ``generate`` and against each other; bf16 on a GPU rounds
differently with each, as with the batch size). ``auto`` is what was measured fastest
(BENCHMARKS.md); the ``engine:`` tuning block of the configs (``conf/engine.yaml``) and the
``Engine``'s arguments of the same names override it, for benchmarks:

* ``attention``: ``shared_prefix`` (one copy of a prompt's KV read by all its rows:
  ``engine.attention``) wherever it is exact for the model and the model sits on one
  device, else ``copy``: the prompt KV copied to each row and the model's own attention
  (``engine.steps.CopyStep``), the fallback for the models shared-prefix attention does
  not support (a sliding window shorter than the context, logit softcapping, other
  model types) and for a policy split over several GPUs;
* ``decode_step``: ``cuda_graph`` (the ``static`` step captured in CUDA graphs) on one
  CUDA device with shared-prefix attention, else ``eager``; ``static`` is the same step
  without graphs (for the CPU tests of what a graph replays);
* ``sync_every``: the host reads the new tokens every step on the CPU (nothing to
  overlap), every 8 steps on a GPU;
* ``max_batch_rows`` (``generation.batch_rows``: a setting users size, not tuning): 64 on
  the CPU, on a GPU the rows its free memory holds (``auto_batch_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aisp_bench.engine.attention import supported

AUTO_ROWS_CPU = 64  # max_batch_rows="auto" on the CPU
AUTO_ROWS_MAX = 512  # and the most it gives on a GPU
SYNC_EVERY_GPU = 8


@dataclass(frozen=True)
class Tuning:
    """How an engine decodes, every ``auto`` resolved."""

    attention: str  # shared_prefix | copy
    decode_step: str  # eager | static | cuda_graph
    sync_every: int


def choose(model, device: torch.device, *, attention: str = "auto", decode_step: str = "auto",
           sync_every: int | str = "auto") -> Tuning:
    """The ``Tuning`` of an engine on ``model`` (its ``lm_head`` on ``device``); a choice the
    model or device cannot take is a ``ValueError``."""
    exact = supported(model)
    if attention == "auto":
        attention = "shared_prefix" if exact else "copy"
    elif attention == "shared_prefix" and not exact:
        raise ValueError(f"shared-prefix attention does not support model type {model.config.model_type!r} "
                         "on this placement; use attention='copy'")
    if decode_step == "auto":
        decode_step = "cuda_graph" if device.type == "cuda" and attention == "shared_prefix" else "eager"
    if decode_step != "eager" and attention == "copy":
        raise ValueError(f"decode_step={decode_step!r} needs shared-prefix attention (model type "
                         f"{model.config.model_type!r}, attention={attention!r}); use decode_step='eager'")
    if decode_step == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"decode_step='cuda_graph' needs the model on a CUDA device, it is on {device}")
    if sync_every == "auto":
        sync_every = 1 if device.type == "cpu" else SYNC_EVERY_GPU
    return Tuning(attention, decode_step, int(sync_every))


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token adds to the cache over all layers."""
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


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
