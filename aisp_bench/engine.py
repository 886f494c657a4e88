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
  per-row buffer of generated tokens (no per-step concatenation). Models that this
  attention does not cover exactly use ``attention="copy"``: the prompt cache copied to
  each row in a ``DynamicCache`` (still one prefill);
* rows that finish (EOS, a stop string, ``max_new_tokens``) leave the batch at once: the
  cache and every per-row tensor are compacted so finished rows cost nothing more;
* rows beyond ``max_batch_rows`` are decoded in successive chunks.

Randomness never comes from here: callers pass noise and uniforms drawn from generators
seeded per (run seed, prompt id, iteration, row), so results do not depend on batching.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aisp_bench import shared_prefix
from aisp_bench.types import Prompt, Sample


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


class Engine:
    """Batched decoding with a shared prompt KV cache and pre-logit noise.

    Args:
        model: a ``transformers`` causal LM (``model.get_decoder()`` gives the backbone,
            ``model.get_output_embeddings()`` the ``lm_head``).
        tokenizer: its tokenizer.
        render: callable turning a ``Prompt`` into the text the model is fed.
        max_new_tokens: decoding stops a row after this many tokens.
        max_batch_rows: rows decoded together at most; more are decoded in chunks.
        stop_strings: a row ends when its text contains one; the text is cut before it.
        eos_token_ids: extra ids that end a row, beside the model's own EOS ids.
        add_special_tokens: passed to the tokenizer when encoding rendered prompts.
        context_length: prompts longer than ``context_length - max_new_tokens`` tokens
            are truncated from the left (``overflow="truncate_left"``) or refused with
            ``PromptTooLongError`` (``"error"``); default: the model's
            ``max_position_embeddings`` (None: no limit).
        attention: ``auto`` (shared-prefix attention where the model supports it, else
            ``copy``), ``shared_prefix`` or ``copy``.
    """

    def __init__(
        self,
        model,
        tokenizer,
        render=None,
        *,
        max_new_tokens: int = 128,
        max_batch_rows: int = 64,
        stop_strings: Sequence[str] = (),
        eos_token_ids: Sequence[int] = (),
        add_special_tokens: bool = False,
        context_length: int | None = None,
        overflow: str = "truncate_left",
        check_prelogit: bool = True,
        attention: str = "auto",
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        if overflow not in ("truncate_left", "error"):
            raise ValueError(f"overflow must be 'truncate_left' or 'error', got {overflow!r}")
        if attention not in ("auto", "shared_prefix", "copy"):
            raise ValueError(f"attention must be 'auto', 'shared_prefix' or 'copy', got {attention!r}")
        self.model = model.eval()
        ok = shared_prefix.supported(model.config)
        if attention == "shared_prefix" and not ok:
            raise ValueError(f"shared-prefix attention does not support model type {model.config.model_type!r}")
        if attention == "auto":
            attention = "shared_prefix" if ok else "copy"
        self.attention = attention
        self.tokenizer = tokenizer
        self.render = render or (lambda p: p.text)
        self.max_new_tokens = int(max_new_tokens)
        self.max_batch_rows = int(max_batch_rows)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.add_special_tokens = add_special_tokens
        self.overflow = overflow
        self.backbone = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
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
        self._eos = torch.tensor(self.eos_token_ids, device=self.device)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])

        self.context_length = context_length or getattr(model.config, "max_position_embeddings", None)
        # Stop strings are searched in the text of the last few tokens only.
        self._stop_window = max((len(s) for s in self.stop_strings), default=0) + 2
        self.stats = {"prefill_tokens": 0, "generated_tokens": 0, "forward_calls": 0}
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
        ids = torch.tensor([[self.pad_token_id, self.eos_token_ids[0], self.pad_token_id]], device=self.device)
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
        slots = torch.as_tensor(slots, dtype=torch.long)
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

    @torch.inference_mode()
    def _decode_chunk(self, prefix, slots, noise, uniforms, temperature, top_p) -> list[Sample]:
        dev = self.device
        B = int(slots.numel())
        slots_d = slots.to(dev)
        shared = self.attention == "shared_prefix"
        if shared:
            cache = shared_prefix.SuffixKV(len(prefix.cache.layers), self.max_new_tokens)
            state = shared_prefix.DecodeState.build(prefix.cache, prefix.mask, slots_d)
        else:
            cache = copy.deepcopy(prefix.cache)
            cache.batch_select_indices(slots_d)
        mask = None if shared else prefix.mask.index_select(0, slots_d)
        pos = prefix.next_pos.index_select(0, slots_d).clone()
        z = prefix.last_hidden.index_select(0, slots_d)
        if noise is not None:
            noise = noise.to(dev)
            tau = noise.shape[1]
        if uniforms is not None:
            uniforms = uniforms.to(dev)
        active = torch.arange(B, device=dev)  # original row index of each live row
        tokens: list[list[int]] = [[] for _ in range(B)]
        results: list[Sample | None] = [None] * B
        for t in range(self.max_new_tokens):
            if noise is not None and t < tau:
                z = (z.float() + noise[active, t]).to(z.dtype)
            logits = self.lm_head(z)
            if uniforms is not None:
                tok = sample_top_p(logits, temperature, top_p, uniforms[active, t])
            else:
                tok = logits.argmax(dim=-1)
            is_eos = torch.isin(tok, self._eos)
            tok_list, eos_list, act_list = tok.tolist(), is_eos.tolist(), active.tolist()
            done = []
            for j, (row, tk, e) in enumerate(zip(act_list, tok_list, eos_list)):
                tokens[row].append(tk)
                if e:
                    results[row] = self._finish(tokens[row], "eos")
                elif self.stop_strings and self._hits_stop(tokens[row]):
                    results[row] = self._finish(tokens[row], "stop_string")
                elif t + 1 == self.max_new_tokens:
                    results[row] = self._finish(tokens[row], "length")
                else:
                    continue
                done.append(j)
            self.stats["generated_tokens"] += len(act_list)
            if len(done) == len(act_list):
                break
            if done:
                keep = torch.tensor(sorted(set(range(len(act_list))) - set(done)), device=dev)
                pos, tok, active = pos[keep], tok[keep], active[keep]
                if shared:
                    cache.select(keep)
                    state.set_rows(slots_d[active])
                else:
                    cache.batch_select_indices(keep)
                    mask = mask[keep]
            if shared:
                with shared_prefix.active(self.model.config, state):
                    z = self._forward(tok.unsqueeze(-1), None, pos.unsqueeze(-1), cache)[:, -1]
            else:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                z = self._forward(tok.unsqueeze(-1), mask, pos.unsqueeze(-1), cache)[:, -1]
            pos = pos + 1
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ stopping
    def _hits_stop(self, ids: list[int]) -> bool:
        tail = self.tokenizer.decode(ids[-self._stop_window :], skip_special_tokens=True)
        return any(s in tail for s in self.stop_strings)

    def _finish(self, ids: list[int], reason: str) -> Sample:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if self.stop_strings:
            cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
        return Sample(token_ids=list(ids), text=text.strip(), finish_reason=reason)  # type: ignore[arg-type]
