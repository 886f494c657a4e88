"""python -m aisp_bench.plan: the counts of a small grid against numbers worked out by hand."""

from __future__ import annotations

import json
import math
import re

import pytest

from aisp_bench.cli import UserError
from aisp_bench.data.datasets import PromptDataset
from aisp_bench.methods.aisp import AISP
from aisp_bench.methods.bon import BoNTopP
from aisp_bench.methods.particle_filter import ParticleFilter
from aisp_bench.methods.spec_rejection import SpecRejection
from aisp_bench.plan import PerPrompt, app, job_counts, sampling


def test_samples_and_scored_groups_per_prompt():
    def counts(method, rows):
        per = sampling(method, rows, 32)
        assert (per.scored, per.generated, per.scored_tokens) == (per.samples, per.samples * 32, per.samples * 32)
        return per.samples, per.groups

    assert counts(AISP(n=4, kappa=4), 64) == (4 * 4 + 1, 4 + 1)  # y(U*) is one more sample, scored alone
    assert counts(AISP(n=32, kappa=32, final_candidate=False), "auto") == (1024, 32)
    assert counts(BoNTopP(num_samples=1024), 64) == (1024, 16)  # 64 rows at a time
    assert counts(BoNTopP(num_samples=16), 64) == (16, 1)
    assert counts(BoNTopP(num_samples=1024), "auto") == (1024, 1)


def test_the_reward_guided_decoders_count_their_schedule():
    """Speculative Rejection: 16 rows to 12 tokens, 8 to 24, 4 to 36, 2 to 48 (α = 1/2); each
    point scores the rows in I, partial responses read whole. Particles: N rows throughout."""
    sr = sampling(SpecRejection(num_samples=16, rejection_rate=0.5, decision_tokens=12), 64, 48)
    assert sr == PerPrompt(samples=16, groups=4, scored=16 + 8 + 4 + 2, generated=(16 + 8 + 4 + 2) * 12,
                           scored_tokens=16 * 12 + 8 * 24 + 4 * 36 + 2 * 48)
    assert sr.generated == 8 * 48 * 15 // 16  # 15/16 of BoN's N·T at N = 8 (the config's default ratio)
    pf = sampling(ParticleFilter(num_particles=8, segment_tokens=[6, 40]), 64, 48)
    assert pf == PerPrompt(samples=8, groups=3, scored=24, generated=8 * 48, scored_tokens=8 * (6 + 40 + 48))


def test_job_counts():
    per = PerPrompt(samples=17, groups=5, scored=17, generated=17 * 32, scored_tokens=17 * 32)
    c = job_counts([10, 20], per, shares_prompt=True, tokens_per_second=100)
    assert (c.jobs, c.prompts, c.samples, c.generated_tokens) == (1, 2, 34, 2 * 17 * 32)
    assert c.reward_tokens == 1088 + (10 + 20) * 5  # responses, and each prompt once per scored group
    assert c.gpu_hours == pytest.approx(1088 / 100 / 3600) == c.longest_job_hours
    c = job_counts([10, 20], per, shares_prompt=False, tokens_per_second=None)
    assert c.reward_tokens == 1088 + 30 * 17 and math.isnan(c.gpu_hours)


def plan(capsys, *args):
    try:
        app(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 11 and cells[0] not in ("dataset",) and not cells[0].startswith(":"):
            rows[cells[2] or cells[0]] = cells[3:]
    return code, rows, out, err


def test_a_sharded_demo_grid(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no results/bench/ here
    grid = ["-m", "experiment=demo", "dataset.num_shards=2", "dataset.shard=range(2)", "plan.tokenizer=false"]
    code, rows, out, err = plan(capsys, *grid, "plan.tokens_per_second=100")
    assert code == 0, err
    prompts = PromptDataset("demo", "prompts", path="demo_prompts.jsonl", num_prompts=3).load()
    T = sum(math.ceil(sum(len(m.content) for m in p.messages) / 4) for p in prompts)  # 4 characters a token
    # demo: n 4, kappa 4, 32 new tokens; AISP 17 samples in 5 groups, each BoN 16 in one (batch_rows 64)
    assert rows["aisp"][:6] == ["1", "2", "3", "51", "1,632", f"{1632 + 5 * T:,}"]
    assert rows["bon_topp"][:6] == rows["bon_gaussian"][:6] == ["1", "2", "3", "48", "1,536", f"{1536 + T:,}"]
    assert rows["total"][:6] == ["3", "6", "9", "147", "4,704", f"{4704 + 7 * T:,}"]
    assert rows["total"][6:] == [f"{4704 / 100 / 3600:.3f}", f"{2 * 17 * 32 / 100 / 3600:.3f}"]  # shard 0: 2 prompts
    assert "ESTIMATED at 4 characters per token (plan.tokenizer=false)" in out
    assert "wall time" not in out
    code, rows, out, err = plan(capsys, *grid, "plan.tokens_per_second=100", "plan.gpus=4")
    wall = max(4704 / 100 / 3600 / 4, 2 * 17 * 32 / 100 / 3600)  # the longest job (AISP, 2 prompts) bounds it
    assert f"wall time on 4 GPUs at once (plan.gpus; one job per GPU): about {wall:.3f} h" in out
    assert f"about {4704 / 100 / 3600 / 2:.3f} h" in plan(capsys, *grid, "plan.tokens_per_second=100",
                                                          "plan.gpus=2")[2]  # 6 jobs on 2 GPUs: GPU-hours / 2
    # one shard only, and the throughput of a benchmark file (per method; BoN Gaussian has none)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "H200", "date": "2025-01-01", "methods": {
        "aisp/default": {"tokens_per_s": 200.0}, "bon_topp/N16/default": {"tokens_per_s": 400.0}}}))
    code, rows, out, err = plan(capsys, *grid[:3], "dataset.shard=1", "plan.tokenizer=false", f"plan.bench={bench}")
    assert rows["aisp"][:5] == ["1", "1", "1", "17", "544"] and rows["aisp"][6] == f"{544 / 200 / 3600:.3f}"
    assert rows["bon_topp"][6] == f"{512 / 400 / 3600:.3f}" and rows["bon_gaussian"][6] == rows["total"][6] == "—"
    assert "aisp/default 200 generated tokens/s, from" in out and "not estimated for bon_gaussian" in out


def test_plan_notes_and_refusals(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, rows, out, err = plan(capsys, "dataset.num_prompts=1", "plan.tokenizer=false")
    assert code == 0 and rows["total"][:2] == ["1", "1"]
    assert "GPU-hours not estimated: no results/bench/methods_gpu.json (run scripts/bench_methods.py" in out
    code, rows, out, err = plan(capsys, "hydra/launcher=slurm", "plan.tokenizer=false", "plan.tokens_per_second=0.01")
    assert "over hydra.launcher.timeout_min=720: it is requeued" in out  # 3 prompts x 33 samples x 128 tokens
    for args, message in ((["seed=0,1"], "seed=0,1 is a sweep: add -m"),
                          (["-m", "dataset.num_shards=2", "dataset.shard=0,2"], r"dataset.shard must be .* got '2'"),
                          (["plan.tokens_per_second=-1"], "plan.tokens_per_second must be a finite number > 0"),
                          (["plan.gpus=0"], "plan.gpus must be"),
                          (["method=nosuch"], "nosuch"), (["--frobnicate"], "unknown option --frobnicate")):
        code, rows, out, err = plan(capsys, *args, "plan.tokenizer=false")
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
        assert re.search(message, err), err
    with pytest.raises(UserError):
        sampling(object(), 64, 32)
