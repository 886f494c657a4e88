"""An offline pairwise judge: a reward model behind a minimal OpenAI chat-completions API.

GPT-4 (the paper's judge for Tables 2-3) cannot be reached offline, and the small
offline LMs do not follow the "score1 score2" verdict format. This server lets the
whole judge chain (``PairwiseJudge``, its cache, both orders, the tallies, the win-rate
files) run offline, and gives a useful proxy: *the win rate under a held-out reward
model*. It is not GPT-4 and says so: the judge model is named ``rm:<reward name>``.

What it does with each ``POST .../chat/completions`` request:

1. It reads the last user message, which must be exactly our pairwise message
   (:data:`aisp_bench.judge.prompts.USER_TEMPLATE`: the question, answer 1, answer 2);
   the regex is built from that template, so the two cannot drift apart. Anything else
   is an HTTP 400 that says what was expected (the client does not retry a 400, and
   ``PairwiseJudge`` stops the batch on it).
2. It scores (question, answer 1) and (question, answer 2) with the reward model. The
   question is a one-turn ``Prompt``; a question that is exactly a multi-turn
   ``Prompt.transcript()`` (``Human: ...\\n\\nAssistant: ...\\n\\nHuman: ...``, as run records
   store HH-RLHF prompts) is split back into its turns, so a reward model renders the
   conversation turn by turn as it does during a run.
3. It maps the two rewards r1, r2 to two 1-10 scores (:func:`verdict_scores`):
   ``|r1 - r2| <= tie_margin``: a tie, ``5 5``; else the better answer ``7``, the
   worse ``3``. A pure ranking, on purpose: reward scales differ between models (UltraRM
   about -10..5, Eurus-RM hundreds, SmolLM2 judge -3..3) and the win-rate tally reads
   only which score is higher, so a spread-preserving mapping would add nothing but a
   scale choice. ``tie_margin`` (in the reward model's units) turns near-equal rewards
   into draws.
4. It replies like OpenAI: ``choices[0].message.content`` is ``"<s1> <s2>\\nReward model
   <name>: r1 = ..., r2 = ...; ..."`` (the first line is what ``parse_scores`` reads),
   with approximate ``usage`` token counts (about 4 characters a token).

Deterministic: identical (question, answer) pairs get identical rewards (an in-memory
memo, so the second order of a pair never re-scores and both orders always agree), and
temperature, ``max_tokens`` and ``n`` are ignored. Requests are scored by one worker
thread that batches whatever requests are waiting (the reward model is used from one
thread only). The server listens on 127.0.0.1 (port 0: a free one) and checks no key;
the ``model`` of a request must be the server's ``rm:<name>`` (else 404), so a win-rate
file can never say ``gpt-4`` for a reward model's verdicts.

Use it through the judge CLI, which starts and stops it in-process::

    python -m aisp_bench.judge --runs-a ... --runs-b ... --local-reward-judge smollm2_judge [--tie-margin 0.1]

or standalone (prints its ``base_url`` and model name)::

    python -m aisp_bench.judge.rm_server --reward smollm2_judge --port 8011
    python -m aisp_bench.judge --runs-a ... --runs-b ... base_url=http://127.0.0.1:8011/v1 model=rm:smollm2_judge
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import queue
import re
import string
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from aisp_bench.judge.client import CHARS_PER_TOKEN, PairwiseJudge
from aisp_bench.judge.prompts import USER_TEMPLATE
from aisp_bench.types import Message, Prompt

TIE_SCORE = 5
WIN_SCORE = 7
LOSE_SCORE = 3
MAPPING_VERSION = "rm-judge-v1"  # bump when the mapping or the reply changes
LOCAL_CACHE_BASE_URL = "local-reward-judge"  # what the CLI's cache keys hold instead of the random port


# -- the request message ------------------------------------------------------------------
def _template_regex(template: str) -> re.Pattern[str]:
    """A regex that matches exactly what ``template.format(**fields)`` produces."""
    parts = []
    for literal, field, spec, conv in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            if spec or conv or not field.isidentifier():
                raise ValueError(f"unsupported template field {field!r}")
            parts.append(f"(?P<{field}>.*?)")
    return re.compile("".join(parts), re.S)


USER_MESSAGE_RE = _template_regex(USER_TEMPLATE)


class MalformedRequestError(ValueError):
    """A chat request this server cannot judge (answered with HTTP 400)."""


def parse_user_message(text: str) -> tuple[str, str, str]:
    """(question, answer 1, answer 2) of one of our pairwise user messages.

    Raises ``MalformedRequestError`` when ``text`` is not exactly
    ``USER_TEMPLATE.format(question=..., answer1=..., answer2=...)``.
    """
    m = USER_MESSAGE_RE.fullmatch(text)
    if m is None:
        head = text[:60].replace("\n", "\\n")
        raise MalformedRequestError(
            "the last user message is not an aisp-bench pairwise judge message "
            "(aisp_bench.judge.prompts.USER_TEMPLATE: '[Question]\\n...', then "
            f"'[The Start of Assistant 1's Answer]' ... '[The End of Assistant 2's Answer]'); got {head!r}"
        )
    return m.group("question"), m.group("answer1"), m.group("answer2")


_TURN_RE = re.compile(r"(?:^|\n\n)(Human|Assistant|System): ")
_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}


def question_prompt(question: str, split_turns: bool = True) -> Prompt:
    """The ``Prompt`` a question stands for.

    A one-turn prompt holding ``question``, unless ``split_turns`` and ``question`` is
    exactly the ``Prompt.transcript()`` of a conversation of two or more messages ending
    with a user turn: then that conversation (checked by rendering it back).
    """
    if split_turns and question.startswith(("Human: ", "System: ")):
        parts = _TURN_RE.split(question)
        if parts[0] == "" and len(parts) >= 5:
            try:
                p = Prompt(
                    id="q",
                    messages=tuple(Message(_ROLES[r], c) for r, c in zip(parts[1::2], parts[2::2], strict=True)),
                )
            except ValueError:
                p = None
            if p is not None and len(p.messages) >= 2 and p.transcript() == question:
                return p
    return Prompt.single("q", question)


def _message_text(content: Any) -> str:
    """A message's text: a string, or the ``text`` parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(c, dict) for c in content):
        return "".join(str(c.get("text", "")) for c in content if c.get("type", "text") == "text")
    raise MalformedRequestError("message content must be a string or a list of text parts")


