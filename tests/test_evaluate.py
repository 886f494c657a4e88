"""``python -m aisp_bench.evaluate`` on tiny synthetic run folders (the command run in process on its composed config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aisp_bench.evaluate import evaluate_run, main
from aisp_bench.metrics.coherence import MINILM_LABEL, Encoder
from aisp_bench.rundir import read_json

RESPONSES = ["a b c d e", "the cat the cat the cat\n\nUser: and then?", ""]
# hand-counted diversities: 0.4, 1/15 (cut at "User:"), 0 (empty -> " ")
DIVERSITY = (0.4 + 1 / 15 + 0.0) / 3


def make_run(root: Path, seed: int = 0, torn: bool = True, summary: bool = True) -> Path:
    run = root / "runs" / "shp" / "tiny__rm" / "aisp" / "default" / f"seed{seed}"
    run.mkdir(parents=True)
    config = {
        "seed": seed,
        "method": {"name": "aisp"},
        "model": {"name": "tiny", "stop_strings": []},
        "reward": {"name": "rm"},
        "dataset": {"name": "shp"},
        "generation": {"max_new_tokens": 16},
    }
    (run / "manifest.json").write_text(json.dumps({"config": config, "versions": {}, "git_commit": "x"}))
    lines = []
    for i, resp in enumerate(RESPONSES):
        rec = {
            "prompt_id": str(i),
            "prompt": f"Question number {i}?",
            "messages": [{"role": "user", "content": f"Question number {i}?"}],
            "response": resp,
            "reward": [1.0, -2.0, 4.0][i],
            "sample_rewards": [0.0],
            "num_samples": 4,
            "num_tokens": 40,
            "response_tokens": [5, 9, 0][i],
            "seconds": 0.5,
            "finish_reason": "eos",
        }
        lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"prompt_id": "3", "prompt": "Quest'  # a crash mid-write
    (run / "records.jsonl").write_text(text)
    if summary:
        (run / "summary.json").write_text(
            json.dumps({"num_prompts": 4, "num_done": 3, "mean_reward": 1.0, "complete": False, "custom": [1, 2]})
        )
    return run


class FixedEncoder(Encoder):
    """Embeds every text as the same unit vector: coherence is exactly 1."""

    label = "fixed (test)"

    def __init__(self):
        super().__init__(max_length=8, device="cpu")
        self.model = object()

    def load(self):
        return self

    def _embed(self, texts):
        return torch.ones(len(texts), 4) / 2


def test_evaluate_run_writes_metrics_and_keeps_other_keys(tmp_path):
    run = make_run(tmp_path)
    status, m = evaluate_run(run, FixedEncoder())
    assert status == "updated"
    summary = read_json(run / "summary.json")
    assert summary["custom"] == [1, 2] and summary["num_done"] == 3 and summary["complete"] is False
    got = summary["metrics"]
    assert got == m
    assert got["num_records"] == 3  # the torn 4th line was dropped
    assert got["reward_mean"] == pytest.approx(1.0)
    assert got["diversity"] == pytest.approx(DIVERSITY)
    assert got["coherence"] == pytest.approx(1.0) and got["coherence_encoder"] == "fixed (test)"
    assert got["response_tokens_mean"] == pytest.approx(14 / 3)
    assert got["response_words_mean"] == pytest.approx((5 + 6 + 0) / 3)
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "metrics_per_prompt.json", "records.jsonl",
                                                     "summary.json"]
    # the per-prompt values the means average, in the records' order, under the same fingerprint
    per = read_json(run / "metrics_per_prompt.json")
    assert per["fingerprint"] == m["fingerprint"] and per["prompt_ids"] == ["0", "1", "2"]
    assert per["reward"] == [1.0, -2.0, 4.0] and per["coherence"] == pytest.approx([1.0] * 3)
    assert per["diversity"] == pytest.approx([0.4, 1 / 15, 0.0])


def test_evaluate_is_idempotent_and_tracks_its_inputs(tmp_path):
    run = make_run(tmp_path)
    enc = FixedEncoder()
    evaluate_run(run, enc)
    before = (run / "summary.json").read_bytes()
    assert evaluate_run(run, enc)[0] == "up to date"
    assert (run / "summary.json").read_bytes() == before
    assert evaluate_run(run, enc, force=True)[0] == "updated"
    assert (run / "summary.json").read_bytes() == before  # same inputs, same file
    # new records -> recomputed: the torn line is replaced by a complete 4th record
    lines = (run / "records.jsonl").read_text().splitlines()[:3]
    lines.append(json.dumps({"prompt_id": "3", "prompt": "Q?", "response": "w x y z", "reward": 0.0}))
    (run / "records.jsonl").write_text("\n".join(lines) + "\n")
    status, m = evaluate_run(run, enc)
    assert status == "updated" and m["num_records"] == 4
    assert m["diversity"] == pytest.approx((0.4 + 1 / 15 + 0.0 + 0.25) / 4)

    # a different encoder is a different result
    class Other(FixedEncoder):
        label = "other (test)"

    assert evaluate_run(run, Other())[0] == "updated"


NO_COH = "metrics=[reward_mean,diversity,response_tokens_mean,response_words_mean,num_records]"


@pytest.fixture
def evaluate(command, tmp_path):
    """evaluate(*overrides) -> (exit code, stdout, stderr) of the command on tmp_path's runs."""
    return lambda *overrides: command(main, "evaluate", f"results_dir={tmp_path}", *overrides)


