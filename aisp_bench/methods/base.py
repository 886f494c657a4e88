"""What every method shares: the call signature and best-of bookkeeping.

A method is a pure algorithm: ``method(prompts, engine, reward, seed) -> list[Result]``.
It reaches the policy only through the engine and the reward model only through
``reward.score``; it never loads a model, writes a file or reads the config. Its
hyperparameters are checked where the config is (``validate.RULES``, ``method.*``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from aisp_bench.types import Prompt, Result, Sample


class Method(ABC):
    """Base class: subclasses set ``name`` and ``rows_per_prompt`` and implement ``__call__``."""

    name: str
    rows_per_prompt: int  # rows one prompt wants decoded together (picks how many prompts to batch)

    @abstractmethod
    def __call__(self, prompts: Sequence[Prompt], engine, reward, seed: int) -> list[Result]: ...


def powers_of_two(N: int) -> frozenset[int]:
    """Best-of-N's budget checkpoints: 1, 2, 4, ... up to N, and N."""
    return frozenset({2**j for j in range(N.bit_length()) if 2**j <= N} | {N})


@dataclass
class Tracker:
    """Per-prompt record of every sample's reward and tokens, and the best so far.

    Ties keep the earlier sample (Algorithm 1 replaces the best only on a strictly
    greater reward). A non-finite reward (NaN, ±inf: a failed reward call) never becomes
    the best unless every sample of the prompt has one: then the first sample is kept
    with reward NaN, so the prompt still has a record. The result's ``extra`` counts
    them as ``nonfinite_rewards`` (left out when there are none).

    ``checkpoint_at``: sample counts at which the best so far is kept as a budget
    checkpoint (the response the method would return had it stopped there; ``Result``
    describes the compact form ``result`` writes). Empty: no checkpoints.
    """

    prompt_id: str
    checkpoint_at: Collection[int] = frozenset()
    rewards: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    best_reward: float = float("-inf")
    best: Sample | None = None
    best_index: int = -1
    points: list[tuple[int, int, float, str]] = field(default_factory=list)  # (samples, best index, reward, text)

    def add(self, samples: Sequence[Sample], rewards: torch.Tensor) -> None:
        for s, r in zip(samples, rewards.tolist()):
            r = float(r)
            self.rewards.append(r)
            self.tokens.append(s.num_tokens)
            if math.isfinite(r) and (r > self.best_reward or not math.isfinite(self.best_reward)):
                self.best_reward, self.best, self.best_index = r, s, len(self.rewards) - 1
            elif self.best is None:  # kept only until a finite reward comes
                self.best_reward, self.best, self.best_index = math.nan, s, len(self.rewards) - 1
            if len(self.rewards) in self.checkpoint_at:
                self.points.append((len(self.rewards), self.best_index, self.best_reward, self.best.text))

    def checkpoints(self) -> list[dict]:
        """The compact checkpoints: a response's text once, at the first point returning it,
        and never for the finally returned sample (the record's ``response``)."""
        out, stored = [], {self.best_index}
        for samples, index, reward, text in self.points:
            out.append({"samples": samples, "sample": index, "reward": reward}
                       | ({} if index in stored else {"response": text}))
            stored.add(index)
        return out

    def result(self, iterations: list[dict] | None = None, decode_passes: int | None = None, **extra) -> Result:
        assert self.best is not None
        nonfinite = sum(not math.isfinite(r) for r in self.rewards)
        if nonfinite:
            extra["nonfinite_rewards"] = nonfinite
        return Result(
            prompt_id=self.prompt_id,
            response=self.best.text,
            reward=self.best_reward,
            sample_rewards=list(self.rewards),
            num_samples=len(self.rewards),
            num_tokens=sum(self.tokens),
            finish_reason=self.best.finish_reason,
            response_tokens=self.best.num_tokens,
            sample_tokens=list(self.tokens),
            iterations=iterations or [],
            extra=extra,
            checkpoints=self.checkpoints(),
            decode_passes=decode_passes,
        )
