"""Tables and figures from synthetic run folders (aisp_bench.report): hand-checked numbers."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aisp_bench.report import figures, table1, tables
from aisp_bench.report.__main__ import main as report_main
from aisp_bench.report.common import paper_order, select_variants
from aisp_bench.report.curves import compute_curve
from aisp_bench.results import Selection, discover_runs
from aisp_bench.rundir import RunFolderError, read_records


def runs_in(root: Path, **select) -> list:
    """The runs under ``root`` in the paper's order (as the report command sees them)."""
    return paper_order(discover_runs(root, Selection.from_mapping(select)))


def md_cells(md: str) -> list[list[str]]:
    """The cells of a Markdown table's rows (header first, the alignment row left out)."""
    rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in r.strip("|").split(" | ")] for r in rows[:1] + rows[2:]]

# --------------------------------------------------------------------------- synthetic runs


def write_run(root: Path, dataset: str, pair: str, method: str, seed: int, records: list[dict], *,
              variant: str = "default", method_cfg: dict | None = None, metrics: dict | None = None,
              complete: bool = True, torn_tail: str | None = None) -> Path:
    """A run folder as the orchestration writes it (records.jsonl, manifest.json, summary.json)."""
    d = root / "runs" / dataset / pair / method / variant / f"seed{seed}"
    d.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]
    text = "\n".join(lines) + "\n" + (torn_tail or "")
    (d / "records.jsonl").write_text(text)
    model, reward = pair.split("__")
    cfg = {"seed": seed, "method": {"name": method, **(method_cfg or {})}, "model": {"name": model},
           "reward": {"name": reward}, "dataset": {"name": dataset}, "generation": {}}
    (d / "manifest.json").write_text(json.dumps({"config": cfg}))
    rewards = [r["reward"] for r in records]
    summary = {"num_prompts": len(records), "num_done": len(records), "num_skipped": 0,
               "mean_reward": float(np.mean(rewards)) if rewards else None, "complete": complete}
    if metrics is not None:
        summary["metrics"] = metrics
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def bon_record(pid: str, sample_rewards: list[float], sample_tokens: list[int] | None = None,
               seconds: float = 1.0) -> dict:
    st = sample_tokens or [10] * len(sample_rewards)
    return {"prompt_id": pid, "prompt": "q", "messages": [], "response": "a", "reward": max(sample_rewards),
            "sample_rewards": sample_rewards, "num_samples": len(sample_rewards), "num_tokens": sum(st),
            "response_tokens": 5, "seconds": seconds, "finish_reason": "eos", "sample_tokens": st}


def aisp_record(pid: str, n: int, sample_rewards: list[float], final: float | None = None,
                sample_tokens: list[int] | None = None, iter_seconds: list[float] | None = None,
                seconds: float | None = None) -> dict:
    """An AISP record whose ``iterations`` are consistent with ``sample_rewards`` (n per iteration)."""
    K = len(sample_rewards) // n
    all_r = list(sample_rewards) + ([final] if final is not None else [])
    st = sample_tokens or [10] * len(all_r)
    its, best = [], -math.inf
    for k in range(K):
        chunk = sample_rewards[k * n:(k + 1) * n]
        best = max(best, max(chunk))
        its.append({"k": k + 1, "mean": float(np.mean(chunk)), "max": max(chunk), "best_so_far": best,
                    "ess": 1.0, "u_norm": 0.0, "kl": 0.0, "tokens": sum(st[k * n:(k + 1) * n]),
                    "seconds": (iter_seconds[k] if iter_seconds else 1.0)})
    secs = seconds if seconds is not None else sum(it["seconds"] for it in its)
    return {"prompt_id": pid, "prompt": "q", "messages": [], "response": "a", "reward": max(all_r),
            "sample_rewards": all_r, "num_samples": len(all_r), "num_tokens": sum(st), "response_tokens": 5,
            "seconds": secs, "finish_reason": "eos", "iterations": its, "sample_tokens": st}


AISP_CFG = {"n": 2, "kappa": 3, "tau": 4, "lam": 0.5, "alpha": 0.9999, "sigma": 0.5, "final_candidate": True}


