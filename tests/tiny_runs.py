"""The tiny run the launcher tests share (Slurm, Ray): the offline pair on the demo prompts,
a few tokens, one prompt per batch (so no layout can change a float), and helpers to run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from proc import kill_tree, run_tree

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = ("seconds", "final_candidate_seconds")
# scale=smoke: n 2, κ 2; 6 prompts: 3 per shard of 2, 2 per shard of 3
ARGS = ["scale=smoke", "dataset=demo", "dataset.num_prompts=6", "generation.max_new_tokens=4", "batch_prompts=1",
        "progress=false"]
RUN = Path("runs/demo/smollm2_135m__smollm2_judge/aisp/dataset.num_prompts=6,generation.max_new_tokens=4/seed0")


def without_timings(rec: dict) -> dict:
    out = {k: v for k, v in rec.items() if k not in TIMINGS}
    out["iterations"] = [{k: v for k, v in it.items() if k not in TIMINGS} for it in rec.get("iterations", [])]
    return out


def env(**extra: str) -> dict[str, str]:
    # RAY_AUTH_MODE: the test Ray on 127.0.0.1 takes no token (Ray 2.60 asks for one by default)
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled", **extra)


def aisp_bench(*args: str, results: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m aisp_bench *args results_dir=results``, its process tree ended on timeout."""
    return run_tree([sys.executable, "-m", "aisp_bench", *args, f"results_dir={results}"], cwd=ROOT, env=env(),
                    timeout=timeout)


def start(*args: str, results: Path) -> subprocess.Popen:
    """The same in the background (its own session: ``proc.kill_tree`` ends it)."""
    return subprocess.Popen([sys.executable, "-m", "aisp_bench", *args, f"results_dir={results}"], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_tree(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def records_in(folder: Path) -> int:
    path = folder / "records.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"ended before {what}: {(proc.communicate()[1] or '')[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def lock_pid(folder: Path) -> int | None:
    try:
        return json.loads((folder / "run.lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
