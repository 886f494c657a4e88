"""The report beyond the paper's tables: Table 1 extended (paired bootstrap differences),
win-rate intervals, the judge's bias, the fixed-budget sensitivity and Figure 2's prompt
sample, on synthetic run folders with hand-checked numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aisp_bench.report import figures, judge_bias, sensitivity, table1, table1_extended, tables
from aisp_bench.report.__main__ import main as report_main
from aisp_bench.report.stats import Bootstrap
from test_report import (
    AISP_CFG, _figure_tree, aisp_record, bon_record, md_cells, runs_in, subset_mean_best, write_run,
)

PAIR = "llama3_8b__ultrarm"
BOOT = Bootstrap(resamples=4000, seed=0)


@pytest.fixture
def report(command, tmp_path):
    return lambda *overrides: command(report_main, "report", f"results_dir={tmp_path}", *overrides)


def with_prompt_metrics(run: Path, values: dict[str, list], fingerprint: str = "fp") -> None:
    """What evaluate writes: summary.json's metrics fingerprint and metrics_per_prompt.json."""
    summary = json.loads((run / "summary.json").read_text())
    summary["metrics"] = {"fingerprint": fingerprint, "gold_reward_model": "eurus", "base_logprob_model": "llama"}
    (run / "summary.json").write_text(json.dumps(summary))
    ids = [json.loads(x)["prompt_id"] for x in (run / "records.jsonl").read_text().splitlines()]
    (run / "metrics_per_prompt.json").write_text(json.dumps({"fingerprint": "fp", "prompt_ids": ids, **values}))


# --------------------------------------------------------------------------- Table 1 extended


def _extended_tree(root: Path) -> None:
    """Two prompts, two seeds. Own rewards: AISP s0 p 3 q 1, s1 p 2 q 2; BoN s0 p 1 q 1, s1 p 1 q 0.
    Gold (AISP - BoN): p 0.5 and 0.5; q -1 and 0."""
    own = {"aisp": {0: (3, 1), 1: (2, 2)}, "bon_topp": {0: (1, 1), 1: (1, 0)}}
    gold = {"aisp": {0: [1.0, 0.0], 1: [1.0, 1.0]}, "bon_topp": {0: [0.5, 1.0], 1: [0.5, 1.0]}}
    for method, seeds in own.items():
        for seed, (rp, rq) in seeds.items():
            if method == "aisp":
                recs = [aisp_record("p", 2, [0.0, rp]), aisp_record("q", 2, [rq, 0.0])]
                recs[0]["iterations"][-1]["kl"] = 2.0 + seed
                recs[1]["iterations"][-1]["kl"] = 4.0
            else:
                recs = [bon_record("p", [rp]), bon_record("q", [rq])]
            run = write_run(root, "shp", PAIR, method, seed, recs, method_cfg=AISP_CFG if method == "aisp" else None)
            with_prompt_metrics(run, {"gold_reward": gold[method][seed], "base_logprob": [-1.0, None]})


