"""The pairwise judge interface: a ``JudgeRequest`` (a record's prompt and two answers,
``answer1`` shown first) gets a ``JudgeReply`` whose first line holds two 1-10 scores
(``parse_scores``). ``CachedJudge`` gives both judges (``client.PairwiseJudge``, an
OpenAI-compatible chat model; ``reward_judge.RewardModelJudge``, a reward model in process):

* a **cache**: one JSON file per request, ``cache_dir/<2 hex>/<sha256>.json``, keyed by
  ``settings()`` (the judge's version, model, ...) and the request's chat messages
  (question, both answers, their order), written as each reply arrives, so a re-run
  asks only what is missing;
* a **budget** (``max_requests``; None: none) over the object's life. It counts
  *judgements*: each distinct uncached request counts once, however many HTTP attempts
  it takes (the client's retries of 429/5xx/timeouts and ``PairwiseJudge``'s retries of a
  malformed reply are not counted; at most ``max_requests * (max_retries + 1)`` calls). A
  batch that needs more than what is left is refused before anything is sent;
* a **dry run**: :meth:`CachedJudge.plan` counts requests, cached ones and tokens.

A subclass sets ``model`` (the win-rate files' ``judge_model``), ``version`` and
``base_url_host`` and implements ``settings()`` and ``_answer()`` (the uncached requests).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aisp_bench.judge.prompts import Scores, build_messages, parse_scores
from aisp_bench.rundir import read_json_or_none, write_json_atomic
from aisp_bench.types import Prompt

CHARS_PER_TOKEN = 4.0  # rough English average, for the dry-run estimate only
Progress = Callable[[int, int], None]


class JudgeError(RuntimeError):
    """A judge run that cannot go on (no key, a fatal API error, a judge model that cannot load)."""


class BudgetExceededError(JudgeError):
    """More requests would be sent than ``max_requests`` allows; nothing was sent."""


@dataclass(frozen=True)
class JudgeRequest:
    """One judgement: a prompt and two answers, ``answer1`` shown first."""

    prompt: Prompt
    answer1: str
    answer2: str

    def messages(self) -> list[dict[str, str]]:
        """The chat messages; the question is ``Prompt.transcript`` (the records' ``prompt``)."""
        return build_messages(self.prompt.transcript(), self.answer1, self.answer2)


@dataclass
class JudgeReply:
    key: str
    content: str | None = None  # the judge's text (None if the request failed)
    error: str | None = None  # why the request failed after retries (never cached)

    @property
    def scores(self) -> Scores | None:
        """Parsed (first, second) scores, or None when the reply does not parse."""
        return parse_scores(self.content)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Plan:
    """What a batch would cost (see :meth:`CachedJudge.plan`)."""

    num_requests: int  # distinct requests in the batch
    num_cached: int
    num_to_send: int
    est_input_tokens: int  # of the requests to send, ~4 characters a token
    max_output_tokens: int | None  # num_to_send * max_tokens (an upper bound)
    budget_left: int | None  # None: no budget
    model: str = ""
    base_url_host: str = ""

    def describe(self) -> str:
        budget = "" if self.budget_left is None else f" (budget left {self.budget_left})"
        out = "" if self.max_output_tokens is None else f", at most {self.max_output_tokens:,} output tokens"
        return (
            f"judge {self.model} at {self.base_url_host}: {self.num_requests} distinct requests, "
            f"{self.num_cached} cached, {self.num_to_send} to send{budget}; "
            f"estimated ~{self.est_input_tokens:,} input tokens{out}"
        )


class CachedJudge:
    """The cache, budget and plan of a judge (see the module docstring)."""

    model: str = ""
    version: str = ""  # the prompt or verdict-rule version, part of every cache key
    base_url_host: str = ""
    max_tokens: int | None = None

    def __init__(self, cache_dir: str, max_requests: int | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.max_requests = None if max_requests is None else int(max_requests)
        self.requests_sent = 0  # judgements asked of the judge by this object (the budget counter)

    @property
    def budget_left(self) -> int | None:
        return None if self.max_requests is None else self.max_requests - self.requests_sent

    def settings(self) -> dict[str, Any]:  # pragma: no cover - abstract
        """Everything besides the messages that shapes a reply (part of the cache key)."""
        raise NotImplementedError

    def _answer(self, todo: dict[str, JudgeRequest], progress: Progress | None) -> dict[str, JudgeReply]:
        """Replies to the requests that are not cached (keyed like ``todo``); each stored with ``_store``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def cache_key(self, request: JudgeRequest) -> str:
        payload = {**self.settings(), "messages": request.messages()}
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _store(self, key: str, request: JudgeRequest, content: str | None, **extra: Any) -> JudgeReply:
        """Write one reply to the cache and return it."""
        entry = {
            "key": key,
            **{k: v for k, v in self.settings().items() if k != "base_url"},
            "base_url_host": self.base_url_host,
            "messages": request.messages(),
            "reply": content,
            **extra,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(self.cache_path(key), entry)
        return JudgeReply(key=key, content=content)

    def _lookup(self, requests: Sequence[JudgeRequest]
                ) -> tuple[dict[str, JudgeReply], dict[str, JudgeRequest], list[str]]:
        """(cached replies, requests to send), each keyed by cache key, one per distinct request,
        and each request's cache key in order."""
        done: dict[str, JudgeReply] = {}
        todo: dict[str, JudgeRequest] = {}
        keys = [self.cache_key(r) for r in requests]
        for r, k in zip(requests, keys, strict=True):
            if k not in done and k not in todo:
                entry = read_json_or_none(self.cache_path(k))  # an unreadable entry counts as missing
                if entry is None or entry.get("key") != k:
                    todo[k] = r
                else:
                    done[k] = JudgeReply(key=k, content=entry["reply"])
        return done, todo, keys

    def plan(self, requests: Sequence[JudgeRequest]) -> Plan:
        """Count what a batch would send, without sending anything or writing any file."""
        done, todo, _ = self._lookup(requests)
        chars = sum(len(m["content"]) for r in todo.values() for m in r.messages())
        return Plan(
            num_requests=len(done) + len(todo),
            num_cached=len(done),
            num_to_send=len(todo),
            est_input_tokens=int(chars / CHARS_PER_TOKEN) + 8 * len(todo),
            max_output_tokens=None if self.max_tokens is None else self.max_tokens * len(todo),
            budget_left=self.budget_left,
            model=self.model,
            base_url_host=self.base_url_host,
        )

    def judge(self, requests: Sequence[JudgeRequest], *, progress: Progress | None = None) -> list[JudgeReply]:
        """Replies for ``requests`` (same order), from the cache or the judge: ``BudgetExceededError``
        (nothing sent) over the budget left, ``JudgeError`` when the judge cannot answer at all; a
        request that failed comes back with ``error`` set (not cached)."""
        done, todo, keys = self._lookup(requests)
        left = self.budget_left
        if left is not None and len(todo) > left:
            raise BudgetExceededError(
                f"{len(todo)} requests to send but max_requests leaves {left} "
                f"(max_requests={self.max_requests}); nothing was sent. Raise judge.max_requests "
                "or lower num_prompts/trials"
            )
        if todo:
            self.requests_sent += len(todo)
            done.update(self._answer(todo, progress))
        return [done[k] for k in keys]
