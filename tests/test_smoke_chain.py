"""`make smoke`: the whole chain offline on CPU produces every table and figure."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from proc import run_tree

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_smoke_produces_every_artefact(tmp_path, shared_data):
    env = dict(os.environ, AISP_BENCH_RESULTS=str(tmp_path), PYTHONUNBUFFERED="1")
    env.pop("OPENAI_API_KEY", None)  # the offline judge must not need one
    cmd = ["make", "-s", "smoke", "SKIP_SETUP=1", f"PY={sys.executable}", f"RESULTS={tmp_path / 'smoke'}",
           "SEEDS=0,1", f"SHARED_DATA={shared_data}"]
    out = run_tree(cmd, cwd=ROOT, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = tmp_path / "smoke"
    tables = {p.name for p in (res / "tables").iterdir()}
    for stem in ("table1", "table1_extended", "table2", "table3"):
        assert {f"{stem}.md", f"{stem}.csv", f"{stem}.tex"} <= tables
    for stem in ("lambda_sweep", "judge_bias", "sensitivity", "budget", "compute"):
        assert {f"{stem}.md", f"{stem}.csv"} <= tables
    figures = {p.name for p in (res / "figures").iterdir()}
    for ds in ("shp", "hh_rlhf"):
        assert {f"figure2_{ds}.png", f"compute_{ds}.png", f"budget_{ds}.png"} <= figures
    assert "sensitivity_demo.png" in figures
    t1 = pd.read_csv(res / "tables" / "table1.csv")
    assert len(t1) == 6 and set(t1.method) == {"aisp", "bon_topp", "bon_gaussian"}
    assert set(t1.dataset) == {"shp", "hh_rlhf"} and (t1.n_seeds == 2).all()
    assert t1[["reward_mean", "diversity_mean", "coherence_mean"]].notna().all().all()
    assert (t1.coherence_encoder.str.contains("MiniLM")).all()
    for name, baseline in (("table2", "bon_topp"), ("table3", "bon_gaussian")):
        t = pd.read_csv(res / "tables" / f"{name}.csv")
        assert len(t) == 2 and set(t.dataset) == {"shp", "hh_rlhf"}
        assert ((t.win + t.draw + t.loss + t.invalid - 100).abs() < 1e-6).all()
        assert ((t.win_lo <= t.win) & (t.win <= t.win_hi)).all()  # every win rate has its interval
    # the extended view: every method has its gold reward (MiniLM) and base_logprob; AISP minus each BoN
    # on both datasets with an interval around the difference
    ext = pd.read_csv(res / "tables" / "table1_extended.csv")
    rows = ext[(ext.row == "method") & ext.metric.isin(["reward", "gold_reward", "base_logprob"])]
    assert len(rows) == 18 and rows["mean"].notna().all() and (rows["mean"][rows.metric == "base_logprob"] < 0).all()
    diff = ext[ext.row == "difference"]
    assert set(zip(diff.dataset, diff.baseline)) == {(d, b) for d in ("shp", "hh_rlhf") for b in ("bon_topp",
                                                                                              "bon_gaussian")}
    d = diff[diff.metric.isin(["reward", "gold_reward", "base_logprob"])]
    assert ((d.lo <= d["mean"] + 1e-9) & (d["mean"] <= d.hi + 1e-9)).all() and (d.n_prompts == 2).all()
    # the budget curves: every method's checkpoints (BoN N = 4: 1, 2, 4; AISP n = κ = 2: 2, 4 and y(U*)) with
    # the proxy, the gold reward (MiniLM), base_logprob and KL, over both prompts and seeds
    bud = pd.read_csv(res / "tables" / "budget.csv")
    cp = bud[(bud.row == "method") & bud.checkpoint]
    assert set(zip(cp.dataset, cp.method, cp.samples)) == {
        (d, m, s) for d in ("shp", "hh_rlhf") for m, ss in (("bon_topp", (1, 2, 4)), ("bon_gaussian", (1, 2, 4)),
                                                             ("aisp", (2, 4, 5))) for s in ss}
    assert cp[["proxy", "gold", "base_logprob", "kl"]].notna().all().all() and (cp.gold_n == 2).all()
    assert (cp.n_seeds == 2).all()
    md = (res / "tables" / "budget.md").read_text()
    assert "not evaluated" not in md and "no budget checkpoints" not in md
    comp = pd.read_csv(res / "tables" / "compute.csv").set_index(["dataset", "method"])
    assert comp[["samples", "tokens", "reward_tokens", "flops", "depth", "seconds"]].notna().all().all()
    assert (comp.xs("aisp", level="method").depth == 3).all() and (comp.xs("bon_topp", level="method").depth == 1).all()
    bias = pd.read_csv(res / "tables" / "judge_bias.csv")
    assert len(bias) == 4 and (bias.flips_n > 0).all() and (bias.words_missing == 0).all()
    sens = pd.read_csv(res / "tables" / "sensitivity.csv")
    assert len(sens) == 4 and (sens.budget == 8).all() and set(sens.sigma) == {0.25, 1.0}
    assert sens[["final_reward", "base_logprob", "seconds"]].notna().all().all()
    lam = pd.read_csv(res / "tables" / "lambda_sweep.csv")
    sweep = lam[lam.variant.str.startswith("lambda_sweep")]
    assert len(sweep) == 5 and sweep.lam.nunique() == 5 and sweep.std_r_over_lam_first.notna().all()
    # runs are reused: a second `make smoke` generates nothing new, and evaluates nothing again (no policy
    # is loaded for base_logprob, no reward model for the gold reward)
    files = lambda: {p.relative_to(res).as_posix(): p.read_bytes()  # noqa: E731
                     for d in ("tables", "figures") for p in (res / d).iterdir()}
    before = files()
    again = run_tree(cmd, cwd=ROOT, env=env, timeout=900)
    assert again.returncode == 0
    assert again.stderr.count("nothing to do") == 12 + 4 + 5
    assert not [w for w in ("loading policy", "loading judge", "loading sentence encoder") if w in again.stderr]
    assert "16 run(s): 0 updated, 16 up to date" in again.stdout
    # and the report rebuilds the same tables and figures, byte for byte (seeded resampling, the same inputs)
    assert files() == before
