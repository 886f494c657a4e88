"""The ``Engine``: prefill prompts once, decode many rows of them (see the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from aisp_bench.engine.attention import cache_keyword
from aisp_bench.engine.decoding import Decoding
from aisp_bench.engine.padding import pad
from aisp_bench.engine.stopping import StopRules
from aisp_bench.engine.tuning import auto_batch_rows, choose, kv_bytes_per_token
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
    # static decode steps (buffers, CUDA graphs) by chunk layout, reused by later decodes (``engine.steps``)
    static_steps: dict = field(default_factory=dict, repr=False)
    # (present prompts, k, v, bias): the last prompt KV laid out for shared-prefix attention
    prompt_kv: tuple | None = field(default=None, repr=False)


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

    Option values are checked where the config is (``validate.RULES``: ``generation.*``,
    ``engine.*``); here only what depends on the model and device.

    Args:
        model, tokenizer: a ``transformers`` causal LM (``model.get_decoder()`` gives the
            backbone, ``model.get_output_embeddings()`` the ``lm_head``) and its tokenizer.
        render: callable turning a ``Prompt`` into the text the model is fed.
        max_new_tokens: decoding stops a row after this many tokens.
        max_batch_rows: rows decoded together at most; more are decoded in chunks.
            ``auto``: resolved when first used (``engine.tuning.auto_batch_rows``).
        stop_strings: a row ends when its text contains one; the text is cut before it.
        eos_token_ids: extra ids that end a row, beside the model's own EOS ids.
        add_special_tokens: passed to the tokenizer when encoding rendered prompts.
        context_length: prompts longer than ``context_length - max_new_tokens`` tokens
            are truncated from the left (``overflow="truncate_left"``) or refused with
            ``PromptTooLongError`` (``"error"``); default: the model's
            ``max_position_embeddings`` (None: no limit).
        attention, decode_step, sync_every: how it decodes, never what (the same tokens in
            fp32): ``auto`` takes what ``engine.tuning`` says was measured fastest on this
            model and device; benchmarks set them (the configs' ``engine:`` block).
    """

    def __init__(self, model, tokenizer, render=None, *, max_new_tokens: int = 128, max_batch_rows: int | str = 64,
                 stop_strings: Sequence[str] = (), eos_token_ids: Sequence[int] = (), add_special_tokens: bool = False,
                 context_length: int | None = None, overflow: str = "truncate_left", check_prelogit: bool = True,
                 attention: str = "auto", decode_step: str = "auto", sync_every: int | str = "auto") -> None:
        self.model = model.eval()
        self._max_batch_rows = max_batch_rows
        self.tokenizer = tokenizer
        self.render = render or (lambda p: p.text)
        self.max_new_tokens = int(max_new_tokens)
        self.add_special_tokens = add_special_tokens
        self.overflow = overflow
        self.backbone = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.device, self.dtype = self.lm_head.weight.device, self.lm_head.weight.dtype
        self.hidden_size = int(self.lm_head.weight.shape[1])
        tuning = choose(model, self.device, attention=attention, decode_step=decode_step, sync_every=sync_every)
        self.attention, self.decode_step, self.sync_every = tuning.attention, tuning.decode_step, tuning.sync_every
        self._cache_kw = cache_keyword(self.backbone)
        self.eos_token_ids = eos_ids(model, tokenizer, eos_token_ids)
        pad_id = tokenizer.pad_token_id
        self.pad_token_id = int(pad_id if pad_id is not None else self.eos_token_ids[0])
        self.stops = StopRules(tokenizer, stop_strings, self.eos_token_ids, int(self.lm_head.weight.shape[0]))
        self.context_length = context_length or getattr(model.config, "max_position_embeddings", None)
        self.kv_bytes_per_token = kv_bytes_per_token(model.config, self.dtype)
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
        ids, mask, pos = pad(encoded, self.pad_token_id, "left", self.device)
        cache = DynamicCache(config=self.model.config)
        hidden = self.backbone_forward(ids, mask, pos, cache)
        self.stats["prefill_tokens"] += sum(len(e) for e in encoded)
        return Prefix(prompts=list(prompts), cache=cache, mask=mask, last_hidden=hidden[:, -1].clone(),
                      next_pos=mask.sum(-1), prompt_tokens=[len(e) for e in encoded])

    def decode(self, prefix: Prefix, prompt_of_row: Sequence[int] | torch.Tensor, *, noise: torch.Tensor | None = None,
               uniforms: torch.Tensor | None = None, temperature: float = 1.0, top_p: float = 1.0) -> list[Sample]:
        """Decode one row per entry of ``prompt_of_row`` (its prompt's index in ``prefix``).

        =============  =============  =================================================
        argument       shape          meaning
        =============  =============  =================================================
        prompt_of_row  (B,)           the prompt of each row
        noise          (B, τ, d)      pre-logit noise v_t for steps t = 1..τ (greedy)
        uniforms       (B, T)         one uniform per step for top-p sampling, T >=
                                      max_new_tokens
        =============  =============  =================================================

        Without noise and uniforms the rows are decoded greedily. Rows are decoded in
        chunks of ``max_batch_rows`` (``engine.chunk``), one after another.
        """
        prompt_of_row = torch.as_tensor(prompt_of_row, dtype=torch.long).cpu()
        B = int(prompt_of_row.numel())
        if noise is not None and uniforms is not None:
            raise ValueError("give noise (greedy on noisy pre-logits) or uniforms (top-p sampling), not both")
        if noise is not None:
            if noise.dim() != 3 or noise.shape[0] != B or noise.shape[2] != self.hidden_size:
                raise ValueError(f"noise must have shape ({B}, tau, {self.hidden_size}), got {tuple(noise.shape)}")
        if uniforms is not None and (uniforms.shape[0] != B or uniforms.shape[1] < self.max_new_tokens):
            raise ValueError(f"uniforms must have shape ({B}, >= {self.max_new_tokens}), got {tuple(uniforms.shape)}")
        out: list[Sample] = []
        for start in range(0, B, self.max_batch_rows):  # a chunk at a time, from its first step to its last
            sl = slice(start, start + self.max_batch_rows)
            chunk = Decoding(self, prefix, prompt_of_row[sl])
            chunk.run(self.max_new_tokens, noise=None if noise is None else noise[sl],
                      uniforms=None if uniforms is None else uniforms[sl], temperature=temperature, top_p=top_p)
            out += chunk.responses()
        return out

    def start(self, prefix: Prefix, prompt_of_row: Sequence[int] | torch.Tensor) -> Decoding:
        """A decode of one row per entry of ``prompt_of_row`` that pauses between segments:
        ``run`` a segment, read ``responses``, ``select`` rows, run on (``engine.decoding``)."""
        return Decoding(self, prefix, prompt_of_row)