# --------------------------------------------------------------------------- io


def test_torn_last_line_is_skipped_and_only_that_one(tmp_path):
    d = write_run(tmp_path, "shp", "llama3_8b__ultrarm", "bon_topp", 0,
                  [bon_record("a", [1.0]), bon_record("b", [2.0])], torn_tail='{"prompt_id": "c", "rew')
    with pytest.warns(UserWarning, match="torn last line"):
        recs = read_records(d)
    assert [r["prompt_id"] for r in recs] == ["a", "b"]
    (d / "records.jsonl").write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(RunFolderError, match="line 2 is corrupt"):
        read_records(d)


def test_discovery_filters_and_variant_choice(tmp_path):
    rec = [bon_record("a", [1.0])]
    write_run(tmp_path, "shp", "llama3_8b__ultrarm", "aisp", 0, rec, variant="method.lam=0.3",
              method_cfg={"lam": 0.3})
    write_run(tmp_path, "shp", "llama3_8b__ultrarm", "aisp", 0, rec)
    write_run(tmp_path, "hh_rlhf", "vicuna_7b__eurus", "bon_topp", 1, rec, variant="x=1")
    write_run(tmp_path, "hh_rlhf", "vicuna_7b__eurus", "bon_topp", 2, rec, variant="x=1")
    write_run(tmp_path, "hh_rlhf", "vicuna_7b__eurus", "bon_topp", 1, rec, variant="a=0")
    runs = runs_in(tmp_path)
    assert len(runs) == 5 and runs[0].dataset == "shp"  # SHP sorts first (paper order)
    assert {r.pair for r in runs_in(tmp_path, pair="vicuna_7b__eurus")} == {"vicuna_7b__eurus"}
    chosen, notes = select_variants(runs)
    assert chosen[("shp", "llama3_8b", "ultrarm", "aisp")][0].variant == "default"
    assert [r.seed for r in chosen[("hh_rlhf", "vicuna_7b", "eurus", "bon_topp")]] == [1, 2]  # most seeds
    assert len(notes) == 2
    assert runs[0].method_param("lam") is None
    assert [r for r in runs if r.variant == "method.lam=0.3"][0].method_param("lam") == 0.3


# --------------------------------------------------------------------------- table 1


def _table1_tree(root: Path) -> None:
    pair = "llama3_8b__ultrarm"
    # AISP, 3 seeds with evaluation metrics.
    for seed, (rw, div, coh) in enumerate([(-2.0, 0.70, 0.60), (-2.5, 0.71, 0.62), (-3.0, 0.72, 0.64)]):
        write_run(root, "shp", pair, "aisp", seed, [bon_record("a", [rw])], method_cfg=AISP_CFG,
                  metrics={"reward_mean": rw, "diversity": div, "coherence": coh})
    # BoN (top-p), 2 seeds, no evaluation yet: reward from records (mean over prompts).
    write_run(root, "shp", pair, "bon_topp", 0, [bon_record("a", [1.0]), bon_record("b", [3.0])])
    write_run(root, "shp", pair, "bon_topp", 1, [bon_record("a", [2.0]), bon_record("b", [6.0])], complete=False)
    # A pair the paper does not have.
    write_run(root, "demo", "smollm2_135m__smollm2_judge", "aisp", 0, [bon_record("a", [0.25])],
              metrics={"reward_mean": 0.25, "diversity": 0.5, "coherence": 0.4})


