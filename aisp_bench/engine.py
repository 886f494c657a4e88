"""The generation engine: the only code that runs the policy model's forward pass.

It decodes many rows at once on any ``transformers`` causal LM whose logits are
``lm_head(z_t)``, z_t being the final hidden state after the last norm (the paper's
pre-logit, Eq. 2). Per row it applies one of three rules:

* greedy on ``lm_head(z_t + v_t)`` with caller-given noise v_t for generated steps
  t = 1..τ and no noise after τ (Eq. 3; AISP and BoN with Gaussian pre-logit noise);
* temperature + top-p (nucleus) sampling, with the filter of ``transformers``'
  ``TopPLogitsWarper`` and one caller-given uniform per step (BoN top-p);
* plain greedy (no noise, no sampling).

How it is fast:

* ``prefill`` runs each prompt once (several prompts left-padded in one batch) and keeps
  its KV cache and its last pre-logit; ``decode`` can be called many times on one prefix
  (all of AISP's κ iterations reuse one prefill);
* the prompt's KV cache is shared by its rows, not copied (``shared_prefix``): each
  decode step attends to one copy of the prompt KV per prompt and to a preallocated
  per-row buffer of generated tokens. ``attention="copy"`` copies the prompt cache to
  each row instead (models the shared-prefix attention does not cover, and where its
  few large kernels are faster: ``Engine.attention_for``);
* the host does not wait for the device at every step: generated tokens stay on the
  device and are read every ``sync_every`` steps, where EOS ids are found in one
  vectorised pass and stop strings are searched only in rows whose new token can
  complete one (``stop_candidates``);
* rows that finish (EOS, a stop string, ``max_new_tokens``) leave the batch: the cache
  and every per-row tensor are compacted, so finished rows cost nothing more;
* ``decode_step="static"`` runs the same attention on preallocated buffers with fixed
  shapes per batch-size bucket, which ``decode_step="cuda_graph"`` captures in CUDA
  graphs (one replay per step instead of hundreds of kernel launches);
* rows beyond ``max_batch_rows`` are decoded in successive chunks.

Randomness never comes from here: callers pass noise and uniforms drawn from generators
seeded per (run seed, prompt id, iteration, row), so results do not depend on batching.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from aisp_bench import shared_prefix
from aisp_bench.types import Prompt, Sample


DECODE_STEPS = ("eager", "static", "cuda_graph")
# batch sizes of the static decode step: finished rows leave when the live ones fit a smaller one
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
SPAN = 32  # and it attends to the generated positions in spans of this many
AUTO_ROWS_CPU = 64  # max_batch_rows="auto" on the CPU
AUTO_ROWS_MAX = 512  # and the most it gives on a GPU


class PromptTooLongError(ValueError):
    pass


@dataclass
class EncodedPrompt:
    ids: list[int]
    num_tokens: int  # before truncation
    truncated: bool


@dataclass
class Prefix:
    """A batch of prefilled prompts (left-padded), ready to be decoded many times.

    ============  ==========  ===================================================
    field         shape       meaning
    ============  ==========  ===================================================
    cache         P rows      KV cache of the padded prompts
    mask          (P, L)      1 for prompt tokens, 0 for left padding
    last_hidden   (P, d)      pre-logit z_1 that yields the first response token
    next_pos      (P,)        position id of the first response token
    ============  ==========  ===================================================
    """

    prompts: list[Prompt]
    cache: object
    mask: torch.Tensor
    last_hidden: torch.Tensor
    next_pos: torch.Tensor
    prompt_tokens: list[int]
    # static decode states (buffers, CUDA graphs) by chunk layout, reused by later decodes
    decoders: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.prompts)


def top_p_filter(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature then nucleus filter, as ``transformers`` does it.

    Returns (sorted_probs, sorted_idx): the sampling distribution over the vocabulary in
    ascending-score order, zero outside the nucleus. Mirrors ``TemperatureLogitsWarper``
    followed by ``TopPLogitsWarper`` (remove tokens whose ascending cumulative probability
    is <= 1 - top_p, always keep the most likely token).
    """
    scores = logits.float() / temperature
    sorted_scores, sorted_idx = torch.sort(scores, descending=False, dim=-1)
    if top_p < 1.0:
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1.0 - top_p)
        remove[..., -1] = False
        sorted_scores = sorted_scores.masked_fill(remove, float("-inf"))
    return sorted_scores.softmax(dim=-1), sorted_idx


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """Draw one token per row by inverse CDF with the given uniforms u in [0, 1): (B,)."""
    probs, idx = top_p_filter(logits, temperature, top_p)
    cum = probs.double().cumsum(dim=-1)
    target = u.to(cum.device, torch.float64).unsqueeze(-1) * cum[:, -1:]
    pos = (cum <= target).sum(dim=-1).clamp_(max=probs.shape[-1] - 1)
    return idx.gather(-1, pos.unsqueeze(-1)).squeeze(-1)


