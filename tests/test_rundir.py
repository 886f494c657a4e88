"""The run folder (aisp_bench.rundir) and the results tree (aisp_bench.results): crash safety,
the record schema, identity, selection."""

from __future__ import annotations

import json
import warnings

import pytest

from aisp_bench.results import Selection, discover_runs, judge_file, judge_files
from aisp_bench.rundir import (
    RecordWriter, Run, RunFolderError, make_record, read_json, read_records, record_prompt, scan_records, summarize,
    write_json_atomic,
)  # fmt: skip
from aisp_bench.types import Message, Prompt, Result


def test_writer_appends_and_reads_back(tmp_path):
    with RecordWriter(tmp_path) as w:
        w.write({"prompt_id": "a", "reward": 1.0})
        w.write({"prompt_id": "b", "reward": 2.0})
    assert [r["prompt_id"] for r in read_records(tmp_path)] == ["a", "b"]
    assert (tmp_path / "records.jsonl").read_text().count("\n") == 2
    assert read_records(tmp_path / "nothing") == []  # a run before its first record


def test_torn_tail_is_cut_and_only_that(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"prompt_id": "a"}\n{"prompt_id": "b"}\n\n{"prompt_id": "c", "resp')
    scan = scan_records(path)
    assert [r["prompt_id"] for r in scan.records] == ["a", "b"] and scan.dropped_tail
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["prompt_id"] for r in read_records(tmp_path)] == ["a", "b"]
    with RecordWriter(tmp_path) as w:
        assert w.repaired and [r["prompt_id"] for r in w.records] == ["a", "b"]
        w.write({"prompt_id": "c"})
    assert path.read_text() == '{"prompt_id": "a"}\n{"prompt_id": "b"}\n\n{"prompt_id": "c"}\n'
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file: no warning
        assert len(read_records(tmp_path)) == 3


def test_complete_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"prompt_id": "a"}\n{"prompt_id": "b"}')
    with RecordWriter(tmp_path) as w:
        assert not w.repaired and len(w.records) == 2
        w.write({"prompt_id": "c"})
    assert [r["prompt_id"] for r in read_records(tmp_path)] == ["a", "b", "c"]


def test_corruption_before_the_last_line_is_an_error(tmp_path):
    (tmp_path / "records.jsonl").write_text('{"prompt_id": "a"}\nnot json\n{"prompt_id": "b"}\n')
    with pytest.raises(RunFolderError, match="records.jsonl: line 2 is corrupt"):
        read_records(tmp_path)
    with pytest.raises(RunFolderError):
        RecordWriter(tmp_path)


def test_atomic_json_and_summary(tmp_path):
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    write_json_atomic(tmp_path / "x.json", {"a": 2})
    assert read_json(tmp_path / "x.json") == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind
    recs = [dict(reward=1.0, num_samples=5, num_tokens=40, seconds=2.0, response_tokens=8),
            dict(reward=3.0, num_samples=5, num_tokens=20, seconds=1.0, response_tokens=4)]
    s = summarize(recs, num_prompts=3, skipped=["z"], truncated=[])
    assert s["mean_reward"] == 2.0 and s["std_reward"] == 1.0 and s["complete"]
    assert (s["total_samples"], s["total_tokens"], s["total_seconds"]) == (10, 60, 3.0)
    assert not summarize(recs[:1], num_prompts=3, skipped=[], truncated=[])["complete"]


def test_nonfinite_numbers_are_written_as_null_and_summarised_apart(tmp_path):
    """A prompt whose every sample had a NaN reward: records.jsonl stays strict JSON, the summary's
    mean is over the finite rewards and counts the other."""
    nan, inf = float("nan"), float("inf")
    recs = [dict(prompt_id="a", reward=1.0, sample_rewards=[1.0, nan], iterations=[{"ess": nan}], num_samples=2,
                 num_tokens=4, seconds=1.0, response_tokens=2),
            dict(prompt_id="b", reward=nan, sample_rewards=[nan, inf], num_samples=2, num_tokens=4, seconds=1.0,
                 response_tokens=2)]
    with RecordWriter(tmp_path) as w:
        for r in recs:
            w.write(r)
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in records.jsonl"))
              for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert strict[0]["sample_rewards"] == [1.0, None] and strict[0]["iterations"] == [{"ess": None}]
    assert strict[1]["reward"] is None and strict[1]["sample_rewards"] == [None, None]
    s = summarize(read_records(tmp_path), num_prompts=2, skipped=[], truncated=[])
    assert s["mean_reward"] == 1.0 and s["std_reward"] == 0.0 and s["num_nonfinite_rewards"] == 1 and s["complete"]
    assert "num_nonfinite_rewards" not in summarize(recs[:1], num_prompts=1, skipped=[], truncated=[])