def test_table1_hand_checked_means_stds_and_paper_values(tmp_path):
    _table1_tree(tmp_path)
    df = table1.table1(runs_in(tmp_path))
    assert list(df[["dataset", "method"]].itertuples(index=False, name=None)) == [
        ("shp", "bon_topp"), ("shp", "aisp"), ("demo", "aisp")]
    aisp = df[(df.dataset == "shp") & (df.method == "aisp")].iloc[0]
    assert aisp.n_seeds == 3 and aisp.seeds == "0,1,2" and aisp.reward_source == "metrics"
    assert aisp.reward_mean == pytest.approx(-2.5)
    assert aisp.reward_std == pytest.approx(0.5)  # sample std, ddof=1: sqrt((0.25+0+0.25)/2)
    assert aisp.diversity_mean == pytest.approx(0.71) and aisp.diversity_std == pytest.approx(0.01)
    assert aisp.coherence_mean == pytest.approx(0.62) and aisp.coherence_std == pytest.approx(0.02)
    # the paper's Table 1 values for the same cell, beside ours
    assert aisp.reward_paper_mean == -2.36 and aisp.reward_paper_std == 0.07
    assert aisp.diversity_paper_mean == 0.705 and aisp.coherence_paper_std == 0.005
    bon = df[(df.dataset == "shp") & (df.method == "bon_topp")].iloc[0]
    # per-seed means over prompts 2.0 and 4.0 -> mean 3.0, std sqrt(2)
    assert bon.reward_source == "records" and bon.reward_mean == pytest.approx(3.0)
    assert bon.reward_std == pytest.approx(math.sqrt(2.0))
    assert math.isnan(bon.diversity_mean) and not bon.complete
    assert bon.reward_paper_mean == -3.44
    demo = df[df.dataset == "demo"].iloc[0]
    assert math.isnan(demo.reward_std) and math.isnan(demo.reward_paper_mean)


def test_table1_files_rows_and_columns(tmp_path):
    _table1_tree(tmp_path)
    paths = table1.write_table1(table1.table1(runs_in(tmp_path)), tmp_path / "tables")
    assert sorted(p.name for p in paths) == ["table1.csv", "table1.md", "table1.tex"]
    csv = pd.read_csv(tmp_path / "tables" / "table1.csv")
    assert len(csv) == 3
    for m in ("reward", "diversity", "coherence"):
        assert {f"{m}_mean", f"{m}_std", f"{m}_paper_mean", f"{m}_paper_std"} <= set(csv.columns)
    md = (tmp_path / "tables" / "table1.md").read_text()
    header, *rows = md_cells(md)
    assert header[:4] == ["Models", "Methods", "SHP Reward", "SHP Reward (paper)"] and "demo Reward" in header
    assert "demo Reward (paper)" not in header  # no paper column where the paper has no value
    assert len(rows) == 3 and all(len(r) == len(header) for r in rows)  # one per (pair, method)
    aisp_row = dict(zip(header, next(r for r in rows if r[1] == "AISP" and "-2.36 (0.07)" in r)))
    assert aisp_row["SHP Reward"] == "-2.50 (0.50)" and aisp_row["SHP Reward (paper)"] == "-2.36 (0.07)"
    assert aisp_row["SHP Diversity"] == "0.710 (0.010)"
    bon_row = dict(zip(header, next(r for r in rows if r[1] == "BoN (top-p)")))
    assert bon_row["SHP Reward"] == "3.00 (1.4)†* [n=2]" and bon_row["SHP Reward (paper)"] == "-3.44 (0.07)"
    assert bon_row["SHP Diversity"] == "—"
    assert "ddof=1" in md and "Kanai" in md and "evaluation step" in md
    tex = (tmp_path / "tables" / "table1.tex").read_text()
    assert r"\multicolumn" in tex and r"Llama3\_8B \& UltraRM" in tex and r"\mathcal{N}" not in tex
    assert r"\begin{tabular}{llrrrrrrrrr}" in tex  # 2 labels + SHP 3×(ours, paper) + demo 3


