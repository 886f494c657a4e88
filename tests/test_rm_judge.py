"""The offline reward-model judge (``judge=reward_model``), in process.

A fake reward (words in the answer; no model is loaded) judges synthetic runs, so
verdicts, ties, both orders, the cache and the tallies can be checked by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from synthetic_runs import write_run

from aisp_bench.judge.__main__ import main as judge_main
from aisp_bench.judge.base import JudgeError, JudgeRequest
from aisp_bench.judge.prompts import Scores, parse_scores
from aisp_bench.judge.reward_judge import RewardModelJudge, reply_text, rm_model_name, verdict_scores
from aisp_bench.judge.winrate import Protocol, build_comparison, run_comparisons
from aisp_bench.rewards import RewardModel
from aisp_bench.rundir import Run
from aisp_bench.types import Message, Prompt


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
    with pytest.raises(ValueError, match="reward=NAME"):
        RewardModelJudge(None)


def test_scores_each_answer_once_reads_the_turns_and_caches(tmp_path):
    rm = WordCountReward()
    judge = RewardModelJudge(rm, cache_dir=str(tmp_path / "cache"))
    conv = Prompt("x", (Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "Joke?")))
    q = Prompt.single("q", "Why?")
    reqs = [JudgeRequest(q, "because it is so", "no"), JudgeRequest(q, "no", "because it is so"),
            JudgeRequest(q, "a b", "c d"), JudgeRequest(conv, "one", "two words")]
    replies = judge.judge(reqs)
    assert [r.scores for r in replies] == [Scores(7, 3), Scores(3, 7), Scores(5, 5), Scores(3, 7)]
    assert replies[0].content.splitlines()[1].startswith("Reward model words: r1 = 4, r2 = 1;")
    assert rm.loads >= 1 and len(rm.seen) == 6  # both orders share their two scores
    assert (conv.messages, "one") in rm.seen  # a multi-turn prompt reaches the reward model as its turns
    assert judge.model == "rm:words" and judge.plan(reqs).num_cached == 4
    # a new judge on the same cache: nothing scored, nothing loaded (a reward that cannot load is fine)
    broken = RewardModelJudge(WordCountReward(fail_load=True), cache_dir=str(tmp_path / "cache"))
    assert [r.content for r in broken.judge(reqs)] == [r.content for r in replies]
    with pytest.raises(JudgeError, match="reward model judge words: cannot load reward model 'words'"):
        broken.judge([JudgeRequest(q, "new", "answer")])
    # another margin is another judge model and other cache keys
    assert RewardModelJudge(rm, tie_margin=1.0, cache_dir=str(tmp_path / "cache")).plan(reqs).num_cached == 0


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
    a = [Run.at(write_side(tmp_path, "aisp", s, 0)) for s in (0, 1)]
    b = [Run.at(write_side(tmp_path, "bon_topp", s, 1)) for s in (0, 1)]
    return a, b


def counts(result: dict) -> list[tuple[int, int, int, int]]:
    return [(t["win"], t["draw"], t["loss"], t["invalid"]) for t in result["trials"]]


def test_comparison_end_to_end(runs, tmp_path):
    rm = WordCountReward()
    protocol = Protocol(num_prompts=len(ANSWERS), trials=2)
    comp = build_comparison(protocol, *runs, tmp_path)
    plan, [result] = run_comparisons(RewardModelJudge(rm, cache_dir=str(tmp_path / "cache")), protocol, [comp])
    assert plan.num_to_send == 2 * 7 * 2  # trials x prompts x both orders
    assert len(rm.seen) == 28  # each distinct (prompt, answer) scored once: 2 seeds x 7 prompts x 2 answers
    assert result["judge_model"] == "rm:words" and result["mode"] == "both_orders"
    assert counts(result) == [(3, 2, 1, 1)] * 2
    outcomes = {j["prompt_id"]: j["outcome"] for j in result["trials"][0]["judgements"]}
    assert outcomes == {
        "p0": "win", "p1": "win", "p2": "win", "p3": "loss", "p4": "draw", "p5": "draw", "p6": "invalid",
    }  # fmt: skip
    scores = {j["prompt_id"]: j["scores"] for j in result["trials"][0]["judgements"]}
    assert scores["p0"] == [[7, 3], [3, 7]] and scores["p4"] == [[5, 5], [5, 5]] and scores["p6"] == [None, None]
    # the answers' lengths (words of A's and B's answers, each with its "seed0") are recorded for the bias report
    words = {j["prompt_id"]: j["words"] for j in result["trials"][0]["judgements"]}
    assert words == {p: [len(a.split()) + 1, len(b.split()) + 1] for p, (a, b) in ANSWERS.items()}
    assert result["trials"][0]["order_agreement"] == 1.0  # deterministic: both orders always agree
    assert result["mean"] == pytest.approx({"win": 300 / 7, "draw": 200 / 7, "loss": 100 / 7, "invalid": 100 / 7})
    assert json.loads(comp.out.read_text()) == result
    # a tie margin of 1 word: p2 (3 vs 2 words) becomes a draw
    judge = RewardModelJudge(rm, tie_margin=1.0, cache_dir=str(tmp_path / "cache"))
    _, [tied] = run_comparisons(judge, protocol, [comp])
    assert tied["judge_model"] == "rm:words@tie=1" and counts(tied) == [(2, 3, 1, 1)] * 2


@pytest.fixture
def judge_cli(command, tmp_path):
    """judge_cli(*overrides, reward={...}, pick=True) -> (exit code, stdout, stderr) with
    judge=reward_model and (``pick``) a WordCountReward added to the reward group as ``words``."""

    def _run(*overrides, reward: dict | None = None, pick: bool = True):
        folder = tmp_path / "conf" / "reward"
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"_target_: {WordCountReward.__module__}.WordCountReward", "name: words", "device: auto"]
        lines += [f"{k}: {json.dumps(v)}" for k, v in (reward or {}).items()]
        (folder / "words.yaml").write_text("\n".join(lines))
        return command(judge_main, "judge", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "judge=reward_model",
                       *(["reward=words"] if pick else []), f"results_dir={tmp_path}", "num_prompts=7", "trials=2",
                       "method_b=bon_topp", *overrides)

    return _run


def test_cli_reward_model_judge(runs, tmp_path, judge_cli, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # never needed
    code, out, _ = judge_cli("reward.device=cpu")
    path = tmp_path / "judge" / "shp" / "tiny__rm" / "aisp_vs_bon_topp.json"
    result = json.loads(path.read_text())
    assert code == 0 and result["judge_model"] == "rm:words" and counts(result) == [(3, 2, 1, 1)] * 2
    assert "judge rm:words at in-process: 28 distinct requests, 0 cached, 28 to send" in out
    assert "win 42.9%, draw 28.6%, loss 14.3%, invalid 14.3%" in out
    # everything cached: the model is not even loaded (a reward that cannot load is fine)
    code, out, _ = judge_cli(reward={"fail_load": True})
    assert code == 0 and "28 cached, 0 to send" in out and json.loads(path.read_text()) == result
    code, out, _ = judge_cli("num_prompts=3", "dry_run=true", reward={"fail_load": True})  # nor for a dry run
    assert code == 0 and "dry run: judge rm:words" in out
    code, _, err = judge_cli("judge.tie_margin=0.5", reward={"fail_load": True})  # new verdicts: it must load
    assert code == 1 and err.strip() == ("error: reward model judge words: cannot load reward model 'words' "
                                         "from 'nowhere': no such weights")
    for args, pick, needle in ((["judge.tie_margin=-1"], True, "error: judge.tie_margin must be a finite number >= 0"),
                               ([], False, "error: judge: judge=reward_model needs a reward model: reward=NAME")):
        code, _, err = judge_cli(*args, pick=pick)
        assert code == 2 and err.startswith(needle) and err.count("\n") == 1, err


@pytest.mark.slow
def test_real_minilm_reward_judge(runs, tmp_path, compose, capsys):
    """A real (fast) reward model end to end: every verdict valid and consistent in both orders."""
    cfg = compose(["judge=reward_model", "reward=minilm_similarity", "reward.device=cpu", f"results_dir={tmp_path}",
                   "num_prompts=6", "trials=1", "method_b=bon_topp"], config_name="judge")
    assert judge_main(cfg) == 0
    result = json.loads((tmp_path / "judge" / "shp" / "tiny__rm" / "aisp_vs_bon_topp.json").read_text())
    t = result["trials"][0]
    assert result["judge_model"] == "rm:minilm_similarity" and t["n"] == 6 and t["invalid"] == 0
    assert t["order_agreement"] == 1.0 and t["win"] + t["draw"] + t["loss"] == 6
