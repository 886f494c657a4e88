"""Budget checkpoints (recorded by the methods, read by rundir), the budget view and the compute
table from synthetic run folders: hand-checked numbers."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from aisp_bench.methods import AISP, BoNGaussian, BoNTopP
from aisp_bench.methods.base import Tracker, powers_of_two
from aisp_bench.report import budget, costs
from aisp_bench.report.stats import Bootstrap
from aisp_bench.results import discover_runs
from aisp_bench.rundir import json_safe, make_record, record_checkpoints
from aisp_bench.types import Prompt, Sample

from test_aisp_math import CountToken, ToyEngine

NAN = math.nan
BOOT = Bootstrap(resamples=500, seed=0)


def samples(k: int) -> list[Sample]:
    return [Sample([0] * (i + 1), f"s{i}", "eos") for i in range(k)]


# --------------------------------------------------------------------------- recording


def test_tracker_keeps_the_best_so_far_at_each_checkpoint_compactly():
    rewards = [0.5, NAN, 0.5, 2.0, 1.0, 2.0, 3.0, NAN]  # a tie (kept: the earlier), non-finite rewards
    t = Tracker("p", frozenset({1, 2, 3, 4, 6, 8}))
    t.add(samples(8), torch.tensor(rewards))
    res = t.result(decode_passes=1)
    assert [(c["samples"], c["sample"], c["reward"]) for c in res.checkpoints] == [
        (1, 0, 0.5), (2, 0, 0.5), (3, 0, 0.5), (4, 3, 2.0), (6, 3, 2.0), (8, 6, 3.0)]
    # a text once, at the first point returning it; never for the sample finally returned (the record's response)
    assert [c.get("response") for c in res.checkpoints] == ["s0", None, None, "s3", None, None]
    rec = json.loads(json.dumps(json_safe(make_record(Prompt.single("p", "x"), res, 1.0, prompt_tokens=7)),
                                allow_nan=False))  # as RecordWriter writes it
    assert rec["response"] == "s6" and rec["prompt_tokens"] == 7 and rec["decode_passes"] == 1
    assert [c["response"] for c in record_checkpoints(rec)] == ["s0", "s0", "s0", "s3", "s3", "s6"]
    assert record_checkpoints({"response": "r"}) == []  # a record made before checkpoints existed
    # no finite reward yet: the first sample, reward NaN (null in the record)
    t = Tracker("p", frozenset({1, 2, 3}))
    t.add(samples(3), torch.tensor([NAN, math.inf, 1.0]))
    cps = t.checkpoints()
    assert [c["sample"] for c in cps] == [0, 0, 2] and math.isnan(cps[0]["reward"]) and math.isnan(cps[1]["reward"])
    assert cps[0]["response"] == "s0" and "response" not in cps[2]


def test_checkpoints_at_paper_settings_add_at_most_11_texts_for_bon_and_kappa_plus_1_for_aisp():
    assert sorted(powers_of_two(1024)) == [2**j for j in range(11)]
    assert sorted(powers_of_two(48)) == [1, 2, 4, 8, 16, 32, 48]
    rng = np.random.default_rng(0)
    t = Tracker("p", powers_of_two(1024))
    t.add(samples(1024), torch.tensor(rng.normal(size=1024)))
    assert len(t.checkpoints()) == 11 and sum("response" in c for c in t.checkpoints()) <= 10  # the last: none
    kappa, n = 32, 32
    t = Tracker("p", frozenset([n * k for k in range(1, kappa + 1)] + [n * kappa + 1]))
    t.add(samples(n * kappa + 1), torch.tensor(np.sort(rng.normal(size=n * kappa + 1))))  # a new best every k
    assert len(t.checkpoints()) == kappa + 1 and sum("response" in c for c in t.checkpoints()) == kappa


@pytest.mark.parametrize("method, budgets, passes", [
    (BoNTopP(num_samples=12), [1, 2, 4, 8, 12], 1), (BoNGaussian(num_samples=12, tau=8), [1, 2, 4, 8, 12], 1),
    (AISP(n=4, kappa=3, tau=8, lam=0.05), [4, 8, 12, 13], 4),
    (AISP(n=4, kappa=3, tau=8, lam=0.05, final_candidate=False), [4, 8, 12], 3)])
def test_methods_record_the_best_so_far_at_their_budgets(method, budgets, passes):
    prompts = [Prompt.single("p", "x"), Prompt.single("q", "y")]
    for res in method(prompts, ToyEngine(), CountToken(), seed=3):
        r = res.sample_rewards
        assert [c["samples"] for c in res.checkpoints] == budgets and res.decode_passes == passes
        for c in res.checkpoints:
            first_best = int(np.argmax(r[: c["samples"]]))  # the earliest of tied bests
            assert (c["sample"], c["reward"]) == (first_best, r[first_best])
        assert res.checkpoints[-1]["sample"] == int(np.argmax(r)) and res.checkpoints[-1]["reward"] == res.reward


# --------------------------------------------------------------------------- the budget view


def write_run(root: Path, method: str, records: list[dict], per: dict | None, method_cfg: dict | None = None,
              parameters: dict | None = None, seed: int = 0) -> Path:
    """A run folder with its summary's metrics fingerprint and a matching metrics_per_prompt.json."""
    d = root / "runs" / "shp" / "llama3_8b__ultrarm" / method / "default" / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = {"seed": seed, "method": {"name": method, **(method_cfg or {})}, "model": {"name": "llama3_8b"},
           "reward": {"name": "ultrarm"}, "dataset": {"name": "shp"}, "generation": {}}
    (d / "manifest.json").write_text(json.dumps({"config": cfg, **({"parameters": parameters} if parameters else {})}))
    metrics = {"fingerprint": "fp", "gold_reward_model": "eurus", "base_logprob_model": "llama3_8b"} if per else {}
    (d / "summary.json").write_text(json.dumps({"num_prompts": len(records), "num_done": len(records),
                                                "complete": True, "metrics": metrics}))
    if per:
        (d / "metrics_per_prompt.json").write_text(json.dumps({"fingerprint": "fp", **per}))
    return d