def test_table1_names_where_each_datasets_prompts_came_from(tmp_path):
    sources = {"shp": {"path": "/data/shp/test_1000.jsonl"}, "hh_rlhf": {"hub_id": "Anthropic/hh-rlhf", "split": "test"}}
    for ds, src in sources.items():
        run = write_run(tmp_path, ds, "llama3_8b__ultrarm", "aisp", 0, [bon_record("a", [1.0])], method_cfg=AISP_CFG)
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["config"]["dataset"].update(src, num_prompts=1000, sample_seed=0)
        (run / "manifest.json").write_text(json.dumps(manifest))
    run = write_run(tmp_path, "hh_rlhf", "llama3_8b__ultrarm", "bon_topp", 0, [bon_record("a", [1.0])])
    df = table1.table1(runs_in(tmp_path))
    assert set(df.prompts) == {"file shp/test_1000.jsonl, 1000 drawn with sample_seed 0", "not recorded",
                               "hub Anthropic/hh-rlhf (all subsets), test split, 1000 drawn with sample_seed 0"}
    table1.write_table1(df, tmp_path / "tables")
    md = (tmp_path / "tables" / "table1.md").read_text()
    assert ("Prompts: SHP: file shp/test_1000.jsonl, 1000 drawn with sample_seed 0; HH-RLHF: hub Anthropic/hh-rlhf "
            "(all subsets), test split, 1000 drawn with sample_seed 0 | not recorded.") in md


def test_table1_never_averages_seeds_of_different_scorers(tmp_path):
    """Seed 2 was evaluated with another reward model and coherence encoder: left out and named, never mixed."""
    pair = "llama3_8b__ultrarm"
    for seed, (rw, rm, coh, enc) in enumerate([(-5.0, "ultrarm", 0.6, "simcse"), (-5.2, "ultrarm", 0.8, "simcse"),
                                               (2.0, "rm", 0.1, "minilm")]):
        write_run(tmp_path, "shp", pair, "aisp", seed, [bon_record("a", [rw])], method_cfg=AISP_CFG,
                  complete=seed != 1, metrics={"reward_mean": rw, "reward_model": rm, "diversity": 0.5,
                                               "coherence": coh, "coherence_encoder": enc})
    df = table1.table1(runs_in(tmp_path))
    row = df.iloc[0]
    assert row.reward_mean == pytest.approx(-5.1) and row.reward_n == 2 and row.reward_model == "ultrarm"
    assert row.coherence_mean == pytest.approx(0.7) and row.coherence_encoder == "simcse"
    assert row.reward_left_out == "seed 2 (rm)" and row.coherence_left_out == "seed 2 (minilm)"
    assert row.diversity_n == 3  # diversity has one scale
    table1.write_table1(df, tmp_path / "tables")
    md = (tmp_path / "tables" / "table1.md").read_text()
    header, *rows = md_cells(md)
    cells = dict(zip(header, rows[0]))
    assert cells["SHP Reward"] == "-5.10 (0.14)‡* [n=2]" and cells["SHP Coherence"] == "0.700 (0.14)‡* [n=2]"
    assert cells["SHP Diversity"] == "0.500 (0)*"  # seed 1 is incomplete: marked in every column
    assert "reward: left out seed 2 (rm)." in md and "coherence: left out seed 2 (minilm)." in md
    assert r"$^\ddagger$" in (tmp_path / "tables" / "table1.tex").read_text()


# --------------------------------------------------------------------------- figure 2


def test_aisp_curves_from_iterations():
    rec = aisp_record("a", 2, [1.0, 3.0, 0.0, 2.0, 5.0, 4.0], final=6.0)
    c = figures.aisp_curves(rec)
    np.testing.assert_allclose(c["aisp_mean_at_k"], [2.0, 1.0, 4.5])
    np.testing.assert_allclose(c["aisp_best_at_k"], [3.0, 2.0, 5.0])
    np.testing.assert_allclose(c["aisp_best_so_far"], [3.0, 3.0, 5.0])


def _figure_tree(root: Path) -> None:
    pair = "llama3_8b__ultrarm"
    aisp = {0: [aisp_record("p", 2, [1.0, 3.0, 0.0, 2.0, 5.0, 4.0], final=0.0),
                aisp_record("q", 2, [0.0, 0.0, 1.0, 1.0, 1.0, 3.0])],
            1: [aisp_record("p", 2, [2.0, 2.0, 4.0, 0.0, 1.0, 1.0]),
                aisp_record("q", 2, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0])]}
    for seed, recs in aisp.items():
        write_run(root, "shp", pair, "aisp", seed, recs, method_cfg=AISP_CFG)
    bon = {0: [bon_record("p", [0.0, 1.0, 2.0, 0.0, 0.0, 7.0, 9.0, 9.0]), bon_record("q", [1.0] * 8)],
           1: [bon_record("p", [3.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]), bon_record("q", [0.0] * 8)]}
    for seed, recs in bon.items():
        write_run(root, "shp", pair, "bon_topp", seed, recs, method_cfg={"num_samples": 8})