def test_table1_extended_differences_and_intervals(tmp_path):
    _extended_tree(tmp_path)
    df = table1_extended.table1_extended(runs_in(tmp_path), BOOT)
    get = lambda row, metric: df[(df.row == row) & (df.metric == metric)].iloc[0]  # noqa: E731
    # method rows: mean (std) over seeds of the per-seed mean over prompts
    a = df[(df.row == "method") & (df.method == "aisp")].set_index("metric")
    assert a.loc["reward", "mean"] == pytest.approx(2.0) and a.loc["reward", "std"] == pytest.approx(0.0)
    assert a.loc["kl", "mean"] == pytest.approx((3.0 + 3.5) / 2) and a.loc["base_logprob", "n_prompts"] == 1
    # AISP - BoN own reward: p (2, 1), q (0, 2); per prompt means 1.5 and 1, overall 5/4. With two prompts
    # the resampled mean is 1.5 (both p), 1.25 or 1 (both q), each at least 1/4 likely: [1, 1.5]
    d = get("difference", "reward")
    assert (d["mean"], d.lo, d.hi, d.n_prompts, d.n_seeds) == (pytest.approx(1.25), 1.0, 1.5, 2, 2)
    # gold: p (0.5, 0.5), q (-1, 0): per prompt 0.5 and -0.5 -> [-0.5, 0.5] around 0
    g = get("difference", "gold_reward")
    assert (g["mean"], g.lo, g.hi) == (pytest.approx(0.0), -0.5, 0.5) and g.scored_by == "eurus"
    assert np.isnan(get("difference", "kl")["mean"])  # BoN has no KL(Q_Û‖P)
    paths = table1_extended.write_table1_extended(df, tmp_path / "tables", BOOT)
    assert sorted(p.name for p in paths) == ["table1_extended.csv", "table1_extended.md", "table1_extended.tex"]
    md = (tmp_path / "tables" / "table1_extended.md").read_text()
    cells = md_cells(md)
    assert cells[0][:4] == ["Dataset, models", "Method", "Optimised reward", "Gold reward"]
    assert cells[3][1:4] == ["AISP − BoN (top-p)", "+1.250 [+1.000, +1.500]", "+0.000 [-0.500, +0.500]"]
    assert "4,000 resamples" in md and "prompts resampled as clusters" in md and "all of its seeds" in md
    # a stale per-prompt file (another fingerprint than summary.json's) is not read
    run = tmp_path / "runs" / "shp" / PAIR / "aisp" / "default" / "seed0"
    with_prompt_metrics(run, {"gold_reward": [9.0, 9.0]}, fingerprint="other")
    df2 = table1_extended.table1_extended(runs_in(tmp_path), BOOT)
    assert df2[(df2.row == "method") & (df2.method == "aisp") & (df2.metric == "gold_reward")].n_seeds.iloc[0] == 1


def test_table1_extended_keeps_each_metric_on_one_scorer(tmp_path):
    """BoN seed 1's gold reward came from another model: left out of its row and of the difference, and named."""
    _extended_tree(tmp_path)
    run = tmp_path / "runs" / "shp" / PAIR / "bon_topp" / "default" / "seed1"
    summary = json.loads((run / "summary.json").read_text())
    summary["metrics"]["gold_reward_model"] = "ultrarm"
    (run / "summary.json").write_text(json.dumps(summary))
    df = table1_extended.table1_extended(runs_in(tmp_path), BOOT)
    get = lambda row, metric: df[(df.row == row) & (df.metric == metric)].iloc[0]  # noqa: E731
    g = get("difference", "gold_reward")
    assert g.n_seeds == 1 and g["mean"] == pytest.approx((0.5 - 1.0) / 2) and g.scored_by == "eurus"  # seed 0 alone
    assert get("difference", "reward").n_seeds == 2  # the other metrics keep both seeds
    table1_extended.write_table1_extended(df, tmp_path / "tables", BOOT)
    md = (tmp_path / "tables" / "table1_extended.md").read_text()
    assert "Gold reward of BoN (top-p) seed 1 (ultrarm) left out: the others are scored by eurus" in md


# --------------------------------------------------------------------------- win rates and judge bias


def judgement(pid: str, outcome: str, scores: list, words: list | None) -> dict:
    j = {"prompt_id": pid, "outcome": outcome, "orders": ["AB", "BA"], "scores": scores}
    return j if words is None else {**j, "words": words}


def write_judge(root: Path, a: str, b: str, trials: list[list[dict]], run_a: str = "x", run_b: str = "y") -> None:
    d = root / "judge" / "shp" / PAIR
    d.mkdir(parents=True, exist_ok=True)
    ts = []
    for i, js in enumerate(trials):
        counts = {k: sum(j["outcome"] == k for j in js) for k in ("win", "draw", "loss", "invalid")}
        ts.append({"trial": i, "run_a": run_a, "run_b": run_b, **counts, "n": len(js), "judgements": js})
    (d / f"{a}_vs_{b}.json").write_text(json.dumps({
        "dataset": "shp", "model": "llama3_8b", "reward": "ultrarm", "method_a": a, "method_b": b,
        "judge_model": "gpt-4", "mode": "both_orders", "num_prompts": 2, "trials": ts}))


