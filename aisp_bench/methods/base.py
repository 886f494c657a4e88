"""What every method shares: the call signature and best-of bookkeeping.

A method is a pure algorithm: ``method(prompts, engine, reward, seed) -> list[Result]``.
It reaches the policy only through the engine and the reward model only through
``reward.score``; it never loads a model, writes a file or reads the config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from aisp_bench.registry import Registry
from aisp_bench.types import Prompt, Result, Sample

METHODS: Registry[type] = Registry("method")


def check_positive(name: str, value, *, integer: bool = False) -> None:
    """One-line errors that name the bad value (``method.n must be >= 1, got 0``)."""
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"method.{name} must be an integer >= 1, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"method.{name} must be > 0, got {value!r}")


class Method(ABC):
    """Base class: subclasses set ``name`` and implement ``__call__``."""

    name: str

    @property
    @abstractmethod
    def rows_per_prompt(self) -> int:
        """Rows one prompt wants decoded together (used to pick how many prompts to batch)."""

    @abstractmethod
    def __call__(self, prompts: Sequence[Prompt], engine, reward, seed: int) -> list[Result]: ...


@dataclass
class Tracker:
    """Per-prompt record of every sample's reward and tokens, and the best so far.

    Ties keep the earlier sample (Algorithm 1 replaces the best only on a strictly
    greater reward).
    """

    prompt_id: str
    rewards: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    best_reward: float = float("-inf")
    best: Sample | None = None

    def add(self, samples: Sequence[Sample], rewards: torch.Tensor) -> None:
        for s, r in zip(samples, rewards.tolist()):
            self.rewards.append(float(r))
            self.tokens.append(s.num_tokens)
            if self.best is None or r > self.best_reward:
                self.best_reward, self.best = float(r), s

    def result(self, iterations: list[dict] | None = None, **extra) -> Result:
        assert self.best is not None
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
        )
