"""Plain data types shared by every layer: prompts, generated samples, method results.

Nothing here touches a model, a file or the config; these are the values that flow
between the engine, the methods, the reward models and the run orchestration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: a conversation whose last message is the user's turn.

    ``id`` is stable across subsets and runs (SHP ``post_id``, HH-RLHF row index), so
    seeds derived from it do not depend on which prompts shared a batch.
    """

    id: str
    messages: tuple[Message, ...]

    def __post_init__(self) -> None:
        if not self.messages:
            raise ValueError(f"prompt {self.id!r} has no messages")
        if self.messages[-1].role != "user":
            raise ValueError(f"prompt {self.id!r} must end with a user turn, got {self.messages[-1].role!r}")

    @property
    def text(self) -> str:
        """The last user turn (the question the response answers)."""
        return self.messages[-1].content

    @classmethod
    def single(cls, id: str, text: str) -> Prompt:
        return cls(id=str(id), messages=(Message("user", text),))

    def to_json(self) -> list[dict[str, str]]:
        return [asdict(m) for m in self.messages]

    def transcript(self) -> str:
        """The user text for a single-turn prompt, else a plain Human/Assistant transcript."""
        if len(self.messages) == 1:
            return self.text
        names = {"user": "Human", "assistant": "Assistant", "system": "System"}
        return "\n\n".join(f"{names[m.role]}: {m.content}" for m in self.messages)

    @classmethod
    def from_json(cls, id: str, messages: list[dict[str, str]]) -> Prompt:
        return cls(id=str(id), messages=tuple(Message(m["role"], m["content"]) for m in messages))


# "partial": a row still being decoded, as a paused decode hands it back (engine.decoding)
FinishReason = Literal["eos", "stop_string", "length", "partial"]


@dataclass
class Sample:
    """One decoded row: what the engine returns for one (prompt, noise or seed) pair."""

    token_ids: list[int]  # generated ids, including a final EOS id when the row ended on one
    text: str  # decoded response, cut before any stop string, without special tokens
    finish_reason: FinishReason

    @property
    def num_tokens(self) -> int:
        """Tokens the model generated for this row (the compute it cost)."""
        return len(self.token_ids)


@dataclass
class Result:
    """What a method returns for one prompt.

    ``sample_rewards`` lists every generated sample's reward in generation order
    (for AISP: iteration by iteration, then the final y(U*) candidate if decoded).
    ``sample_tokens`` lists the tokens each sample cost, in the same order, and
    ``num_tokens`` is their sum (the honest compute count). ``iterations`` holds
    per-iteration diagnostics (AISP only). ``extra`` holds method-specific fields that
    join the record, e.g. ``nonfinite_rewards`` (how many samples had a NaN or ±inf
    reward; absent when none).

    ``checkpoints`` (optional: a method may record none) lists, at budget points, the
    response the method would have returned had it stopped there: ``{"samples": samples
    spent, "sample": index of that response in ``sample_rewards``, "reward": its reward}``,
    plus its ``"response"`` text only at the first point returning that sample, and never
    for the sample finally returned (``response``): a point whose best did not change
    points at the earlier one through ``sample`` (``Tracker.result`` writes them,
    ``rundir.record_checkpoints`` reads them). ``decode_passes``: the dependent decode
    passes one prompt needed, one after another (BoN: 1; AISP: κ, plus y(U*)).
    """

    prompt_id: str
    response: str
    reward: float
    sample_rewards: list[float]
    num_samples: int
    num_tokens: int
    finish_reason: str
    response_tokens: int
    sample_tokens: list[int]
    iterations: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    decode_passes: int | None = None
