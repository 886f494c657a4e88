"""Temperature + nucleus (top-p) sampling with caller-given uniforms (BoN top-p).

Two ways to draw the same token:

* the full path (``top_p_filter`` + the inverse CDF): sort the whole vocabulary, as
  ``transformers``' ``TopPLogitsWarper`` does;
* the top-k prefilter (``sample_top_p`` with ``k`` > 0): only the k highest scores are
  sorted. A row whose nucleus lies inside them, with every decision clear of rounding
  (``_nucleus_in_top_k``), draws the full path's token bit for bit: the filtered scores
  are laid out exactly as the full path lays them out (same values at the same
  positions of a vocabulary-wide row), so its softmax and cumulative sums are the same
  computations. Other rows take the full path. On by default where measured faster
  (``TOP_P_PREFILTER_K``).
"""

from __future__ import annotations

import torch

# k of the top-k prefilter by device type; absent or 0: the full sort. Measured on the CPU
# (scripts/bench_sampling.py: 64 rows, 49k and 128k vocabularies); on CUDA not yet.
TOP_P_PREFILTER_K: dict[str, int] = {"cpu": 64}
_U = 2.0**-24  # float32 unit roundoff


def top_p_filter(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature then nucleus filter, as ``transformers`` does it.

    Returns (sorted_probs, sorted_idx): the sampling distribution over the vocabulary in
    ascending-score order, zero outside the nucleus. Mirrors ``TemperatureLogitsWarper``
    followed by ``TopPLogitsWarper`` (remove tokens whose ascending cumulative probability
    is <= 1 - top_p, always keep the most likely token). Equal scores are ordered by
    token id (a stable sort), so the draw is a function of the logits alone.
    """
    scores = logits.float() / temperature
    sorted_scores, sorted_idx = torch.sort(scores, dim=-1, stable=True)
    if top_p < 1.0:
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1.0 - top_p)
        remove[..., -1] = False
        sorted_scores = sorted_scores.masked_fill(remove, float("-inf"))
    return sorted_scores.softmax(dim=-1), sorted_idx


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Position (B,) of the draw with uniforms u in the rows of ``probs`` (float64 cumsum)."""
    cum = probs.double().cumsum(dim=-1)
    target = u.to(cum.device, torch.float64).unsqueeze(-1) * cum[:, -1:]
    return (cum <= target).sum(dim=-1).clamp_(max=probs.shape[-1] - 1)


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor,
                 k: int | None = None) -> torch.Tensor:
    """Draw one token per row by inverse CDF with the given uniforms u in [0, 1): (B,).

    ``k``: the top-k prefilter's k (0: the full sort; None: ``TOP_P_PREFILTER_K`` for the
    logits' device). Either way the same tokens (module docstring).
    """
    k = TOP_P_PREFILTER_K.get(logits.device.type, 0) if k is None else k
    if k <= 0 or top_p >= 1.0 or k >= logits.shape[-1] or logits.shape[0] == 0:
        probs, idx = top_p_filter(logits, temperature, top_p)
        return idx.gather(-1, _inverse_cdf(probs, u).unsqueeze(-1)).squeeze(-1)
    tok, ok = _sample_prefiltered(logits, temperature, top_p, u, k)
    if not bool(ok.all()):  # these rows' nucleus is not (clearly) inside the top k
        bad = (~ok).nonzero().squeeze(1)
        tok[bad] = sample_top_p(logits[bad], temperature, top_p, u.to(logits.device)[bad], k=0)
    return tok


def _sample_prefiltered(logits, temperature, top_p, u, k) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B,), ok (B,)): the draw through the top k, and whether it is the full path's."""
    scores = logits.float() / temperature  # the full path's scores, bit for bit
    B, V = scores.shape
    top, idx = scores.topk(k, dim=-1)
    idx, by_id = idx.sort(dim=-1)  # the full path's order among the candidates: score, then id
    s, order = top.gather(-1, by_id).sort(dim=-1, stable=True)
    idx = idx.gather(-1, order)
    kept, ok = _nucleus_in_top_k(scores, s, top_p)
    layout = scores.new_full((B, V), float("-inf"))  # the full path's filtered sorted scores
    layout[:, V - k :] = s.masked_fill(~kept, float("-inf"))
    probs = layout.softmax(dim=-1)  # vocabulary-wide: the normalizer's summation order is the full path's
    if scores.device.type == "cpu":  # a sequential cumsum: the leading zeros add exactly nothing
        pos = _inverse_cdf(probs[:, V - k :], u)
    else:  # a parallel scan: its association depends on positions, so the whole row
        pos = _inverse_cdf(probs, u) - (V - k)
    return idx.gather(-1, pos.clamp_(min=0).unsqueeze(-1)).squeeze(-1), ok


def _nucleus_in_top_k(scores: torch.Tensor, s: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the candidates ``s`` (B, k), ascending, the full path keeps, and per row
    whether that is certain.

    Every token scoring above the lowest candidate s_min is a candidate, so the full
    path's cumulative probability at such a candidate is (z_low + the exponentials of the
    candidates up to it) / z: z_low sums the exponentials of the tokens scoring <= s_min
    (ties with tokens outside the top k included) in float32, the rest is float64. The
    full path computes the same in float32 from a softmax over the whole row. Each float32
    sum of up to V terms, accumulated in at least 8 lanes (CPU vector lanes; CUDA threads
    each accumulate fewer), is off by less than (V/8 + 64) u relative, the exp and a few
    roundings included; the full path's value and this one (z_low in the numerator and in
    z) differ by less than ``rel`` = 3 (V/8 + 64) u of the value. A row is certain when
    every candidate above s_min is farther than that from the threshold 1 - p (compared in
    float32, as the full path does), the mass at or below s_min is removed with the same
    margin, and the row is finite.
    """
    V = scores.shape[-1]
    m, s_min = s[:, -1:], s[:, :1]
    z_low = torch.exp(scores - m).masked_fill_(scores > s_min, 0.0).sum(dim=-1, keepdim=True).double()
    sure = s > s_min  # above s_min: all in the top k, their order and the mass below them known
    e = torch.exp((s - m).double()) * sure
    z = z_low + e.sum(dim=-1, keepdim=True)
    cum = (z_low + e.cumsum(dim=-1)) / z  # the full path's cumulative probability at each candidate
    below = z_low[:, 0] / z[:, 0]  # ... at the highest token scoring <= s_min
    t = float(torch.tensor(1.0 - top_p, dtype=torch.float32))
    rel = 3 * (V / 8 + 64) * _U
    clear = ((cum - t).abs() > rel * cum.clamp(min=t)) | ~sure
    ok = clear.all(-1) & (below < t * (1 - rel)) & sure.any(-1) & torch.isfinite(m[:, 0]) & torch.isfinite(z[:, 0])
    kept = (cum > t) & sure
    kept[:, -1] = True
    return kept, ok