# -- rewards -> scores ------------------------------------------------------------------
def verdict_scores(r1: float, r2: float, tie_margin: float = 0.0) -> tuple[int, int]:
    """The two 1-10 scores for rewards r1 (answer 1) and r2 (answer 2).

    ``(5, 5)`` when ``|r1 - r2| <= tie_margin``, else ``(7, 3)`` or ``(3, 7)``, the 7 to
    the higher reward. Symmetric: swapping the answers swaps the scores.
    """
    if abs(r1 - r2) <= tie_margin:
        return TIE_SCORE, TIE_SCORE
    return (WIN_SCORE, LOSE_SCORE) if r1 > r2 else (LOSE_SCORE, WIN_SCORE)


def reply_text(name: str, r1: float, r2: float, tie_margin: float = 0.0) -> str:
    """The whole reply: the verdict line, then the rewards behind it.

    Non-finite rewards give a reply without a score line (an *invalid* verdict in the
    tally), never a made-up score.
    """
    if not (math.isfinite(r1) and math.isfinite(r2)):
        return f"Reward model {name} returned a non-finite reward: r1 = {r1}, r2 = {r2}; no verdict."
    s1, s2 = verdict_scores(r1, r2, tie_margin)
    diff = abs(r1 - r2)
    if s1 == s2:
        why = f"|r1 - r2| = {diff:.4g} <= tie margin {tie_margin:g}: a tie"
    else:
        why = f"|r1 - r2| = {diff:.4g} > tie margin {tie_margin:g}: Assistant {1 if s1 > s2 else 2} is better"
    return f"{s1} {s2}\nReward model {name}: r1 = {r1:.6g}, r2 = {r2:.6g}; {why}."


def rm_model_name(reward_name: str, tie_margin: float = 0.0) -> str:
    """The judge model name: ``rm:<name>``, plus ``@tie=<margin>`` for a non-zero margin.

    The name is part of every judge cache key and of the win-rate files, so replies
    under another reward model or another margin are never mixed up.
    """
    return f"rm:{reward_name}" if tie_margin == 0 else f"rm:{reward_name}@tie={tie_margin:g}"