def subset_mean_best(pool: list[float], N: int) -> float:
    """The best of N samples, averaged over every N-subset of ``pool`` (by enumeration)."""
    subsets = list(itertools.combinations(pool, N))
    return sum(max(s) for s in subsets) / len(subsets)


def test_figure2_curves_equal_hand_computed(tmp_path):
    _figure_tree(tmp_path)
    df = figures.figure2_data(runs_in(tmp_path), "shp", band="seeds")
    get = lambda name: df[df.curve == name].sort_values("k")  # noqa: E731
    # AISP best so far: seed0 p [3,3,5] q [0,1,3] -> [1.5,2,4]; seed1 p [2,4,4] q [1,1,1] -> [1.5,2.5,2.5]
    bsf = get("aisp_best_so_far")
    np.testing.assert_allclose(bsf["mean"], [1.5, 2.25, 3.25])
    np.testing.assert_allclose(bsf["hi"] - bsf["mean"], [0.0, np.std([2, 2.5], ddof=1), np.std([4, 2.5], ddof=1)])
    # mean at k: seed0 p [2,1,4.5] q [0,1,2] -> [1,1,3.25]; seed1 p [2,2,1] q [1,1,1] -> [1.5,1.5,1]
    np.testing.assert_allclose(get("aisp_mean_at_k")["mean"], [1.25, 1.25, 2.125])
    # best at k: seed0 p [3,2,5] q [0,1,3] -> [1.5,1.5,4]; seed1 p [2,4,1] q [1,1,1] -> [1.5,2.5,1]
    np.testing.assert_allclose(get("aisp_best_at_k")["mean"], [1.5, 2.0, 2.5])
    # BoN at N = n·k = 2,4,6: the best of N samples drawn from the run's pool of 8, averaged over
    # every N-subset (K = AISP's 3 iterations), not the best of the first N
    bon = get("bon_topp")
    assert list(bon["N"]) == [2, 4, 6]
    p0, p1 = [subset_mean_best([0, 1, 2, 0, 0, 7, 9, 9], N) for N in (2, 4, 6)], \
        [subset_mean_best([3, 0, 0, 4, 0, 0, 0, 0], N) for N in (2, 4, 6)]
    s0, s1 = (np.array(p0) + 1) / 2, np.array(p1) / 2
    np.testing.assert_allclose(bon["mean"], (s0 + s1) / 2)
    # prompts band: per prompt mean over seeds, then mean ± s.e. over prompts
    dfp = figures.figure2_data(runs_in(tmp_path), "shp", band="prompts")
    b = dfp[dfp.curve == "bon_topp"].sort_values("k")
    p, q = (np.array(p0) + np.array(p1)) / 2, np.array([0.5, 0.5, 0.5])
    np.testing.assert_allclose(b["mean"], (p + q) / 2)
    np.testing.assert_allclose(b["hi"] - b["mean"], np.std([p, q], axis=0, ddof=1) / np.sqrt(2))