def test_cli_without_coherence_and_errors(tmp_path, evaluate):
    run = make_run(tmp_path)
    make_run(tmp_path, seed=1, summary=False)  # unfinished: skipped
    code, out, err = evaluate(NO_COH)
    assert code == 0 and "1 updated, 0 up to date, 1 skipped, 0 failed" in out and "seed1: skipped" in err
    m = read_json(run / "summary.json")["metrics"]
    assert "coherence" not in m and m["diversity"] == pytest.approx(DIVERSITY)
    before = (run / "summary.json").read_bytes()
    code, out, _ = evaluate(NO_COH, "select.seed=0")
    assert code == 0 and "1 run(s): 0 updated, 1 up to date" in out and (run / "summary.json").read_bytes() == before

    for args, needle in ((["select.dataset=hh_rlhf"], "no run folders under"), (["select.seed=[x]"], "select.seed"),
                         (["metrics=[reward_mean,divrsity]"], "known:"), (["encoder=simcs"], "known: minilm"),
                         (["encoder=minilm", "device=cuda:7"], "device")):
        code, _, err = evaluate(*args)
        assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, (args, err)

    (run / "records.jsonl").write_text('{"prompt_id": 1}\nnot json\n{"prompt_id": 2}\n')
    before = (run / "summary.json").read_bytes()
    code, _, err = evaluate(NO_COH, "force=true")
    assert code == 2 and "records.jsonl: line 2 is corrupt" in err  # refused before any summary is written
    assert (run / "summary.json").read_bytes() == before


def test_cli_simcse_unavailable_names_minilm(tmp_path, evaluate, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run = make_run(tmp_path)
    before = (run / "summary.json").read_bytes()
    code, _, err = evaluate("device=cpu", "metrics=[reward_mean,coherence]")
    if code == 0:
        pytest.skip("the SimCSE checkpoint is cached on this machine")
    assert code == 1 and "encoder=minilm" in err and len(err.strip().splitlines()) == 1
    assert (run / "summary.json").read_bytes() == before  # never a silent substitute


@pytest.mark.slow
def test_cli_with_minilm_stand_in(tmp_path, evaluate):
    run = make_run(tmp_path)
    code, out, _ = evaluate("encoder=minilm", "device=cpu", "metrics=[reward_mean,coherence,num_records]")
    assert code == 0
    m = read_json(run / "summary.json")["metrics"]
    assert m["coherence_encoder"] == MINILM_LABEL and MINILM_LABEL in out
    assert -1.0 <= m["coherence"] <= 1.0 and m["num_records"] == 3
    assert "1 up to date" in evaluate("encoder=minilm", "metrics=[reward_mean,coherence,num_records]")[1]


# -- reward=NAME: an evaluation reward model (Table 1's "rewards by UltraRM") ----------------
from aisp_bench.evaluate import eval_rewards_path  # noqa: E402
from aisp_bench.rewards import RewardModel  # noqa: E402

NAMES_NO_COH = NO_COH.split("=", 1)[1].strip("[]").split(",")
# words of the cleaned responses: 5, 6 (cut at "User:"), 0 (empty -> " ")
WORDS_MEAN = (5 + 6 + 0) / 3


class WordReward(RewardModel):
    """r = words in the response + 100 per extra message of the prompt; counts what it scores."""

    def __init__(self, name: str = "words", device: str = "auto", fail_load: bool = False):
        self.name = name
        self.device = device
        self.fail_load = fail_load
        self.scored: list[tuple[int, str]] = []  # (number of prompt messages, response)

    def load(self):
        if self.fail_load:
            raise RuntimeError("cannot load reward model 'words' from 'nowhere': no such weights\nsecond line")
        return self

    def _score_batch(self, prompts, responses):
        self.scored += [(len(p.messages), r) for p, r in zip(prompts, responses)]
        return torch.tensor([len(r.split()) + 100.0 * (len(p.messages) - 1) for p, r in zip(prompts, responses)])


def reward_option(tmp_path: Path, name: str = "words", **extra) -> list[str]:
    """Overrides that add ``reward/<name>.yaml`` (a WordReward) to the config search path and pick it."""
    folder = tmp_path / "conf" / "reward"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"_target_: {WordReward.__module__}.WordReward", "name: words", "device: auto"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"reward={name}"]


