"""Speculative Rejection and particle filtering in the reports, from synthetic run folders:
their records' totals are their compute (one point per prompt), their one budget checkpoint
is their end point, Table 1's extended view shows what every method spent."""

from __future__ import annotations

import numpy as np
import pytest
from test_budget import BOOT, budget_tree, record, write_run

from aisp_bench.report import budget, costs, figures
from aisp_bench.report.table1_extended import table1_extended, write_table1_extended
from aisp_bench.results import discover_runs

PER = {"prompt_ids": ["p", "q"], "gold_reward": [0.5, 0.2], "base_logprob": [-1.5, -1.0],
       "checkpoints": {"gold_reward": [[0.5], [0.2]], "base_logprob": [[-1.5], [-1.0]]}}


def guided(pid: str, rewards: list[float], tokens: list[int], num_tokens: int, reward_tokens: int) -> dict:
    """A reward-guided decoder's record: its sample lists are not its compute (num_tokens,
    reward_tokens are), one checkpoint at its end."""
    n = len(rewards)
    return record(pid, rewards, [(n, int(np.argmax(rewards)), None)], sample_tokens=tokens, num_tokens=num_tokens,
                  reward_tokens=reward_tokens, reward_calls=3, decode_passes=1, prompt_tokens=5, seconds=4.0,
                  decision_points=[{"tokens": 4, "kept": 2}])


def tree(root):
    budget_tree(root)  # bon_topp (N = 4), aisp, and an old bon_gaussian run
    write_run(root, "spec_rejection", [guided("p", [1.0, 2.5, 0.5, 0.0], [4, 10, 4, 2], 20, 60),
                                       guided("q", [0.0, 1.0, 3.0, 0.5], [2, 4, 10, 4], 20, 80)], PER,
              method_cfg={"num_samples": 4, "rejection_rate": 0.5}, parameters={"policy": 100, "reward": 10})
    write_run(root, "particle_filter", [guided("p", [2.0, 2.0], [10, 10], 26, 90), guided("q", [1.0, 4.0], [8, 10], 24, 70)],
              PER, method_cfg={"num_particles": 2}, parameters={"policy": 100, "reward": 10})


def test_compute_of_the_guided_decoders_is_their_records_totals(tmp_path):
    tree(tmp_path)
    df = costs.compute_table(discover_runs(tmp_path)).set_index("method")
    sr, pf = df.loc["spec_rejection"], df.loc["particle_filter"]
    assert (sr.samples, sr.tokens, sr.reward_tokens, sr.depth, sr.seconds) == (4, 20, 70, 1, 4.0)
    assert (pf.samples, pf.tokens, pf.reward_tokens) == (2, 25, 80)  # not Σ sample_tokens (copied prefixes)
    assert pf.flops == pytest.approx(2 * 100 * (5 + 25) + 2 * 10 * 80)
    cd = figures.compute_data(discover_runs(tmp_path), "shp", band="prompts").set_index("method")
    assert list(cd.loc[["spec_rejection"], "sample"]) == [1]  # one point per prompt
    assert (cd.loc["spec_rejection", "tokens"], cd.loc["spec_rejection", "mean"]) == (20, (2.5 + 3.0) / 2)
    assert (cd.loc["particle_filter", "reward_tokens"], cd.loc["particle_filter", "mean"]) == (80, 3.0)
    assert len(cd.loc["bon_topp"]) == 4  # BoN still a curve
    costs.write_compute_table(df.reset_index(), tmp_path / "tables")
    md = (tmp_path / "tables" / "compute.md").read_text()
    assert "Speculative Rejection, Particle filtering: the records' totals" in md
    paths = figures.write_compute(discover_runs(tmp_path), tmp_path / "figures", band="prompts",
                                  axes=["tokens", "reward_tokens"])
    assert [p.name for p in paths] == ["compute_shp.png", "compute_shp.csv"]


def test_budget_view_has_their_end_point_and_no_missing_note(tmp_path):
    tree(tmp_path)
    df = budget.budget_table(discover_runs(tmp_path), BOOT)
    sr = df[(df.method == "spec_rejection") & (df.row == "method")].set_index("samples")
    assert list(sr.index) == [4] and sr.proxy[4] == pytest.approx(2.75) and sr.gold[4] == pytest.approx(0.35)
    assert not any("Speculative Rejection" in n or "Particle filtering" in n for n in df.attrs["notes"])
    budget.write_budget(df, tmp_path / "tables", tmp_path / "figures", BOOT)
    assert "Speculative Rejection, Particle filtering: one budget point" in (tmp_path / "tables" / "budget.md").read_text()
    d = df[(df.method == "aisp") & (df.row == "difference") & (df.baseline == "particle_filter")]
    end = d[(d.samples == 3) & (d.baseline_samples == 2)]  # AISP's end point against the particles'
    assert len(end) == 1 and end.gold.iloc[0] == pytest.approx(((0.7 - 0.5) + (0.4 - 0.2)) / 2)


def test_table1_extended_shows_every_methods_compute(tmp_path):
    tree(tmp_path)
    df = table1_extended(discover_runs(tmp_path), BOOT)
    rows = df[df.row == "method"].set_index(["method", "metric"])["mean"]
    assert rows[("spec_rejection", "tokens")] == 20 and rows[("bon_topp", "tokens")] == 40
    assert rows[("particle_filter", "reward_tokens")] == 80 and rows[("bon_topp", "reward_tokens")] == 45
    assert rows[("spec_rejection", "samples")] == 4 and rows[("aisp", "seconds")] == 2.0
    diff = df[(df.row == "difference") & (df.baseline == "spec_rejection")].set_index("metric")
    assert diff.loc["tokens", "mean"] == 30 - 20 and diff.loc["tokens", "lo"] <= 10 <= diff.loc["tokens", "hi"]
    write_table1_extended(df, tmp_path / "tables", BOOT)
    md = (tmp_path / "tables" / "table1_extended.md").read_text()
    assert "Speculative Rejection" in md and "Particle filtering" in md and "Reward-model tokens" in md
    assert "| 20 |" in md or " 20 " in md


def test_compare_gives_no_first_sample_for_the_guided_decoders(tmp_path):
    from aisp_bench.report.tables import compare, render_compare

    tree(tmp_path)
    df = compare(discover_runs(tmp_path)).set_index("method")
    assert np.isnan(df.loc["spec_rejection", "first_sample"]) and np.isnan(df.loc["particle_filter", "first_sample"])
    assert df.loc["spec_rejection", "reward"] == (2.5 + 3.0) / 2  # their best is still reported
    assert np.isfinite(df.loc["bon_topp", "first_sample"]) and np.isfinite(df.loc["aisp", "first_sample"])
    assert "none for Speculative Rejection and particle filtering" in render_compare(df.reset_index())
