"""The ``Engine``: prefill once, decode many rows (see the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from aisp_bench import shared_prefix
from aisp_bench.engine.rows import CopyRows, SharedRows, StaticRows
from aisp_bench.engine.sampling import sample_top_p
from aisp_bench.engine.scoring import response_logprobs
from aisp_bench.engine.sizing import auto_attention, auto_batch_rows, kv_bytes_per_token
from aisp_bench.engine.stopping import StopRules
from aisp_bench.types import Prompt, Sample


class PromptTooLongError(ValueError):
    pass


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
    # (present prompts, k, v, bias): the last prompt KV laid out for shared-prefix attention
    layout: tuple | None = field(default=None, repr=False)


def eos_ids(model, tokenizer, extra: Sequence[int] = ()) -> list[int]:
    """The ids that end a row: ``extra``, the generation config's and the tokenizer's EOS."""
    eos = set(int(i) for i in extra)
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is not None:
            eos.update([int(src)] if isinstance(src, int) else [int(i) for i in src])
    if not eos:
        raise ValueError("the model has no EOS token id; give eos_token_ids")
    return sorted(eos)


class Engine:
    """Batched decoding with a shared prompt KV cache and pre-logit noise.

    Option values are checked where the config is (``validate.RULES``, ``generation.*``);
    here only what depends on the model and device.

    Args:
        model, tokenizer: a ``transformers`` causal LM (``model.get_decoder()`` gives the
            backbone, ``model.get_output_embeddings()`` the ``lm_head``) and its tokenizer.
        render: callable turning a ``Prompt`` into the text the model is fed.
        max_new_tokens: decoding stops a row after this many tokens.
        max_batch_rows: rows decoded together at most; more are decoded in chunks.
            ``auto``: resolved when first used (``engine.sizing.auto_batch_rows``).
        stop_strings: a row ends when its text contains one; the text is cut before it.
        eos_token_ids: extra ids that end a row, beside the model's own EOS ids.
        add_special_tokens: passed to the tokenizer when encoding rendered prompts.
        context_length: prompts longer than ``context_length - max_new_tokens`` tokens
            are truncated from the left (``overflow="truncate_left"``) or refused with
            ``PromptTooLongError`` (``"error"``); default: the model's
            ``max_position_embeddings`` (None: no limit).
        attention: ``shared_prefix`` (one prompt KV per prompt, per-row buffers for the
            generated tokens), ``copy`` (the prompt cache copied to each row, the model's
            own attention) or ``auto``: chosen per decode call (``engine.sizing.auto_attention``).
        decode_step: ``eager`` (the model's forward on shapes that shrink as rows finish),
            ``static`` (shared-prefix attention on preallocated buffers: fixed shapes per
            batch-size bucket, rows padded up to the bucket after rows finish),
            ``cuda_graph`` (the static step captured once per bucket in a CUDA graph and
            replayed; CUDA only) or ``auto``: ``cuda_graph`` on one CUDA device where
            shared-prefix attention supports the model and ``attention`` is not ``copy``
            (the methods end to end 1.0-1.8x faster than eager on an H100: BENCHMARKS.md), else
            ``eager``. All give the same tokens in fp32.
        sync_every: the host looks at the generated tokens (EOS, stop strings) and drops
            finished rows every this many steps; in between the device runs ahead (rows
            that ended early decode a few wasted steps, their output unchanged). ``auto``:
            1 on the CPU, 8 on a GPU.
    """

    def __init__(self, model, tokenizer, render=None, *, max_new_tokens: int = 128, max_batch_rows: int | str = 64,
                 stop_strings: Sequence[str] = (), eos_token_ids: Sequence[int] = (), add_special_tokens: bool = False,
                 context_length: int | None = None, overflow: str = "truncate_left", check_prelogit: bool = True,
                 attention: str = "auto", decode_step: str = "auto", sync_every: int | str = "auto") -> None:
        self.model = model.eval()
        self._max_batch_rows = max_batch_rows
        self._shared_ok = shared_prefix.supported(model.config)
        if decode_step == "auto":
            devices = {p.device for p in model.parameters()}  # one CUDA device: graphs do not span devices
            one_gpu = len(devices) == 1 and next(iter(devices)).type == "cuda"
            decode_step = "cuda_graph" if one_gpu and self._shared_ok and attention != "copy" else "eager"
        if attention == "shared_prefix" and not self._shared_ok:
            raise ValueError(f"shared-prefix attention does not support model type {model.config.model_type!r}")
        if decode_step != "eager" and (attention == "copy" or not self._shared_ok):
            raise ValueError(f"decode_step={decode_step!r} needs shared-prefix attention (model type "
                             f"{model.config.model_type!r}, attention={attention!r}); use decode_step='eager'")
        self.attention, self.decode_step = attention, decode_step
        self.tokenizer = tokenizer
        self.render = render or (lambda p: p.text)
        self.max_new_tokens = int(max_new_tokens)
        self.add_special_tokens = add_special_tokens
        self.overflow = overflow
        self.backbone = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.device, self.dtype = self.lm_head.weight.device, self.lm_head.weight.dtype
        self.hidden_size = int(self.lm_head.weight.shape[1])
        if decode_step == "cuda_graph" and self.device.type != "cuda":
            raise ValueError(f"decode_step='cuda_graph' needs the model on a CUDA device, it is on {self.device}")
        self.sync_every = (1 if self.device.type == "cpu" else 8) if sync_every == "auto" else int(sync_every)
        self._cache_kw = shared_prefix.cache_keyword(self.backbone)
        self.eos_token_ids = eos_ids(model, tokenizer, eos_token_ids)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        self.stops = StopRules(tokenizer, stop_strings, self.eos_token_ids, int(self.lm_head.weight.shape[0]))
        self.context_length = context_length or getattr(model.config, "max_position_embeddings", None)
        self.kv_bytes_per_token = kv_bytes_per_token(model.config, self.dtype)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.stats = {"prefill_tokens": 0, "generated_tokens": 0, "forward_calls": 0, "graph_captures": 0}
        if check_prelogit:
            self._check_prelogit()

    # ------------------------------------------------------------------ properties
    @property
    def max_prompt_tokens(self) -> int | None:
        """Longest prompt that leaves room for ``max_new_tokens`` (None: no limit)."""
        return None if not self.context_length else max(1, int(self.context_length) - self.max_new_tokens)

    @property
    def max_batch_rows(self) -> int:
        """Rows decoded together; ``auto`` is resolved on first use (after other models,
        e.g. the reward, took their share of the device)."""
        if self._max_batch_rows == "auto":
            self._max_batch_rows = auto_batch_rows(self.device, max_new_tokens=self.max_new_tokens,
                                                   kv_bytes_per_token=self.kv_bytes_per_token,
                                                   vocab_size=int(self.lm_head.weight.shape[0]),
                                                   hidden_size=self.hidden_size)
        return self._max_batch_rows

    # ------------------------------------------------------------------ encoding
    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of the rendered prompt, before any truncation."""
        return self.tokenizer(self.render(prompt), add_special_tokens=self.add_special_tokens)["input_ids"]

    def encode(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids, truncated from the left to ``max_prompt_tokens`` (or refused)."""
        ids, limit = self.prompt_ids(prompt), self.max_prompt_tokens
        if limit is not None and len(ids) > limit:
            if self.overflow == "error":
                raise PromptTooLongError(f"prompt {prompt.id!r} has {len(ids)} tokens, more than {limit}")
            return ids[len(ids) - limit :]
        return ids

    # ------------------------------------------------------------------ forward
    def backbone_forward(self, input_ids, mask, pos, cache) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                            **{self._cache_kw: cache})
        self.stats["forward_calls"] += 1
        return out.last_hidden_state

    @torch.inference_mode()
    def _check_prelogit(self) -> None:
        """Refuse models whose logits are not lm_head(final hidden state)."""
        vocab = self.model.get_input_embeddings().weight.shape[0]
        ids = torch.tensor([[self.pad_token_id, self.eos_token_ids[0], self.pad_token_id]]).clamp(max=vocab - 1)
        ids = ids.to(self.device)
        logits = self.model(input_ids=ids).logits[0, -1].float()
        mine = self.lm_head(self.backbone(input_ids=ids).last_hidden_state[0, -1]).float()
        if not torch.allclose(logits, mine, rtol=1e-3, atol=1e-3 * float(logits.abs().max())):
            raise ValueError(f"{type(self.model).__name__}: logits are not lm_head(final hidden state); "
                             "pre-logit noise needs such a model")

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Prompt]) -> Prefix:
        """Run each prompt once (left-padded batch) and keep its KV cache and z_1."""
        if not prompts:
            raise ValueError("prefill needs at least one prompt")
        encoded = [self.encode(p) for p in prompts]
        lengths = [len(e) for e in encoded]
        width = max(lengths)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, width - len(e) :] = torch.tensor(e, dtype=torch.long)
            mask[i, width - len(e) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
        cache = DynamicCache(config=self.model.config)
        hidden = self.backbone_forward(ids, mask, pos, cache)
        self.stats["prefill_tokens"] += sum(lengths)
        return Prefix(prompts=list(prompts), cache=cache, mask=mask, last_hidden=hidden[:, -1].clone(),
                      next_pos=mask.sum(-1), prompt_tokens=lengths)

    def decode(self, prefix: Prefix, slots: Sequence[int] | torch.Tensor, *, noise: torch.Tensor | None = None,
               uniforms: torch.Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0) -> list[Sample]:
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
            noise_sl, uniforms_sl = (None if x is None else x[sl] for x in (noise, uniforms))
            out += self._decode_chunk(prefix, slots[sl], noise_sl, uniforms_sl, temperature, top_p)
        return out

    response_logprobs = response_logprobs  # log p of given responses under the noise-free policy (engine.scoring)

    def attention_for(self, prefix: Prefix, rows: int) -> str:
        """The attention path a decode of ``rows`` rows of ``prefix`` takes (see ``attention``)."""
        if self.attention != "auto":
            return self.attention
        return auto_attention(device_type=self.device.type, decode_step=self.decode_step, supported=self._shared_ok,
                              prompt_tokens=prefix.prompt_tokens, rows=rows, max_new_tokens=self.max_new_tokens,
                              kv_bytes_per_token=self.kv_bytes_per_token, weight_bytes=self.weight_bytes)

    def _rows(self, prefix: Prefix, slots: torch.Tensor):
        """The decode state of one chunk (``engine.rows``: ``CopyRows``, ``SharedRows``, ``StaticRows``)."""
        if self.decode_step == "eager":
            if self.attention_for(prefix, int(slots.numel())) == "copy":
                return CopyRows(self, prefix, slots)
            return SharedRows(self, prefix, slots)
        key = (self.decode_step, self.max_new_tokens, tuple(slots.tolist()))
        rows = prefix.decoders.get(key)
        if rows is None:  # kept on the prefix: AISP's next iterations reuse buffers and graphs
            rows = prefix.decoders[key] = StaticRows(self, prefix, slots, graphs=self.decode_step == "cuda_graph")
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
            finished = self.stops.collect(gen, gen_host, alive, synced, t, last=t + 1 == T)
            for row, sample in finished:
                results[row] = sample
                self.stats["generated_tokens"] += sample.num_tokens
            synced = t + 1
            if not alive.any():
                break
            if finished:
                tok, pos, slot_row = self._drop_finished(rows, alive, tok, pos, slot_row, t)
                write_idx, src_idx = slot_row.to(dev), slot_row.clamp(max=B - 1).to(dev)
            z = rows.forward(tok, pos, t)
            pos = pos + 1
        return results  # type: ignore[return-value]

    def _drop_finished(self, rows, alive, tok, pos, slot_row, t):
        """Let the decode state drop finished rows (steps 0..t-1 are in its KV); returns
        (tok, pos, slot_row) of the new batch, padding slots (row B) at the end."""
        B = alive.numel()
        live = ((slot_row < B) & alive[slot_row.clamp(max=B - 1)]).nonzero().squeeze(1)
        n = rows.keep(live, t)
        if n is None:  # the layout stays (a static bucket)
            return tok, pos, slot_row
        pad, live_d = n - live.numel(), live.to(tok.device)
        tok = torch.cat([tok.index_select(0, live_d), tok.new_full((pad,), self.pad_token_id)])
        pos = torch.cat([pos.index_select(0, live_d), pos.new_zeros(pad)])
        return tok, pos, torch.cat([slot_row[live], torch.full((pad,), B)])

