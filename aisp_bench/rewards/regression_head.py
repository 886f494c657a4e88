"""UltraRM-13b and Eurus-RM-7b: a decoder backbone plus a linear regression head.

Both checkpoints share one layout (see their model cards): a backbone under ``model.*``
(``LlamaModel`` for UltraRM, ``MistralModel`` for Eurus-RM) and
``regression_head = nn.Linear(hidden_size, 1, bias=False)``; the reward is the head's
output at the last non-padding token. Their cards ship this as ``LlamaRewardModel`` and
``EurusRewardModel`` (the latter as remote code); ``RegressionHeadModel`` below is the
same module built for any backbone config through ``AutoModel.from_config``, so no
``trust_remote_code`` is needed and the checkpoints' state-dict keys (``model.*``,
``regression_head.weight``) load one to one.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from aisp_bench.rewards.base import TextPairReward, last_token_index


class RegressionHeadModel(PreTrainedModel):
    """``AutoModel`` backbone + ``regression_head``; ``forward`` returns (B,) rewards.

    Build it with ``RegressionHeadModel(config)`` from any decoder config (``LlamaConfig``,
    ``MistralConfig``, ...) or load a checkpoint with ``RegressionHeadModel.from_pretrained(path)``
    (the backbone's config class is read from the folder's ``config.json``).
    """

    config_class = PretrainedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: list[str] = []  # post_init adds the backbone's (its decoder layer)
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.model = AutoModel.from_config(config)
        self.regression_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """As ``PreTrainedModel.from_pretrained``; without ``config``, the folder's own
        (``LlamaConfig`` for UltraRM, ``MistralConfig`` for Eurus-RM) is read first."""
        if config is None:
            kw = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **kw)
        return super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Rewards (B,) read at each row's last real token (left or right padding).

        Without ``position_ids`` they are computed from the mask, so a left-padded row
        sees the positions it would see unpadded.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        ends = last_token_index(attention_mask).to(hidden.device)
        return self.reward_from_hidden(hidden[torch.arange(hidden.shape[0], device=hidden.device), ends])

    def reward_from_hidden(self, last: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) from the backbone's final hidden states (B, d) at the read-out tokens."""
        w = self.regression_head.weight  # under device_map the head may sit on another GPU
        return self.regression_head(last.to(device=w.device, dtype=w.dtype)).squeeze(-1)


class RegressionHeadReward(TextPairReward):
    """A regression-head reward model (UltraRM-13b, Eurus-RM-7b) by hub id or local folder.

    Args:
        name: short name used in run folder names (``ultrarm``, ``eurus``).
        name_or_path: hub id or local folder holding ``config.json`` and the weights.
        template: how (prompt, response) becomes the text the RM reads (from config).
        tokenizer_name_or_path: where the tokenizer is, if not beside the weights.
        (the rest as ``TextPairReward``)
    """

    def __init__(self, name: str, name_or_path: str, template, tokenizer_name_or_path: str | None = None,
                 **kwargs) -> None:
        super().__init__(name=name, name_or_path=name_or_path, template=template, **kwargs)
        self.tokenizer_name_or_path = tokenizer_name_or_path

    def attach(self, model: RegressionHeadModel, tokenizer) -> RegressionHeadReward:
        self._use_model(model, tokenizer, model.model, model.reward_from_hidden)
        return self

    def _from_pretrained(self, src: str, dtype: torch.dtype, hub: dict, place: dict):
        from transformers import AutoTokenizer

        model, info = RegressionHeadModel.from_pretrained(src, dtype=dtype, output_loading_info=True, **hub, **place)
        tok = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path or src,
                                            **({} if self.tokenizer_name_or_path else hub))
        missing = [k for k in info.get("missing_keys", []) if k]
        if missing:
            raise RuntimeError(
                f"cannot load reward model {self.name!r} from {src!r}: the checkpoint lacks "
                f"{', '.join(sorted(missing)[:4])}{' ...' if len(missing) > 4 else ''} "
                "(is it a regression-head reward model?)"
            )
        return model, tok


__all__ = ["RegressionHeadModel", "RegressionHeadReward"]