def record(pid: str, rewards: list[float], cps: list[tuple[int, int, str | None]], **extra) -> dict:
    """A record whose checkpoints are (samples, sample index, stored text or None)."""
    best = int(np.argmax(rewards))
    checkpoints = [{"samples": s, "sample": i, "reward": rewards[i]} | ({"response": t} if t else {})
                   for s, i, t in cps]
    return {"prompt_id": pid, "prompt": "q", "messages": [], "response": f"{pid}{best}", "reward": rewards[best],
            "sample_rewards": rewards, "num_samples": len(rewards), "num_tokens": 10 * len(rewards),
            "sample_tokens": [10] * len(rewards), "response_tokens": 10, "seconds": 2.0, "finish_reason": "eos",
            "checkpoints": checkpoints, **extra}


def subset_mean_best(pool: list[float], m: int) -> float:
    subsets = list(itertools.combinations(pool, m))
    return sum(max(s) for s in subsets) / len(subsets)


BON_P, BON_Q = [1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]
AISP_CFG = {"n": 2, "kappa": 1, "sigma": 0.5, "final_candidate": True}


def budget_tree(root: Path) -> None:
    write_run(root, "bon_topp", [
        record("p", BON_P, [(1, 0, "p0"), (2, 1, None), (4, 1, None)], prompt_tokens=6, decode_passes=1),
        record("q", BON_Q, [(1, 0, "q0"), (2, 0, None), (4, 2, None)], prompt_tokens=4, decode_passes=1)],
        {"prompt_ids": ["p", "q"], "gold_reward": [0.3, 0.6], "base_logprob": [-2.0, -3.0],
         "checkpoints": {"gold_reward": [[0.1, 0.3, 0.3], [0.2, 0.2, 0.6]],
                         "base_logprob": [[-1.0, -2.0, -2.0], [-1.0, -1.0, -3.0]]}},
        method_cfg={"num_samples": 4}, parameters={"policy": 100, "reward": 10})
    its = [{"k": 1, "best_so_far": 2.0, "kl": 0.5}]
    write_run(root, "aisp", [
        record("p", [2.0, 1.0, 4.0], [(2, 0, "p0"), (3, 2, None)], iterations=its, prompt_tokens=6, decode_passes=2),
        record("q", [0.0, 1.0, 1.0], [(2, 1, None), (3, 1, None)], iterations=its, prompt_tokens=4, decode_passes=2)],
        {"prompt_ids": ["p", "q"], "gold_reward": [0.7, 0.4], "base_logprob": [-2.5, -1.2],
         "checkpoints": {"gold_reward": [[0.5, 0.7], [0.4, 0.4]], "base_logprob": [[-1.5, -2.5], [-1.2, -1.2]]}},
        method_cfg=AISP_CFG, parameters={"policy": 100, "reward": 10})
    # a run recorded before checkpoints (and before prompt_tokens, parameters): its end point only
    old = [{k: v for k, v in record(pid, r, []).items() if k != "checkpoints"} for pid, r in (("p", BON_P),
                                                                                            ("q", BON_Q))]
    write_run(root, "bon_gaussian", old, {"prompt_ids": ["p", "q"], "gold_reward": [0.9, 0.1],
                                          "base_logprob": [-1.0, -1.0]}, method_cfg={"num_samples": 4})


