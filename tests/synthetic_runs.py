"""Synthetic run folders for the judge tests (shared by test_judge and test_rm_judge)."""

from __future__ import annotations

import json
from pathlib import Path


def write_run(root: Path, method: str, seed: int, responses: dict[str, str]) -> Path:
    run = root / "runs" / "shp" / "tiny__rm" / method / "default" / f"seed{seed}"
    run.mkdir(parents=True)
    config = {
        "seed": seed,
        "method": {"name": method},
        "model": {"name": "tiny", "stop_strings": []},
        "reward": {"name": "rm"},
        "dataset": {"name": "shp"},
        "generation": {"max_new_tokens": 16},
    }
    (run / "manifest.json").write_text(json.dumps({"config": config, "versions": {}}))
    with open(run / "records.jsonl", "w") as f:
        for pid, resp in responses.items():
            prompt = f"Question {pid}?"
            rec = {
                "prompt_id": pid,
                "prompt": prompt,
                "messages": [{"role": "user", "content": prompt}],
                "response": resp,
                "reward": 0.0,
                "sample_rewards": [0.0],
                "num_samples": 1,
                "num_tokens": 3,
                "response_tokens": 3,
                "seconds": 0.1,
                "finish_reason": "eos",
                "iterations": [],
            }
            f.write(json.dumps(rec) + "\n")
    (run / "summary.json").write_text(json.dumps({"num_prompts": len(responses), "complete": True}))
    return run
