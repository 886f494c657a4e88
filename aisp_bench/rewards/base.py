"""The reward interface every method sees: ``score(prompts, responses) -> tensor``.

Also the plumbing shared by the model-based rewards: loading, truncation that keeps the
end of the response, and ``DecoderReward``, the base of the rewards read from a decoder
at the last token (regression heads, decoder classifiers, the LM judge), which score
through ``batching.SequenceScorer`` (shared prompts, batches packed by tokens).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from aisp_bench.rewards.batching import SequenceScorer, last_token_index
from aisp_bench.types import Prompt

log = logging.getLogger(__name__)


class RewardModel(ABC):
    """r(x, y): one float per (prompt, response) pair, in input order.

    ``score`` checks its inputs, cuts the pairs into the batches ``_batches`` gives (by
    default sorted by ``_length_key`` into batches of ``batch_size``: little padding),
    calls ``_score_batch`` on each under ``torch.inference_mode`` and returns a float32
    CPU tensor of shape (len(responses),) in the input order. Implementations load lazily
    (``load()``), so building one from config costs nothing and downloads nothing.
    """

    name: str = "reward"
    batch_size: int = 16

    def _settings(self, name: str, batch_size: int, max_length: int | None, device: str, dtype: str) -> None:
        """The settings every model-based reward has; no model loaded yet."""
        self.name, self.batch_size, self.max_length = name, batch_size, max_length
        self.device, self.dtype = device, dtype
        self.model = self.tokenizer = None

    def load(self) -> RewardModel:
        return self

    @abstractmethod
    def _score_batch(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        """Rewards of one batch, in its order."""

    def _batches(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[list[int]]:
        """The pair indices of each ``_score_batch`` call: similar lengths together (little padding)."""
        def length(i: int) -> int:
            return sum(len(m.content) for m in prompts[i].messages) + len(responses[i])

        order = sorted(range(len(responses)), key=length)
        return [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        n = len(responses)
        out = torch.empty(n, dtype=torch.float32)
        if n == 0:
            return out
        self.load()
        with torch.inference_mode():
            for idx in self._batches(prompts, responses):
                r = self._score_batch([prompts[i] for i in idx], [responses[i] for i in idx])
                out[torch.tensor(idx)] = r.detach().float().cpu().reshape(-1)
        return out

    __call__ = score


# ---------------------------------------------------------------------------- helpers


def load_pretrained(reward: RewardModel, src: str, build: Callable, revision: str | None = None,
                    device_map: str | dict | None = None, attn_implementation: str | None = None) -> RewardModel:
    """``reward.attach(*build(src, dtype, hub, place))`` on ``reward.device`` in ``reward.dtype``.

    ``build`` returns (model, tokenizer) from ``from_pretrained`` calls given ``hub``
    (revision) and ``place`` (device_map, attention). A local path (absolute, ``./``,
    ``~``) that does not exist fails first, in one line: it would otherwise be taken for
    a hub id and fail deep inside ``huggingface_hub``; so does any load error. The model
    is placed straight onto its device (a 13B model never passes through CPU memory)
    unless ``device_map`` says otherwise.
    """
    from aisp_bench.models.loading import resolve_device, resolve_dtype, weight_bars_follow_logging

    if src.startswith(("/", "./", "../", "~")) and not Path(src).expanduser().exists():
        raise FileNotFoundError(f"cannot load reward model {reward.name!r}: no such folder {src!r}")
    dev = resolve_device(reward.device)
    dtype = resolve_dtype(reward.dtype, dev)
    hub = {"revision": revision} if revision else {}
    place = {"device_map": device_map or {"": str(dev)}}
    if attn_implementation:
        place["attn_implementation"] = attn_implementation
    log.info("loading reward model %s from %s (%s on %s)", reward.name, src, dtype, device_map or dev)
    weight_bars_follow_logging()
    try:
        model, tokenizer = build(src, dtype, hub, place)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"cannot load reward model {reward.name!r} from {src!r}: {first}") from None
    return reward.attach(model, tokenizer)


def leading_special_count(ids: Sequence[int], special_ids: set[int]) -> int:
    """Number of special tokens (BOS, a chat template's header) at the start of ``ids``."""
    return next((n for n, i in enumerate(ids) if i not in special_ids), len(ids))


def truncate_keep_end(ids: list[int], max_length: int | None, keep_head: int = 0, min_cut: int = 0) -> list[int]:
    """Fit ``ids`` into ``max_length`` tokens, keeping the first ``keep_head`` and the end.

    The tokens dropped are those right after the head: the start of the conversation
    first, at least ``min_cut`` of them (a prompt's own cut: ``DecoderReward.fit``). The
    end of the text (the end of the response, where a reward model reads its score, and
    for a judge the question after it) always survives.
    """
    if max_length is None or (len(ids) <= max_length and min_cut <= 0):
        return ids
    keep_head = min(keep_head, max_length - 1)
    tail = max(1, min(max_length - keep_head, len(ids) - keep_head - max(0, min_cut)))
    return ids[:keep_head] + ids[len(ids) - tail :]


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS, else 0 (padding is masked out anyway)."""
    v = next(v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if v is not None)
    return int(v[0] if isinstance(v, (list, tuple)) else v)


def model_device(model) -> torch.device:
    """Where a model's inputs go (its input embeddings; works under ``device_map``)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


class DecoderReward(RewardModel):
    """A reward read from a decoder's final hidden state at each text's last token.

    ``score`` hands all pairs at once to a ``SequenceScorer`` (``rewards/batching.py``):
    each pair's ids exactly as ``encode`` gives them, grouped by prompt, the tokens a
    prompt's responses share run once, forwards packed by tokens. Subclasses implement
    ``encode`` and call ``_use_model`` from ``attach``.

    Settings every such reward has (constructor arguments and YAML keys, checked by
    ``validate.py``):

    * ``name``: short name used in run folder names;
    * ``batch_size``: rows per forward at most;
    * ``max_batch_tokens``: padded tokens per forward, about (``batching``, point 4);
    * ``max_length``: tokens; longer inputs lose tokens after the fixed head, so the end
      of the response survives;
    * ``response_tokens``: where a prompt is cut, the room it leaves for a response: the
      cut depends on the prompt alone, so every response of a prompt up to this length
      reads the same conversation (and the prompt's tokens run once for all of them);
    * ``add_special_tokens``: ``null``: add them unless the rendered text already starts
      with the tokenizer's BOS (as chat-template text does);
    * ``device``, ``dtype``;
    * ``attention``: how the tokens a prompt's responses share are run (once, the rest
      scored against their KV: ``split``, ``sdpa``; or ``full``, each pair whole) or
      ``auto`` (``SequenceScorer.score``): tuning, the same rewards in fp32, set from the
      configs' ``engine.reward_attention`` by the commands, not by the reward's YAML.
    """

    padding_side: str = "right"

    def __init__(
        self,
        name: str,
        batch_size: int,
        max_batch_tokens: int,
        max_length: int | None = 2048,
        add_special_tokens: bool | None = None,
        device: str = "auto",
        dtype: str = "auto",
        attention: str = "auto",
        response_tokens: int = 512,
    ) -> None:
        self._settings(name, batch_size, max_length, device, dtype)
        if max_length is not None and not 0 <= response_tokens < max_length:
            raise ValueError(f"reward {name!r}: response_tokens={response_tokens} must be at least 0 and below "
                             f"max_length={max_length} (the room a cut prompt leaves for a response)")
        self.response_tokens = response_tokens
        self.max_batch_tokens = max_batch_tokens
        self.attention = attention
        self.add_special_tokens = add_special_tokens
        self.stats = {"rows": 0, "forwards": 0, "padded_tokens": 0, "prefix_tokens_saved": 0}  # summed over calls

    @abstractmethod
    def encode(self, prompt: Prompt, response: str) -> list[int]:
        """The exact token ids the model reads for this pair."""

    def fit(self, ids: list[int], bare: Callable[[], list[int]], keep_head: Callable[[], int]) -> list[int]:
        """``ids`` of one (prompt, response) within ``max_length``: the tokens right after the
        head (``keep_head()`` tokens) go, at least as many as leave ``response_tokens`` after the
        prompt's own ids (``bare()``: the pair with an empty response). Both are computed only
        when a cut is possible. So the cut of a prompt is the same for its every response up to
        that length."""
        if self.max_length is None or len(ids) + self.response_tokens <= self.max_length:
            return ids
        return truncate_keep_end(ids, self.max_length, keep_head(),
                                 min_cut=len(bare()) + self.response_tokens - self.max_length)

    def _use_model(self, model, tokenizer, backbone, readout, forward=None) -> None:
        """Score with ``backbone`` + ``readout`` (or ``forward``; see ``SequenceScorer``)."""
        self.model, self.tokenizer = model.eval(), tokenizer
        self._scorer = SequenceScorer(backbone, readout, pad_token_id(tokenizer), model_device(model), forward)

    def _tokenize(self, text: str) -> list[int]:
        add = self.add_special_tokens
        if add is None:
            bos = getattr(self.tokenizer, "bos_token", None)
            add = not (bos and text.startswith(bos))
        return list(self.tokenizer(text, add_special_tokens=bool(add))["input_ids"])

    def _batches(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[list[int]]:
        return [list(range(len(responses)))]  # one call: the scorer groups and packs by tokens

    def _score_batch(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses)]
        return self._scorer.score(
            seqs, [p.messages for p in prompts], max_batch_tokens=self.max_batch_tokens, max_rows=self.batch_size,
            padding_side=self.padding_side, stats=self.stats, attention=self.attention,
        )


class TextPairReward(DecoderReward):
    """Base of the hub reward models that read one rendered text per (prompt, response).

    Adds to ``DecoderReward``'s settings ``name_or_path`` (hub id or local folder),
    ``template`` (a ``TranscriptFormat`` or ``ChatTemplateFormat``), ``revision``,
    ``device_map`` (``auto``: spread over the visible GPUs; overrides ``device``),
    ``attn_implementation`` (passed to ``from_pretrained``) and ``padding_side`` (of the
    rows scored in full; shared prompts are always left padded and their responses
    right padded: the reward does not depend on it). Subclasses give ``attach`` (use an
    already built model and tokenizer: tests, or a model shared with other code) and
    ``_from_pretrained`` (the ``build`` of ``load_pretrained``).
    """

    def __init__(
        self,
        name: str,
        name_or_path: str,
        template,
        revision: str | None = None,
        device_map: str | dict | None = None,
        attn_implementation: str | None = None,
        padding_side: str = "right",
        batch_size: int = 64,
        max_batch_tokens: int = 8192,
        **kwargs,  # the rest of DecoderReward's settings
    ) -> None:
        super().__init__(name, batch_size, max_batch_tokens, **kwargs)
        self.name_or_path = str(name_or_path)
        self.template = template
        self.revision = revision
        self.device_map = device_map
        self.attn_implementation = attn_implementation
        self.padding_side = padding_side

    def load(self) -> TextPairReward:
        if self.model is None:
            load_pretrained(self, self.name_or_path, self._from_pretrained, self.revision, self.device_map,
                            self.attn_implementation)
        return self

    def render(self, prompt: Prompt, response: str) -> str:
        """The exact text the model reads for this pair."""
        return self.template.render(prompt.messages, response=response, tokenizer=self.tokenizer)

    def encode(self, prompt: Prompt, response: str) -> list[int]:
        """Token ids of the rendered pair, cut to ``max_length`` (``fit``) keeping the special head and the end."""
        ids = self._tokenize(self.render(prompt, response))
        return self.fit(ids, lambda: self._tokenize(self.render(prompt, "")),
                        lambda: leading_special_count(ids, set(self.tokenizer.all_special_ids)))


__all__ = ["RewardModel", "DecoderReward", "TextPairReward", "load_pretrained", "truncate_keep_end",
           "last_token_index", "pad_token_id", "model_device"]