def test_compute_curve_tokens_and_pro_rata_seconds():
    rec = aisp_record("a", 2, [1.0, 0.0, 3.0, 2.0], final=5.0, sample_tokens=[10, 30, 20, 20, 50],
                      iter_seconds=[4.0, 2.0], seconds=9.0)
    rec.update(prompt_tokens=7, decode_passes=3)
    c = compute_curve(rec, n=2, params=(100.0, 10.0))
    np.testing.assert_allclose(c["best"], [1, 1, 3, 3, 5])
    np.testing.assert_allclose(c["tokens"], [10, 40, 60, 80, 130])
    np.testing.assert_allclose(c["reward_tokens"], [17, 47, 67, 87, 137])  # the prompt once
    np.testing.assert_allclose(c["flops"], 2 * 100 * (7 + c["tokens"]) + 2 * 10 * c["reward_tokens"])
    np.testing.assert_allclose(c["depth"], [1, 1, 2, 2, 3])  # iterations 1, 2, then y(U*)
    # iteration 1: 4 s split 10:30; iteration 2: 2 s split 20:20; final candidate: 9 - 6 = 3 s
    np.testing.assert_allclose(c["seconds"], [1, 4, 5, 6, 9])
    b = bon_record("b", [0.0, 2.0, 1.0], sample_tokens=[1, 2, 3], seconds=6.0)
    c = compute_curve(b)
    np.testing.assert_allclose(c["seconds"], [1, 3, 6])
    np.testing.assert_allclose(c["best"], [0, 2, 2])  # in generation order: the best so far
    assert np.isnan(c["reward_tokens"]).all() and np.isnan(c["flops"]).all()  # no prompt_tokens, no parameters
    # a best-of-N pool: the expected best of j samples of the pool, at j times its mean cost, depth 1
    c = compute_curve({**b, "prompt_tokens": 4}, params=(100.0, 10.0), pool=True)
    np.testing.assert_allclose(c["best"], [1.0, (2 + 2 + 1) / 3, 2.0])
    for axis, want in (("tokens", [2, 4, 6]), ("reward_tokens", [6, 8, 10]), ("seconds", [2, 4, 6]),
                       ("depth", [1, 1, 1])):
        np.testing.assert_allclose(c[axis], want)


def test_compute_data_and_figure_files(tmp_path):
    _figure_tree(tmp_path)
    df = figures.compute_data(runs_in(tmp_path), "shp", band="seeds")
    a = df[df.method == "aisp"]
    # seed 0's prompt p has a 7th sample (y(U*)), q has not: each run is cut to its shortest prompt
    assert len(a) == 6 and len(df[df.method == "bon_topp"]) == 8
    np.testing.assert_allclose(a["tokens"], np.arange(1, 7) * 10.0)
    b = df[df.method == "bon_topp"].sort_values("sample")
    # the expected best of j samples of each pool, mean over prompts, then over seeds
    s0 = np.mean([[subset_mean_best([0, 1, 2, 0, 0, 7, 9, 9], j) for j in range(1, 9)], np.ones(8)], axis=0)
    s1 = np.mean([[subset_mean_best([3, 0, 0, 4, 0, 0, 0, 0], j) for j in range(1, 9)], np.zeros(8)], axis=0)
    np.testing.assert_allclose(b["mean"], (s0 + s1) / 2)
    assert set(figures.AXES) <= set(df.columns) and (b["depth"] == 1).all() and b["flops"].isna().all()
    paths = figures.write_figure2(runs_in(tmp_path), tmp_path / "figures") + figures.write_compute(
        runs_in(tmp_path), tmp_path / "figures", axes=["samples", "flops"])
    assert sorted(p.name for p in paths) == ["compute_shp.csv", "compute_shp.png", "figure2_shp.csv",
                                             "figure2_shp.png"]
    assert all(p.stat().st_size > 1000 for p in paths if p.suffix == ".png")


# --------------------------------------------------------------------------- tables 2 / 3


def _judge(root: Path, dataset: str, pair: str, a: str, b: str, trials: list[tuple[int, int, int, int]]) -> None:
    d = root / "judge" / dataset / pair
    d.mkdir(parents=True, exist_ok=True)
    model, reward = pair.split("__")
    ts = [{"trial": i, "run_a": "x", "run_b": "y", "win": w, "draw": dr, "loss": lo, "invalid": inv,
           "n": w + dr + lo + inv} for i, (w, dr, lo, inv) in enumerate(trials)]
    (d / f"{a}_vs_{b}.json").write_text(json.dumps({
        "dataset": dataset, "model": model, "reward": reward, "method_a": a, "method_b": b,
        "judge_model": "gpt-4", "mode": "both_orders", "num_prompts": 100, "trials": ts,
        "mean": {"win": 0, "draw": 0, "loss": 0, "invalid": 0}}))