def test_eval_reward_replaces_reward_mean_and_names_both(tmp_path):
    run = make_run(tmp_path)
    rm = WordReward()
    status, m = evaluate_run(run, None, names=NAMES_NO_COH, reward=rm)
    assert status == "updated"
    assert m["reward_mean"] == pytest.approx(WORDS_MEAN)
    assert (m["reward_model"], m["reward_source"]) == ("words", "evaluated")
    assert m["run_reward_mean"] == pytest.approx(1.0)  # the run's own: (1 - 2 + 4) / 3
    assert list(m)[:4] == ["reward_mean", "reward_model", "reward_source", "run_reward_mean"]
    # what was scored: each record's messages and its *cleaned* response
    assert sorted(rm.scored) == sorted([(1, "a b c d e"), (1, "the cat the cat the cat"), (1, " ")])
    assert read_json(run / "summary.json")["metrics"] == m
    cache = read_json(eval_rewards_path(run, "words"))["scores"].values()
    assert [(c["prompt_id"], c["reward"]) for c in cache] == [("0", 5.0), ("1", 6.0), ("2", 0.0)]

    # idempotent: same reward, nothing scored, file unchanged
    before = (run / "summary.json").read_bytes()
    assert evaluate_run(run, None, names=NAMES_NO_COH, reward=rm)[0] == "up to date"
    assert len(rm.scored) == 3 and (run / "summary.json").read_bytes() == before

    # no --reward: the run's own reward and the manifest's reward name
    status, m = evaluate_run(run, None, names=NAMES_NO_COH)
    assert status == "updated"
    assert (m["reward_mean"], m["run_reward_mean"]) == (pytest.approx(1.0), pytest.approx(1.0))
    assert (m["reward_model"], m["reward_source"]) == ("rm", "run")

    # back to the evaluation reward: recomputed from the score cache, nothing re-scored
    status, m = evaluate_run(run, None, names=NAMES_NO_COH, reward=rm)
    assert status == "updated" and m["reward_mean"] == pytest.approx(WORDS_MEAN) and len(rm.scored) == 3
    assert (run / "summary.json").read_bytes() == before
    # another reward name is another fingerprint and another cache file
    other = WordReward(name="words2")
    assert evaluate_run(run, None, names=NAMES_NO_COH, reward=other)[0] == "updated"
    assert len(other.scored) == 3 and eval_rewards_path(run, "words2").is_file()
    # --force re-scores (and gives the same block)
    assert evaluate_run(run, None, names=NAMES_NO_COH, reward=rm, force=True)[0] == "updated"
    assert len(rm.scored) == 6 and (run / "summary.json").read_bytes() == before


def test_a_change_of_the_reward_settings_scores_again(tmp_path):
    from aisp_bench.evaluate import reward_settings

    run, rm = make_run(tmp_path), WordReward()
    a = {"reward": reward_settings({"name": "words", "max_length": 10, "batch_size": 2})}
    same = {"reward": reward_settings({"name": "words", "max_length": 10, "batch_size": 64, "device": "cpu"})}
    b = {"reward": reward_settings({"name": "words", "max_length": 20})}
    assert a == same and a != b  # batch sizes and the device are tuning, max_length is not
    path = eval_rewards_path(run, "words")
    assert evaluate_run(run, None, names=NAMES_NO_COH, reward=rm, settings=a)[0] == "updated"
    assert len(rm.scored) == 3 and read_json(path)["settings"] == a["reward"]
    assert evaluate_run(run, None, names=NAMES_NO_COH, reward=rm, settings=same)[0] == "up to date"
    assert evaluate_run(run, None, names=NAMES_NO_COH, reward=rm, settings=b)[0] == "updated"
    assert len(rm.scored) == 6 and read_json(path)["settings"] == b["reward"]  # every pair scored again
    # a cache written before settings were recorded is taken as it is, and stamped
    cache = read_json(path)
    del cache["settings"]
    path.write_text(json.dumps(cache))
    assert evaluate_run(run, None, names=NAMES_NO_COH, reward=rm, settings=a)[0] == "updated"  # a's fingerprint
    assert len(rm.scored) == 6 and read_json(path)["settings"] == a["reward"]