def stop_candidates(tokenizer, stop_strings: Sequence[str], vocab_size: int) -> torch.Tensor | None:
    """(V,) bool: the tokens whose arrival can complete a stop string (None: no stop strings).

    A stop string that newly appears when token x is appended ends inside x's text, so
    that text holds the stop string's last character. Tokens whose text alone is not
    plain (partial UTF-8 bytes decode to U+FFFD) are candidates too, and a stop string
    that ends in whitespace makes every token one (decoders may strip it). Only rows
    whose new token is a candidate get their text decoded and searched.
    """
    if not stop_strings:
        return None
    lasts = {s[-1] for s in stop_strings}
    mask = torch.ones(vocab_size, dtype=torch.bool)
    if any(c.isspace() for c in lasts):
        return mask
    try:
        n = min(vocab_size, len(tokenizer))
    except TypeError:  # a tokenizer without a length: decode the model's whole vocabulary
        n = vocab_size
    ids = [[i] for i in range(n)]
    if hasattr(tokenizer, "batch_decode"):
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    else:
        texts = [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    mask[:n] = torch.tensor([("\ufffd" in x) or any(c in x for c in lasts) for x in texts], dtype=torch.bool)
    return mask


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
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
    fewer. Provisional: it fits the two H200 measurements of BENCHMARKS.md, made before
    shared-prefix attention lost two thirds of its kernels; ``scripts/bench_methods.py``
    measures both paths."""
    if not supported:
        return "copy"
    if decode_step != "eager" or device_type != "cuda":
        return "shared_prefix"
    width = max(prompt_tokens)
    copies = rows * (width + max_new_tokens) * kv_bytes_per_token
    return "copy" if all(n == width for n in prompt_tokens) and copies <= weight_bytes else "shared_prefix"


class Engine:
    """Batched decoding with a shared prompt KV cache and pre-logit noise.

    Args:
        model: a ``transformers`` causal LM (``model.get_decoder()`` gives the backbone,
            ``model.get_output_embeddings()`` the ``lm_head``).
        tokenizer: its tokenizer.
        render: callable turning a ``Prompt`` into the text the model is fed.
        max_new_tokens: decoding stops a row after this many tokens.
        max_batch_rows: rows decoded together at most; more are decoded in chunks.
            ``auto``: 64 on the CPU; on a GPU as many as its free memory holds when first
            used (``auto_batch_rows``), at most 512.
        stop_strings: a row ends when its text contains one; the text is cut before it.
        eos_token_ids: extra ids that end a row, beside the model's own EOS ids.
        add_special_tokens: passed to the tokenizer when encoding rendered prompts.
        context_length: prompts longer than ``context_length - max_new_tokens`` tokens
            are truncated from the left (``overflow="truncate_left"``) or refused with
            ``PromptTooLongError`` (``"error"``); default: the model's
            ``max_position_embeddings`` (None: no limit).
        attention: ``shared_prefix`` (one prompt KV per prompt, per-row buffers for the
            generated tokens), ``copy`` (the prompt cache copied to each row, the model's
            own attention) or ``auto``: per decode call, ``copy`` where shared-prefix
            attention does not support the model, and on a GPU with the eager step where
            the prompts are unpadded and the copies take at most the weights' bytes (the
            copy path's few large kernels then beat shared-prefix attention's many small
            ones: H200 measurement in BENCHMARKS.md); else ``shared_prefix``.
        decode_step: ``eager`` (the model's forward on shapes that shrink as rows finish),
            ``static`` (shared-prefix attention on preallocated buffers: fixed shapes per
            batch-size bucket, rows padded up to the bucket after rows finish) or
            ``cuda_graph`` (the static step captured once per bucket in a CUDA graph and
            replayed; CUDA only). All give the same tokens in fp32.
        sync_every: the host looks at the generated tokens (EOS, stop strings) and drops
            finished rows every this many steps; in between the device runs ahead (rows
            that ended early decode a few wasted steps, their output unchanged). ``auto``:
            1 on the CPU, 8 on a GPU.
    """

    def __init__(
        self,
        model,
        tokenizer,
        render=None,
        *,
        max_new_tokens: int = 128,
        max_batch_rows: int | str = 64,
        stop_strings: Sequence[str] = (),
        eos_token_ids: Sequence[int] = (),
        add_special_tokens: bool = False,
        context_length: int | None = None,
        overflow: str = "truncate_left",
        check_prelogit: bool = True,
        attention: str = "auto",
        decode_step: str = "eager",
        sync_every: int | str = "auto",
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if overflow not in ("truncate_left", "error"):
            raise ValueError(f"overflow must be 'truncate_left' or 'error', got {overflow!r}")
        if attention not in ("auto", "shared_prefix", "copy"):
            raise ValueError(f"attention must be 'auto', 'shared_prefix' or 'copy', got {attention!r}")
        if decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step must be one of {', '.join(DECODE_STEPS)}, got {decode_step!r}")
        if sync_every != "auto" and (isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1):
            raise ValueError(f"sync_every must be 'auto' or an integer >= 1, got {sync_every!r}")
        self.model = model.eval()
        self.max_batch_rows = max_batch_rows
        self._shared_ok = shared_prefix.supported(model.config)
        if attention == "shared_prefix" and not self._shared_ok:
            raise ValueError(f"shared-prefix attention does not support model type {model.config.model_type!r}")
        if decode_step != "eager" and (attention == "copy" or not self._shared_ok):
            raise ValueError(f"decode_step={decode_step!r} needs shared-prefix attention (model type "
                             f"{model.config.model_type!r}, attention={attention!r}); use decode_step='eager'")
        self.attention = attention
        self.decode_step = decode_step
        self.tokenizer = tokenizer
        self.render = render or (lambda p: p.text)
        self.max_new_tokens = int(max_new_tokens)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.add_special_tokens = add_special_tokens
        self.overflow = overflow
        self.backbone = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        if decode_step == "cuda_graph" and self.device.type != "cuda":
            raise ValueError(f"decode_step='cuda_graph' needs the model on a CUDA device, it is on {self.device}")
        self.sync_every = (1 if self.device.type == "cpu" else 8) if sync_every == "auto" else int(sync_every)
        params = inspect.signature(self.backbone.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

        eos = set(int(i) for i in eos_token_ids)
        for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
            if src is None:
                continue
            eos.update([int(src)] if isinstance(src, int) else [int(i) for i in src])
        if not eos:
            raise ValueError("the model has no EOS token id; give eos_token_ids")
        self.eos_token_ids = sorted(eos)
        self._eos_host = torch.tensor(self.eos_token_ids)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])

        self.context_length = context_length or getattr(model.config, "max_position_embeddings", None)
        # Stop strings are searched in the text of the last few tokens only.
        self._stop_window = max((len(s) for s in self.stop_strings), default=0) + 2
        self._stop_mask: torch.Tensor | None = None
        self.kv_bytes_per_token = _kv_bytes_per_token(model.config, self.dtype)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.stats = {"prefill_tokens": 0, "generated_tokens": 0, "forward_calls": 0, "graph_captures": 0}
        if check_prelogit:
            self._check_prelogit()

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def hidden_size(self) -> int:
        return int(self.lm_head.weight.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def max_prompt_tokens(self) -> int | None:
        """Longest prompt that leaves room for ``max_new_tokens`` (None: no limit)."""
        return None if not self.context_length else max(1, int(self.context_length) - self.max_new_tokens)

    @property
    def max_batch_rows(self) -> int:
        """Rows decoded together; ``auto`` is resolved on first use (after other models,
        e.g. the reward, took their share of the device)."""
        if self._max_batch_rows == "auto":
            self._max_batch_rows = self.auto_batch_rows()
        return self._max_batch_rows

    @max_batch_rows.setter
    def max_batch_rows(self, value: int | str) -> None:
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"max_batch_rows must be 'auto' or an integer >= 1, got {value!r}")
        self._max_batch_rows = value

    def auto_batch_rows(self) -> int:
        """64 on the CPU. On a GPU: the rows its free memory holds now, each row needing its
        generated tokens' KV (``max_new_tokens`` x ``kv_bytes_per_token``), logits and
        top-p buffers (24 bytes per vocabulary entry) and pre-logit noise (8 bytes per
        hidden unit and step), after a margin of 10% of the card + 2 GiB; rounded down to
        a multiple of 32, at most 512 (decoding is compute-bound beyond about 256 rows
        on H100/H200-class cards)."""
        if self.device.type != "cuda":
            return AUTO_ROWS_CPU
        free, total = torch.cuda.mem_get_info(self.device)
        vocab = int(self.lm_head.weight.shape[0])
        per_row = (self.kv_bytes_per_token * self.max_new_tokens + 24 * vocab
                   + 8 * self.hidden_size * self.max_new_tokens)
        rows = int((free - 0.1 * total - 2 * 1024**3) // per_row)
        return min(AUTO_ROWS_MAX, rows // 32 * 32) if rows >= 32 else max(1, rows)

    # ------------------------------------------------------------------ encoding
    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of the rendered prompt, before any truncation."""
        return self.tokenizer(self.render(prompt), add_special_tokens=self.add_special_tokens)["input_ids"]

    def encode(self, prompt: Prompt) -> EncodedPrompt:
        ids = self.prompt_ids(prompt)
        n = len(ids)
        limit = self.max_prompt_tokens
        if limit is not None and n > limit:
            if self.overflow == "error":
                raise PromptTooLongError(f"prompt {prompt.id!r} has {n} tokens, more than {limit}")
            return EncodedPrompt(ids=ids[n - limit :], num_tokens=n, truncated=True)
        return EncodedPrompt(ids=ids, num_tokens=n, truncated=False)

    # ------------------------------------------------------------------ forward
    def _forward(self, input_ids, mask, pos, cache) -> torch.Tensor:
        out = self.backbone(
            input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, **{self._cache_kw: cache}
        )
        self.stats["forward_calls"] += 1
        return out.last_hidden_state

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    @torch.inference_mode()
    def _check_prelogit(self) -> None:
        """Refuse models whose logits are not lm_head(final hidden state)."""
        vocab = self.model.get_input_embeddings().weight.shape[0]
        ids = torch.tensor([[self.pad_token_id, self.eos_token_ids[0], self.pad_token_id]]).clamp(max=vocab - 1)
        ids = ids.to(self.device)
        logits = self.model(input_ids=ids).logits[0, -1].float()
        mine = self.lm_head(self.backbone(input_ids=ids).last_hidden_state[0, -1]).float()
        if not torch.allclose(logits, mine, rtol=1e-3, atol=1e-3 * float(logits.abs().max())):
            raise ValueError(
                f"{type(self.model).__name__}: logits are not lm_head(final hidden state); "
                "pre-logit noise needs such a model"
            )

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Prompt]) -> Prefix:
        """Run each prompt once (left-padded batch) and keep its KV cache and z_1."""
        if not prompts:
            raise ValueError("prefill needs at least one prompt")
        encoded = [self.encode(p) for p in prompts]
        lengths = [len(e.ids) for e in encoded]
        width = max(lengths)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, width - len(e.ids) :] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, width - len(e.ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
        cache = self._new_cache()
        hidden = self._forward(ids, mask, pos, cache)
        self.stats["prefill_tokens"] += sum(lengths)
        return Prefix(
            prompts=list(prompts),
            cache=cache,
            mask=mask,
            last_hidden=hidden[:, -1].clone(),
            next_pos=mask.sum(-1),
            prompt_tokens=lengths,
        )

    def decode(
        self,
        prefix: Prefix,
        slots: Sequence[int] | torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        uniforms: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> list[Sample]:
        """Decode one row per entry of ``slots`` (the prompt index in ``prefix``).

        ============  =============  =================================================
        argument      shape          meaning
        ============  =============  =================================================
        slots         (B,)           prompt index of each row
        noise         (B, τ, d)      pre-logit noise v_t for steps t = 1..τ (greedy)
        uniforms      (B, T)         one uniform per step for top-p sampling, T >=
                                     max_new_tokens
        ============  =============  =================================================

        Without noise and uniforms the rows are decoded greedily.
        """
        slots = torch.as_tensor(slots, dtype=torch.long).cpu()
        B = int(slots.numel())
        if noise is not None and uniforms is not None:
            raise ValueError("give noise (greedy on noisy pre-logits) or uniforms (top-p sampling), not both")
        if noise is not None:
            if noise.dim() != 3 or noise.shape[0] != B or noise.shape[2] != self.hidden_size:
                raise ValueError(f"noise must have shape ({B}, tau, {self.hidden_size}), got {tuple(noise.shape)}")
        if uniforms is not None and (uniforms.shape[0] != B or uniforms.shape[1] < self.max_new_tokens):
            raise ValueError(f"uniforms must have shape ({B}, >= {self.max_new_tokens}), got {tuple(uniforms.shape)}")
        out: list[Sample] = []
        for start in range(0, B, self.max_batch_rows):
            sl = slice(start, start + self.max_batch_rows)
            out.extend(
                self._decode_chunk(
                    prefix,
                    slots[sl],
                    None if noise is None else noise[sl],
                    None if uniforms is None else uniforms[sl],
                    temperature,
                    top_p,
                )
            )
        return out

    def attention_for(self, prefix: Prefix, rows: int) -> str:
        """The attention path a decode of ``rows`` rows of ``prefix`` takes (see ``attention``)."""
        if self.attention != "auto":
            return self.attention
        return auto_attention(device_type=self.device.type, decode_step=self.decode_step, supported=self._shared_ok,
                              prompt_tokens=prefix.prompt_tokens, rows=rows, max_new_tokens=self.max_new_tokens,
                              kv_bytes_per_token=self.kv_bytes_per_token, weight_bytes=self.weight_bytes)

    def _rows(self, prefix: Prefix, slots: torch.Tensor):
        """The decode state of one chunk (see ``_CopyRows``, ``_SharedRows``, ``_StaticRows``)."""
        if self.decode_step == "eager":
            if self.attention_for(prefix, int(slots.numel())) == "copy":
                return _CopyRows(self, prefix, slots)
            return _SharedRows(self, prefix, slots)
        key = (self.decode_step, self.max_new_tokens, tuple(slots.tolist()))
        rows = prefix.decoders.get(key)
        if rows is None:  # kept on the prefix: AISP's next iterations reuse buffers and graphs
            rows = prefix.decoders[key] = _StaticRows(self, prefix, slots, graphs=self.decode_step == "cuda_graph")
        rows.reset()
        return rows

    @torch.inference_mode()
    def _decode_chunk(self, prefix, slots, noise, uniforms, temperature, top_p) -> list[Sample]:
        """Decode rows ``slots`` of ``prefix`` together.

        The batch has ``n`` slots; ``slot_row`` says which row each holds (B: none, a
        padding slot of a static bucket). Tokens go to ``gen`` (by row, on the device);
        every ``sync_every`` steps the host reads the new ones, finishes rows that ended
        and lets the decode state drop them (``rows.keep``).
        """
        dev, T = self.device, self.max_new_tokens
        B = int(slots.numel())
        rows = self._rows(prefix, slots)
        slots_d = slots.to(dev)
        z = prefix.last_hidden.index_select(0, slots_d)
        pos = prefix.next_pos.index_select(0, slots_d)
        tau = 0 if noise is None else min(int(noise.shape[1]), T)
        noise = None if noise is None else noise.to(dev)
        uniforms = None if uniforms is None else uniforms.to(dev)
        gen = torch.zeros((B + 1, T), dtype=torch.long, device=dev)  # row B: padding slots write here
        gen_host = torch.zeros((B, T), dtype=torch.long)
        slot_row = torch.arange(B)
        write_idx = src_idx = slot_row.to(dev)
        alive = torch.ones(B, dtype=torch.bool)
        results: list[Sample | None] = [None] * B
        synced = 0  # steps before this one are on the host
        for t in range(T):
            if t < tau:
                z = (z + noise[:, t].index_select(0, src_idx)).to(z.dtype)
            logits = self.lm_head(z)
            if uniforms is not None:
                tok = sample_top_p(logits, temperature, top_p, uniforms[:, t].index_select(0, src_idx))
            else:
                tok = logits.argmax(dim=-1)
            gen[:, t].index_copy_(0, write_idx, tok)
            if t + 1 < T and t + 1 - synced < self.sync_every:
                z = rows.forward(tok, pos, t)
                pos = pos + 1
                continue
            ended = self._collect(gen, gen_host, alive, synced, t, results)
            synced = t + 1
            if not alive.any():
                break
            if ended:
                live = ((slot_row < B) & alive[slot_row.clamp(max=B - 1)]).nonzero().squeeze(1)
                n = rows.keep(live, t)  # steps 0..t-1 are in the KV
                if n is not None:
                    pad = n - live.numel()
                    live_d = live.to(dev)
                    tok = torch.cat([tok.index_select(0, live_d), tok.new_full((pad,), self.pad_token_id)])
                    pos = torch.cat([pos.index_select(0, live_d), pos.new_zeros(pad)])
                    slot_row = torch.cat([slot_row[live], torch.full((pad,), B)])
                    write_idx = slot_row.to(dev)
                    src_idx = slot_row.clamp(max=B - 1).to(dev)
            z = rows.forward(tok, pos, t)
            pos = pos + 1
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ stopping
    def _collect(self, gen, gen_host, alive, start, t, results) -> bool:
        """Bring steps ``start..t`` of the live rows to the host and finish the rows that
        ended there: at an EOS id, when a stop string appears, or at the last step.
        Returns whether any row finished."""
        live = alive.nonzero().squeeze(1)
        block = gen[:, start : t + 1].index_select(0, live.to(gen.device)).cpu()  # (m, k)
        gen_host[live, start : t + 1] = block
        k = block.shape[1]
        is_eos = torch.isin(block, self._eos_host)
        end = torch.where(is_eos.any(1), is_eos.int().argmax(1), k).tolist()  # first EOS (k: none)
        reason = ["eos" if e < k else "length" for e in end]
        if self.stop_strings:
            if self._stop_mask is None:
                self._stop_mask = stop_candidates(self.tokenizer, self.stop_strings, int(self.lm_head.weight.shape[0]))
            cand = self._stop_mask[block] & (torch.arange(k) < torch.tensor(end)[:, None])
            for i, j in cand.nonzero().tolist():  # row by row, steps in order
                if reason[i] != "stop_string" and j < end[i]:
                    row, s = int(live[i]), start + j
                    if self._hits_stop(gen_host[row, max(0, s + 1 - self._stop_window) : s + 1].tolist()):
                        end[i], reason[i] = j, "stop_string"
        last = t + 1 == self.max_new_tokens
        done = [i for i in range(len(end)) if end[i] < k or last]
        ids = [gen_host[int(live[i]), : start + min(end[i], k - 1) + 1].tolist() for i in done]
        for i, sample in zip(done, self._finish(ids, [reason[i] for i in done])):
            row = int(live[i])
            results[row] = sample
            alive[row] = False
            self.stats["generated_tokens"] += sample.num_tokens
        return bool(done)

    def _hits_stop(self, ids: list[int]) -> bool:
        tail = self.tokenizer.decode(ids[-self._stop_window :], skip_special_tokens=True)
        return any(s in tail for s in self.stop_strings)

    def _finish(self, rows: list[list[int]], reasons: list[str]) -> list[Sample]:
        if not rows:
            return []
        if hasattr(self.tokenizer, "batch_decode"):
            texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        else:
            texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows]
        out = []
        for ids, text, reason in zip(rows, texts, reasons):
            if self.stop_strings:
                cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
            out.append(Sample(token_ids=ids, text=text.strip(), finish_reason=reason))  # type: ignore[arg-type]
        return out


class _CopyRows:
    """``attention="copy"``: the prompt cache copied to each row (a ``DynamicCache``) and
    the model's own attention; finished rows are dropped at once."""

    def __init__(self, engine: Engine, prefix: Prefix, slots: torch.Tensor) -> None:
        slots_d = slots.to(engine.device)
        self.engine = engine
        self.cache = copy.deepcopy(prefix.cache)
        self.cache.batch_select_indices(slots_d)
        self.mask = prefix.mask.index_select(0, slots_d)

    def forward(self, tok: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self.engine._forward(tok.unsqueeze(-1), self.mask, pos.unsqueeze(-1), self.cache)[:, -1]

    def keep(self, live: torch.Tensor, filled: int) -> int:
        live_d = live.to(self.mask.device)
        self.cache.batch_select_indices(live_d)
        self.mask = self.mask.index_select(0, live_d)
        return int(live.numel())


class _SharedRows:
    """Shared-prefix attention, eager: one KV copy per prompt (of the prompts present),
    each row's generated KV in a preallocated buffer; finished rows are dropped at once."""

    def __init__(self, engine: Engine, prefix: Prefix, slots: torch.Tensor) -> None:
        present, self.local = torch.unique(slots, return_inverse=True)
        present_d = present.to(engine.device)
        self.engine = engine
        self.P = int(present.numel())
        self.k, self.v = shared_prefix.prompt_kv(prefix.cache, present_d)
        self.bias = shared_prefix.padding_bias(prefix.mask.index_select(0, present_d), engine.dtype)
        self.cache = shared_prefix.RowKV(len(self.k), engine.max_new_tokens)
        self._layout()

    def _layout(self) -> None:
        row_of_slot, slot_of_row, R = shared_prefix.group_rows(self.local, self.P)
        dev = self.engine.device
        self.state = shared_prefix.RowState(self.k, self.v, row_of_slot.to(dev), slot_of_row.to(dev), R)
        self.bias_rows = self.bias.index_select(0, self.local.to(dev))

    def forward(self, tok: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        B = tok.shape[0]
        self.state.row_bias = torch.cat([self.bias_rows, self.bias_rows.new_zeros((B, 1, 1, t + 1))], dim=-1)
        with shared_prefix.active(self.engine.model.config, self.state, shared_prefix.ROWS_ATTN_NAME):
            return self.engine._forward(tok.unsqueeze(-1), None, pos.unsqueeze(-1), self.cache)[:, -1]

    def keep(self, live: torch.Tensor, filled: int) -> int:
        self.cache.keep(live.to(self.engine.device), filled)
        self.local = self.local[live]
        self._layout()
        return int(live.numel())


class _StaticRows:
    """Shared-prefix attention on static shapes, for CUDA graphs.

    All inputs of a step live in buffers allocated once per chunk layout (tokens,
    positions, the step index, the row layout, the per-row KV for all T steps). The
    batch has a bucket size n: the chunk's row count at first, then, once enough rows
    finished, the next smaller size of ``BUCKETS`` that holds the live rows (moved to
    the front; the slots behind them are padding that decodes garbage, never read). The
    generated keys are read in spans of ``SPAN`` positions (the unwritten ones masked).
    One step per (bucket, span) is what a CUDA graph captures (``graphs``); replays only
    need the buffers refilled. The object is kept on the prefix, so later decode calls of the
    same rows (AISP's iterations, BoN's chunks) reuse buffers and graphs.
    """

    def __init__(self, engine: Engine, prefix: Prefix, slots: torch.Tensor, graphs: bool) -> None:
        dev, T = engine.device, engine.max_new_tokens
        present, self.local0 = torch.unique(slots, return_inverse=True)
        present_d = present.to(dev)
        self.engine, self.graphs = engine, graphs
        self.P, self.B0 = int(present.numel()), int(slots.numel())
        k, v = shared_prefix.prompt_kv(prefix.cache, present_d)
        self.bias = shared_prefix.padding_bias(prefix.mask.index_select(0, present_d), engine.dtype)
        self.R = shared_prefix.group_rows(self.local0, self.P)[2]
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.tok = torch.full((self.B0,), engine.pad_token_id, dtype=torch.long, device=dev)
        self.pos = torch.zeros(self.B0, dtype=torch.long, device=dev)
        self.row_of_slot = torch.zeros(self.P * self.R, dtype=torch.long, device=dev)
        self.slot_of_row = torch.zeros(self.B0, dtype=torch.long, device=dev)
        self.bias_rows = self.bias.index_select(0, self.local0.to(dev))
        self.steps = torch.arange(T, device=dev)
        self.suffix_zeros = torch.zeros(T, dtype=engine.dtype, device=dev)
        self.cache = shared_prefix.RowKV(len(k), T, step=self.step)
        self.k, self.v = k, v
        self.captured: dict[tuple[int, int], tuple] = {}
        self.reset()

    def reset(self) -> None:
        """Back to all of the chunk's rows (start of a decode call)."""
        self.n = self.B0
        self._layout(self.local0)

    def _layout(self, local: torch.Tensor) -> None:
        row_of_slot, slot_of_row, _ = shared_prefix.group_rows(local, self.P, self.R)
        m = int(local.numel())
        self.row_of_slot.copy_(row_of_slot)
        self.slot_of_row.zero_()
        self.slot_of_row[:m] = slot_of_row.to(self.slot_of_row.device)
        self.bias_rows[:m] = self.bias.index_select(0, local.to(self.bias.device))
        self.local = local

    def _step(self, n: int, span: int) -> torch.Tensor:
        """One decode step of the first n slots from the buffers, attending to the first
        ``span`` generated positions (those after ``step`` masked): z (n, d)."""
        suffix = self.suffix_zeros[:span].masked_fill(self.steps[:span] > self.step, float("-inf"))
        state = shared_prefix.RowState(self.k, self.v, self.row_of_slot, self.slot_of_row[:n], self.R)
        state.row_bias = torch.cat([self.bias_rows[:n], suffix.expand(n, 1, 1, -1)], dim=-1)
        self.cache.span = span
        with shared_prefix.active(self.engine.model.config, state, shared_prefix.ROWS_ATTN_NAME):
            return self.engine._forward(self.tok[:n, None], None, self.pos[:n, None], self.cache)[:, -1]

    def _capture(self, n: int, span: int) -> tuple:
        dev = self.engine.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: the KV buffers and library handles exist before capture
            for _ in range(2):
                self._step(n, span)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._step(n, span)
        self.engine.stats["graph_captures"] += 1
        self.captured[n, span] = (graph, out)
        return self.captured[n, span]

    def forward(self, tok: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        n, span = self.n, min(self.engine.max_new_tokens, (t // SPAN + 1) * SPAN)
        self.tok[:n].copy_(tok)
        self.pos[:n].copy_(pos)
        self.step.fill_(t)
        if not self.graphs:
            return self._step(n, span)
        graph, out = self.captured.get((n, span)) or self._capture(n, span)
        graph.replay()
        self.engine.stats["forward_calls"] += 1
        return out

    def keep(self, live: torch.Tensor, filled: int) -> int | None:
        """Move the live slots to the front of the smallest bucket that holds them, if
        that is smaller than the current one; else keep the layout (returns None)."""
        m = int(live.numel())
        smaller = [b for b in BUCKETS if m <= b < self.n]
        if not smaller:
            return None
        self.cache.keep(live.to(self.step.device), filled)
        self._layout(self.local[live])
        self.n = min(smaller)
        return self.n