def test_budget_table_hand_checked(tmp_path):
    budget_tree(tmp_path)
    df = budget.budget_table(discover_runs(tmp_path), BOOT)
    get = lambda method, row="method": df[(df.method == method) & (df.row == row)].set_index("samples")  # noqa: E731
    bon = get("bon_topp")
    # BoN: its checkpoints 1, 2, 4 and AISP's budget 3 (proxy only: the unbiased best of 3 of the pool)
    assert list(bon.index) == [1, 2, 3, 4] and list(bon.checkpoint) == [True, True, False, True]
    for m in (1, 2, 3, 4):
        want = (subset_mean_best(BON_P, m) + subset_mean_best(BON_Q, m)) / 2
        assert bon.proxy[m] == pytest.approx(want) and bon.kl[m] == pytest.approx(math.log(m) - (m - 1) / m)
    np.testing.assert_allclose(bon.proxy_checkpoint[[1, 2, 4]], [(1 + 0) / 2, (3 + 0) / 2, (3 + 5) / 2])
    np.testing.assert_allclose(bon.gold[[1, 2, 4]], [0.15, 0.25, 0.45])
    np.testing.assert_allclose(bon.base_logprob[[1, 2, 4]], [-1.0, -1.5, -2.5])
    assert np.isnan(bon.gold[3]) and (bon.kl_kind == "bon_bound").all()
    assert ((bon.gold_lo <= bon.gold + 1e-12) | bon.gold.isna()).all() and (bon.gold_n[[1, 2, 4]] == 2).all()
    aisp = get("aisp")
    np.testing.assert_allclose(aisp.proxy[[2, 3]], [1.5, 2.5])
    np.testing.assert_allclose(aisp.gold[[2, 3]], [0.45, 0.55])
    np.testing.assert_allclose(aisp.kl[[2, 3]], [0.5, 0.5])
    # AISP − BoN (top-p) on the same prompt: at 2 and 3 samples (at 3 BoN's unbiased proxy only), and at the
    # end points (3 vs 4)
    d = get("aisp", "difference")
    d = d[d.baseline == "bon_topp"].reset_index()
    assert list(zip(d.samples, d.baseline_samples, d.checkpoint)) == [(2, 2, True), (3, 3, False), (3, 4, True)]
    assert d.gold[0] == pytest.approx(((0.5 - 0.3) + (0.4 - 0.2)) / 2) and np.isnan(d.gold[1])
    assert d.gold[2] == pytest.approx(((0.7 - 0.3) + (0.4 - 0.6)) / 2)
    assert d.proxy[0] == pytest.approx(((2 - subset_mean_best(BON_P, 2)) + (1 - subset_mean_best(BON_Q, 2))) / 2)
    assert d.proxy[1] == pytest.approx(((4 - subset_mean_best(BON_P, 3)) + (1 - subset_mean_best(BON_Q, 3))) / 2)
    assert ((d.gold_lo <= d.gold + 1e-12) & (d.gold <= d.gold_hi + 1e-12))[[0, 2]].all()
    # the run without checkpoints: BoN's unbiased proxy at every budget, gold at its end point only, and a note
    old = get("bon_gaussian")
    assert old.gold[4] == pytest.approx(0.5) and old.gold.drop(4).isna().all() and old.proxy.notna().all()
    assert any("BoN (N(0,σ²I)) seed 0: no budget checkpoints recorded" in n for n in df.attrs["notes"])


