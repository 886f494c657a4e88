"""``python -m aisp_bench.evaluate`` on tiny synthetic run folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aisp_bench.evaluate import evaluate_run, main
from aisp_bench.metrics.coherence import MINILM_LABEL, Encoder
from aisp_bench.metrics.records import read_json

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
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "records.jsonl", "summary.json"]


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


def test_cli_without_coherence_and_errors(tmp_path, capsys):
    run = make_run(tmp_path)
    make_run(tmp_path, seed=1, summary=False)  # unfinished: skipped
    metrics = "--metrics=reward_mean,diversity,response_tokens_mean,response_words_mean,num_records"
    assert main([str(tmp_path / "runs"), metrics]) == 0
    out, err = capsys.readouterr()
    assert "1 updated, 0 up to date, 1 skipped, 0 failed" in out and "seed1: skipped" in err
    m = read_json(run / "summary.json")["metrics"]
    assert "coherence" not in m and m["diversity"] == pytest.approx(DIVERSITY)
    before = (run / "summary.json").read_bytes()
    assert main([str(run), metrics]) == 0
    assert "up to date" in capsys.readouterr().out and (run / "summary.json").read_bytes() == before

    for args in (
        [str(tmp_path / "missing")],
        [str(tmp_path / "runs" / "nothing*")],
        [str(tmp_path / "runs" / "shp" / "x")],
    ):
        if "x" in args[0]:
            (tmp_path / "runs" / "shp" / "x").mkdir()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    assert main([str(run), "--metrics", "reward_mean,divrsity"]) == 2
    assert "known:" in capsys.readouterr().err

    (run / "records.jsonl").write_text('{"prompt_id": 1}\nnot json\n{"prompt_id": 2}\n')
    assert main([str(run), metrics]) == 1  # corrupt records: reported, non-zero
    assert "records.jsonl: line 2 is corrupt" in capsys.readouterr().err


def test_cli_simcse_unavailable_names_minilm(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run = make_run(tmp_path)
    before = (run / "summary.json").read_bytes()
    code = main([str(run), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    if code == 0:
        pytest.skip("the SimCSE checkpoint is cached on this machine")
    assert code == 1 and "--encoder minilm" in err and len(err.splitlines()) == 1
    assert (run / "summary.json").read_bytes() == before  # never a silent substitute


@pytest.mark.slow
def test_cli_with_minilm_stand_in(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main([str(run), "--encoder", "minilm", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    m = read_json(run / "summary.json")["metrics"]
    assert m["coherence_encoder"] == MINILM_LABEL and MINILM_LABEL in out
    assert -1.0 <= m["coherence"] <= 1.0 and m["num_records"] == 3
    assert main([str(run), "--encoder", "minilm"]) == 0
    assert "1 up to date" in capsys.readouterr().out
