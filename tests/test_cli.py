"""The command line: composition, end-to-end runs, resume after a crash, bad input, the four apps' front door."""

from __future__ import annotations

import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from aisp_bench.cli import UserError
from aisp_bench.config import MOVED_KEYS, NON_SEMANTIC, semantic_config
from aisp_bench.run import run
from aisp_bench.rundir import Run, make_record, read_json, read_records, summarize, write_json_atomic
from aisp_bench.types import Result
from proc import run_tree

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {g: sorted(p.stem for p in (ROOT / "aisp_bench" / "conf" / g).glob("*.yaml")) for g in
          ("method", "model", "reward", "dataset", "judge", "experiment", "scale")}


def cli(args, env_results, timeout=300):
    env = dict(os.environ, AISP_BENCH_RESULTS=str(env_results), PYTHONUNBUFFERED="1")
    return run_tree([sys.executable, "-m", "aisp_bench", *args], cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.parametrize("group", ["method", "model", "reward", "dataset", "judge"])
def test_every_config_option_instantiates(compose, group):
    """Every option builds its object (nothing is loaded or downloaded); judges in the judge command."""
    assert GROUPS[group], f"conf/{group} is empty"
    for option in GROUPS[group]:
        if group == "judge":
            cfg = compose([f"judge={option}", "reward=minilm_similarity"], config_name="judge")
        else:
            cfg = compose([f"{group}={option}"])
        obj = instantiate(cfg[group])
        assert obj is not None
        if group in ("method", "model", "reward", "dataset"):
            assert obj.name == cfg[group].name


@pytest.mark.parametrize("option", GROUPS["experiment"] + GROUPS["scale"])
def test_experiments_and_scales_compose(compose, option):
    group = "experiment" if option in GROUPS["experiment"] else "scale"
    cfg = compose([f"{group}={option}"])
    for g in ("method", "dataset"):
        instantiate(cfg[g])
    assert "runs" in cfg.run_dir


def test_paper_defaults_and_equal_budget(compose):
    cfg = compose(["method=aisp", "dataset=shp", "reward=ultrarm"])
    m = instantiate(cfg.method)
    assert (m.n, m.kappa, m.tau, m.alpha, m.sigma, m.lam) == (32, 32, 128, 0.9999, 0.5, 0.7)
    assert cfg.generation.max_new_tokens == 128 and cfg.dataset.num_prompts == 1000
    for name, lam in (("shp", 0.7), ("hh_rlhf", 0.3)):
        assert compose(["dataset=" + name, "reward=ultrarm"]).method.lam == lam
    for name, lam in (("shp", 240), ("hh_rlhf", 120)):
        assert compose(["dataset=" + name, "reward=eurus"]).method.lam == lam
    b = instantiate(compose(["method=bon_topp"]).method)
    assert (b.num_samples, b.temperature, b.top_p) == (1024, 0.6, 0.9)
    g = instantiate(compose(["method=bon_gaussian"]).method)
    assert (g.num_samples, g.sigma2, g.tau) == (1024, 0.5, 128)
    # one budget for all: N follows n·kappa
    assert compose(["method=bon_topp", "budget.n=4", "budget.kappa=3"]).method.num_samples == 12


def test_run_folder_names(compose, tmp_path):
    cfg = compose(["method=aisp", "dataset=shp", "method.lam=0.3", "seed=2"])
    assert cfg.run_dir == str(tmp_path / "results/runs/shp/smollm2_135m__smollm2_judge/aisp/method.lam=0.3/seed2")
    assert compose(["method=bon_topp"]).run_dir.endswith("runs/demo/smollm2_135m__smollm2_judge/bon_topp/default/seed0")
    assert "/aisp/table1/seed0" in compose(["experiment=table1"]).run_dir


def test_non_semantic_keys_are_neither_in_the_folder_name_nor_in_the_resume_check(compose):
    """One list (config.NON_SEMANTIC) drives Hydra's exclude_keys and the resume check."""
    values = {"overwrite": "true", "progress": "false", "batch_prompts": "2", "generation.batch_rows": "8",
              "model.device": "cpu", "model.device_map": "auto", "model.attn_implementation": "sdpa",
              "reward.device": "cpu", "reward.batch_size": "4", "experiment_name": "x", "dataset.num_shards": "4",
              "dataset.shard": "3", "engine.decode_step": "static", "engine.attention": "copy",
              "engine.sync_every": "4", "reward.max_batch_tokens": "4096", "engine.reward_attention": "full"}
    # "engine": the whole tuning block; MOVED_KEYS: where its keys were in older manifests
    assert set(values) | {"results_dir", "run_dir", "judge", "engine", *MOVED_KEYS} == set(NON_SEMANTIC)
    cfg = compose([f"{k}={v}" for k, v in values.items() if k != "experiment_name"])
    assert cfg.run_dir.endswith("/aisp/default/seed0")  # none of them names the folder
    plain = OmegaConf.to_container(compose([]), resolve=True)
    changed = OmegaConf.to_container(cfg, resolve=True)
    assert changed != plain and semantic_config(changed) == semantic_config(plain)
    assert semantic_config({**plain, "judge": {"model": "gpt-4"}}) == semantic_config(plain)  # older manifests
    assert compose(["method.alpha=0.5"]).run_dir.endswith("/aisp/method.alpha=0.5/seed0")


def test_a_run_made_before_the_tuning_block_is_the_same_run(compose, caplog):
    """Manifests written before the ``engine:`` block hold its keys where they were
    (``generation.decode_step``, ``reward.share_prefix`` ...): such a complete run is found
    complete (nothing loaded, nothing rewritten) and reads as before."""
    import copy

    cfg = compose(["dataset.num_prompts=2"])
    new = OmegaConf.to_container(cfg, resolve=True)
    old = copy.deepcopy(new)
    del old["engine"]
    old["generation"].update(decode_step="static", attention="shared_prefix", sync_every=4)
    old["reward"].update(share_prefix=False, shared_attention="split")
    assert semantic_config(old) == semantic_config(new)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    prompts = instantiate(cfg.dataset).load()
    records = [make_record(p, Result(p.id, "ok", 1.0, [1.0], 1, 2, "eos", 2, [2]), 0.1) for p in prompts]
    (run_dir / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_json_atomic(run_dir / "summary.json", summarize(records, len(prompts), [], []))
    write_json_atomic(run_dir / "manifest.json", {"config": old, "finished": "2026-01-01T00:00:00+00:00",
                                                  "sessions": [{"engine": {"decode_step": "static"}}]})
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with caplog.at_level("INFO", logger="aisp_bench"):
        assert run(cfg) == run_dir
    assert "nothing to do" in caplog.text
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    read = Run.at(run_dir)
    assert read.config["generation"]["decode_step"] == "static" and read.summary["complete"]
    assert [r["prompt_id"] for r in read.records] == [p.id for p in prompts]


# ------------------------------------------------------------------------- bad input
BAD = [
    (["method.sigma=0"], "method.sigma must be a finite number > 0, got 0"),
    (["method.lam=-1"], "method.lam must be a finite number > 0, got -1"),
    (["method.alpha=1.5"], "method.alpha must be a finite number in (0, 1], got 1.5"),
    (["method.alpha=0"], "method.alpha must be a finite number in (0, 1], got 0"),
    (["budget.n=0"], "budget.n must be an integer >= 1, got 0"),
    (["method.kappa=0"], "method.kappa must be an integer >= 1, got 0"),
    (["method.tau=0"], "method.tau must be an integer >= 1, got 0"),
    (["method=bon_topp", "method.num_samples=0"], "method.num_samples must be an integer >= 1, got 0"),
    (["method=bon_gaussian", "method.sigma2=-0.5"], "method.sigma2 must be a finite number > 0, got -0.5"),
    (["seed=-1"], "seed must be an integer >= 0, got -1"),
    (["generation.max_new_tokens=0"], "generation.max_new_tokens must be an integer >= 1, got 0"),
    (["dataset.num_prompts=0"], "dataset.num_prompts must be an integer >= 1 or null, got 0"),
]


@pytest.mark.parametrize("overrides, message", BAD)
def test_bad_values_are_named_and_touch_nothing(compose, tmp_path, overrides, message):
    cfg = compose(overrides)
    with pytest.raises(UserError) as e:
        run(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "results").exists()


def _write(path: Path, text: str, gz=False) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "kind, name, content, message",
    [
        ("shp", "missing.jsonl", None, "does not exist"),
        ("shp", "bad.jsonl", '{"post_id": "a", "history": "q"}\n{"post_id": \n', "line 2 is not valid JSON"),
        ("shp", "empty.jsonl", "\n", "has no prompts"),
        ("shp", "nofield.jsonl", '{"post_id": "a", "title": "q"}\n', "row 0 has no 'history' field"),
        ("hh_rlhf", "nochosen.json", '[{"rejected": "x"}]', "row 0 has no 'chosen' field"),
        ("shp", "list.json", '{"a": 1}', "must hold a JSON list"),
        ("shp", "data.csv", "a,b\n", "unsupported file type"),
    ],
)
def test_bad_data_files(compose, tmp_path, kind, name, content, message):
    path = tmp_path / "data" / name
    if content is not None:
        _write(path, content)
    cfg = compose([f"dataset={'shp' if kind == 'shp' else 'hh_rlhf'}", f"dataset.path={path}"])
    with pytest.raises(UserError, match=message):
        run(cfg)
    assert not (tmp_path / "results").exists()


def test_malformed_hh_rows_are_left_out_and_reported_once_per_file(caplog):
    from aisp_bench.data.datasets import parse_hh

    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello"},
            {"chosen": "\n\nHuman: hi\n\nAssistant: ok Human: more?\n\nAssistant: x"},  # ends with Assistant
            {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"}]
    with caplog.at_level(logging.WARNING, logger="aisp_bench"):
        first = parse_hh(rows, "once.jsonl")
        again = parse_hh(rows, "once.jsonl")  # the next job of a sweep reads the same file
    assert [[m.content for m in p.messages] for p in first] == [["hi"], ["a", "b", "c"]] and again == first
    assert caplog.text.count("left out 1 row(s) whose prompt does not end with a Human turn (rows 1)") == 1


def test_hub_unreachable_names_dataset_path(compose, tmp_path, monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'stanfordnlp/SHP' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.delenv("AISP_SHP_PATH", raising=False)
    cfg = compose(["dataset=shp"])
    with pytest.raises(UserError, match=r"cannot load 'stanfordnlp/SHP'.*pass dataset.path=FILE"):
        run(cfg)


def test_cli_exit_codes_and_one_line_errors(tmp_path):
    out = cli(["method.sigma=-1"], tmp_path)
    assert out.returncode == 2
    err = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert err == ["error: method.sigma must be a finite number > 0, got -1"]
    assert "Traceback" not in out.stderr
    unknown = cli(["method=aspi"], tmp_path)
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert "aisp" in unknown.stderr and "bon_topp" in unknown.stderr  # the known options are listed
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_end_to_end_run_and_resume(tmp_path):
    args = ["scale=smoke", "progress=false"]  # the demo prompts: 2 at the smoke scale
    out = cli(args, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == "" and "[aisp_bench.models.policy][INFO] - loading policy" in out.stderr  # logs on stderr
    assert "Loading weights" not in out.stderr  # transformers' bar: only with hydra.verbose=true
    run_dir = tmp_path / "smoke/runs/demo/smollm2_135m__smollm2_judge/aisp/default/seed0"
    recs = read_records(run_dir)
    assert len(recs) == 2 and len({r["prompt_id"] for r in recs}) == 2
    for r in recs:
        assert r["num_samples"] == 2 * 2 + 1 == len(r["sample_rewards"])
        assert len(r["iterations"]) == 2 and r["reward"] == max(r["sample_rewards"])
    manifest, summary = read_json(run_dir / "manifest.json"), read_json(run_dir / "summary.json")
    assert manifest["config"]["method"]["name"] == "aisp" and manifest["versions"]["torch"]
    assert manifest["finished"] and "git_commit" in manifest
    # the "auto" engine settings as resolved on this machine (the CPU's)
    assert manifest["sessions"][0]["engine"] == {"decode_step": "eager", "batch_rows": 64, "sync_every": 1}
    assert summary["num_done"] == 2 and summary["complete"]
    assert summary["total_samples"] == 10 and summary["mean_reward"] == pytest.approx(
        sum(r["reward"] for r in recs) / 2)
    before = (run_dir / "records.jsonl").read_bytes()
    # the same command again: nothing recomputed, nothing duplicated
    again = cli(args, tmp_path)
    assert again.returncode == 0 and (run_dir / "records.jsonl").read_bytes() == before
    assert "complete (2 prompts); nothing to do" in again.stderr and "loading policy" not in again.stderr
    assert len(read_json(run_dir / "manifest.json")["sessions"]) == 1
    # a folder made by a different config is refused, and left alone
    manifest_path = run_dir / "manifest.json"
    m = read_json(manifest_path)
    m["config"]["method"]["alpha"] = 0.5  # as if made by another config
    manifest_path.write_text(json.dumps(m))
    refused = cli(args, tmp_path)
    assert refused.returncode == 2 and "method.alpha: 0.5 -> 0.9999" in refused.stderr
    assert "overwrite=true" in refused.stderr and (run_dir / "records.jsonl").read_bytes() == before
    replaced = cli(args + ["overwrite=true"], tmp_path)
    assert replaced.returncode == 0
    assert read_json(manifest_path)["config"]["method"]["alpha"] == 0.9999
    assert len(read_records(run_dir)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("overflow", ["skip", "truncate_left"])
def test_long_prompts_are_skipped_or_truncated_and_counted(compose, shared_data, overflow):
    cfg = compose(["scale=smoke", "dataset=shp", f"dataset.path={shared_data / 'shp' / 'test_1000.jsonl'}",
                   "dataset.num_prompts=4", "model.max_context=110", f"generation.prompt_overflow={overflow}",
                   "budget.n=1", "budget.kappa=1", "generation.max_new_tokens=4", "progress=false"])
    run_dir = run(cfg)
    summary, recs = read_json(run_dir / "summary.json"), read_records(run_dir)
    # some of these 4 prompts exceed 110 - 4 tokens with SmolLM2's chat template
    long_ids = summary["skipped_ids"] if overflow == "skip" else summary["truncated_ids"]
    assert len(long_ids) >= 1 and summary["num_prompts"] == 4
    if overflow == "skip":
        assert summary["num_skipped"] == len(long_ids) and summary["num_truncated"] == 0
        assert len(recs) == 4 - len(long_ids) and not {r["prompt_id"] for r in recs} & set(long_ids)
        assert summary["complete"]
    else:
        assert summary["num_truncated"] == len(long_ids) and summary["num_skipped"] == 0 and len(recs) == 4


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates(tmp_path):
    args = ["scale=smoke", "dataset.num_prompts=3", "progress=false", "batch_prompts=1", "method=bon_gaussian"]
    env = dict(os.environ, AISP_BENCH_RESULTS=str(tmp_path), PYTHONUNBUFFERED="1")
    run_dir = tmp_path / "smoke/runs/demo/smollm2_135m__smollm2_judge/bon_gaussian/dataset.num_prompts=3/seed0"
    records = run_dir / "records.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "aisp_bench", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if records.is_file() and records.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = records.read_text().splitlines()
    assert 1 <= len(first) < 3, "the run was not killed mid-way"
    with open(records, "a") as f:  # a crash in the middle of writing the next record
        f.write('{"prompt_id": "torn", "response": "half a rec')
    out = cli(args, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torn last line" in out.stderr
    recs = read_records(run_dir)
    ids = [r["prompt_id"] for r in recs]
    assert len(ids) == 3 and len(set(ids)) == 3 and "torn" not in ids
    assert records.read_text().splitlines()[: len(first)] == first  # kept, not recomputed
    # and the resumed result equals an uninterrupted run (seeded per prompt)
    fresh = cli(args, tmp_path / "fresh")
    assert fresh.returncode == 0
    fresh_recs = {r["prompt_id"]: r for r in read_records(
        tmp_path / "fresh" / run_dir.relative_to(tmp_path))}
    for r in recs:
        assert r["sample_rewards"] == pytest.approx(fresh_recs[r["prompt_id"]]["sample_rewards"], abs=1e-5)
        assert r["response"] == fresh_recs[r["prompt_id"]]["response"]


@pytest.mark.slow
def test_multirun_gives_one_folder_per_setting(tmp_path):
    out = cli(["-m", "scale=smoke", "progress=false", "method.lam=0.1,0.3", "budget.kappa=1", "dataset.num_prompts=1"],
              tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    base = tmp_path / "smoke/runs/demo/smollm2_135m__smollm2_judge/aisp"
    assert sorted(p.name for p in base.iterdir()) == [
        "budget.kappa=1,dataset.num_prompts=1,method.lam=0.1", "budget.kappa=1,dataset.num_prompts=1,method.lam=0.3"]
    for p in base.iterdir():
        m = read_json(p / "seed0/manifest.json")
        assert str(m["config"]["method"]["lam"]) in p.name