# -- scoring worker -------------------------------------------------------------------------
class _Scorer:
    """Scores (prompt, answer) pairs on one thread, batching the pairs that wait.

    Each distinct pair is scored once: a pair already being scored is waited for, not
    queued again, and a memo (LRU, ``memo_size`` pairs) serves repeats. So the two
    orders of one comparison, even when they arrive together, read the same two
    numbers.
    """

    def __init__(self, reward: Any, max_batch: int = 64, memo_size: int = 65536) -> None:
        self.reward = reward
        self.max_batch = max(1, int(max_batch))
        self.memo_size = int(memo_size)
        self._memo: OrderedDict[tuple, float] = OrderedDict()
        self._pending: dict[tuple, Future[float]] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="rm-judge-scorer", daemon=True)
        self._thread.start()
        self.pairs_scored = 0  # pairs sent to the reward model (memo hits excluded)

    def score(self, items: Sequence[tuple[Prompt, str]]) -> list[float]:
        futures: list[Future[float]] = []
        for prompt, answer in items:
            key = (prompt.messages, answer)
            with self._lock:
                if key in self._memo:
                    self._memo.move_to_end(key)
                    fut: Future[float] = Future()
                    fut.set_result(self._memo[key])
                elif key in self._pending:
                    fut = self._pending[key]
                else:
                    fut = Future()
                    self._pending[key] = fut
                    self._queue.put((key, prompt, answer))
            futures.append(fut)
        return [f.result() for f in futures]

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            keys = [key for key, _, _ in batch]
            try:
                rewards = self.reward.score([p for _, p, _ in batch], [a for _, _, a in batch])
                values = [float(x) for x in rewards.tolist()]
                if len(values) != len(keys):
                    raise RuntimeError(f"the reward model returned {len(values)} scores for {len(keys)} pairs")
            except BaseException as e:  # noqa: BLE001 - handed to the waiting requests (HTTP 500)
                with self._lock:
                    futs = [self._pending.pop(k) for k in keys]
                for fut in futs:
                    fut.set_exception(e)
            else:
                self.pairs_scored += len(keys)
                with self._lock:
                    for k, v in zip(keys, values, strict=True):
                        self._memo[k] = v
                    while len(self._memo) > self.memo_size:
                        self._memo.popitem(last=False)
                    futs = [self._pending.pop(k) for k in keys]
                for fut, v in zip(futs, values, strict=True):
                    fut.set_result(v)
            if stop:
                return

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
        with self._lock:  # anything still waiting: fail it rather than leave a request hanging
            futs = list(self._pending.values())
            self._pending.clear()
        for fut in futs:
            if not fut.done():
                fut.set_exception(RuntimeError("reward judge server closed"))


