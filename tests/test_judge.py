"""The pairwise judge against a real ``openai`` client and a local chat-completions server.

The server (``http.server`` in a thread on 127.0.0.1, port 0) speaks enough of the
chat-completions API for the client: it scores the two answers it is shown from
markers in their text (GOOD 8, BAD 3, POSITIONAL: first shown 9 / second 2, GARBAGE:
an unparsable reply), and can be told to answer 429, 500, 401, a broken body or late.
It counts requests and keeps their bodies and headers in memory only.
"""

from __future__ import annotations

import inspect
import json
import re
import secrets
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate

from aisp_bench.judge.__main__ import main as judge_main
from aisp_bench.judge.base import BudgetExceededError, JudgeError, JudgeRequest
from aisp_bench.judge.client import PairwiseJudge
from aisp_bench.judge.prompts import Scores, parse_scores
from aisp_bench.judge.winrate import (
    Protocol, a_shown_first, build_comparison, outcome, preference, run_comparisons, sample_prompt_ids,
)  # fmt: skip
from aisp_bench.rundir import Run
from aisp_bench.types import Prompt

ROOT = Path(__file__).resolve().parents[1]
ANSWER_RE = re.compile(r"\[The Start of Assistant (\d)'s Answer\]\n(.*?)\n\[The End of Assistant \1's Answer\]", re.S)


