"""Real prompt shards of the offline pair on real SHP prompts: a shard killed mid-way, then the
local submitit launcher (the Slurm path without Slurm) running every shard, equal to one
process, and read as one run by the unsharded command, evaluate and report."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from aisp_bench.evaluate import main as evaluate_main
from aisp_bench.report.__main__ import main as report_main
from aisp_bench.run import run
from aisp_bench.rundir import Run, read_json, read_records
from proc import kill_tree, run_tree
from tiny_runs import ROOT, without_timings


@pytest.mark.slow
def test_shards_on_the_local_launcher_equal_one_process(tmp_path, command, compose, caplog):
    # batch_prompts=1: each prompt computed alone, so batching cannot change a float between layouts
    args = ["scale=smoke", "dataset.num_prompts=3", "generation.max_new_tokens=8", "batch_prompts=1",
            "progress=false"]  # the demo prompts; n 2, κ 2
    env = dict(os.environ, AISP_BENCH_RESULTS=str(tmp_path / "sharded"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    root = (tmp_path / "sharded/smoke/runs/demo/smollm2_135m__smollm2_judge/aisp"
            / "dataset.num_prompts=3,generation.max_new_tokens=8/seed0")
    shard0 = root / "shards" / "00-of-02"

    # shard 0 alone, killed after its first record: it leaves its records and its run.lock
    proc = subprocess.Popen([sys.executable, "-m", "aisp_bench", *args, "dataset.num_shards=2", "dataset.shard=0"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (
                (shard0 / "records.jsonl").is_file() and (shard0 / "records.jsonl").read_text().count("\n") >= 1):
            time.sleep(0.05)
    finally:
        kill_tree(proc)
    assert len(read_records(shard0)) == 1, "shard 0 was not killed mid-way"
    assert json.loads((shard0 / "run.lock").read_text())["pid"] == proc.pid

    # both shards as one -m sweep on the local launcher: shard 0 takes over the dead lock and resumes
    out = run_tree([sys.executable, "-m", "aisp_bench", "-m", "hydra/launcher=local", *args, "dataset.num_shards=2",
                    "dataset.shard=0,1"], cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "sharded").rglob(".submitit/*/*_log.err"))
    assert "taking over run.lock" in logs and "its process is gone" in logs
    assert len(read_json(shard0 / "manifest.json")["sessions"]) == 2  # the killed one and the resumed one
    assert not list(root.rglob("run.lock")) and not (root / "records.jsonl").exists()

    # the same run in one process
    plain_env = dict(env, AISP_BENCH_RESULTS=str(tmp_path / "plain"))
    out = run_tree([sys.executable, "-m", "aisp_bench", *args], cwd=ROOT, env=plain_env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    plain = read_records(tmp_path / "plain" / root.relative_to(tmp_path / "sharded"))
    sharded = Run.at(root)
    assert sharded.complete and sharded.shards.num_shards == 2
    assert [r["prompt_id"] for r in sharded.records] == [r["prompt_id"] for r in plain]  # the dataset's order
    assert [without_timings(r) for r in sharded.records] == [without_timings(r) for r in plain]

    # `make table1` on the shards as they are: the unsharded command finds the run done (and
    # loads no model), evaluate and report read it as one run
    results = f"results_dir={tmp_path / 'sharded' / 'smoke'}"
    with caplog.at_level(logging.INFO):
        assert run(compose([*args, results])) == root
    assert "complete (as 2 prompt shards); nothing to do" in caplog.text and "loading policy" not in caplog.text
    code, stdout, err = command(evaluate_main, "evaluate", results, "metrics=[reward_mean,num_records]")
    assert code == 0 and "(3 records)" in stdout, err
    code, stdout, err = command(report_main, "report", results, "target=table1")
    assert code == 0, err
    row = (tmp_path / "sharded/smoke/tables/table1.csv").read_text().splitlines()[1]
    assert ",3,True,metrics," in row  # n_prompts, complete, reward from the evaluation

