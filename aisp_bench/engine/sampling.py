"""Temperature + nucleus (top-p) sampling with caller-given uniforms (BoN top-p)."""

from __future__ import annotations

import torch


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
