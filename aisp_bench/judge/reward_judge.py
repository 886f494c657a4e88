"""An offline pairwise judge: a reward model, in process (``judge=reward_model reward=NAME``).

GPT-4 (the paper's judge for Tables 2-3) cannot be reached offline, and the small
offline LMs do not follow the verdict format. ``RewardModelJudge`` runs the same chain
(cache, both orders, tallies, win-rate files) with a reward model: *the win rate under
a held-out reward model*, named ``rm:<reward name>`` in every file, never ``gpt-4``.

Each request's two answers are scored with the record's own prompt (its messages, so a
conversation stays one); rewards r1, r2 become the scores ``5 5`` when
``|r1 - r2| <= tie_margin``, else ``7 3`` or ``3 7`` (a pure ranking: reward scales
differ between models, and the tally reads only which score is higher). Non-finite
rewards give a reply without scores: an *invalid* verdict, never a made-up one. Each
distinct (prompt, answer) is scored once per batch, so both orders read the same two
numbers; the model loads only when some verdict is not cached.
"""

from __future__ import annotations

import math
from typing import Any

from aisp_bench.cli import first_line
from aisp_bench.judge.base import CachedJudge, JudgeError, JudgeReply, JudgeRequest, Progress

TIE_SCORE, WIN_SCORE, LOSE_SCORE = 5, 7, 3
MAPPING_VERSION = "rm-judge-v1"  # bump when the mapping or the reply changes


def verdict_scores(r1: float, r2: float, tie_margin: float = 0.0) -> tuple[int, int]:
    """The two 1-10 scores for rewards r1 (answer 1) and r2 (answer 2) (see the module docstring)."""
    if abs(r1 - r2) <= tie_margin:
        return TIE_SCORE, TIE_SCORE
    return (WIN_SCORE, LOSE_SCORE) if r1 > r2 else (LOSE_SCORE, WIN_SCORE)


def reply_text(name: str, r1: float, r2: float, tie_margin: float = 0.0) -> str:
    """The whole reply: the verdict line, then the rewards behind it (no verdict for non-finite rewards)."""
    if not (math.isfinite(r1) and math.isfinite(r2)):
        return f"Reward model {name} returned a non-finite reward: r1 = {r1}, r2 = {r2}; no verdict."
    s1, s2 = verdict_scores(r1, r2, tie_margin)
    why = (f"<= tie margin {tie_margin:g}: a tie" if s1 == s2
           else f"> tie margin {tie_margin:g}: Assistant {1 if s1 > s2 else 2} is better")
    return f"{s1} {s2}\nReward model {name}: r1 = {r1:.6g}, r2 = {r2:.6g}; |r1 - r2| = {abs(r1 - r2):.4g} {why}."


def rm_model_name(reward_name: str, tie_margin: float = 0.0) -> str:
    """``rm:<name>``, plus ``@tie=<margin>`` for a non-zero margin: part of every cache key and
    win-rate file, so verdicts under another reward model or margin are never mixed up."""
    return f"rm:{reward_name}" if tie_margin == 0 else f"rm:{reward_name}@tie={tie_margin:g}"


class RewardModelJudge(CachedJudge):
    """A reward model (``score(prompts, responses) -> tensor``, ``load()``) as a pairwise judge;
    arguments are the keys of ``conf/judge/reward_model.yaml``."""

    version = MAPPING_VERSION
    base_url_host = "in-process"

    def __init__(self, reward: Any, tie_margin: float = 0.0, cache_dir: str = "results/judge_cache") -> None:
        if reward is None:
            raise ValueError("judge=reward_model needs a reward model: reward=NAME (e.g. reward=minilm_similarity)")
        super().__init__(cache_dir)
        self.reward = reward
        self.name = str(getattr(reward, "name", None) or type(reward).__name__)
        self.tie_margin = float(tie_margin)
        self.model = rm_model_name(self.name, self.tie_margin)

    def settings(self) -> dict[str, Any]:
        return {"prompt_version": self.version, "model": self.model}

    def _answer(self, todo: dict[str, JudgeRequest], progress: Progress | None) -> dict[str, JudgeReply]:
        try:
            self.reward.load()
        except Exception as e:  # noqa: BLE001 - missing weights, no hub: one line, stop
            raise JudgeError(f"reward model judge {self.name}: {first_line(e)}") from None
        pairs: dict[tuple, tuple] = {}  # (messages, answer) -> (prompt, answer), each scored once
        for req in todo.values():
            for answer in (req.answer1, req.answer2):
                pairs.setdefault((req.prompt.messages, answer), (req.prompt, answer))
        items = list(pairs.values())
        values = self.reward.score([p for p, _ in items], [a for _, a in items]).tolist()
        reward_of = dict(zip(pairs, (float(v) for v in values), strict=True))
        out = {}
        for key, req in todo.items():
            r1 = reward_of[(req.prompt.messages, req.answer1)]
            r2 = reward_of[(req.prompt.messages, req.answer2)]
            text = reply_text(self.name, r1, r2, self.tie_margin)
            out[key] = self._store(key, req, text, rewards=[r if math.isfinite(r) else None for r in (r1, r2)])
            if progress is not None:
                progress(len(out), len(todo))
        return out
