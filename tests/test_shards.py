"""Prompt shards: the slice each shard runs, a sharded run read as one, and what refuses it
(no model is loaded here; tests/test_scale_out.py runs real shards)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from aisp_bench.data.datasets import PromptDataset
from aisp_bench.evaluate import main as evaluate_main
from aisp_bench.judge.__main__ import main as judge_main
from aisp_bench.report.__main__ import main as report_main
from aisp_bench.results import discover_runs
from aisp_bench.rundir import Run, RunFolderError, read_json, read_records, read_summary, shard_dir
from aisp_bench.run import run
from aisp_bench.cli import UserError
from synthetic_runs import write_run, write_sharded_run

RESPONSES = {f"p{i}": "x" * (i + 1) for i in range(7)}  # the dataset's order: p0 .. p6


def test_shards_are_balanced_slices_whose_union_is_the_run(shared_data):
    path = shared_data / "shp" / "test_1000.jsonl"
    whole = [p.id for p in PromptDataset("shp", "shp", path=str(path), num_prompts=10).load()]
    parts = [[p.id for p in PromptDataset("shp", "shp", path=str(path), num_prompts=10, num_shards=4, shard=i).load()]
             for i in range(4)]
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert sorted(sum(parts, [])) == sorted(whole) and len(set(sum(parts, []))) == 10
    assert parts[1] == whole[1::4]  # every 4th prompt from 1, in the dataset's order


def test_shard_folders_and_keys_leave_the_run_folder_name_alone(compose, tmp_path):
    plain = compose(["dataset=shp"]).run_dir
    assert compose(["dataset=shp", "dataset.num_shards=16", "dataset.shard=3"]).run_dir == plain
    assert shard_dir(plain, 3, 16).relative_to(plain).as_posix() == "shards/03-of-16"
    assert shard_dir(plain, 7, 100).name == "007-of-100"


def test_a_sharded_run_reads_as_one(tmp_path):
    path = write_sharded_run(tmp_path, "aisp", 0, RESPONSES, 3)
    (run,) = discover_runs(tmp_path)
    assert run.path == path and run.shards.num_shards == 3 and run.complete
    assert [r["prompt_id"] for r in run.records] == list(RESPONSES)  # the dataset's order, each once
    s = run.summary
    assert (s["num_prompts"], s["num_done"], s["num_shards"], s["unfinished_shards"]) == (7, 7, 3, [])
    assert s["mean_reward"] == pytest.approx(sum(len(v) for v in RESPONSES.values()) / 7)
    assert run.config["method"]["name"] == "aisp" and run.shards.describe() == ""


def test_missing_shards_and_mixed_folders_are_named(tmp_path):
    path = write_sharded_run(tmp_path, "aisp", 0, RESPONSES, 3, leave_out=(1,))
    run = Run.at(path)
    assert not run.complete and run.summary["unfinished_shards"] == [1]
    assert run.shards.describe() == "shards 01 of 3 not complete (01 missing)"
    assert sorted(r["prompt_id"] for r in run.records) == ["p0", "p2", "p3", "p5", "p6"]
    unfinished = path / "shards" / "02-of-03" / "summary.json"
    unfinished.write_text(json.dumps({"num_prompts": 2, "complete": False}))
    assert Run.at(path).shards.describe() == "shards 01, 02 of 3 not complete (01 missing)"
    # shards of another count beside them; an unsharded run beside them; another config
    (path / "shards" / "00-of-04").mkdir()
    with pytest.raises(RunFolderError, match=r"holds shards of different dataset.num_shards \(3, 4\)"):
        read_records(path)
    (path / "shards" / "00-of-04").rmdir()
    (path / "records.jsonl").write_text("")
    with pytest.raises(RunFolderError, match="holds both an unsharded run and shards"):
        read_summary(path)
    (path / "records.jsonl").unlink()
    manifest = path / "shards" / "02-of-03" / "manifest.json"
    m = read_json(manifest)
    m["config"]["method"]["lam"] = 0.3
    manifest.write_text(json.dumps(m))
    with pytest.raises(RunFolderError, match=r"shards 02 of 3 were made with another config than shard 00 "
                                             r"\(method.lam: '<absent>' -> 0.3\)"):
        Run.at(path).records


def test_commands_read_shards_as_one_run_and_refuse_unfinished_ones(tmp_path, command):
    results = f"results_dir={tmp_path}"
    metrics = (results, "metrics=[reward_mean,num_records]", "select.method=aisp")
    complete = write_sharded_run(tmp_path, "aisp", 0, RESPONSES, 3)
    partial = write_sharded_run(tmp_path, "aisp", 1, RESPONSES, 3, leave_out=(2,))
    for seed in (0, 1):
        write_run(tmp_path, "bon_topp", seed, RESPONSES)
    code, out, err = command(evaluate_main, "evaluate", *metrics)
    assert code == 0 and "1 updated" in out and "1 skipped" in out
    assert f"warning: {partial}: skipped: shards 02 of 3 not complete (02 missing)" in err
    own = read_json(complete / "summary.json")  # the merged run's metrics, in the run folder's summary
    assert own["num_done"] == 7 and own["metrics"]["num_records"] == 7 and own["num_shards"] == 3
    assert Run.at(complete).metrics["reward_mean"] == pytest.approx(own["mean_reward"])
    assert not (partial / "summary.json").exists()
    code, out, err = command(evaluate_main, "evaluate", *metrics)
    assert "1 up to date" in out
    code, out, err = command(report_main, "report", results, "target=table1", "select.method=aisp")
    assert code == 0, err
    assert "warning: shp/tiny__rm/aisp/default/seed1: shards 02 of 3 not complete (02 missing)" in err
    table = (tmp_path / "tables" / "table1.md").read_text()
    assert "seed1: shards 02 of 3 not complete (02 missing)" in table
    assert "*: at least one seed is not complete" in table
    code, out, err = command(judge_main, "judge", results, "judge=reward_model", "reward=minilm_similarity",
                             "method_b=bon_topp", "dry_run=true")
    assert code == 2 and err.strip().splitlines() == [
        f"error: {partial}: shards 02 of 3 not complete (02 missing); finish them before judging this run"]
    code, out, err = command(judge_main, "judge", results, "judge=reward_model", "reward=minilm_similarity",
                             "method_b=bon_topp", "dry_run=true", "select.seed=0")
    assert code == 0 and out.startswith("dry run"), err


def _fake_shards(cfg, num_shards, leave_out=(), complete=True):
    """Shard folders for ``cfg``'s run holding its prompts, as if run (same config, no model)."""
    root, resolved = cfg.run_dir, OmegaConf.to_container(cfg, resolve=True)
    prompts = [p.id for p in PromptDataset(**{k: v for k, v in resolved["dataset"].items() if k != "_target_"}
                                           | {"num_shards": 1, "shard": 0}).load()]
    for i in set(range(num_shards)) - set(leave_out):
        folder = shard_dir(root, i, num_shards)
        folder.mkdir(parents=True)
        ids = prompts[i::num_shards]
        conf = {**resolved, "dataset": {**resolved["dataset"], "num_shards": num_shards, "shard": i}}
        (folder / "manifest.json").write_text(json.dumps({"config": conf, "shard": {"prompt_ids": ids}}))
        (folder / "records.jsonl").write_text("".join(json.dumps(
            {"prompt_id": p, "reward": 1.0, "num_samples": 1, "num_tokens": 1, "seconds": 0.0, "response_tokens": 1})
            + "\n" for p in ids))
        (folder / "summary.json").write_text(json.dumps({"num_prompts": len(ids), "complete": complete}))
    return root


