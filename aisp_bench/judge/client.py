"""The GPT-4 judge: an OpenAI-compatible chat-completions client (a ``CachedJudge``; its
arguments are the keys of ``conf/judge/gpt4.yaml``). What it adds to the cache, budget and
dry run of :mod:`aisp_bench.judge.base`:

* **Any OpenAI-compatible server** at ``base_url`` (``null`` = OpenAI's; the
  ``OPENAI_BASE_URL`` variable is ignored so the config is the only source), e.g. a local
  vLLM or llama.cpp server at ``http://127.0.0.1:8000/v1``.
* **The key**: read from ``OPENAI_API_KEY`` only when a request must be sent (a server
  without auth needs it set to any value); never stored, cached or printed (error
  messages are scrubbed of it).
* **Retries**: the ``openai`` client's own for 429, 5xx, 408/409, timeouts and connection
  errors (backoff 0.5 s doubling to 8 s, with jitter, or the server's ``Retry-After``);
  400/401/403/404 are not retried. A 200 reply that is not a chat completion (not JSON,
  no ``choices``) is a server failure too, retried here the same way. An authentication,
  permission, not-found or bad-request error stops the whole batch; any other request
  that still fails comes back with ``error`` set (not cached), so a re-run retries only
  those. No retry counts against ``max_requests`` (a judgement counts once).
* **Concurrency**: at most ``concurrency`` requests in flight (a thread pool).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from aisp_bench.judge.base import CachedJudge, JudgeError, JudgeReply, JudgeRequest, Progress
from aisp_bench.judge.prompts import PROMPT_VERSION

OPENAI_BASE_URL = "https://api.openai.com/v1"


class _Stopped(Exception):
    """A queued request skipped because the batch was stopped."""


class MalformedReplyError(RuntimeError):
    """A reply that is not a chat completion (not JSON, no ``choices``): a server failure, never cached."""


def _first_choice(resp: Any) -> Any:
    """The first choice of a chat completion; ``MalformedReplyError`` for anything else."""
    choices = getattr(resp, "choices", None)
    if not isinstance(choices, list) or not choices or getattr(choices[0], "message", None) is None:
        raise MalformedReplyError(f"the server's reply is not a chat completion: {str(resp)[:100]!r}")
    return choices[0]


class PairwiseJudge(CachedJudge):
    """Pairwise GPT-4-style judge; arguments are the keys of ``conf/judge/gpt4.yaml``."""

    version = PROMPT_VERSION
    retry_delay = 0.5  # seconds before the first retry of a malformed reply, doubling up to 8 s (as the client's)

    def __init__(
        self,
        model: str = "gpt-4",
        base_url: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        max_requests: int = 2500,
        concurrency: int = 4,
        cache_dir: str = "results/judge_cache",
        timeout: float = 60.0,
        max_retries: int = 5,
    ) -> None:
        super().__init__(cache_dir, max_requests)
        self.model = str(model)
        self.base_url = str(base_url).rstrip("/") if base_url else OPENAI_BASE_URL
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self._key: str | None = None

    @property
    def base_url_host(self) -> str:
        return urlsplit(self.base_url).hostname or self.base_url

    def settings(self) -> dict[str, Any]:
        return {
            "prompt_version": self.version,
            "model": self.model,
            "base_url": self.base_url,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    @cached_property
    def _client(self) -> Any:
        """The ``openai`` client, made on first use (a missing key: ``JudgeError``)."""
        key = os.environ.get("OPENAI_API_KEY")
        if not key:
            raise JudgeError(
                "OPENAI_API_KEY is not set (for a local server without authentication set it to any value)"
            )
        from openai import OpenAI

        self._key = key
        return OpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout, max_retries=self.max_retries)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _send(self, key: str, request: JudgeRequest, stop: threading.Event, fatal: tuple[type, ...]) -> JudgeReply:
        """One request; a malformed reply is retried ``max_retries`` times (backoff as the client's)."""
        from openai import APIResponseValidationError

        if stop.is_set():  # a fatal error or an interrupt elsewhere: send nothing more
            raise _Stopped()
        for attempt in itertools.count():
            try:
                resp = self._client.chat.completions.create(
                    model=self.model, messages=request.messages(), temperature=self.temperature,
                    max_tokens=self.max_tokens,
                )
                choice = _first_choice(resp)
                break
            except fatal:
                stop.set()
                raise
            except (MalformedReplyError, json.JSONDecodeError, APIResponseValidationError):
                if attempt == self.max_retries:
                    raise
                time.sleep(min(8.0, self.retry_delay * 2**attempt) * random.uniform(0.75, 1.0))
        return self._store(
            key,
            request,
            choice.message.content,
            finish_reason=choice.finish_reason,
            response_model=getattr(resp, "model", None),
            usage=resp.usage.model_dump() if getattr(resp, "usage", None) is not None else None,
        )

    def _answer(self, todo: dict[str, JudgeRequest], progress: Progress | None) -> dict[str, JudgeReply]:
        """Send ``todo`` with ``concurrency`` threads; a fatal API error stops the batch (``JudgeError``),
        other failures come back as replies with ``error`` set."""
        from openai import AuthenticationError, BadRequestError, NotFoundError, PermissionDeniedError

        fatal = (AuthenticationError, BadRequestError, NotFoundError, PermissionDeniedError)
        self._client  # noqa: B018 - fail on a missing key before starting threads
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge")
        futures: dict[Future[JudgeReply], str] = {pool.submit(self._send, k, r, stop, fatal): k for k, r in todo.items()}
        done: dict[str, JudgeReply] = {}
        try:
            pending = set(futures)
            while pending:
                complete, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in complete:
                    k, exc = futures[fut], fut.exception()
                    if isinstance(exc, _Stopped):
                        continue
                    if isinstance(exc, fatal):
                        raise JudgeError(f"judge request failed: {self._scrub(f'{type(exc).__name__}: {exc}')}")
                    done[k] = fut.result() if exc is None else JudgeReply(key=k, error=self._scrub(f"{type(exc).__name__}: {exc}"))
                    if progress is not None:
                        progress(len(done), len(todo))
        finally:
            stop.set()  # queued requests are dropped; those in flight finish and are cached
            pool.shutdown(wait=True, cancel_futures=True)
        return done


def print_progress(done: int, total: int) -> None:
    """A minimal progress line on stderr (every 10 replies and at the end)."""
    if done == total or done % 10 == 0:
        print(f"judge: {done}/{total} replies", file=sys.stderr, flush=True)