# A first (AB) then B first (BA); scores are [first shown, second shown]
J = [judgement("p", "win", [[8, 2], [2, 8]], [30, 10]),    # A both orders; A longer
     judgement("q", "draw", [[8, 2], [8, 2]], [5, 10]),    # first shown wins both: a flip; B longer
     judgement("r", "loss", [[2, 8], [8, 2]], [10, 20]),   # B both orders; B longer
     judgement("s", "draw", [[5, 5], [6, 4]], [7, 7])]     # tie, then first shown: a flip; equal


def test_winrate_intervals_resample_judged_prompts(tmp_path):
    write_judge(tmp_path, "aisp", "bon_topp", [[J[0], J[2]]])
    t = tables.winrate_table(tmp_path, "aisp", "bon_topp", boot=BOOT)
    r = t.iloc[0]
    # one trial, a win and a loss: the resampled win rate is 0, 50 or 100 (1/4, 1/2, 1/4)
    assert (r.win, r.win_lo, r.win_hi) == (50.0, 0.0, 100.0) and (r.draw_lo, r.draw_hi) == (0.0, 0.0)
    tables.write_winrate(t, tmp_path / "tables", "table2", boot=BOOT, extra_notes=["a bias line"])
    md = (tmp_path / "tables" / "table2.md").read_text()
    assert md_cells(md)[1][2:5] == ["50.0 [0.0, 100.0]", "0.0 [0.0, 0.0]", "50.0 [0.0, 100.0]"]
    assert "prompts resampled as clusters" in md and "averaged over trials" in md and "- a bias line" in md
    # a file in B's view: win and loss (and their intervals) swap
    write_judge(tmp_path, "bon_gaussian", "aisp", [[J[0], J[0], J[1]]])
    r = tables.winrate_table(tmp_path, "aisp", "bon_gaussian", boot=BOOT).iloc[0]
    assert (r.loss, r.loss_lo, r.loss_hi, r.win_hi) == (pytest.approx(200 / 3), 0.0, 100.0, 0.0)


def test_judge_bias_flips_position_and_length(tmp_path):
    write_judge(tmp_path, "aisp", "bon_topp", [J])
    df = judge_bias.bias_table(tmp_path, "aisp", ["bon_topp"], boot=BOOT)
    r = df.iloc[0]
    # flips: q (A then B preferred... first shown both times) and s (tie, then A): 2 of 4
    assert (r.flips, r.flips_n) == (50.0, 4) and (r.reversed, r.reversed_n) == (25.0, 4)
    # first position: 7 non-tied replies, first shown preferred in p-AB, q both, r-BA, s-BA = 5
    assert r.first_position_n == 7 and r.first_position == pytest.approx(500 / 7)
    # longer answer wins: p (A longer, win) and r (B longer, loss) -> 2 of 2
    assert (r.longer_wins, r.longer_wins_n) == (100.0, 2)
    assert (r.a_longer_n, r.a_longer_win, r.b_longer_n, r.b_longer_win, r.b_longer_draw) == (1, 100.0, 2, 0.0, 50.0)
    assert (r.equal_n, r.equal_draw) == (1, 100.0)
    # B's view of the same judgements: the same rates, buckets and outcomes swapped
    write_judge(tmp_path, "bon_gaussian", "aisp", [J])
    s = judge_bias.bias_table(tmp_path, "aisp", ["bon_gaussian"], boot=BOOT).iloc[0]
    assert (s.flips, s.longer_wins, s.b_longer_n, s.b_longer_loss, s.a_longer_n) == (50.0, 100.0, 1, 100.0, 2)
    paths = judge_bias.write_bias(df, tmp_path / "tables", BOOT)
    assert sorted(p.name for p in paths) == ["judge_bias.csv", "judge_bias.md"]
    assert md_cells(paths[0].read_text() if paths[0].suffix == ".md" else paths[1].read_text())[1][3] \
        .startswith("50.0 [")