def test_budget_files_and_notes(tmp_path):
    budget_tree(tmp_path)
    df = budget.budget_table(discover_runs(tmp_path), BOOT)
    paths = budget.write_budget(df, tmp_path / "tables", tmp_path / "figures", BOOT)
    assert sorted(p.name for p in paths) == ["budget.csv", "budget.md", "budget_shp.png"]
    md = (tmp_path / "tables" / "budget.md").read_text()
    rows = [r for r in md.splitlines() if r.startswith("|")][2:]
    # BoN top-p 1, 2, 4; AISP 2, 3; the old run's end point; AISP − each where both have a checkpoint
    assert len(rows) == len(df[df.checkpoint]) == 3 + 2 + 1 + 2 + 1
    assert "3 vs 4" in md and "2 vs 2" in md
    assert "gold eurus, base log-prob under llama3_8b" in md and "no budget checkpoints recorded" in md
    assert len(pd.read_csv(tmp_path / "tables" / "budget.csv")) == len(df)
    # an unevaluated run says what is missing
    (next((tmp_path / "runs").rglob("aisp/default/seed0")) / "metrics_per_prompt.json").unlink()
    df = budget.budget_table(discover_runs(tmp_path), BOOT)
    assert any("AISP seed 0: gold reward of the checkpoints not evaluated" in n for n in df.attrs["notes"])
    assert df[(df.method == "aisp") & (df.row == "method")].gold.isna().all()


# --------------------------------------------------------------------------- the compute table


def test_compute_table_every_axis(tmp_path):
    budget_tree(tmp_path)
    df = costs.compute_table(discover_runs(tmp_path)).set_index("method")
    bon, aisp, old = df.loc["bon_topp"], df.loc["aisp"], df.loc["bon_gaussian"]
    assert (bon.samples, bon.tokens, bon.reward_tokens, bon.depth) == (4, 40, 40 + 5, 1)  # prompts 6 and 4: mean 5
    assert bon.flops == pytest.approx(2 * 100 * 45 + 2 * 10 * 45)
    assert (bon.flops_policy, bon.flops_reward) == (2 * 100 * 45, 2 * 10 * 45)
    assert (aisp.samples, aisp.tokens, aisp.depth, aisp.seconds) == (3, 30, 2, 2.0)
    assert (bon.policy_parameters, bon.reward_parameters) == (100, 10)
    assert np.isnan(old.reward_tokens) and np.isnan(old.flops) and old.depth == 1 and old.tokens == 40
    paths = costs.write_compute_table(df.reset_index(), tmp_path / "tables")
    md = (tmp_path / "tables" / "compute.md").read_text()
    assert [p.name for p in paths] == ["compute.md", "compute.csv"] and "9.9e+03" in md
    assert "policy 100, reward 10" in md and "—" in md
