"""The reward interface every method sees: ``score(prompts, responses) -> tensor``.

Also the plumbing shared by the model-based rewards: truncation that keeps the end of the
response, padding on either side with explicit position ids, and the index of the last
real token of each row.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aisp_bench.registry import Registry
from aisp_bench.types import Prompt

log = logging.getLogger(__name__)
REWARDS: Registry[type] = Registry("reward")

PADDING_SIDES = ("left", "right")


class RewardModel(ABC):
    """r(x, y): one float per (prompt, response) pair, in input order.

    ``score`` checks its inputs, sorts the pairs by ``_length_key`` into batches of
    ``batch_size`` (little padding), calls ``_score_batch`` on each under
    ``torch.inference_mode`` and returns a float32 CPU tensor of shape (len(responses),)
    in the input order. Implementations load lazily (``load()``), so building one from
    config costs nothing and downloads nothing.
    """

    name: str = "reward"
    batch_size: int = 16

    def load(self) -> RewardModel:
        return self

    @abstractmethod
    def _score_batch(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        """Rewards of one batch, in its order."""

    def _length_key(self, prompt: Prompt, response: str) -> Any:
        """Sort key that puts pairs of similar length (and so little padding) together."""
        return sum(len(m.content) for m in prompt.messages) + len(response)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        n = len(responses)
        out = torch.empty(n, dtype=torch.float32)
        if n == 0:
            return out
        self.load()
        order = sorted(range(n), key=lambda i: self._length_key(prompts[i], responses[i]))
        bs = max(1, int(self.batch_size))
        with torch.inference_mode():
            for s in range(0, n, bs):
                idx = order[s : s + bs]
                r = self._score_batch([prompts[i] for i in idx], [responses[i] for i in idx])
                out[torch.tensor(idx)] = r.detach().float().cpu().reshape(-1)
        return out

    __call__ = score


# ---------------------------------------------------------------------------- helpers


def check_padding_side(padding_side: str) -> str:
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"unknown padding_side {padding_side!r}; use left or right")
    return padding_side


def check_local_path(reward: str, name_or_path: str) -> None:
    """Fail early, in one line, on a local path that does not exist.

    Something that looks like a path (absolute, ``./``, ``~``) but is missing would
    otherwise be taken for a hub id and fail deep inside ``huggingface_hub``.
    """
    s = str(name_or_path)
    if s.startswith(("/", "./", "../", "~")) or Path(s).expanduser().exists():
        if not Path(s).expanduser().exists():
            raise FileNotFoundError(f"cannot load reward model {reward!r}: no such folder {s!r}")


def pretrained_args(reward: str, src: str, device: str, dtype: str, device_map: str | None = None,
                    revision: str | None = None, attn_implementation: str | None = None):
    """(dtype, hub kwargs, placement kwargs) for ``from_pretrained`` of a reward model.

    Checks a local path first; places the model straight onto its device (a 13B model
    never passes through CPU memory) unless ``device_map`` says otherwise.
    """
    from aisp_bench.models.loading import resolve_device, resolve_dtype

    check_local_path(reward, src)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    hub = {"revision": revision} if revision else {}
    place = {"device_map": device_map or {"": str(dev)}}
    if attn_implementation:
        place["attn_implementation"] = attn_implementation
    log.info("loading reward model %s from %s (%s on %s)", reward, src, torch_dtype, device_map or dev)
    return torch_dtype, hub, place


def load_error(reward: str, src: str, err: BaseException) -> RuntimeError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return RuntimeError(f"cannot load reward model {reward!r} from {src!r}: {first}")


def leading_special_count(ids: Sequence[int], special_ids: set[int]) -> int:
    """Number of special tokens (BOS, a chat template's header) at the start of ``ids``."""
    n = 0
    for i in ids:
        if i not in special_ids:
            break
        n += 1
    return n


def truncate_keep_end(ids: list[int], max_length: int | None, keep_head: int = 0) -> list[int]:
    """Fit ``ids`` into ``max_length`` tokens, keeping the first ``keep_head`` and the end.

    The tokens dropped are those right after the head: the start of the conversation
    first. The end of the text (the end of the response, where a reward model reads its
    score, and for a judge the question after it) always survives.
    """
    if max_length is None or len(ids) <= max_length:
        return ids
    keep_head = min(keep_head, max_length - 1)
    tail = max_length - keep_head
    return ids[:keep_head] + ids[len(ids) - tail :]


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right", device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad token lists to one (B, L) tensor.

    Returns ``input_ids``, ``attention_mask`` and ``position_ids``; the latter count real
    tokens only (0 at each row's first real token), so a decoder sees the same positions
    whichever side the padding is on.
    """
    check_padding_side(side)
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        if not len(s):
            raise ValueError("cannot score an empty token sequence")
        t = torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            ids[b, : len(s)], mask[b, : len(s)] = t, 1
        else:
            ids[b, L - len(s) :], mask[b, L - len(s) :] = t, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask = 1) token of each row, for left or right padding."""
    L = mask.shape[-1]
    return (L - 1) - mask.flip(-1).to(torch.long).argmax(-1)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS, else 0 (padding is masked out anyway)."""
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if v is not None:
            return int(v if not isinstance(v, (list, tuple)) else v[0])
    return 0


def model_device(model) -> torch.device:
    """Where a model's inputs go (its input embeddings; works under ``device_map``)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


class TextPairReward(RewardModel):
    """Base of the rewards that read one rendered text per (prompt, response).

    Holds the settings every such reward shares (they are its constructor arguments and
    the YAML keys): ``name``, ``template`` (a ``TranscriptFormat`` or
    ``ChatTemplateFormat``), ``batch_size``, ``max_length`` (tokens; longer inputs lose
    tokens after the leading special tokens, so the end of the response survives),
    ``padding_side``, ``add_special_tokens`` (``null``: add them unless the rendered text
    already starts with the tokenizer's BOS, as chat-template text does), ``device`` and
    ``dtype``. Subclasses set ``self.tokenizer`` in ``load()``.
    """

    def __init__(
        self,
        name: str,
        template,
        batch_size: int = 8,
        max_length: int | None = 2048,
        padding_side: str = "right",
        add_special_tokens: bool | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        if max_length is not None and int(max_length) < 2:
            raise ValueError(f"max_length must be at least 2 tokens (or null), got {max_length!r}")
        self.name = name
        self.template = template
        self.batch_size = int(batch_size)
        self.max_length = None if max_length is None else int(max_length)
        self.padding_side = check_padding_side(padding_side)
        self.add_special_tokens = add_special_tokens
        self.device = device
        self.dtype = dtype
        self.tokenizer = None
        self.model = None

    def render(self, prompt: Prompt, response: str) -> str:
        """The exact text the model reads for this pair."""
        return self.template.render(prompt.messages, response=response, tokenizer=self.tokenizer)

    def _adds_special(self, text: str) -> bool:
        if self.add_special_tokens is not None:
            return bool(self.add_special_tokens)
        bos = getattr(self.tokenizer, "bos_token", None)
        return not (bos and text.startswith(bos))

    def encode(self, prompt: Prompt, response: str) -> list[int]:
        """Token ids of the rendered pair, truncated to ``max_length`` keeping the end."""
        text = self.render(prompt, response)
        ids = list(self.tokenizer(text, add_special_tokens=self._adds_special(text))["input_ids"])
        if self.max_length is not None and len(ids) > self.max_length:
            head = leading_special_count(ids, set(self.tokenizer.all_special_ids))
            ids = truncate_keep_end(ids, self.max_length, keep_head=head)
        return ids


__all__ = [
    "REWARDS",
    "RewardModel",
    "TextPairReward",
    "truncate_keep_end",
    "pad_batch",
    "last_token_index",
    "pad_token_id",
    "model_device",
]