def test_judge_bias_reads_lengths_of_older_files_from_the_runs(tmp_path):
    words = {"aisp": {"p": "one two three", "q": "one"}, "bon_topp": {"p": "a", "q": "a b c d\n\nUser: x y z"}}
    for method, resp in words.items():
        recs = [{**bon_record(pid, [0.0]), "response": text} for pid, text in resp.items()]
        write_run(tmp_path, "shp", PAIR, method, 0, recs)
    old = [{k: v for k, v in j.items() if k != "words"} for j in (J[0], J[1])]
    # the run paths as the judge showed them, relative to another working directory
    write_judge(tmp_path, "aisp", "bon_topp", [old], run_a=f"elsewhere/runs/shp/{PAIR}/aisp/default/seed0",
                run_b=f"elsewhere/runs/shp/{PAIR}/bon_topp/default/seed0")
    r = judge_bias.bias_table(tmp_path, "aisp", ["bon_topp"], boot=BOOT).iloc[0]
    # p: 3 words vs 1 (A longer, win); q: 1 vs 4 (cleaned at "User:", B longer, draw)
    assert (r.a_longer_n, r.a_longer_win, r.b_longer_n, r.b_longer_draw, r.words_missing) == (1, 100.0, 1, 100.0, 0)


def test_cli_judge_bias_and_tables_notes(tmp_path, report):
    write_judge(tmp_path, "aisp", "bon_topp", [J])
    code, out, err = report("target=[table2,judge_bias]", "bootstrap.resamples=500")
    assert code == 0, err
    assert "Judge position and length bias" in out  # printed beside the tables
    assert "Judge bias (SHP, Llama3_8B & UltraRM): the verdict changes with the order for 50.0 [" in \
        (tmp_path / "tables" / "table2.md").read_text()
    assert len(pd.read_csv(tmp_path / "tables" / "judge_bias.csv")) == 1
    for args, needle in ((["bootstrap.resamples=5"], "bootstrap.resamples must be an integer >= 100"),
                         (["bootstrap.level=1.5"], "bootstrap.level"), (["figure2.prompts=0"], "figure2.prompts")):
        code, _, err = report("target=table2", *args)
        assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1, (args, err)


# --------------------------------------------------------------------------- sensitivity


def test_sensitivity_table_and_figure(tmp_path, report):
    grid = {(2, 8, 0.5): (1.0, 3.0), (4, 4, 0.5): (2.0, 2.0), (4, 4, 1.0): (0.0, 1.0)}
    for (n, kappa, sigma), rewards in grid.items():
        cfg = {**AISP_CFG, "n": n, "kappa": kappa, "sigma": sigma}
        recs = [aisp_record(pid, n, [r] * (n * kappa), seconds=2.0 * n) for pid, r in zip("pq", rewards)]
        write_run(tmp_path, "shp", PAIR, "aisp", 0, recs, method_cfg=cfg,
                  variant=f"sensitivity,budget.n={n},method.sigma={sigma}")
    write_run(tmp_path, "shp", PAIR, "aisp", 0, [aisp_record("p", 2, [9.0, 9.0])], method_cfg=AISP_CFG,
              variant="table1")  # not a sensitivity run
    assert set(table1.table1(runs_in(tmp_path)).variant) == {"table1"}  # the sweep never feeds Table 1
    df = sensitivity.sensitivity_table(runs_in(tmp_path), BOOT)
    assert [(r.n, r.kappa, r.sigma) for r in df.itertuples()] == [(2, 8, 0.5), (4, 4, 0.5), (4, 4, 1.0)]
    assert (df.budget == 16).all() and list(df.final_reward) == [2.0, 2.0, 0.5] and list(df.seconds) == [4.0, 8.0, 8.0]
    r = df.iloc[0]
    assert (r.final_reward_lo, r.final_reward_hi) == (1.0, 3.0)  # two prompts: the interval spans their rewards
    code, out, err = report("target=sensitivity", "bootstrap.resamples=500")
    assert code == 0, err
    assert (tmp_path / "figures" / "sensitivity_shp.png").stat().st_size > 1000
    cells = md_cells((tmp_path / "tables" / "sensitivity.md").read_text())
    assert cells[1][2:4] == ["2 × 8", "0.5"] and cells[1][6].startswith("2.000 [1.000, 3.000]")


