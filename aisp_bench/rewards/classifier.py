"""Any ``AutoModelForSequenceClassification`` reward model with one output.

Covers the published reward models that ship as sequence classifiers (e.g.
``Skywork/Skywork-Reward-Llama-3.1-8B``, ``OpenAssistant/reward-model-deberta-v3-large-v2``).
The reward is the single logit.

How the logit is read:

* Decoder classifiers (a ``score`` head on a decoder backbone, the usual RM layout): the
  backbone runs with explicit position ids and the head is read at each row's last
  attention-mask token, so left and right padding give the same reward and a pad id
  that also occurs in the text (pad = EOS) cannot move the read-out token. Where
  shared-prefix attention covers the backbone (Llama, Mistral, Qwen2/3), a prompt's
  responses share its tokens (``rewards/batching.py``), as for the regression heads.
* Anything else (encoders such as DeBERTa, which pool their first token): the model's
  own forward, right padded, every pair in full.
"""

from __future__ import annotations

import torch

from aisp_bench.models.templates import ChatTemplateFormat
from aisp_bench.rewards.base import TextPairReward, pad_token_id


class HFClassifierReward(TextPairReward):
    """A one-output sequence-classification reward model by hub id or local folder.

    Args:
        name: short name used in run folder names.
        name_or_path: hub id or local folder.
        template: how (prompt, response) is rendered; ``ChatTemplateFormat`` uses the
            model's own chat template.
        fallback_template: used instead of a ``ChatTemplateFormat`` ``template`` when the
            tokenizer has no chat template (``null``: that is an error).
        (the rest as ``TextPairReward``; encoders are always right padded)
    """

    def __init__(self, name: str, name_or_path: str, template=None, fallback_template=None, **kwargs) -> None:
        template = template if template is not None else ChatTemplateFormat()
        super().__init__(name=name, name_or_path=name_or_path, template=template, **kwargs)
        self.fallback_template = fallback_template

    def attach(self, model, tokenizer) -> HFClassifierReward:
        n = getattr(model.config, "num_labels", None)
        if n != 1:
            raise ValueError(f"reward model {self.name!r} must have one output, got num_labels={n}")
        if isinstance(self.template, ChatTemplateFormat) and not getattr(tokenizer, "chat_template", None):
            if self.fallback_template is None:
                raise ValueError(
                    f"reward model {self.name!r}: the tokenizer has no chat template; set fallback_template"
                )
            self.template = self.fallback_template
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = pad_token_id(tokenizer)
        # the decoder layout: a `score` head over a decoder backbone (LlamaForSequenceClassification,
        # MistralFor..., GPT2For..., ...); anything else goes through its own forward
        head = getattr(model, "score", None)
        if isinstance(head, torch.nn.Linear) and model.base_model is not model:
            self._use_model(model, tokenizer, model.base_model,
                            lambda last: head(last.to(device=head.weight.device, dtype=head.weight.dtype)))
        else:
            self._use_model(model, tokenizer, None, None,
                            forward=lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits)
        return self

    def _from_pretrained(self, src: str, dtype: torch.dtype, hub: dict, place: dict):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src, **hub)
        return AutoModelForSequenceClassification.from_pretrained(src, dtype=dtype, **hub, **place), tok


__all__ = ["HFClassifierReward"]
