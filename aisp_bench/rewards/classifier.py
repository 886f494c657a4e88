"""Any ``AutoModelForSequenceClassification`` reward model with one output.

Covers the published reward models that ship as sequence classifiers (e.g.
``Skywork/Skywork-Reward-Llama-3.1-8B``, ``OpenAssistant/reward-model-deberta-v3-large-v2``).
The reward is the single logit.

How the logit is read:

* Decoder classifiers (a ``score`` head on a decoder backbone, the usual RM layout): the
  backbone runs with explicit position ids and the head is read at each row's last
  attention-mask token, so left and right padding give the same reward and a pad id
  that also occurs in the text (pad = EOS) cannot move the read-out token.
* Anything else (encoders such as DeBERTa, which pool their first token): the model's
  own forward, right padded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from aisp_bench.models.templates import ChatTemplateFormat
from aisp_bench.rewards.base import (
    REWARDS,
    TextPairReward,
    pretrained_args,
    last_token_index,
    load_error,
    model_device,
    pad_batch,
    pad_token_id,
)
from aisp_bench.types import Prompt

log = logging.getLogger(__name__)


@REWARDS.register("hf_classifier")
class HFClassifierReward(TextPairReward):
    """A one-output sequence-classification reward model by hub id or local folder.

    Args:
        name: short name used in run folder names.
        name_or_path: hub id or local folder.
        template: how (prompt, response) is rendered; ``ChatTemplateFormat`` uses the
            model's own chat template.
        fallback_template: used instead of a ``ChatTemplateFormat`` ``template`` when the
            tokenizer has no chat template (``null``: that is an error).
        revision, device_map, attn_implementation: as for the policy models.
        (the rest as ``TextPairReward``; ``padding_side`` only matters for encoders,
        which are always right padded)
    """

    def __init__(
        self,
        name: str,
        name_or_path: str,
        template=None,
        fallback_template=None,
        revision: str | None = None,
        device_map: str | dict | None = None,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(name=name, template=template if template is not None else ChatTemplateFormat(), **kwargs)
        self.name_or_path = str(name_or_path)
        self.fallback_template = fallback_template
        self.revision = revision
        self.device_map = device_map
        self.attn_implementation = attn_implementation
        self._pad_id = 0
        self._decoder_head = False

    def attach(self, model, tokenizer) -> HFClassifierReward:
        """Use an already built classifier and tokenizer (tests, shared models)."""
        n = getattr(model.config, "num_labels", None)
        if n != 1:
            raise ValueError(f"reward model {self.name!r} must have one output, got num_labels={n}")
        if isinstance(self.template, ChatTemplateFormat) and not getattr(tokenizer, "chat_template", None):
            if self.fallback_template is None:
                raise ValueError(
                    f"reward model {self.name!r}: the tokenizer has no chat template; set fallback_template"
                )
            self.template = self.fallback_template
        self.model, self.tokenizer = model.eval(), tokenizer
        self._pad_id = pad_token_id(tokenizer)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self._pad_id
        # the decoder layout: a `score` head over a decoder backbone (LlamaForSequenceClassification,
        # MistralFor..., GPT2For..., ...); anything else goes through its own forward
        head = getattr(model, "score", None)
        self._decoder_head = isinstance(head, torch.nn.Linear) and model.base_model is not model
        return self

    def load(self) -> HFClassifierReward:
        if self.model is not None:
            return self
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        src = self.name_or_path
        dtype, kw, extra = pretrained_args(self.name, src, self.device, self.dtype, self.device_map, self.revision,
                                           self.attn_implementation)
        try:
            tok = AutoTokenizer.from_pretrained(src, **kw)
            model = AutoModelForSequenceClassification.from_pretrained(src, dtype=dtype, **kw, **extra)
        except (OSError, ValueError, KeyError) as e:
            raise load_error(self.name, src, e) from None
        return self.attach(model, tok)

    def _score_batch(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses)]
        dev = model_device(self.model)
        if self._decoder_head:
            ids, mask, pos = pad_batch(seqs, self._pad_id, self.padding_side, dev)
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            last = hidden[torch.arange(len(seqs), device=hidden.device), last_token_index(mask).to(hidden.device)]
            score = self.model.score
            return score(last.to(device=score.weight.device, dtype=score.weight.dtype)).reshape(-1).float()
        ids, mask, _ = pad_batch(seqs, self._pad_id, "right", dev)
        return self.model(input_ids=ids, attention_mask=mask).logits.reshape(-1).float()


__all__ = ["HFClassifierReward"]