def test_table2_table3_from_judge_files(tmp_path):
    _judge(tmp_path, "shp", "llama3_8b__ultrarm", "aisp", "bon_topp",
           [(50, 10, 40, 0), (60, 0, 38, 2), (40, 20, 40, 0)])
    _judge(tmp_path, "hh_rlhf", "llama3_8b__ultrarm", "aisp", "bon_topp", [(10, 5, 5, 0)])
    # reversed file for table 3: BoN's view, win/loss swap
    _judge(tmp_path, "shp", "vicuna_7b__eurus", "bon_gaussian", "aisp", [(30, 20, 50, 0)])
    t2 = tables.winrate_table(tmp_path, "aisp", "bon_topp")
    assert list(t2.dataset) == ["shp", "hh_rlhf"]
    r = t2.iloc[0]
    assert r.n_trials == 3 and r.win == pytest.approx(50.0) and r.draw == pytest.approx(10.0)
    assert r.loss == pytest.approx(118 / 3) and r.invalid == pytest.approx(2 / 3)
    assert r.win_std == pytest.approx(10.0)
    assert t2.iloc[1].win == pytest.approx(50.0) and t2.iloc[1].draw == pytest.approx(25.0)
    t3 = tables.winrate_table(tmp_path, "aisp", "bon_gaussian")
    assert len(tables.winrate_table(tmp_path, "aisp", "bon_topp", Selection(dataset=("hh*",)))) == 1
    assert len(t3) == 1 and t3.iloc[0].win == pytest.approx(50.0) and t3.iloc[0].loss == pytest.approx(30.0)
    paths = tables.write_winrate(t2, tmp_path / "tables", "table2")
    assert sorted(p.name for p in paths) == ["table2.csv", "table2.md", "table2.tex"]
    cells = md_cells((tmp_path / "tables" / "table2.md").read_text())
    assert cells[0] == ["Datasets", "Models", "AISP", "Draw", "BoN (top-p)", "Invalid", "Trials"]
    assert cells[1] == ["SHP", "Llama3_8B & UltraRM", "50.0", "10.0", "39.3", "0.7", "3"]
    assert "a split verdict counts as a draw" in (tmp_path / "tables" / "table2.md").read_text()  # mode both_orders
    tex = (tmp_path / "tables" / "table2.tex").read_text()
    assert r"\multicolumn{3}{c}{Rate}" in tex and "SHP & Llama3\\_8B \\& UltraRM & 50.0 & 10.0 & 39.3" in tex
    assert len(pd.read_csv(tmp_path / "tables" / "table2.csv")) == 2


# --------------------------------------------------------------------------- λ sweep


def test_lambda_sweep(tmp_path):
    pair = "llama3_8b__ultrarm"
    # n = 2, K = 2; the final candidate (last) is excluded from "all"
    recs = [aisp_record("p", 2, [0.0, 2.0, 1.0, 5.0], final=9.0), aisp_record("q", 2, [1.0, 1.0, 1.0, 1.0])]
    for lam in (0.5, 2.0):
        write_run(tmp_path, "shp", pair, "aisp", 0, recs, variant=f"method.lam={lam}",
                  method_cfg={**AISP_CFG, "lam": lam})
    df = tables.lambda_sweep(runs_in(tmp_path))
    assert list(df.lam) == [0.5, 2.0]
    first = np.mean([np.std([0.0, 2.0], ddof=1), 0.0])  # per prompt std over the first n, mean over prompts
    all_ = np.mean([np.std([0.0, 2.0, 1.0, 5.0], ddof=1), 0.0])
    assert df.iloc[0].std_r_over_lam_first == pytest.approx(first / 0.5)
    assert df.iloc[1].std_r_over_lam_all == pytest.approx(all_ / 2.0)
    assert df.iloc[0].reward_mean == pytest.approx((9.0 + 1.0) / 2)
    assert df.iloc[0].one_digit and not df.iloc[1].one_digit  # 2.83 vs 0.71
    paths = tables.write_lambda_sweep(df, tmp_path / "tables")
    assert sorted(p.name for p in paths) == ["lambda_sweep.csv", "lambda_sweep.md"]


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def report(command, tmp_path):
    """report(*overrides) -> (exit code, stdout, stderr) of the command on tmp_path."""
    return lambda *overrides: command(report_main, "report", f"results_dir={tmp_path}", *overrides)