# -- the server ---------------------------------------------------------------------------------
class RewardJudgeServer:
    """A reward model served as an OpenAI chat-completions "judge" (see the module docstring).

    Args:
        reward: a ``RewardModel`` (anything with ``score(prompts, responses) -> tensor``
            and ``load()``).
        name: the reward's name in the model name and replies (default ``reward.name``).
        tie_margin: rewards this close (reward units, >= 0) are a tie.
        host, port: where to listen (port 0: any free port).
        split_turns: rebuild multi-turn conversations from transcripts (see
            :func:`question_prompt`).
        max_batch: at most this many pairs per ``reward.score`` call.
        verbose: print one line per request on stderr.

    ``start()`` loads the model and starts serving in a background thread; ``close()``
    stops it. Usable as a context manager. ``base_url`` ends in ``/v1``.
    """

    def __init__(
        self,
        reward: Any,
        *,
        name: str | None = None,
        tie_margin: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        split_turns: bool = True,
        max_batch: int = 64,
        verbose: bool = False,
    ) -> None:
        tie_margin = float(tie_margin)
        if not math.isfinite(tie_margin) or tie_margin < 0:
            raise ValueError(f"tie_margin must be a finite number >= 0, got {tie_margin!r}")
        self.reward = reward
        self.name = str(name or getattr(reward, "name", None) or type(reward).__name__)
        self.tie_margin = tie_margin
        self.model = rm_model_name(self.name, tie_margin)
        self.host = host
        self.port = int(port)
        self.split_turns = bool(split_turns)
        self.max_batch = int(max_batch)
        self.verbose = bool(verbose)
        self.requests_served = 0
        self._ids = itertools.count(1)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._scorer: _Scorer | None = None
        self._pairs_done = 0  # pairs scored by scorers already closed

    # -- lifecycle ------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("the reward judge server is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def pairs_scored(self) -> int:
        """(question, answer) pairs the reward model scored (memo hits excluded)."""
        return self._pairs_done + (self._scorer.pairs_scored if self._scorer is not None else 0)

    def start(self, load: bool = True) -> RewardJudgeServer:
        """Load the reward model (unless ``load`` is false) and serve in a background thread."""
        if self._httpd is not None:
            return self
        if load:
            self.reward.load()
        httpd = ThreadingHTTPServer((self.host, self.port), self._handler_class())
        httpd.daemon_threads = True
        self._httpd = httpd
        self._scorer = _Scorer(self.reward, self.max_batch)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="rm-judge-http", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and the scoring thread (idempotent)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._scorer is not None:
            self._scorer.close()
            self._pairs_done += self._scorer.pairs_scored
            self._scorer = None

    def __enter__(self) -> RewardJudgeServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- requests -------------------------------------------------------------------
    def score_pair(self, question: str, answer1: str, answer2: str) -> tuple[float, float]:
        """Rewards of (question, answer1) and (question, answer2) (the server must be started)."""
        if self._scorer is None:
            raise RuntimeError("the reward judge server is not started")
        prompt = question_prompt(question, self.split_turns)
        r1, r2 = self._scorer.score([(prompt, answer1), (prompt, answer2)])
        return r1, r2

    def handle_chat(self, body: Any) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON payload) for one chat-completions request body."""
        try:
            if not isinstance(body, dict):
                raise MalformedRequestError("the request body must be a JSON object")
            model = body.get("model")
            if model != self.model:
                return 404, _error(
                    f"model {model!r} is not served here; this reward-model judge serves {self.model!r}",
                    "not_found_error",
                    "model_not_found",
                )
            if body.get("stream"):
                raise MalformedRequestError("streaming is not supported by the reward-model judge")
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise MalformedRequestError("'messages' must be a non-empty list of message objects")
            if messages[-1].get("role") != "user":
                raise MalformedRequestError(f"the last message must be the user's, got {messages[-1].get('role')!r}")
            question, a1, a2 = parse_user_message(_message_text(messages[-1].get("content")))
            texts = [_message_text(m.get("content", "")) for m in messages]
        except MalformedRequestError as e:
            return 400, _error(str(e), "invalid_request_error")
        try:
            r1, r2 = self.score_pair(question, a1, a2)
        except Exception as e:  # noqa: BLE001 - the model failed: a server error
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return 500, _error(f"reward model {self.name} failed: {msg}", "server_error")
        content = reply_text(self.name, r1, r2, self.tie_margin)
        prompt_tokens = math.ceil(sum(len(t) for t in texts) / CHARS_PER_TOKEN) + 4 * len(texts)
        completion_tokens = math.ceil(len(content) / CHARS_PER_TOKEN)
        self.requests_served += 1
        return 200, {
            "id": f"chatcmpl-rm-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": f"{MAPPING_VERSION}:{self.name}:tie={self.tie_margin:g}",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _models_payload(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "aisp-bench"}],
        }

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects

            def log_message(self, fmt: str, *args: Any) -> None:
                if server.verbose:
                    sys.stderr.write(f"rm-judge: {self.address_string()} {fmt % args}\n")

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length > 0 else b""
                path = urlsplit(self.path).path.rstrip("/")
                if not path.endswith("/chat/completions"):
                    self._send(404, _error(f"unknown path {path!r}; use POST /v1/chat/completions", "not_found_error"))
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(400, _error("the request body is not JSON", "invalid_request_error"))
                    return
                status, payload = server.handle_chat(body)
                self._send(status, payload)

            def do_GET(self) -> None:  # noqa: N802
                path = urlsplit(self.path).path.rstrip("/")
                if path.endswith("/models"):
                    self._send(200, server._models_payload())
                else:
                    self._send(404, _error(f"unknown path {path!r}", "not_found_error"))

        return Handler


def _error(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


# -- judge side -------------------------------------------------------------------------------
class LocalRewardJudge(PairwiseJudge):
    """``PairwiseJudge`` for a server started in-process on a random port.

    Identical except that its cache keys hold ``local-reward-judge`` instead of the
    server's URL (whose port changes every time), so a re-run reuses the cached replies.
    The model name (``rm:<name>[@tie=...]``) still separates reward models and margins.
    """

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "base_url": LOCAL_CACHE_BASE_URL}


def build_server(
    reward_spec: str,
    *,
    tie_margin: float = 0.0,
    device: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    verbose: bool = False,
) -> RewardJudgeServer:
    """A (not yet started) server for a ``conf/reward`` name or a reward YAML path."""
    from aisp_bench.evaluate import load_reward_model

    reward, name = load_reward_model(reward_spec, device=device)
    return RewardJudgeServer(reward, name=name, tie_margin=tie_margin, host=host, port=port, verbose=verbose)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aisp_bench.judge.rm_server``: serve a reward model until interrupted."""
    p = argparse.ArgumentParser(
        prog="python -m aisp_bench.judge.rm_server",
        description="Serve a reward model as an OpenAI-compatible pairwise judge (model rm:<name>).",
    )
    p.add_argument("--reward", required=True, metavar="NAME|YAML", help="conf/reward name or reward YAML path")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    p.add_argument("--tie-margin", type=float, default=0.0, help="reward difference at or below which it is a tie")
    p.add_argument("--device", default=None, help="reward model device (default: its config's)")
    p.add_argument("--quiet", action="store_true", help="no line per request")
    args = p.parse_args(argv)
    try:
        server = build_server(
            args.reward,
            tie_margin=args.tie_margin,
            device=args.device,
            host=args.host,
            port=args.port,
            verbose=not args.quiet,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        server.start()
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - the reward model failed to load
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 1
    print(f"serving reward model {server.name} as judge model {server.model!r} at {server.base_url}", flush=True)
    print(
        "use: python -m aisp_bench.judge --runs-a ... --runs-b ... "
        f"base_url={server.base_url} model={server.model}   (OPENAI_API_KEY: any value)",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
