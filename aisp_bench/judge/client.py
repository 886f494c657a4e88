"""The pairwise judge: an OpenAI-compatible chat-completions client with a disk cache.

``PairwiseJudge`` is built from ``conf/judge/gpt4.yaml`` (its constructor arguments are
that file's keys, one to one). What it guarantees:

* **Any OpenAI-compatible server**: ``model``, ``base_url`` (``null`` = OpenAI's own
  endpoint; the ``OPENAI_BASE_URL`` variable is ignored so the config is the only
  source), ``temperature``, ``max_tokens``, ``timeout`` come from the config. A local
  vLLM or llama.cpp server works with ``base_url=http://127.0.0.1:8000/v1``.
* **The key**: read from the ``OPENAI_API_KEY`` environment variable, only when a
  request must actually be sent, and handed to the client; never stored, written to
  the cache or printed (error messages are scrubbed of it). A server without auth still
  needs the variable set to any value.
* **Cache**: one JSON file per request under ``cache_dir/<2 hex>/<sha256>.json``, keyed by
  a hash of (prompt version, model, base URL, temperature, max tokens, the messages -
  which hold the question, both answers and their order). Each file is written
  atomically the moment its reply arrives, so an interrupted run loses nothing and a
  re-run sends only what is missing. Delete a file to ask again.
* **Budget**: ``max_requests`` caps the requests this judge object sends, over its
  whole life. A batch that needs more than what is left is refused before anything is
  sent (``BudgetExceededError``). Cached replies and retries do not count against it:
  each request may be retried up to ``max_retries`` times by the client.
* **Retries**: the ``openai`` client's own: rate limits (429), server errors (5xx),
  408/409, timeouts and connection errors are retried with exponential backoff (0.5 s
  doubling, at most 8 s, with jitter) or the server's ``Retry-After``; other errors
  (400, 401, 403, 404) are not. An authentication, permission, not-found or bad-request
  error stops the whole batch at once; any other request that still fails is returned
  with its ``error`` set (and not cached), so a re-run retries only those.
* **Concurrency**: at most ``concurrency`` requests in flight (a thread pool).
* **Dry run**: :meth:`plan` counts distinct requests, cached ones, ones to send and an
  estimated token count, and sends nothing.

``mode``, ``num_prompts``, ``trials`` and ``sample_seed`` are read by
:mod:`aisp_bench.judge.winrate`, which decides what to ask.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aisp_bench.judge.prompts import PROMPT_VERSION, Scores, build_messages, parse_scores
from aisp_bench.metrics.records import read_json, write_json_atomic

OPENAI_BASE_URL = "https://api.openai.com/v1"
MODES = ("both_orders", "random_order")
CHARS_PER_TOKEN = 4.0  # rough English average, for the dry-run estimate only


class JudgeError(RuntimeError):
    """A judge run that cannot go on (no key, a fatal API error)."""


class BudgetExceededError(JudgeError):
    """More requests would be sent than ``max_requests`` allows; nothing was sent."""


class _Stopped(Exception):
    """A queued request skipped because the batch was stopped."""


@dataclass(frozen=True)
class JudgeRequest:
    """One judgement: the question and two answers, ``answer1`` shown first."""

    question: str
    answer1: str
    answer2: str

    def messages(self) -> list[dict[str, str]]:
        return build_messages(self.question, self.answer1, self.answer2)


@dataclass
class JudgeReply:
    key: str
    content: str | None = None  # the judge's text (None if the request failed)
    cached: bool = False  # served from the cache (no request sent this time)
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
    """What a batch would cost (see :meth:`PairwiseJudge.plan`)."""

    num_requests: int  # distinct requests in the batch
    num_cached: int
    num_to_send: int
    est_input_tokens: int  # of the requests to send, ~4 characters a token
    max_output_tokens: int  # num_to_send * max_tokens (an upper bound)
    budget_left: int
    model: str = ""
    base_url_host: str = ""
    keys_to_send: list[str] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        return (
            f"judge {self.model} at {self.base_url_host}: {self.num_requests} distinct requests, "
            f"{self.num_cached} cached, {self.num_to_send} to send (budget left {self.budget_left}); "
            f"estimated ~{self.est_input_tokens:,} input tokens, at most {self.max_output_tokens:,} output tokens"
        )


class PairwiseJudge:
    """Pairwise GPT-4-style judge; arguments are the keys of ``conf/judge/gpt4.yaml``."""

    def __init__(
        self,
        model: str = "gpt-4",
        base_url: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        max_requests: int = 1000,
        concurrency: int = 4,
        mode: str = "both_orders",
        num_prompts: int = 100,
        trials: int = 3,
        sample_seed: int = 0,
        cache_dir: str = "results/judge_cache",
        timeout: float = 60.0,
        max_retries: int = 5,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown judge mode {mode!r}; known: {', '.join(MODES)}")
        if int(concurrency) < 1:
            raise ValueError("concurrency must be at least 1")
        self.model = str(model)
        self.base_url = str(base_url).rstrip("/") if base_url else OPENAI_BASE_URL
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.max_requests = int(max_requests)
        self.concurrency = int(concurrency)
        self.mode = mode
        self.num_prompts = int(num_prompts)
        self.trials = int(trials)
        self.sample_seed = int(sample_seed)
        self.cache_dir = Path(cache_dir)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.requests_sent = 0  # requests sent by this object (the budget counter)
        self._lock = threading.Lock()
        self._client: Any = None
        self._key: str | None = None

    # -- identity ---------------------------------------------------------------------
    @property
    def base_url_host(self) -> str:
        return urlsplit(self.base_url).hostname or self.base_url

    def settings(self) -> dict[str, Any]:
        """Everything besides the messages that shapes a reply (part of the cache key)."""
        return {
            "prompt_version": PROMPT_VERSION,
            "model": self.model,
            "base_url": self.base_url,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def cache_key(self, request: JudgeRequest) -> str:
        payload = {**self.settings(), "messages": request.messages()}
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def cached(self, key: str) -> dict[str, Any] | None:
        """The cache entry for ``key``, or None (an unreadable entry counts as missing)."""
        path = self.cache_path(key)
        if not path.is_file():
            return None
        try:
            entry = read_json(path)
        except (OSError, json.JSONDecodeError) as e:
            warnings.warn(f"ignoring unreadable judge cache entry {path}: {e}", stacklevel=2)
            return None
        return entry if isinstance(entry, dict) and entry.get("key") == key else None

    # -- planning -----------------------------------------------------------------------
    def plan(self, requests: Sequence[JudgeRequest]) -> Plan:
        """Count what a batch would send, without sending anything or writing any file."""
        distinct: dict[str, JudgeRequest] = {}
        for r in requests:
            distinct.setdefault(self.cache_key(r), r)
        to_send = [k for k in distinct if self.cached(k) is None]
        chars = sum(len(m["content"]) for k in to_send for m in distinct[k].messages())
        return Plan(
            num_requests=len(distinct),
            num_cached=len(distinct) - len(to_send),
            num_to_send=len(to_send),
            est_input_tokens=int(chars / CHARS_PER_TOKEN) + 8 * len(to_send),
            max_output_tokens=self.max_tokens * len(to_send),
            budget_left=self.max_requests - self.requests_sent,
            model=self.model,
            base_url_host=self.base_url_host,
            keys_to_send=to_send,
        )

    # -- sending ------------------------------------------------------------------------
    def _openai(self) -> Any:
        if self._client is None:
            key = os.environ.get("OPENAI_API_KEY")
            if not key:
                raise JudgeError(
                    "OPENAI_API_KEY is not set (for a local server without authentication set it to any value)"
                )
            from openai import OpenAI

            self._key = key
            self._client = OpenAI(
                api_key=key, base_url=self.base_url, timeout=self.timeout, max_retries=self.max_retries
            )
        return self._client

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _send(self, key: str, request: JudgeRequest, stop: threading.Event, fatal: tuple[type, ...]) -> JudgeReply:
        if stop.is_set():  # a fatal error or an interrupt elsewhere: send nothing more
            raise _Stopped()
        try:
            return self._send_one(key, request)
        except fatal:
            stop.set()
            raise

    def _send_one(self, key: str, request: JudgeRequest) -> JudgeReply:
        with self._lock:
            if self.requests_sent >= self.max_requests:  # belt and braces: plan() checked already
                raise BudgetExceededError(f"max_requests={self.max_requests} reached")
            self.requests_sent += 1
        messages = request.messages()
        resp = self._openai().chat.completions.create(
            model=self.model,
            messages=messages,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )
        choice = resp.choices[0] if resp.choices else None
        content = choice.message.content if choice is not None else None
        usage = resp.usage.model_dump() if getattr(resp, "usage", None) is not None else None
        entry = {
            "key": key,
            **{k: v for k, v in self.settings().items() if k != "base_url"},
            "base_url_host": self.base_url_host,
            "messages": messages,
            "reply": content,
            "finish_reason": choice.finish_reason if choice is not None else None,
            "response_model": getattr(resp, "model", None),
            "usage": usage,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(self.cache_path(key), entry)
        return JudgeReply(key=key, content=content)

    def judge(
        self,
        requests: Sequence[JudgeRequest],
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[JudgeReply]:
        """Replies for ``requests`` (same order), from the cache or the server.

        Raises ``BudgetExceededError`` (before sending anything) when the uncached
        requests exceed the budget left, and ``JudgeError`` for a missing key or a
        fatal API error. Other failures come back as replies with ``error`` set.
        """
        from openai import AuthenticationError, BadRequestError, NotFoundError, PermissionDeniedError

        fatal = (AuthenticationError, BadRequestError, NotFoundError, PermissionDeniedError, BudgetExceededError)
        plan = self.plan(requests)
        if plan.num_to_send > plan.budget_left:
            raise BudgetExceededError(
                f"{plan.num_to_send} requests to send but max_requests leaves {plan.budget_left} "
                f"(max_requests={self.max_requests}); nothing was sent. Raise judge max_requests "
                "or lower num_prompts/trials"
            )
        keys = [self.cache_key(r) for r in requests]
        by_key = dict(zip(keys, requests, strict=True))
        done: dict[str, JudgeReply] = {}
        to_send = set(plan.keys_to_send)
        for k in by_key:
            if k not in to_send:
                entry = self.cached(k)
                if entry is not None:
                    done[k] = JudgeReply(key=k, content=entry.get("reply"), cached=True)
        todo = [k for k in by_key if k not in done]
        if todo:
            self._openai()  # fail on a missing key before starting threads
            stop = threading.Event()
            pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge")
            futures: dict[Future[JudgeReply], str] = {
                pool.submit(self._send, k, by_key[k], stop, fatal): k for k in todo
            }
            finished = 0
            try:
                pending = set(futures)
                while pending:
                    complete, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in complete:
                        k = futures[fut]
                        exc = fut.exception()
                        if exc is None:
                            done[k] = fut.result()
                        elif isinstance(exc, _Stopped):
                            continue
                        elif isinstance(exc, fatal):
                            raise JudgeError(f"judge request failed: {self._scrub(f'{type(exc).__name__}: {exc}')}")
                        else:
                            done[k] = JudgeReply(key=k, error=self._scrub(f"{type(exc).__name__}: {exc}"))
                        finished += 1
                        if progress is not None:
                            progress(finished, len(todo))
            finally:
                stop.set()  # queued requests are dropped; those in flight finish and are cached
                pool.shutdown(wait=True, cancel_futures=True)
        return [done[k] for k in keys]


def print_progress(done: int, total: int) -> None:
    """A minimal progress line on stderr (every 10 replies and at the end)."""
    if done == total or done % 10 == 0:
        print(f"judge: {done}/{total} replies", file=sys.stderr, flush=True)
