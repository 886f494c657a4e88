"""hydra/launcher=slurm against a real Slurm controller (``scripts/local_slurm.sh start``: one
node, no GPU, accounting off, as a fresh install): refusals before anything is submitted, and
a 2-shard array that is scancelled mid-way, doubly submitted, resumed and equal to one process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from proc import kill_tree
from tiny_runs import ARGS, RUN, aisp_bench, finish, records_in, start, wait_until, without_timings

from aisp_bench.rundir import Run, read_json, read_records

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]
SLURM = ["-m", "hydra/launcher=slurm", "hydra.launcher.poll_s=1"]
SHARDED = ["dataset.num_shards=2", "dataset.shard=0,1"]


def process_state(pid: int) -> str:
    """R, S, T (stopped) ... of a process on this machine (the local Slurm's tasks run here)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("override, names", [
    ("hydra.launcher.partition=nosuch", "hydra.launcher.partition=nosuch: no such partition"),
    ("hydra.launcher.cpus_per_task=4096", "hydra.launcher.cpus_per_task=4096 asks for 4096 CPU(s)"),
    ("hydra.launcher.mem_gb=100000", "hydra.launcher.mem_gb=100000 asks for 100000 GB"),
    ("scale=paper", "hydra.launcher.gpus_per_task=1 asks for 1 GPU(s) (auto: the jobs run on a GPU"),
    ("hydra.launcher.constraint=nosuchfeature", "sbatch refused the job array: Batch job submission failed"),
])
def test_bad_requests_end_in_one_line_and_leave_nothing(tmp_path, override, names):
    out = aisp_bench(*SLURM, *ARGS, override, results=tmp_path, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == error_lines(out.stderr)[0], out.stderr[-2000:]
    assert names in out.stderr
    assert not (tmp_path / "slurm").exists() and not (tmp_path / "runs").exists()  # no pickles, no scripts


def test_a_task_that_can_never_start_is_cancelled_and_reported(tmp_path):
    # an sbatch option past the check (additional_parameters) asking for more CPUs than a node has
    out = aisp_bench(*SLURM, *ARGS, "+hydra.launcher.additional_parameters.cpus_per_task=4096", results=tmp_path,
                     timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "pending, and can never start (PartitionConfig): cancelled" in error_lines(out.stderr)[0]


def test_wait_false_returns_once_submitted(tmp_path):
    out = aisp_bench(*SLURM, *ARGS, "hydra.launcher.wait=false", results=tmp_path,
                     timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    [array] = [p.name for p in (tmp_path / "slurm").iterdir() if p.is_dir() and p.name.isdigit()]
    subprocess.run(["scancel", array], check=True, timeout=60)
    said = out.stdout + out.stderr  # the launcher logs through Hydra's logging (stdout)
    assert f"follow it with `squeue -r -j {array}`" in said and f"`scancel {array}`" in said


def test_two_shards_scancel_double_submission_resume(tmp_path, tiny_plain_records):
    run, array = tmp_path / RUN, None
    shard0, shard1 = run / "shards" / "00-of-02", run / "shards" / "01-of-02"
    sweep = start(*SLURM, *ARGS, *SHARDED, results=tmp_path)
    try:
        wait_until(lambda: records_in(shard0) >= 1, 300, "shard 0's first record", sweep)
        array = read_json(shard0 / "run.lock")["slurm_array_job_id"]
        subprocess.run(["scontrol", "suspend", f"{array}_0"], check=True, timeout=60)  # it holds its lock meanwhile
        pid = read_json(shard0 / "run.lock")["pid"]
        wait_until(lambda: process_state(pid) == "T", 60, "the task to be suspended")

        # the same shard again, while the array's task holds it: refused in the task, before any
        # model loads, and with accounting off the second submitter ends all the same
        again = aisp_bench(*SLURM, *ARGS, "dataset.num_shards=2", "dataset.shard=0", results=tmp_path, timeout=300)
        assert again.returncode == 2, again.stderr[-3000:]
        [refusal, _] = error_lines(again.stderr)
        assert "is being written by pid" in refusal and f"(Slurm job {array}_0)" in refusal, refusal
        log = Path(refusal.rsplit("(log: ", 1)[1].rstrip(")"))
        assert log.is_file() and "loading policy" not in log.read_text()

        # scancel the task of shard 0: it stops at once (SIGTERM), its lock released (within Slurm's
        # KillWait, after which a SIGKILL would leave the lock and no stopped: line)
        subprocess.run(["scontrol", "resume", f"{array}_0"], check=True, timeout=60)  # a suspended one is SIGKILLed
        wait_until(lambda: process_state(pid) != "T", 60, "the task to run again")
        subprocess.run(["scancel", f"{array}_0"], check=True, timeout=60)
        first = finish(sweep)
    except BaseException:
        kill_tree(sweep)
        if array:
            subprocess.run(["scancel", array], timeout=60)
        raise
    assert first.returncode == 1, first.stderr[-3000:]
    [stopped, _] = error_lines(first.stderr)
    assert f"job {array}_0 (" in stopped and "stopped: SIGTERM" in stopped and f"slurm/{array}_0/" in stopped
    assert "sacct" not in first.stderr + again.stderr  # no accounting asked for
    assert not (shard0 / "run.lock").exists() and 1 <= records_in(shard0) < 3 and records_in(shard1) == 3

    # rerun: shard 1 has nothing to do, shard 0 resumes; one process's records, none twice
    rerun = aisp_bench(*SLURM, *ARGS, *SHARDED, results=tmp_path, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    sessions = read_json(shard0 / "manifest.json")["sessions"]
    assert len(sessions) == 2 and "hydra/launcher=slurm" in sessions[-1]["argv"]  # the user's command line
    assert len(read_json(shard1 / "manifest.json")["sessions"]) == 1
    sharded = Run.at(run)
    assert sharded.complete and [without_timings(r) for r in sharded.records] == [
        without_timings(r) for r in tiny_plain_records]
    assert len(read_records(shard0)) == 3
    assert json.loads((tmp_path / "slurm" / f"{array}_1" / "outcome.json").read_text())["code"] == 0
