"""records.jsonl crash safety: torn tails, missing newlines, corruption, atomic JSON."""

from __future__ import annotations

import json

import pytest

from aisp_bench.results import RecordWriter, RunFolderError, read_records, scan_records, summarize, write_json_atomic


def test_writer_appends_and_reads_back(tmp_path):
    with RecordWriter(tmp_path) as w:
        w.write({"prompt_id": "a", "reward": 1.0})
        w.write({"prompt_id": "b", "reward": 2.0})
    assert [r["prompt_id"] for r in read_records(tmp_path)] == ["a", "b"]
    assert (tmp_path / "records.jsonl").read_text().count("\n") == 2


def test_torn_tail_is_cut_and_only_that(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"prompt_id": "a"}\n{"prompt_id": "b"}\n{"prompt_id": "c", "resp')
    scan = scan_records(path)
    assert [r["prompt_id"] for r in scan.records] == ["a", "b"] and scan.dropped_tail
    with RecordWriter(tmp_path) as w:
        assert w.repaired and [r["prompt_id"] for r in w.existing] == ["a", "b"]
        w.write({"prompt_id": "c"})
    assert path.read_text() == '{"prompt_id": "a"}\n{"prompt_id": "b"}\n{"prompt_id": "c"}\n'


def test_complete_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"prompt_id": "a"}\n{"prompt_id": "b"}')
    with RecordWriter(tmp_path) as w:
        assert not w.repaired and len(w.existing) == 2
        w.write({"prompt_id": "c"})
    assert [r["prompt_id"] for r in read_records(tmp_path)] == ["a", "b", "c"]


def test_corruption_before_the_last_line_is_an_error(tmp_path):
    (tmp_path / "records.jsonl").write_text('{"prompt_id": "a"}\nnot json\n{"prompt_id": "b"}\n')
    with pytest.raises(RunFolderError, match="line 2 is corrupt"):
        read_records(tmp_path)
    with pytest.raises(RunFolderError):
        RecordWriter(tmp_path)


def test_atomic_json_and_summary(tmp_path):
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind
    recs = [dict(reward=1.0, num_samples=5, num_tokens=40, seconds=2.0, response_tokens=8),
            dict(reward=3.0, num_samples=5, num_tokens=20, seconds=1.0, response_tokens=4)]
    s = summarize(recs, num_prompts=3, skipped=["z"], truncated=[])
    assert s["mean_reward"] == 2.0 and s["std_reward"] == 1.0 and s["complete"]
    assert (s["total_samples"], s["total_tokens"], s["total_seconds"]) == (10, 60, 3.0)
    assert not summarize(recs[:1], num_prompts=3, skipped=[], truncated=[])["complete"]