# -- the fake server --------------------------------------------------------------------
class FakeChatServer:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.queue: deque[str] = deque()  # behaviours for the next requests, then "ok"
        self.fail_marker: str | None = None  # answers containing it get a 500
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    behaviour = server.queue.popleft() if server.queue else "ok"
                user = body["messages"][-1]["content"]
                if server.fail_marker and server.fail_marker in user:
                    behaviour = "500"
                try:
                    server.respond(self, behaviour, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def count(self) -> int:
        return len(self.requests)

    @staticmethod
    def verdict(user: str) -> str:
        answers = dict(ANSWER_RE.findall(user))
        a1, a2 = answers["1"], answers["2"]
        if "GARBAGE" in a1 + a2:
            return "Both answers have merits; I cannot decide."
        if "POSITIONAL" in a1 and "POSITIONAL" in a2:
            return "9 2\nThe first answer is better."

        def score(a: str) -> int:
            return 8 if "GOOD" in a else 3 if "BAD" in a else 5

        return f"{score(a1)} {score(a2)}\nExplanation of the scores."

    def respond(self, h: BaseHTTPRequestHandler, behaviour: str, body: dict) -> None:
        if behaviour == "delay":
            time.sleep(1.0)
            behaviour = "ok"
        status, headers = 200, {"content-type": "application/json"}
        if behaviour == "ok" or behaviour == "garbage":
            content = "no scores here" if behaviour == "garbage" else self.verdict(body["messages"][-1]["content"])
            payload = {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
            }
            data = json.dumps(payload).encode()
        elif behaviour == "badbody":  # JSON announced, HTML sent
            data = b"<html>upstream error</html>"
        elif behaviour == "html":  # a proxy's page, 200
            headers["content-type"], data = "text/html", b"<html>upstream error</html>"
        elif behaviour == "nochoices":
            data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"]}).encode()
        else:
            status = int(behaviour)
            headers["retry-after-ms"] = "1"  # keep the client's backoff short
            data = json.dumps({"error": {"message": f"error {status}", "type": "test", "code": None}}).encode()
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeChatServer()
    yield s
    s.close()


@pytest.fixture
def api_key(monkeypatch) -> str:
    key = "sk-test-" + secrets.token_hex(16)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    return key


def make_judge(server: FakeChatServer, tmp_path: Path, **kw) -> PairwiseJudge:
    args = dict(
        model="fake-gpt-4",
        base_url=server.base_url,
        temperature=0.0,
        max_tokens=64,
        max_requests=1000,
        concurrency=4,
        cache_dir=str(tmp_path / "cache"),
        timeout=5.0,
        max_retries=3,
    )
    args.update(kw)
    return PairwiseJudge(**args)


def req(question: str, a1: str, a2: str) -> JudgeRequest:
    return JudgeRequest(Prompt.single("q", question), a1, a2)


def run_comparison(judge, runs_a, runs_b, results_dir: Path, progress=None, **protocol):
    """(plan, win-rate dict or None, its path) of A's runs against B's, as the command judges them."""
    p = Protocol(**{"num_prompts": 10, "trials": 3, **protocol})
    comp = build_comparison(p, [Run.at(r) for r in runs_a], [Run.at(r) for r in runs_b], results_dir)
    plan, results = run_comparisons(judge, p, [comp], progress=progress)
    return plan, (results[0] if results else None), comp.out


# -- synthetic runs ---------------------------------------------------------------------
from synthetic_runs import write_run  # noqa: E402



# prompt kinds: p00-p11 A GOOD vs B BAD (A wins); p12-p14 B GOOD vs A BAD (B wins);
# p15-p17 both POSITIONAL (a position-biased judge: draw in both orders); p18-p19 garbage.
KINDS = {f"p{i:02d}": "a" for i in range(12)} | {f"p{i:02d}": "b" for i in range(12, 15)}
KINDS |= {f"p{i:02d}": "pos" for i in range(15, 18)} | {f"p{i:02d}": "garbage" for i in range(18, 20)}
EXPECTED = {"a": "win", "b": "loss", "pos": "draw", "garbage": "invalid"}


def responses_for(side: str, seed: int) -> dict[str, str]:
    out = {}
    for pid, kind in KINDS.items():
        if kind == "a":
            text = "GOOD answer" if side == "a" else "BAD answer"
        elif kind == "b":
            text = "BAD answer" if side == "a" else "GOOD answer"
        elif kind == "pos":
            text = f"POSITIONAL answer {side}"
        else:
            text = f"GARBAGE {side}"
        out[pid] = f"{text} ({pid}, seed {seed}, {side})"
    return out


@pytest.fixture
def runs(tmp_path):
    a = [write_run(tmp_path, "aisp", s, responses_for("a", s)) for s in range(3)]
    b = [write_run(tmp_path, "bon_topp", s, responses_for("b", s)) for s in range(3)]
    return a, b


def all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


# -- parsing and verdicts ---------------------------------------------------------------
@pytest.mark.parametrize(
    "reply, expected",
    [
        ("8 7\nbecause", Scores(8, 7)),
        ("\n\n  7 3  \nwhy", Scores(7, 3)),
        ("**8 7**\nok", Scores(8, 7)),
        ("8, 7", Scores(8, 7)),
        ("8.5 10", Scores(8.5, 10)),
        ("1 1", Scores(1, 1)),
        ("Assistant 1: 8\nAssistant 2: 7", None),
        ("8\n7", None),
        ("8 7 6", None),
        ("11 2", None),
        ("0 5", None),
        ("The first is better. 8 7", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_scores(reply, expected):
    assert parse_scores(reply) == expected


def test_preference_and_outcome_rules():
    s = Scores(8, 3)
    assert preference(s, a_first=True) == "A"
    assert preference(s, a_first=False) == "B"  # the first shown was B's answer
    assert preference(Scores(5, 5), True) == "tie"
    assert preference(None, True) is None
    assert outcome(["A", "A"]) == "win"
    assert outcome(["B", "B"]) == "loss"
    assert outcome(["A", "B"]) == "draw"  # position bias: split decision
    assert outcome(["A", "tie"]) == "draw"
    assert outcome(["A", None]) == "invalid"  # never a draw
    assert outcome(["A"]) == "win" and outcome(["tie"]) == "draw" and outcome([None]) == "invalid"


def test_seeded_sampling_is_reproducible_and_trial_dependent():
    ids = [f"p{i:03d}" for i in range(300)]
    s0 = sample_prompt_ids(ids, 100, sample_seed=0, trial=0)
    assert s0 == sample_prompt_ids(list(reversed(ids)), 100, 0, 0)  # input order does not matter
    assert len(set(s0)) == 100
    assert s0 != sample_prompt_ids(ids, 100, 0, 1)
    assert s0 != sample_prompt_ids(ids, 100, 1, 0)
    assert sorted(sample_prompt_ids(ids[:5], 100, 0, 0)) == ids[:5]  # fewer than asked: all
    firsts = [a_shown_first(0, 0, i) for i in ids]
    assert firsts == [a_shown_first(0, 0, i) for i in ids]
    assert 100 < sum(firsts) < 200  # both orders occur


# -- config -------------------------------------------------------------------------------
def test_yaml_keys_match_constructor_and_instantiate(compose):
    cfg = yaml.safe_load((ROOT / "aisp_bench" / "conf" / "judge" / "gpt4.yaml").read_text())
    params = list(inspect.signature(PairwiseJudge.__init__).parameters)[1:]
    assert cfg["_target_"] == "aisp_bench.judge.client.PairwiseJudge"
    assert sorted(k for k in cfg if k != "_target_") == sorted(params)
    assert cfg["model"] == "gpt-4" and cfg["base_url"] is None
    app = compose(["judge.model=my-model", "judge.base_url=http://127.0.0.1:1/v1"], config_name="judge")
    assert (app.num_prompts, app.trials, app.mode) == (100, 3, "both_orders")  # the paper's protocol
    judge = instantiate(app.judge)
    assert isinstance(judge, PairwiseJudge)
    assert (judge.model, judge.base_url_host) == ("my-model", "127.0.0.1")
    assert judge.cache_dir == Path(app.results_dir) / "judge_cache"
    assert instantiate(compose([], config_name="judge").judge).base_url_host == "api.openai.com"
    with pytest.raises(Exception, match="nosuch"):
        compose(["judge.nosuch=1"], config_name="judge")


# -- end to end ---------------------------------------------------------------------------
def test_both_orders_end_to_end_cache_and_key(server, api_key, runs, tmp_path):
    runs_a, runs_b = runs
    judge = make_judge(server, tmp_path)
    plan, result, out = run_comparison(judge, runs_a, runs_b, tmp_path)
    assert out == tmp_path / "judge" / "shp" / "tiny__rm" / "aisp_vs_bon_topp.json" and out.is_file()
    assert plan.num_to_send == 3 * 10 * 2 and server.count == 60  # 3 trials x 10 prompts x 2 orders
    assert all(h.get("authorization") == f"Bearer {api_key}" for h in server.headers)
    assert {r["model"] for r in server.requests} == {"fake-gpt-4"}
    assert {r["max_tokens"] for r in server.requests} == {64} and {r["temperature"] for r in server.requests} == {0}

    # order flipping: each (trial, prompt) was asked with A's answer first and with it second
    seen: dict[tuple[str, str], set[str]] = {}
    for body in server.requests:
        answers = dict(ANSWER_RE.findall(body["messages"][-1]["content"]))
        a_pos = "1" if answers["1"].endswith(", a)") else "2"
        assert answers["2" if a_pos == "1" else "1"].endswith(", b)")
        seen.setdefault(answers[a_pos], set()).add(a_pos)
    assert len(seen) == 30 and all(v == {"1", "2"} for v in seen.values())

    assert result["mode"] == "both_orders" and result["judge_model"] == "fake-gpt-4"
    assert result["base_url_host"] == "127.0.0.1"
    assert (result["dataset"], result["model"], result["reward"]) == ("shp", "tiny", "rm")
    assert (result["method_a"], result["method_b"]) == ("aisp", "bon_topp")
    pcts = {k: [] for k in ("win", "draw", "loss", "invalid")}
    for k, t in enumerate(result["trials"]):
        sample = sample_prompt_ids(KINDS, 10, 0, k)
        expected = {o: 0 for o in pcts}
        for pid in sample:
            expected[EXPECTED[KINDS[pid]]] += 1
        assert {o: t[o] for o in pcts} == expected, f"trial {k}"
        assert t["n"] == 10 and t["seed"] == k and t["run_a"].endswith(f"aisp/default/seed{k}")
        assert [j["prompt_id"] for j in t["judgements"]] == sample
        for o in pcts:
            pcts[o].append(100 * expected[o] / 10)
    for o in pcts:
        assert result["mean"][o] == pytest.approx(sum(pcts[o]) / 3)
    assert sum(result["mean"].values()) == pytest.approx(100)

    # the cache: one file per request, and a second run sends nothing and gives the same file
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 60
    first = out.read_text()
    plan2, result2, _ = run_comparison(make_judge(server, tmp_path), runs_a, runs_b, tmp_path)
    assert server.count == 60 and plan2.num_to_send == 0 and plan2.num_cached == 60
    assert out.read_text() == first

    # the key is in no file written anywhere under tmp_path
    for p, data in all_bytes(tmp_path):
        assert api_key.encode() not in data, p


def test_random_order_mode_one_request_per_prompt(server, api_key, runs, tmp_path):
    runs_a, runs_b = runs
    judge = make_judge(server, tmp_path)
    _, result, _ = run_comparison(judge, runs_a, runs_b, tmp_path, mode="random_order", trials=1, num_prompts=20)
    assert server.count == 20 and result["mode"] == "random_order"
    t = result["trials"][0]
    orders = {j["prompt_id"]: j["orders"] for j in t["judgements"]}
    assert all(orders[p] == ["AB" if a_shown_first(0, 0, p) else "BA"] for p in orders)
    assert {o[0] for o in orders.values()} == {"AB", "BA"}
    # the position-biased judge picks whoever is shown first: A wins exactly where A came first
    for j in t["judgements"]:
        if KINDS[j["prompt_id"]] == "pos":
            assert j["outcome"] == ("win" if j["orders"] == ["AB"] else "loss")
        else:
            assert j["outcome"] == EXPECTED[KINDS[j["prompt_id"]]]
    assert (t["win"], t["loss"], t["invalid"]) == (
        12 + sum(a_shown_first(0, 0, p) for p in KINDS if KINDS[p] == "pos"),
        3 + sum(not a_shown_first(0, 0, p) for p in KINDS if KINDS[p] == "pos"),
        2,
    )


def test_retries_on_429_500_and_timeouts(server, api_key, tmp_path):
    judge = make_judge(server, tmp_path, concurrency=1, max_retries=3, timeout=0.3)
    server.queue.extend(["429", "500", "503"])
    t0 = time.monotonic()
    [reply] = judge.judge([req("q?", "GOOD a", "BAD b")])
    assert reply.ok and reply.scores == Scores(8, 3) and server.count == 4
    server.queue.extend(["delay"])  # slower than the 0.3 s timeout: retried
    [reply] = judge.judge([req("q2?", "BAD a", "GOOD b")])
    assert reply.ok and reply.scores == Scores(3, 8) and server.count == 6
    assert time.monotonic() - t0 < 10
    assert judge.requests_sent == 2  # the budget counts requests, not the client's retries


def test_exhausted_retries_are_reported_not_cached_and_rerun_fills_in(server, api_key, runs, tmp_path):
    runs_a, runs_b = runs
    judge = make_judge(server, tmp_path, max_retries=1)
    server.fail_marker = "(p00,"  # every request about p00 gets a 500
    sample = sample_prompt_ids(KINDS, 10, 0, 0)
    assert "p00" in sample
    out = tmp_path / "judge" / "shp" / "tiny__rm" / "aisp_vs_bon_topp.json"
    with pytest.raises(JudgeError, match="2 of 20 judge requests failed"):
        run_comparison(judge, runs_a, runs_b, tmp_path, trials=1)
    assert not out.exists()
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 18  # the successes were kept
    sent = server.count
    server.fail_marker = None
    _, result, _ = run_comparison(make_judge(server, tmp_path), runs_a, runs_b, tmp_path, trials=1)
    assert server.count == sent + 2 and result["trials"][0]["n"] == 10


def test_garbage_is_invalid_and_broken_body_is_a_failure(server, api_key, tmp_path):
    judge = make_judge(server, tmp_path, concurrency=1, max_retries=0)
    server.queue.extend(["garbage", "badbody"])
    r1, r2 = judge.judge([req("q?", "GOOD", "BAD"), req("q?", "BAD", "GOOD")])
    assert r1.ok and r1.content == "no scores here" and r1.scores is None  # invalid, cached
    assert not r2.ok and "JSONDecodeError" in r2.error  # no verdict at all: not cached
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1


def test_a_reply_that_is_not_a_completion_is_retried_and_never_cached(server, api_key, tmp_path):
    """A server answering 200 with a body that is not JSON or has no choices failed: retried like a 5xx."""
    judge = make_judge(server, tmp_path, concurrency=1, max_retries=3)
    judge.retry_delay = 0.01
    server.queue.extend(["html", "nochoices", "badbody"])
    [reply] = judge.judge([req("q?", "GOOD a", "BAD b")])
    assert reply.ok and reply.scores == Scores(8, 3) and server.count == 4 and judge.requests_sent == 1
    server.queue.extend(["html"] * 4)  # more than max_retries: a failed request, not cached
    [reply] = judge.judge([req("q2?", "GOOD a", "BAD b")])
    assert not reply.ok and "not a chat completion" in reply.error and server.count == 8
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1
    [reply] = judge.judge([req("q2?", "GOOD a", "BAD b")])  # a rerun asks again
    assert reply.ok and server.count == 9


def test_budget_refuses_before_sending(server, api_key, runs, tmp_path):
    runs_a, runs_b = runs
    judge = make_judge(server, tmp_path, max_requests=59)
    with pytest.raises(BudgetExceededError, match="60 requests to send"):
        run_comparison(judge, runs_a, runs_b, tmp_path)
    assert server.count == 0 and not (tmp_path / "cache").exists()
    # the budget is for the judge object's life: 4 requests allowed, 2 + 2 fit, then no more
    judge = make_judge(server, tmp_path, max_requests=4)
    judge.judge([req("q1", "a", "b"), req("q1", "b", "a")])
    judge.judge([req("q2", "a", "b"), req("q2", "b", "a")])
    with pytest.raises(BudgetExceededError):
        judge.judge([req("q3", "a", "b")])
    assert server.count == 4
    judge.judge([req("q1", "a", "b")])  # cached: free
    assert server.count == 4


def test_interrupt_keeps_replies_received(server, api_key, runs, tmp_path):
    runs_a, runs_b = runs
    judge = make_judge(server, tmp_path, concurrency=2)

    def interrupt(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_comparison(judge, runs_a, runs_b, tmp_path, progress=interrupt, trials=1)
    cached = len(list((tmp_path / "cache").rglob("*.json")))
    # stopped early: the 5 seen, plus replies that workers finished before the main thread
    # saw the interrupt (how many depends on scheduling), but never all 20
    assert 5 <= cached < 20
    assert server.count == cached  # every reply received is on disk
    _, result, _ = run_comparison(make_judge(server, tmp_path), runs_a, runs_b, tmp_path, trials=1)
    assert server.count == 20 and result["trials"][0]["n"] == 10  # only the rest was asked


def test_missing_key_and_fatal_errors(server, monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        make_judge(server, tmp_path).judge([req("q", "a", "b")])
    assert server.count == 0
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    server.queue.extend(["401"] * 5)
    with pytest.raises(JudgeError, match="AuthenticationError"):
        make_judge(server, tmp_path, concurrency=1).judge([req("q", "a", "b"), req("r", "a", "b")])
    assert server.count == 1  # not retried, and the batch stopped


@pytest.fixture
def judge_cli(command, tmp_path):
    """judge_cli(*overrides) -> (exit code, stdout, stderr) of the command on tmp_path's runs."""
    return lambda *overrides: command(judge_main, "judge", f"results_dir={tmp_path}",
                                      f"judge.cache_dir={tmp_path / 'cache'}", *overrides)


def test_dry_run_sends_and_writes_nothing(server, monkeypatch, runs, tmp_path, judge_cli):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # not needed for a dry run
    before = {p for p, _ in all_bytes(tmp_path)}
    code, out, _ = judge_cli("dry_run=true", f"judge.base_url={server.base_url}", "num_prompts=5",
                             "method_b=[bon_topp,bon_gaussian]")  # no bon_gaussian runs: left out, warned
    assert code == 0 and server.count == 0
    assert "30 distinct requests, 0 cached, 30 to send" in out
    assert re.search(r"~[\d,]+ input tokens, at most 30,720 output tokens", out)  # 30 x max_tokens 1024
    assert f"would write {tmp_path}/judge/shp/tiny__rm/aisp_vs_bon_topp.json" in out
    assert {p for p, _ in all_bytes(tmp_path)} == before


def test_cli_judges_and_reports(server, api_key, runs, tmp_path, judge_cli):
    args = [f"judge.base_url={server.base_url}", "num_prompts=4", "judge.max_tokens=32", "method_b=bon_topp"]
    code, out, _ = judge_cli(*args)
    path = tmp_path / "judge" / "shp" / "tiny__rm" / "aisp_vs_bon_topp.json"
    assert code == 0 and path.is_file() and str(path) in out and server.count == 24
    assert "shp: aisp vs bon_topp (both_orders, 3 trial(s)): win " in out
    assert judge_cli(*args, "judge.max_requests=1")[0] == 0  # everything cached: within any budget
    assert server.count == 24
    code, _, err = judge_cli(*args, "num_prompts=5", "judge.max_requests=1")  # new prompts: over budget
    assert code == 1 and "max_requests" in err and server.count == 24
    for bad, needle in ((["select.dataset=nope"], "no run folders under"), (["method_b=nope"], "no runs of both"),
                        (["mode=sideways"], "mode must be one of both_orders, random_order, got 'sideways'"), (["trials=0"], "trials must be")):
        code, _, err = judge_cli(*args, *bad)
        assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    for p, data in all_bytes(tmp_path):
        assert api_key.encode() not in data, p
