"""A small instruct LM as a Yes/No judge: the offline default reward.

r(x, y) = log P("Yes") - log P("No") for the judge's next token after a fixed question
about the response ("Is this response helpful, polite and correct? Answer Yes or No.").
Only the two logits are needed (the softmax normaliser cancels), so the full vocabulary
projection is skipped.

What it measures, and its limits (SmolLM2-135M-Instruct, the offline default; numbers in
docs/models.md): it follows the question well enough to rank a relevant, polite answer
above an empty, rude or off-topic one (18 of 20 hand-written pairs, margins 0.15-2.3
nats), but it does not check facts and it can prefer fluent-looking gibberish to a
short answer (both misses were gibberish). It is a stand-in that lets the pipeline run
end to end on a CPU, not a substitute for UltraRM or Eurus-RM.

Batching: the judge text starts with the instruction and the conversation and ends with
the response, so rows that share a prompt share a long token prefix. Each batch runs its
longest common prefix once, repeats that KV cache across the rows, and runs only the
rest (``share_prefix``). Rows are sorted by prompt, then length, so a batch usually holds
one prompt's samples (AISP scores n samples of one prompt at a time).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch

from aisp_bench.models.loading import gguf_safetensors_cache, package_file, resolve_device, resolve_dtype
from aisp_bench.rewards.base import (
    REWARDS,
    RewardModel,
    check_local_path,
    load_error,
    model_device,
    pad_batch,
    truncate_keep_end,
)
from aisp_bench.types import Message, Prompt

log = logging.getLogger(__name__)

_MARK = "\x00CONVERSATION\x00"


@REWARDS.register("lm_judge")
class LMJudgeReward(RewardModel):
    """Score = log P(yes) - log P(no) of a causal LM asked a fixed question.

    Args:
        name: short name used in run folder names.
        judge_prompt: the user message the judge reads, with ``{conversation}`` and
            ``{response}`` slots. Put the fixed question first: the text before
            ``{conversation}`` is shared by every row (and kept when truncating).
        conversation_format: renders the prompt's turns into ``{conversation}``
            (a ``TranscriptFormat``).
        judge_format: wraps the judge prompt for the judge model (its chat template,
            ``ChatTemplateFormat``, or a ``TranscriptFormat``); rendered for generation.
        yes_answer, no_answer: the answer words; each must be one token of the judge's
            vocabulary. (Not ``yes``/``no``: YAML reads those keys as booleans.)
        package, gguf_file: a GGUF checkpoint inside a pip package (the offline SmolLM2);
            or ``name_or_path``: a ``transformers`` causal LM (hub id or folder).
        revision: hub revision to pin (``name_or_path`` only).
        batch_size: rows per forward pass.
        max_length: tokens; longer inputs lose tokens right after the shared instruction
            (the start of the conversation first), keeping the response's end.
        share_prefix: run each batch's common token prefix once and reuse its KV cache.
        add_special_tokens: ``null``: add BOS unless the rendered text starts with it.
        device, dtype: where the judge runs (may differ from the policy's device).
    """

    def __init__(
        self,
        name: str,
        judge_prompt: str,
        conversation_format,
        judge_format,
        yes_answer: str = "Yes",
        no_answer: str = "No",
        package: str | None = None,
        gguf_file: str | None = None,
        name_or_path: str | None = None,
        revision: str | None = None,
        batch_size: int = 32,
        max_length: int | None = 1024,
        share_prefix: bool = True,
        add_special_tokens: bool | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        for slot in ("{conversation}", "{response}"):
            if slot not in judge_prompt:
                raise ValueError(f"judge_prompt of reward {name!r} has no {slot} slot")
        if (package is None) == (name_or_path is None) or (package is None) != (gguf_file is None):
            raise ValueError(f"reward {name!r}: give either package and gguf_file, or name_or_path")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        self.name = name
        self.judge_prompt = judge_prompt
        self.conversation_format = conversation_format
        self.judge_format = judge_format
        self.yes_answer, self.no_answer = yes_answer, no_answer
        self.package, self.gguf_file = package, gguf_file
        self.name_or_path = name_or_path
        self.revision = revision
        self.batch_size = int(batch_size)
        self.max_length = None if max_length is None else int(max_length)
        self.share_prefix = bool(share_prefix)
        self.add_special_tokens = add_special_tokens
        self.device = device
        self.dtype = dtype
        self.model = None
        self.tokenizer = None
        self.stats = {"rows": 0, "prefix_tokens_saved": 0}

    # ------------------------------------------------------------------ loading
    def attach(self, model, tokenizer) -> LMJudgeReward:
        """Use an already loaded causal LM and tokenizer (e.g. the policy's own SmolLM2)."""
        ids = []
        for word in (self.yes_answer, self.no_answer):
            toks = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(toks) != 1:
                raise ValueError(f"reward {self.name!r}: answer word {word!r} is {len(toks)} tokens, not one")
            ids.append(int(toks[0]))
        self.model, self.tokenizer = model.eval(), tokenizer
        self._answer_ids = torch.tensor(ids)
        self._backbone = model.get_decoder()
        self._head = model.get_output_embeddings()
        params = inspect.signature(self._backbone.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self._pad_id = next(int(v) for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if v is not None)
        head_text = self._render_text(Prompt.single("_", _MARK), "").split(_MARK)[0]
        # tokens of the fixed instruction (less one: the boundary token may merge)
        self._keep_head = max(0, len(self._tokenize(head_text)) - 1)
        return self

    def load(self) -> LMJudgeReward:
        if self.model is not None:
            return self
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        kw = {}
        if self.package is not None:
            src = str(gguf_safetensors_cache(package_file(self.package, self.gguf_file)))
        else:
            src = str(self.name_or_path)
            check_local_path(self.name, src)
            kw = {"revision": self.revision} if self.revision else {}
        log.info("loading judge %s from %s (%s on %s)", self.name, src, dtype, device)
        try:
            tok = AutoTokenizer.from_pretrained(src, **kw)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw).to(device)
        except (OSError, ValueError, KeyError) as e:
            raise load_error(self.name, src, e) from None
        return self.attach(model, tok)

    # ------------------------------------------------------------------ text
    def _render_text(self, prompt: Prompt, response: str) -> str:
        conversation = self.conversation_format.render(prompt.messages)
        content = self.judge_prompt.replace("{conversation}", conversation).replace("{response}", response)
        return self.judge_format.render((Message("user", content),), tokenizer=self.tokenizer)

    def render(self, prompt: Prompt, response: str) -> str:
        """The exact text the judge reads; its next token is Yes or No."""
        if self.tokenizer is None:
            self.load()
        return self._render_text(prompt, response)

    def _tokenize(self, text: str) -> list[int]:
        add = self.add_special_tokens
        if add is None:
            bos = getattr(self.tokenizer, "bos_token", None)
            add = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=bool(add))["input_ids"])

    def encode(self, prompt: Prompt, response: str) -> list[int]:
        ids = self._tokenize(self._render_text(prompt, response))
        return truncate_keep_end(ids, self.max_length, keep_head=self._keep_head)

    def _length_key(self, prompt: Prompt, response: str):
        # group each prompt's samples together (long shared prefix), then by length
        return (tuple((m.role, m.content) for m in prompt.messages), len(response))

    # ------------------------------------------------------------------ scoring
    def _answer_margin(self, last_hidden: torch.Tensor) -> torch.Tensor:
        w = self._head.weight[self._answer_ids.to(self._head.weight.device)]
        logits = last_hidden.to(device=w.device, dtype=w.dtype) @ w.T
        if getattr(self._head, "bias", None) is not None:
            logits = logits + self._head.bias[self._answer_ids.to(self._head.bias.device)]
        return (logits[:, 0] - logits[:, 1]).float()

    def _score_batch(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses)]
        self.stats["rows"] += len(seqs)
        dev = model_device(self.model)
        c = _common_prefix_len(seqs) if self.share_prefix and len(seqs) > 1 else 0
        c = min(c, min(len(s) for s in seqs) - 1)  # every row keeps at least one token
        if c < 2:
            ids, mask, pos = pad_batch(seqs, self._pad_id, "right", dev)
            hidden = self._backbone(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            last = hidden[torch.arange(len(seqs), device=hidden.device), mask.sum(-1).to(hidden.device) - 1]
            return self._answer_margin(last)
        cache = _new_cache(self.model)
        prefix = torch.tensor([seqs[0][:c]], device=dev)
        self._backbone(input_ids=prefix, use_cache=True, **{self._cache_kw: cache})
        cache.batch_repeat_interleave(len(seqs))
        ids, mask, pos = pad_batch([s[c:] for s in seqs], self._pad_id, "right", dev)
        full_mask = torch.cat([torch.ones(len(seqs), c, dtype=mask.dtype, device=dev), mask], dim=1)
        hidden = self._backbone(
            input_ids=ids, attention_mask=full_mask, position_ids=pos + c, use_cache=True, **{self._cache_kw: cache}
        ).last_hidden_state
        self.stats["prefix_tokens_saved"] += c * (len(seqs) - 1)
        last = hidden[torch.arange(len(seqs), device=hidden.device), mask.sum(-1).to(hidden.device) - 1]
        return self._answer_margin(last)


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


__all__ = ["LMJudgeReward"]