# --------------------------------------------------------------------------- Figure 2's prompts


def test_figure2_averages_a_seeded_sample_of_prompts(tmp_path):
    _figure_tree(tmp_path)
    runs = runs_in(tmp_path)
    # AISP best so far per prompt, mean over the two seeds: p [2.5, 3.5, 4.5], q [0.5, 1, 2]
    by_id = {"p": [2.5, 3.5, 4.5], "q": [0.5, 1.0, 2.0]}
    drawn = set()
    for seed in range(8):
        ids, total = figures.sample_prompt_ids(runs, 1, seed)
        assert total == 2 and len(ids) == 1 and ids == figures.sample_prompt_ids(runs, 1, seed)[0]
        df = figures.figure2_data(runs, "shp", band="seeds", prompts=1, seed=seed)
        bsf = df[df.curve == "aisp_best_so_far"].sort_values("k")
        np.testing.assert_allclose(bsf["mean"], by_id[next(iter(ids))])
        assert (df.prompts == 1).all() and (df.prompts_total == 2).all()
        drawn |= ids
    assert drawn == {"p", "q"}  # the seed matters
    every = figures.figure2_data(runs, "shp", band="seeds", prompts=None)
    assert (every.prompts == 0).all()
    np.testing.assert_allclose(every[every.curve == "aisp_best_so_far"].sort_values("k")["mean"], [1.5, 2.25, 3.25])
    assert figures.sample_prompt_ids(runs, 100, 0) == ({"p", "q"}, 2)  # fewer prompts than asked: all of them


def test_figure2_compares_curves_over_the_prompts_every_run_has(tmp_path):
    """A partial run (BoN seed 2 has only prompt p) narrows every curve to p, asked for all or for more."""
    _figure_tree(tmp_path)
    write_run(tmp_path, "shp", "llama3_8b__ultrarm", "bon_topp", 2, [bon_record("p", [5.0] * 8)],
              method_cfg={"num_samples": 8})
    runs = runs_in(tmp_path)
    assert figures.sample_prompt_ids(runs, None) == ({"p"}, 1)
    for prompts in (None, 1, 100):
        df = figures.figure2_data(runs, "shp", band="seeds", prompts=prompts)
        bsf = df[df.curve == "aisp_best_so_far"].sort_values("k")
        np.testing.assert_allclose(bsf["mean"], [2.5, 3.5, 4.5])  # prompt p alone (q would pull it down)
        bon = df[df.curve == "bon_topp"].sort_values("k")  # p: seeds 0, 1, 2, the best of 2, 4, 6 of each pool
        pools = ([0, 1, 2, 0, 0, 7, 9, 9], [3, 0, 0, 4, 0, 0, 0, 0], [5] * 8)
        np.testing.assert_allclose(bon["mean"], [np.mean([subset_mean_best(x, N) for x in pools]) for N in (2, 4, 6)])
        assert (df.prompts == 0).all() and (df.prompts_total == 1).all()
    write_run(tmp_path, "shp", "llama3_8b__ultrarm", "bon_topp", 3, [bon_record("z", [1.0] * 8)],
              method_cfg={"num_samples": 8})
    with pytest.raises(ValueError, match="share no prompt"):
        figures.figure2_data(runs_in(tmp_path), "shp")


def test_sensitivity_experiment_holds_the_budget(compose):
    from omegaconf.errors import InterpolationResolutionError

    for n in (8, 16, 32, 64, 128):
        cfg = compose(["experiment=sensitivity", f"budget.n={n}"])
        assert (cfg.method.n, cfg.method.kappa, cfg.method.name) == (n, 1024 // n, "aisp")
    cfg = compose(["experiment=sensitivity", "sensitivity_budget=8", "budget.n=4", "scale=smoke"])
    assert (cfg.method.n, cfg.method.kappa) == (4, 2)
    with pytest.raises(InterpolationResolutionError, match="n·κ = 1024 is not a multiple of n = 3"):
        compose(["experiment=sensitivity", "budget.n=3"]).method.kappa
