"""What the reward-guided decoders share (``spec_rejection``, ``particle_filter``): where
decoding pauses, scoring the responses so far, and what each prompt spent.

Both decode their rows with ``engine.start`` (``aisp_bench.engine.decoding``): a segment,
then the reward of every row's response so far (a live row's partial text, a finished
row's response once), then a selection of rows, then the next segment. What a prompt
spent is counted per prompt (``Ledger``):

* generated tokens: every token decoded, by every row, counted once (a duplicated row's
  prefix was decoded once; a dropped row's tokens count);
* reward calls: the ``reward.score`` rounds a prompt took part in, one after another
  (each needs the decode before it);
* reward-model tokens: the prompt once (as the policy read it; a prompt its responses
  share is counted once, as for the other methods) plus the tokens of every response
  scored, partial ones included, in the policy's tokens (the reward model's own
  tokenizer and template differ: a stand-in, the same for every method).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from aisp_bench.types import Prompt, Sample


def decision_points(every: int | Sequence[int], max_new_tokens: int) -> list[int]:
    """The token counts 0 < t < max_new_tokens after which decoding pauses: every ``every``
    tokens (an int), or the given ones (a list; sorted, repeats and those past the end dropped)."""
    if isinstance(every, int):
        if every < 1:
            raise ValueError(f"decision points every {every} tokens: must be >= 1")
        return list(range(every, max_new_tokens, every))
    points = sorted({int(t) for t in every})
    if points and points[0] < 1:
        raise ValueError(f"decision points must be >= 1 token, got {points}")
    return [t for t in points if t < max_new_tokens]


@dataclass
class Ledger:
    """What one prompt spent (the module docstring); ``points``: its per-decision-point diagnostics."""

    prompt_tokens: int
    generated: int = 0
    reward_calls: int = 0
    scored_tokens: int = 0
    points: list[dict] = field(default_factory=list)

    def extra(self) -> dict:
        """The record fields these counts fill."""
        return {"reward_calls": self.reward_calls, "reward_tokens": self.prompt_tokens + self.scored_tokens,
                "decision_points": self.points}


def score_rows(reward, prompts: Sequence[Prompt], prompt_of_row: torch.Tensor, responses: Sequence[Sample],
               rows: torch.Tensor, ledgers: Sequence[Ledger]) -> torch.Tensor:
    """The rewards of ``responses[rows]`` against their prompts, in one ``reward.score`` call
    (float32, one per row of ``rows``); each prompt with a row scored counts the call and the
    tokens its responses hold."""
    rows_l = rows.tolist()
    owners = prompt_of_row[rows].tolist()
    if not rows_l:
        return torch.zeros(0)
    out = reward.score([prompts[p] for p in owners], [responses[j].text for j in rows_l]).float()
    for p in set(owners):
        ledgers[p].reward_calls += 1
    for j, p in zip(rows_l, owners):
        ledgers[p].scored_tokens += responses[j].num_tokens
    return out


def upper_bounds(schedule: Sequence[tuple[int, int]]) -> dict[str, int]:
    """What one prompt costs at most when no row ends early, from its ``schedule``: (t_j, rows
    decoded to t_j and scored there) per segment end, in order. Returns ``generated`` tokens
    Σ rows_j·(t_j − t_{j−1}), reward ``rounds``, responses ``scored`` Σ rows_j and
    ``scored_tokens`` Σ rows_j·t_j (a partial response is read whole at each point)."""
    out, prev = {"generated": 0, "rounds": len(schedule), "scored": 0, "scored_tokens": 0}, 0
    for t, rows in schedule:
        out["generated"] += rows * (t - prev)
        out["scored"] += rows
        out["scored_tokens"] += rows * t
        prev = t
    return out


def reward_stats(scores: torch.Tensor) -> dict[str, float]:
    """Mean and max of the finite scores (NaN when none)."""
    s = scores[torch.isfinite(scores)].double()
    nan = float("nan")
    return {"reward_mean": float(s.mean()) if s.numel() else nan, "reward_max": float(s.max()) if s.numel() else nan}