def test_eval_reward_reads_messages_and_scores_only_new_records(tmp_path):
    run = make_run(tmp_path, torn=False)
    recs = [json.loads(x) for x in (run / "records.jsonl").read_text().splitlines()]
    recs[1]["messages"] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Question number 1?"},
    ]
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rm = WordReward()
    _, m = evaluate_run(run, None, names=NAMES_NO_COH, reward=rm)
    assert m["reward_mean"] == pytest.approx((5 + 206 + 0) / 3)  # record 1: 3 messages -> +200
    # the run grew by one record: only that one is scored
    recs.append({"prompt_id": "3", "prompt": "Q?", "response": "w x y z", "reward": 0.0})  # no messages
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    status, m = evaluate_run(run, None, names=NAMES_NO_COH, reward=rm)
    assert status == "updated" and rm.scored[3:] == [(1, "w x y z")]
    assert m["reward_mean"] == pytest.approx((5 + 206 + 0 + 4) / 4) and m["num_records"] == 4


def test_cli_reward_from_the_reward_group_and_errors(tmp_path, evaluate):
    run = make_run(tmp_path)
    code, out, _ = evaluate(NO_COH, *reward_option(tmp_path), "reward.device=cpu")
    assert code == 0 and "[words]" in out and "1 updated" in out
    m = read_json(run / "summary.json")["metrics"]
    assert m["reward_mean"] == pytest.approx(WORDS_MEAN) and m["reward_source"] == "evaluated"
    assert "1 up to date" in evaluate(NO_COH, *reward_option(tmp_path))[1]  # reward.device: not a setting
    settings = read_json(eval_rewards_path(run, "words"))["settings"]
    code, out, _ = evaluate(NO_COH, *reward_option(tmp_path, fail_load=False))  # another setting of "words"
    assert code == 0 and "1 updated" in out and read_json(eval_rewards_path(run, "words"))["settings"] != settings

    before = (run / "summary.json").read_bytes()
    for args, needle in (
        ([*reward_option(tmp_path), "metrics=[diversity]"], "needs the reward_mean metric"),
        ([NO_COH, *reward_option(tmp_path, "bogus", bogus=1)], "bogus"),
    ):
        code, _, err = evaluate(*args)
        assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    # a reward that cannot load: one line, exit 1, nothing written
    code, _, err = evaluate(NO_COH, *reward_option(tmp_path, "broken", fail_load=True), "force=true")
    assert code == 1
    assert err.strip() == "error: cannot load evaluation reward 'words': cannot load reward model 'words' from " \
        "'nowhere': no such weights"
    assert (run / "summary.json").read_bytes() == before


def test_paper_reward_builds_without_loading(compose):
    from hydra.utils import instantiate

    reward = instantiate(compose(["reward=ultrarm", "reward.device=cuda:1"], config_name="evaluate").reward)
    assert reward.name == "ultrarm" and reward.device == "cuda:1"
    assert reward.model is None  # nothing loaded or downloaded


# -- gold_reward=NAME and base_logprob -----------------------------------------------------
from aisp_bench.evaluate import BasePolicy, eval_logprobs_path  # noqa: E402
from aisp_bench.prefix_scoring import ResponseLogProb  # noqa: E402
from aisp_bench.rundir import Run  # noqa: E402


class WordEngine:
    """Scores a response as -2 per word (its "tokens"), and records each call (prompt ids, responses)."""

    def __init__(self):
        self.scored: list[str] = []
        self.calls: list[tuple[list[str], list[list[str]]]] = []

    def response_logprobs(self, prompts, responses):
        self.scored += [r for rs in responses for r in rs]
        self.calls.append(([p.id for p in prompts], [list(rs) for rs in responses]))
        return [[ResponseLogProb(-2.0 * len(r.split()), len(r.split())) for r in rs] for rs in responses]


