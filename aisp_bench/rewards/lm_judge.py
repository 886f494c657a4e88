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

The judge text starts with the instruction and the conversation and ends with the
response, so a prompt's rows share a long token prefix, run once (``rewards/batching.py``).
"""

from __future__ import annotations

import torch

from aisp_bench.models.loading import gguf_safetensors_cache, package_file
from aisp_bench.rewards.base import DecoderReward, load_pretrained
from aisp_bench.types import Message, Prompt

_MARK = "\x00CONVERSATION\x00"


class LMJudgeReward(DecoderReward):
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
        max_length: tokens; longer inputs lose tokens right after the shared instruction
            (the start of the conversation first), keeping the response's end.
        response_tokens: where a conversation is cut, the room it leaves for a response,
            so that every response of the prompt up to that length reads the same
            conversation (``DecoderReward.fit``).
        (the rest as ``DecoderReward``: batch_size, max_batch_tokens, add_special_tokens,
        device, dtype, attention; the judge may sit on another device than the policy)
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
        max_batch_tokens: int = 512,
        max_length: int | None = 2048,
        add_special_tokens: bool | None = None,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "auto",
        response_tokens: int = 256,
    ) -> None:
        for slot in ("{conversation}", "{response}"):
            if slot not in judge_prompt:
                raise ValueError(f"judge_prompt of reward {name!r} has no {slot} slot")
        if (package is None) == (name_or_path is None) or (package is None) != (gguf_file is None):
            raise ValueError(f"reward {name!r}: give either package and gguf_file, or name_or_path")
        super().__init__(name, batch_size, max_batch_tokens, max_length, add_special_tokens, device, dtype, attention,
                         response_tokens)
        self.judge_prompt = judge_prompt
        self.conversation_format = conversation_format
        self.judge_format = judge_format
        self.yes_answer, self.no_answer = yes_answer, no_answer
        self.package, self.gguf_file = package, gguf_file
        self.name_or_path = name_or_path
        self.revision = revision

    # ------------------------------------------------------------------ loading
    def attach(self, model, tokenizer) -> LMJudgeReward:
        """Use an already loaded causal LM and tokenizer (e.g. the policy's own SmolLM2)."""
        ids = []
        for word in (self.yes_answer, self.no_answer):
            toks = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(toks) != 1:
                raise ValueError(f"reward {self.name!r}: answer word {word!r} is {len(toks)} tokens, not one")
            ids.append(int(toks[0]))
        self._answer_ids = torch.tensor(ids)
        self._head = model.get_output_embeddings()
        self._use_model(model, tokenizer, model.get_decoder(), self._answer_margin)
        head_text = self.render(Prompt.single("_", _MARK), "").split(_MARK)[0]
        # tokens of the fixed instruction (less one: the boundary token may merge)
        self._keep_head = max(0, len(self._tokenize(head_text)) - 1)
        return self

    def load(self) -> LMJudgeReward:
        if self.model is None:
            src = self.name_or_path or gguf_safetensors_cache(package_file(self.package, self.gguf_file))
            load_pretrained(self, str(src), self._from_pretrained, self.revision if self.name_or_path else None)
        return self

    @staticmethod
    def _from_pretrained(src: str, dtype, hub: dict, place: dict):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src, **hub)
        return AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **hub, **place), tokenizer

    # ------------------------------------------------------------------ text
    def render(self, prompt: Prompt, response: str) -> str:
        """The exact text the judge reads; its next token is Yes or No."""
        if self.tokenizer is None:
            self.load()
        conversation = self.conversation_format.render(prompt.messages)
        content = self.judge_prompt.replace("{conversation}", conversation).replace("{response}", response)
        return self.judge_format.render((Message("user", content),), tokenizer=self.tokenizer)

    def encode(self, prompt: Prompt, response: str) -> list[int]:
        ids = self._tokenize(self.render(prompt, response))
        return self.fit(ids, lambda: self._tokenize(self.render(prompt, "")), lambda: self._keep_head)

    # ------------------------------------------------------------------ scoring
    def _answer_margin(self, last_hidden: torch.Tensor) -> torch.Tensor:
        w = self._head.weight[self._answer_ids.to(self._head.weight.device)]
        logits = last_hidden.to(device=w.device, dtype=w.dtype) @ w.T
        if getattr(self._head, "bias", None) is not None:
            logits = logits + self._head.bias[self._answer_ids.to(self._head.bias.device)]
        return (logits[:, 0] - logits[:, 1]).float()


__all__ = ["LMJudgeReward"]
