"""The offline reward-model judge (``aisp_bench.judge.rm_server``) behind the real ``openai`` client.

A fake reward (words in the answer; no model is loaded) is served by the real server;
``PairwiseJudge``, ``run_comparison`` and ``python -m aisp_bench.judge
--local-reward-judge`` run against it unchanged, so verdicts, ties, both orders, the
cache and the tallies can be checked by hand.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from synthetic_runs import write_run

from aisp_bench.judge import PairwiseJudge, build_messages, parse_scores, run_comparison
from aisp_bench.judge.__main__ import main as judge_main
from aisp_bench.judge.prompts import USER_TEMPLATE, Scores
from aisp_bench.judge.rm_server import (
    LocalRewardJudge,
    MalformedRequestError,
    RewardJudgeServer,
    parse_user_message,
    question_prompt,
    reply_text,
    rm_model_name,
    verdict_scores,
)
from aisp_bench.rewards import RewardModel
from aisp_bench.types import Message, Prompt

ROOT = Path(__file__).resolve().parents[1]


class WordCountReward(RewardModel):
    """r = words in the answer (NaN if it contains NAN); records what it scores."""

    def __init__(self, name: str = "words", device: str = "auto", fail_load: bool = False) -> None:
        self.name = name
        self.device = device
        self.fail_load = fail_load
        self.loads = 0
        self.seen: list[tuple[tuple[Message, ...], str]] = []

    def load(self):
        if self.fail_load:
            raise RuntimeError("cannot load reward model 'words' from 'nowhere': no such weights")
        self.loads += 1
        return self

    def _score_batch(self, prompts, responses):
        self.seen += [(p.messages, r) for p, r in zip(prompts, responses)]
        return torch.tensor([math.nan if "NAN" in r else float(len(r.split())) for r in responses])


@pytest.fixture
def rm():
    return WordCountReward()


@pytest.fixture
def server(rm):
    with RewardJudgeServer(rm) as s:
        yield s


def client(server: RewardJudgeServer) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-unused", base_url=server.base_url, max_retries=0, timeout=10)


def ask(server: RewardJudgeServer, question: str, a1: str, a2: str):
    return client(server).chat.completions.create(model=server.model, messages=build_messages(question, a1, a2))


# -- the message, the mapping ------------------------------------------------------------
@pytest.mark.parametrize(
    "q,a1,a2",
    [
        ("What is 2+2?", "4", "Four."),
        ("multi\nline {braces} [Question]", "line 1\n\nline 2\n[The End of it]", ""),
        ("Human: hi\n\nAssistant: hello\n\nHuman: and?", " ", "x" * 500),
    ],
)
def test_user_message_round_trips(q, a1, a2):
    assert parse_user_message(USER_TEMPLATE.format(question=q, answer1=a1, answer2=a2)) == (q, a1, a2)


@pytest.mark.parametrize(
    "text",
    [
        "hello",
        USER_TEMPLATE.format(question="q", answer1="a", answer2="b") + "\nextra",
        "preamble " + USER_TEMPLATE.format(question="q", answer1="a", answer2="b"),
        USER_TEMPLATE.format(question="q", answer1="a", answer2="b").replace("Assistant 2", "Assistant B"),
    ],
)
def test_malformed_user_messages_are_refused(text):
    with pytest.raises(MalformedRequestError, match="USER_TEMPLATE"):
        parse_user_message(text)


def test_mapping_ties_and_winner_in_both_orders():
    assert verdict_scores(3.0, 1.0) == (7, 3) and verdict_scores(1.0, 3.0) == (3, 7)
    assert verdict_scores(-2.5, -2.5) == (5, 5)
    assert verdict_scores(1.0, 1.5, tie_margin=0.5) == (5, 5)  # |diff| <= margin: tie
    assert verdict_scores(1.0, 1.6, tie_margin=0.5) == (3, 7)
    assert verdict_scores(1.0, 1.0 + 1e-6) == (3, 7)  # margin 0: only equal rewards tie
    for r1, r2, m in [(0.3, -0.2, 0.0), (-7.0, 5.0, 1.0), (2.0, 2.0, 0.0), (1.0, 1.4, 0.5)]:
        text = reply_text("x", r1, r2, m)
        s, t = parse_scores(text), parse_scores(reply_text("x", r2, r1, m))
        assert (s.first, s.second) == (t.second, t.first)  # swapping answers swaps scores
        assert f"r1 = {r1:.6g}, r2 = {r2:.6g}" in text.splitlines()[1]
    assert parse_scores(reply_text("x", math.nan, 1.0)) is None  # invalid, never a made-up score
    assert rm_model_name("ultrarm") == "rm:ultrarm" and rm_model_name("ultrarm", 0.25) == "rm:ultrarm@tie=0.25"
    with pytest.raises(ValueError, match="tie_margin"):
        RewardJudgeServer(WordCountReward(), tie_margin=-1)


def test_multi_turn_transcripts_become_conversations():
    conv = Prompt(
        "x", (Message("user", "Hi"), Message("assistant", "Hello! How can I help?"), Message("user", "A joke?"))
    )
    assert question_prompt(conv.transcript()).messages == conv.messages
    assert question_prompt(conv.transcript(), split_turns=False).messages == (Message("user", conv.transcript()),)
    for single in ("What is AI?", "Human: a question that starts oddly", "Human: a\n\nAssistant: b"):
        assert question_prompt(single).messages == (Message("user", single),)  # not a valid conversation


# -- the server behind the real openai client -------------------------------------------------
def test_openai_client_gets_parseable_replies(server, rm):
    assert rm.loads == 1 and not rm.seen  # loaded by start(), before any request
    r = ask(server, "Why?", "because it is so", "no")
    content = r.choices[0].message.content
    assert parse_scores(content) == Scores(7, 3)
    assert content.splitlines()[1].startswith("Reward model words: r1 = 4, r2 = 1;")
    assert r.model == "rm:words" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 50 and r.usage.completion_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the other order: the same rewards (memo: nothing re-scored), the scores swapped
    r2 = ask(server, "Why?", "no", "because it is so")
    assert parse_scores(r2.choices[0].message.content) == Scores(3, 7)
    assert server.pairs_scored == 2 and len(rm.seen) == 2
    assert parse_scores(ask(server, "Why?", "a b", "c d").choices[0].message.content) == Scores(5, 5)
    assert rm.seen[0][0] == (Message("user", "Why?"),)
    # a multi-turn question reaches the reward model as its turns
    conv = Prompt("x", (Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Joke?")))
    ask(server, conv.transcript(), "one", "two words")
    assert rm.seen[-1][0] == conv.messages


def test_bad_requests_get_400_or_404(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError, match="not an aisp-bench pairwise judge message") as e:
        c.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Which is better?"}])
    assert e.value.status_code == 400
    with pytest.raises(openai.NotFoundError, match="serves 'rm:words'"):
        c.chat.completions.create(model="gpt-4", messages=build_messages("q", "a", "b"))
    with pytest.raises(openai.BadRequestError, match="last message must be the user's"):
        c.chat.completions.create(model=server.model, messages=[{"role": "assistant", "content": "x"}])
    req = urllib.request.Request(server.base_url + "/chat/completions", data=b"{not json", method="POST")
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as e:
        no_proxy.open(req, timeout=5)
    assert e.value.code == 400 and b"not JSON" in e.value.read()
    assert server.pairs_scored == 0 and server.requests_served == 0


# -- run_comparison end to end -----------------------------------------------------------------
# A's and B's answers per prompt (words count): p0-p2 A longer (win), p3 B longer (loss),
# p4-p5 as long (draw: tie), p6 NaN reward (invalid); p2 differs by one word only.
ANSWERS = {
    "p0": ("one two three four", "one"),
    "p1": ("a b c d e f", "a b"),
    "p2": ("x y z", "x y"),
    "p3": ("short", "much longer answer here"),
    "p4": ("same length", "equal words"),
    "p5": ("hi", "ho"),
    "p6": ("NAN here", "fine answer"),
}


def write_side(root: Path, method: str, seed: int, side: int) -> Path:
    """A run whose answers are side ``side`` of ANSWERS, plus one word naming the seed."""
    return write_run(root, method, seed, {pid: f"{answers[side]} seed{seed}" for pid, answers in ANSWERS.items()})


@pytest.fixture
def runs(tmp_path):
    a = [write_side(tmp_path, "aisp", s, 0) for s in (0, 1)]
    b = [write_side(tmp_path, "bon_topp", s, 1) for s in (0, 1)]
    return a, b


def local_judge(server: RewardJudgeServer, tmp_path: Path, **kw) -> PairwiseJudge:
    args = dict(
        model=server.model,
        base_url=server.base_url,
        max_tokens=64,
        num_prompts=len(ANSWERS),
        trials=2,
        cache_dir=str(tmp_path / "cache"),
        timeout=10,
        max_retries=0,
    )
    return LocalRewardJudge(**{**args, **kw})


def counts(result: dict) -> list[tuple[int, int, int, int]]:
    return [(t["win"], t["draw"], t["loss"], t["invalid"]) for t in result["trials"]]


def test_run_comparison_end_to_end(rm, runs, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unused")
    runs_a, runs_b = runs
    with RewardJudgeServer(rm) as server:
        plan, result, out = run_comparison(local_judge(server, tmp_path), runs_a, runs_b, out=tmp_path / "w.json")
        assert server.requests_served == 2 * 7 * 2  # trials x prompts x both orders
        # each distinct (question, answer) scored once: 2 seeds x 7 prompts x 2 answers
        assert server.pairs_scored == 28
    assert plan.num_to_send == 28 and result["judge_model"] == "rm:words" and result["mode"] == "both_orders"
    assert counts(result) == [(3, 2, 1, 1)] * 2
    outcomes = {j["prompt_id"]: j["outcome"] for j in result["trials"][0]["judgements"]}
    assert outcomes == {
        "p0": "win", "p1": "win", "p2": "win", "p3": "loss", "p4": "draw", "p5": "draw", "p6": "invalid",
    }  # fmt: skip
    scores = {j["prompt_id"]: j["scores"] for j in result["trials"][0]["judgements"]}
    assert scores["p0"] == [[7, 3], [3, 7]] and scores["p4"] == [[5, 5], [5, 5]] and scores["p6"] == [None, None]
    assert result["trials"][0]["order_agreement"] == 1.0  # deterministic: both orders always agree
    assert result["mean"] == pytest.approx({"win": 300 / 7, "draw": 200 / 7, "loss": 100 / 7, "invalid": 100 / 7})
    assert json.loads(out.read_text()) == result

    # a new server on another port: the cache keys do not depend on the port, nothing is sent
    with RewardJudgeServer(rm) as server2:
        plan2, result2, _ = run_comparison(local_judge(server2, tmp_path), runs_a, runs_b, out=tmp_path / "w.json")
        assert plan2.num_to_send == 0 and server2.requests_served == 0
    assert counts(result2) == counts(result)

    # a tie margin of 1 word: p2 (3 vs 2 words) becomes a draw; another model name, other keys
    with RewardJudgeServer(rm, tie_margin=1.0) as server3:
        plan3, result3, _ = run_comparison(local_judge(server3, tmp_path), runs_a, runs_b, out=tmp_path / "t.json")
        assert plan3.num_to_send == 28 and server3.requests_served == 28
    assert result3["judge_model"] == "rm:words@tie=1"
    assert counts(result3) == [(2, 3, 1, 1)] * 2


# -- the command line ------------------------------------------------------------------------------
def reward_yaml(tmp_path: Path, name: str = "words.yaml", **extra) -> Path:
    path = tmp_path / name
    lines = [f"_target_: {WordCountReward.__module__}.WordCountReward", "name: words", "device: auto"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_local_reward_judge(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    runs_a, runs_b = runs
    base = [
        "--runs-a", str(runs_a[0].parent / "seed*"),
        "--runs-b", str(runs_b[0].parent / "seed*"),
        "--results-dir", str(tmp_path / "results"),
        f"cache_dir={tmp_path / 'cache'}", "num_prompts=7", "trials=2", "max_retries=0",
    ]  # fmt: skip
    yaml_path = reward_yaml(tmp_path)
    assert judge_main([*base, "--local-reward-judge", str(yaml_path), "--reward-device", "cpu"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "results" / "judge" / "shp" / "tiny__rm" / "aisp_vs_bon_topp.json"
    result = json.loads(path.read_text())
    assert result["judge_model"] == "rm:words" and result["base_url_host"] == "127.0.0.1"
    assert counts(result) == [(3, 2, 1, 1)] * 2
    assert "judge rm:words at 127.0.0.1: 28 distinct requests, 0 cached, 28 to send" in out
    assert "local reward judge rm:words: 28 requests, 28 pairs scored" in out
    assert "win 42.9%, draw 28.6%, loss 14.3%, invalid 14.3%" in out
    assert "OPENAI_API_KEY" not in os.environ  # the dummy key was only set for the run

    # everything cached: the server is not even started (a reward that cannot load is fine)
    broken = reward_yaml(tmp_path, "broken.yaml", fail_load=True)
    assert judge_main([*base, "--local-reward-judge", str(broken)]) == 0
    out = capsys.readouterr().out
    assert "28 cached, 0 to send" in out and "0 requests, 0 pairs scored" in out
    assert json.loads(path.read_text()) == result
    # ... and a dry run loads nothing either
    assert judge_main([*base, "num_prompts=3", "--local-reward-judge", str(broken), "--dry-run"]) == 0
    assert "dry run: judge rm:words at 127.0.0.1" in capsys.readouterr().out
    # new requests with a reward that cannot load: one line, exit 1
    assert judge_main([*base, "--local-reward-judge", str(broken), "--tie-margin", "0.5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: local reward judge words: cannot load reward model 'words' from 'nowhere': no such weights"

    for args, needle in (
        (["--tie-margin", "1"], "--tie-margin needs --local-reward-judge"),
        (["--reward-device", "cpu"], "--reward-device needs --local-reward-judge"),
        (["--local-reward-judge", str(yaml_path), "model=gpt-4"], "drop the override 'model=gpt-4'"),
        (["--local-reward-judge", str(yaml_path), "judge.base_url=http://x/v1"], "sets model and base_url"),
        (["--local-reward-judge", str(yaml_path), "--tie-margin", "-1"], "--tie-margin must be"),
        (["--local-reward-judge", "nosuch_rm"], "known: "),
    ):
        assert judge_main([*base, *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert b"sk-" not in p.read_bytes(), p  # no key of any kind was written


def test_standalone_server_process(tmp_path):
    """``python -m aisp_bench.judge.rm_server``: prints its base_url, serves, stops on Ctrl-C."""
    yaml_path = reward_yaml(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT)])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aisp_bench.judge.rm_server", "--reward", str(yaml_path), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    watchdog = threading.Timer(60, proc.kill)  # never hang the suite on a stuck child
    watchdog.start()
    try:
        line = proc.stdout.readline()
        assert "as judge model 'rm:words' at http://127.0.0.1:" in line, (line, proc.stderr.read())
        base_url = line.rsplit(" at ", 1)[1].strip()
        assert "model=rm:words" in proc.stdout.readline()
        c = openai.OpenAI(api_key="x", base_url=base_url, max_retries=0, timeout=10)
        r = c.chat.completions.create(model="rm:words", messages=build_messages("q", "a", "b c"))
        assert parse_scores(r.choices[0].message.content) == Scores(3, 7)
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    bad = subprocess.run(
        [sys.executable, "-m", "aisp_bench.judge.rm_server", "--reward", "nosuch_rm"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown reward 'nosuch_rm'")


@pytest.mark.slow
def test_cli_with_real_minilm_reward(runs, tmp_path, capsys, monkeypatch):
    """A real (fast) reward model end to end: every verdict valid and consistent in both orders."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    runs_a, runs_b = runs
    args = [
        "--runs-a", str(runs_a[0].parent / "seed*"), "--runs-b", str(runs_b[0].parent / "seed*"),
        "--out", str(tmp_path / "m.json"), "--local-reward-judge", "minilm_similarity", "--reward-device", "cpu",
        f"cache_dir={tmp_path / 'cache'}", "num_prompts=6", "trials=1",
    ]  # fmt: skip
    assert judge_main(args) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    t = result["trials"][0]
    assert result["judge_model"] == "rm:minilm_similarity" and t["n"] == 6 and t["invalid"] == 0
    assert t["order_agreement"] == 1.0 and t["win"] + t["draw"] + t["loss"] == 6
