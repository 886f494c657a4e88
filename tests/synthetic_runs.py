"""Synthetic run folders for the judge tests (shared by test_judge and test_rm_judge)."""

from __future__ import annotations

import json
from pathlib import Path


def write_run(root: Path, method: str, seed: int, responses: dict[str, str]) -> Path:
    run = root / "runs" / "shp" / "tiny__rm" / method / "default" / f"seed{seed}"
    write_folder(run, method, seed, responses)
    return run


def write_sharded_run(root: Path, method: str, seed: int, responses: dict[str, str], num_shards: int, *,
                      leave_out: tuple[int, ...] = ()) -> Path:
    """A run of ``responses`` (in the dataset's order) as ``num_shards`` prompt shards, shard i
    holding every num_shards-th prompt from i, its records written in REVERSE order (readers
    must order them by the manifests); the shards in ``leave_out`` are not written."""
    run = root / "runs" / "shp" / "tiny__rm" / method / "default" / f"seed{seed}"
    ids = list(responses)
    for i in range(num_shards):
        if i not in leave_out:
            part = ids[i::num_shards]
            write_folder(run / "shards" / f"{i:02d}-of-{num_shards:02d}", method, seed,
                         {pid: responses[pid] for pid in reversed(part)},
                         shard={"index": i, "num_shards": num_shards, "prompt_ids": part})
    return run


def write_folder(run: Path, method: str, seed: int, responses: dict[str, str], shard: dict | None = None) -> None:
    run.mkdir(parents=True)
    config = {
        "seed": seed,
        "method": {"name": method},
        "model": {"name": "tiny", "stop_strings": []},
        "reward": {"name": "rm"},
        "dataset": {"name": "shp", **({"num_shards": shard["num_shards"], "shard": shard["index"]} if shard else {})},
        "generation": {"max_new_tokens": 16},
    }
    manifest = {"config": config, "versions": {}, **({"shard": shard} if shard else {})}
    (run / "manifest.json").write_text(json.dumps(manifest))
    with open(run / "records.jsonl", "w") as f:
        for pid, resp in responses.items():
            prompt = f"Question {pid}?"
            rec = {
                "prompt_id": pid,
                "prompt": prompt,
                "messages": [{"role": "user", "content": prompt}],
                "response": resp,
                "reward": float(len(resp)),
                "sample_rewards": [float(len(resp))],
                "num_samples": 1,
                "num_tokens": 3,
                "response_tokens": 3,
                "seconds": 0.1,
                "finish_reason": "eos",
                "iterations": [],
            }
            f.write(json.dumps(rec) + "\n")
    (run / "summary.json").write_text(json.dumps({"num_prompts": len(responses), "complete": True}))