def test_record_schema_round_trips_the_prompt():
    conv = Prompt("p1", (Message("user", "Hi"), Message("assistant", "Hello"), Message("user", "A joke?")))
    res = Result("p1", "Why not.", 0.5, [0.1, 0.5], 2, 7, "eos", 3, [4, 3], iterations=[{"k": 1}], extra={"x": 1})
    rec = json.loads(json.dumps(make_record(conv, res, 1.5)))
    assert rec["prompt"] == conv.transcript() and rec["seconds"] == 1.5 and rec["x"] == 1
    assert rec["iterations"] == [{"k": 1}] and rec["sample_tokens"] == [4, 3]
    assert record_prompt(rec) == conv  # the judge and the evaluation reward read the turns back
    assert "iterations" not in make_record(conv, Result("p1", "", 0.0, [0.0], 1, 1, "eos", 1, [1]), 0.1)
    old = {"prompt_id": 7, "prompt": "Q?"}  # a record without messages: one user turn
    assert record_prompt(old) == Prompt.single("7", "Q?")


def _run_tree(root):
    paths = []
    for ds, method, variant, seed in [("shp", "aisp", "table1", 0), ("shp", "aisp", "table1", 1),
                                      ("shp", "aisp", "lambda_sweep,lam_factor=0.1", 0),
                                      ("hh_rlhf", "bon_topp", "table1", 0), ("shp", "bon_topp", "default", 2)]:
        d = root / "runs" / ds / "m__r" / method / variant / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "records.jsonl").write_text("")
        paths.append(d)
    (root / "runs" / "shp" / "m__r" / "aisp" / "table1" / "seedx").mkdir()  # not a run folder
    (root / "runs" / "shp" / "nopair" / "aisp" / "v" / "seed0").mkdir(parents=True)  # not either
    return paths


def test_run_identity_discovery_and_selection(tmp_path):
    paths = _run_tree(tmp_path)
    run = Run.at(paths[2])
    assert (run.dataset, run.model, run.reward, run.method, run.variant, run.seed, run.pair) == (
        "shp", "m", "r", "aisp", "lambda_sweep,lam_factor=0.1", 0, "m__r")
    assert run.method_param("lam_factor") is None and Run.at(tmp_path / "x" / "seed0") is None
    assert run.manifest == {} and run.config == {} and run.summary is None and not run.complete
    everything = discover_runs(tmp_path)
    assert [r.path for r in everything] == sorted(paths) == [r.path for r in discover_runs(tmp_path / "runs")]
    sel = Selection.from_mapping({"dataset": "shp", "variant": ["table1", "lambda*"], "seed": [0]})
    assert [r.path for r in discover_runs(tmp_path, sel)] == sorted([paths[0], paths[2]])
    assert [r.path for r in discover_runs(tmp_path, Selection.from_mapping({"pair": "m__*", "method": "bon_topp"}))] \
        == sorted([paths[3], paths[4]])
    assert discover_runs(tmp_path, Selection(dataset=("demo",))) == []
    assert sel.describe() == "select.dataset=shp select.variant=['table1', 'lambda*'] select.seed=0"
    for bad, needle in (({"seed": "x"}, "select.seed must be integers"), ({"sed": 1}, "unknown selection key"),
                        ({"method": [True]}, "select.method must be names")):
        with pytest.raises(RunFolderError, match=needle):
            Selection.from_mapping(bad)


def test_judge_files_layout(tmp_path):
    path = judge_file(tmp_path, "shp", "m__r", "aisp", "bon_topp")
    assert path == tmp_path / "judge" / "shp" / "m__r" / "aisp_vs_bon_topp.json"
    write_json_atomic(path, {})
    assert judge_files(tmp_path) == [path]