class WordPolicy(BasePolicy):
    """A BasePolicy whose engine is a WordEngine (built once per run that needs it)."""

    def __init__(self):
        super().__init__()
        self.built = 0
        self.word_engine = WordEngine()

    def engine(self, run):
        self.built += 1
        return self.word_engine

    def response_logprobs(self, run, prompts, responses):
        return self.engine(run).response_logprobs(prompts, responses)


def test_gold_reward_and_base_logprob_beside_the_run_reward(tmp_path):
    run = make_run(tmp_path)
    names = [*NAMES_NO_COH, "base_logprob"]
    policy = WordPolicy()
    with pytest.warns(UserWarning, match="not held out"):  # the gold reward is named like the run's own (rm)
        evaluate_run(run, None, names=names, gold_reward=WordReward(name="rm"), policy=policy)
    status, m = evaluate_run(run, None, names=names, gold_reward=WordReward(), policy=policy)
    assert status == "updated"
    assert m["reward_mean"] == pytest.approx(1.0) and m["reward_source"] == "run"  # the optimised reward stays
    assert (m["gold_reward_mean"], m["gold_reward_model"]) == (pytest.approx(WORDS_MEAN), "words")
    # per-token means: -2 for each response with words; the raw response is scored (not cut at
    # "User:"), an empty one has no tokens and is left out of the mean
    assert m["base_logprob"] == pytest.approx(-2.0) and m["base_logprob_model"] == "tiny"
    per = read_json(run / "metrics_per_prompt.json")
    assert per["gold_reward"] == [5.0, 6.0, 0.0] and per["base_logprob"] == [-2.0, -2.0, None]
    assert "checkpoints" not in per  # records without budget checkpoints
    assert policy.word_engine.scored == RESPONSES and policy.built == 1  # scored once, cached per run
    assert eval_logprobs_path(run, "tiny").is_file()
    # idempotent, and a changed gold reward recomputes from the caches without the policy
    assert evaluate_run(run, None, names=names, gold_reward=WordReward(), policy=policy)[0] == "up to date"
    assert evaluate_run(run, None, names=names, gold_reward=WordReward(name="w2"), policy=policy)[0] == "updated"
    assert policy.built == 1 and len(policy.word_engine.scored) == 3
    # a deleted per-prompt file is written again
    (run / "metrics_per_prompt.json").unlink()
    assert evaluate_run(run, None, names=names, gold_reward=WordReward(name="w2"), policy=policy)[0] == "updated"
    with pytest.raises(Exception, match="needs the run's policy"):
        evaluate_run(run, None, names=names)


def test_base_logprob_prefills_each_prompt_once_for_every_run(tmp_path):
    """``prepare``: the responses of all runs in one call, grouped by prompt; the runs then read them."""
    runs = [make_run(tmp_path, seed=s) for s in (0, 1)]
    other = json.loads((runs[1] / "records.jsonl").read_text().splitlines()[0])
    lines = (runs[1] / "records.jsonl").read_text().splitlines()
    (runs[1] / "records.jsonl").write_text("\n".join([json.dumps({**other, "response": "one two"}), *lines[1:3]]) + "\n")
    policy, names = WordPolicy(), [*NAMES_NO_COH, "base_logprob"]
    policy.prepare([Run.at(r) for r in runs])
    # one call: prompt 0 with both runs' answers, prompts 1 and 2 with their one (shared) answer each
    assert policy.word_engine.calls == [(["0", "1", "2"], [[RESPONSES[0], "one two"], [RESPONSES[1]], [RESPONSES[2]]])]
    for r in runs:
        assert evaluate_run(r, None, names=names, policy=policy)[0] == "updated"
    assert len(policy.word_engine.calls) == 1  # nothing scored twice
    assert read_json(runs[1] / "metrics_per_prompt.json")["base_logprob"] == [-2.0, -2.0, None]
    policy.prepare([Run.at(r) for r in runs])  # all cached: nothing to score
    fresh = WordPolicy()
    fresh.prepare([Run.at(r) for r in runs])  # a new process reads the caches on disk
    assert len(policy.word_engine.calls) == 1 and fresh.word_engine.calls == []


