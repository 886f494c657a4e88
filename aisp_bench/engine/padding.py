"""Token lists into one padded batch: the one padder of the package (the engine's prefill,
``base_logprob``'s responses, the reward models' inputs)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right",
        device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad token lists to one (B, L) batch on the ``right`` or ``left`` (L at least 1).

    Returns ``input_ids``, ``attention_mask`` (1 on real tokens) and ``position_ids``, which
    count real tokens only (0 at each row's first real token), so a decoder sees the same
    positions whichever side the padding is on; padding gets position 1, as ``transformers``'
    ``generate`` gives it (its keys are masked: the value changes nothing).
    """
    L = max(1, max((len(s) for s in seqs), default=0))
    ids = torch.full((len(seqs), L), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        if not len(s):
            continue
        t = torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            ids[b, : len(s)], mask[b, : len(s)] = t, 1
        else:
            ids[b, L - len(s) :], mask[b, L - len(s) :] = t, 1
    pos = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
    return ids.to(device), mask.to(device), pos.to(device)