def test_cli_all_writes_every_file(tmp_path, report):
    _figure_tree(tmp_path)
    for seed in (0, 1):
        write_run(tmp_path, "shp", "llama3_8b__ultrarm", "bon_gaussian", seed,
                  [bon_record("p", [0.5] * 8), bon_record("q", [0.5] * 8)])
    _judge(tmp_path, "shp", "llama3_8b__ultrarm", "aisp", "bon_topp", [(5, 3, 2, 0)])
    _judge(tmp_path, "shp", "llama3_8b__ultrarm", "aisp", "bon_gaussian", [(4, 3, 3, 0)])
    code, out, _ = report(f"out={tmp_path / 'out'}")
    assert code == 0
    names = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.*"))
    assert names == ["figures/budget_shp.png", "figures/compute_shp.csv", "figures/compute_shp.png",
                     "figures/figure2_shp.csv", "figures/figure2_shp.png", "tables/budget.csv", "tables/budget.md",
                     "tables/compare.csv", "tables/compare.md", "tables/compute.csv", "tables/compute.md",
                     "tables/lambda_sweep.csv", "tables/lambda_sweep.md",
                     "tables/table1.csv", "tables/table1.md", "tables/table1.tex", "tables/table1_extended.csv",
                     "tables/table1_extended.md", "tables/table1_extended.tex", "tables/table2.csv",
                     "tables/table2.md", "tables/table2.tex", "tables/table3.csv", "tables/table3.md",
                     "tables/table3.tex"]
    assert md_cells(out)[0][:3] == ["Dataset", "Pair", "Method"]  # compare prints its table
    t1 = pd.read_csv(tmp_path / "out" / "tables" / "table1.csv")
    assert list(t1.method) == ["bon_topp", "bon_gaussian", "aisp"]
    f2 = pd.read_csv(tmp_path / "out" / "figures" / "figure2_shp.csv")
    assert set(f2.curve) == {"aisp_mean_at_k", "aisp_best_at_k", "aisp_best_so_far", "bon_topp", "bon_gaussian"}
    code, _, err = report("target=[table1,figure2]", "select.method=aisp", f"out={tmp_path / 'only'}")
    assert code == 0 and list(pd.read_csv(tmp_path / "only" / "tables" / "table1.csv").method) == ["aisp"]
    for args, needle in ((["target=table1", "select.pair=nope__none"], "error: no run folders under"),
                         (["target=tabel1"], "error: unknown target 'tabel1'"),
                         (["target=compute", "compute.axes=[tokens,watts]"], "error: compute.axes must be one or a "
                          "list of samples, tokens, reward_tokens, flops, depth, seconds, got ['tokens', 'watts']")):
        code, _, err = report(*args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(needle), err
    assert "select.pair=nope__none" in report("target=table1", "select.pair=nope__none")[2]


def test_summary_only_run_and_no_judge_error(tmp_path, report):
    d = tmp_path / "runs" / "shp" / "llama3_8b__ultrarm" / "aisp" / "default" / "seed0"
    d.mkdir(parents=True)  # crashed before any record was written; only the summary says something
    (d / "summary.json").write_text(json.dumps({"num_done": 4, "mean_reward": -1.5, "complete": False}))
    df = table1.table1(runs_in(tmp_path))
    assert len(df) == 1 and df.iloc[0].reward_mean == -1.5 and df.iloc[0].reward_source == "summary"
    assert df.iloc[0].n_prompts == 4 and not df.iloc[0].complete
    code, _, err = report("target=table2")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: no judge file aisp_vs_bon_topp.json")


def test_report_package_never_imports_torch():
    import sys

    from proc import run_tree

    code = ("import sys, aisp_bench.report, aisp_bench.report.figures, aisp_bench.report.__main__; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    out = run_tree([sys.executable, "-c", code], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