def test_gold_reward_and_base_logprob_score_each_checkpoint_response_once(tmp_path):
    run = make_run(tmp_path, torn=False)
    recs = [json.loads(x) for x in (run / "records.jsonl").read_text().splitlines()]
    recs[0]["checkpoints"] = [{"samples": 1, "sample": 1, "reward": 0.0, "response": "x y"},
                              {"samples": 2, "sample": 1, "reward": 0.0},  # the same response as at 1 sample
                              {"samples": 4, "sample": 3, "reward": 1.0}]  # the record's own response
    recs[1]["checkpoints"] = [{"samples": 4, "sample": 0, "reward": -2.0, "response": "one two three\n\nUser: more"}]
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    names, gold, policy = [*NAMES_NO_COH, "base_logprob"], WordReward(), WordPolicy()
    policy.prepare([Run.at(run)])  # every response of the run, checkpoints included, each prompt prefilled once
    assert evaluate_run(run, None, names=names, gold_reward=gold, policy=policy)[0] == "updated"
    per = read_json(run / "metrics_per_prompt.json")
    assert per["gold_reward"] == [5.0, 6.0, 0.0] and per["base_logprob"] == [-2.0, -2.0, None]  # as without
    # per record, per checkpoint: the gold reward of the cleaned response (cut at "User:"), base_logprob of the raw one
    assert per["checkpoints"] == {"gold_reward": [[2.0, 2.0, 5.0], [3.0], []],
                                  "base_logprob": [[-2.0, -2.0, -2.0], [-2.0], []]}
    # each distinct (prompt, response) scored once
    assert sorted(r for _, r in gold.scored) == sorted(["a b c d e", "the cat the cat the cat", " ", "x y",
                                                        "one two three"])
    assert sorted(policy.word_engine.scored) == sorted([*RESPONSES, "x y", "one two three\n\nUser: more"])
    assert len(policy.word_engine.calls) == 1  # prepare scored them all
    # a rerun, in this process or a new one, scores nothing
    before = (run / "summary.json").read_bytes()
    assert evaluate_run(run, None, names=names, gold_reward=gold, policy=policy)[0] == "up to date"
    fresh_gold, fresh = WordReward(), WordPolicy()
    fresh.prepare([Run.at(run)])
    assert evaluate_run(run, None, names=names, gold_reward=fresh_gold, policy=fresh)[0] == "up to date"
    assert (fresh_gold.scored, fresh.word_engine.scored) == ([], []) and (run / "summary.json").read_bytes() == before


def test_cli_gold_reward_and_policy_options(tmp_path, evaluate):
    run = make_run(tmp_path)
    gold = reward_option(tmp_path)[0]  # the search path holding reward/words.yaml, and its gold_reward twin:
    (tmp_path / "conf" / "gold_reward").mkdir()
    (tmp_path / "conf" / "gold_reward" / "words.yaml").write_text("defaults:\n  - /reward@_here_: words\n")
    code, out, err = evaluate(NO_COH, gold, "gold_reward=words")
    assert code == 0 and "gold 3.6667 [words]" in out, err
    assert read_json(run / "summary.json")["metrics"]["gold_reward_model"] == "words"
    for args, needle in ((["policy.batch_rows=0"], "policy.batch_rows"), (["policy.dtype=fp8"], "policy.dtype must be one of"),
                         (["policy.device=tpu"], "unknown device 'tpu'"),
                         ([gold, "gold_reward=words", "metrics=[diversity]"], "needs the reward_mean metric")):
        code, _, err = evaluate(*args)
        assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, (args, err)
    # base_logprob on a run whose manifest has no model config to build its policy from
    code, _, err = evaluate("metrics=[reward_mean,base_logprob]")
    assert code == 1 and "base_logprob needs the run's model config" in err and err.count("\n") == 1, err


def test_gold_reward_options_are_the_reward_group(compose):
    conf = Path(__file__).resolve().parents[1] / "aisp_bench" / "conf"
    options = sorted(p.stem for p in (conf / "reward").glob("*.yaml"))
    assert sorted(p.stem for p in (conf / "gold_reward").glob("*.yaml")) == options
    for name in options:
        cfg = compose([f"reward={name}", f"gold_reward={name}"], config_name="evaluate")
        assert cfg.gold_reward == cfg.reward
    assert compose(["gold_reward=ultrarm", "gold_reward.device=cuda:1"], config_name="evaluate").gold_reward.device \
        == "cuda:1"