def test_a_run_in_the_other_layout_is_reused_or_refused(compose):
    """What `make table1` relies on: the unsharded command finds a complete sharded run done."""
    cfg = compose(["progress=false"])
    _fake_shards(cfg, 2)
    assert str(run(cfg)) == cfg.run_dir  # complete as shards: nothing to do, no model loaded
    with pytest.raises(UserError, match=r"holds shards of dataset.num_shards=2; run with that count"):
        run(compose(["dataset.num_shards=3", "dataset.shard=0"]))
    partial = compose(["progress=false", "seed=1"])
    _fake_shards(partial, 3, leave_out=(1,))
    with pytest.raises(UserError, match=r"holds 3 prompt shards, not complete: finish it with dataset.num_shards=3 "
                                        r"\(shards 01 of 3 not complete \(01 missing\)\)"):
        run(partial)
    for i in (0, 2):  # as if the finished shards were made by another version of the config
        manifest = shard_dir(partial.run_dir, i, 3) / "manifest.json"
        m = read_json(manifest)
        m["config"]["method"]["alpha"] = 0.5
        manifest.write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"was made with a different config \(method.alpha: 0.5 -> 0.9999\)"):
        run(compose(["progress=false", "seed=1", "dataset.num_shards=3", "dataset.shard=1"]))
    assert not shard_dir(partial.run_dir, 1, 3).exists()
