"""hydra/launcher=ray on a real Ray (a head on this machine with 2 CPUs, joined through
``hydra.launcher.address``): 3 prompt shards, one CPU each, so the third waits for a slot; a
worker killed mid-shard; the rerun resumes it, and the shards equal one process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_runs import ARGS, RUN, aisp_bench, env, finish, lock_pid, records_in, start, wait_until, without_timings

from aisp_bench.rundir import Run, read_json

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """``ray start --head`` on 127.0.0.1 with 2 CPUs; its whole process group ended afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    temp = tmp_path_factory.mktemp("ray")
    out = temp / "head.out"
    with open(out, "w") as f:
        head = subprocess.Popen([ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                                 "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                                 f"--temp-dir={temp}"], env=env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until(lambda: "Ray runtime started" in out.read_text(), 180, "the Ray head", head)
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(2)
        head.wait(timeout=30)


def test_three_shards_queue_a_killed_worker_resumes_equal_one_process(tmp_path, ray_head, tiny_plain_records):
    run = tmp_path / RUN
    shards = [run / "shards" / f"{i:02d}-of-03" for i in range(3)]
    sweep_args = ["-m", "hydra/launcher=ray", f"hydra.launcher.address={ray_head}", *ARGS, "dataset.num_shards=3",
                  "dataset.shard=range(3)"]
    sweep = start(*sweep_args, results=tmp_path)
    seen: set[tuple[int, ...]] = set()  # which shards held run.lock at once (a job holds it while it runs)

    def first_record_of_shard0() -> bool:
        seen.add(tuple(i for i, s in enumerate(shards) if (s / "run.lock").exists()))
        return records_in(shards[0]) >= 1

    try:
        wait_until(first_record_of_shard0, 300, "shard 0's first record", sweep)
        os.kill(lock_pid(shards[0]), signal.SIGKILL)  # the Ray worker running shard 0
        while sweep.poll() is None:
            seen.add(tuple(i for i, s in enumerate(shards) if (s / "run.lock").exists()))
            time.sleep(0.1)
    finally:
        first = finish(sweep)
    assert first.returncode == 1, first.stderr[-3000:]
    failed = [ln for ln in first.stderr.splitlines() if ln.startswith("error: job")]
    assert len(failed) == 1 and failed[0].startswith("error: job #0 (") and "dataset.shard=0" in failed[0], failed
    assert "the Ray task failed" in failed[0] and "(log: " in failed[0]
    assert max(len(s) for s in seen) <= 2  # 2 CPUs, one per job: the third waited for a slot
    assert (run / "shards" / "00-of-03" / "run.lock").exists() and 1 <= records_in(shards[0]) < 2
    assert records_in(shards[1]) == records_in(shards[2]) == 2

    rerun = aisp_bench(*sweep_args, results=tmp_path)  # shard 0 takes its dead lock over and resumes
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "taking over run.lock" in rerun.stdout + rerun.stderr
    sessions = read_json(shards[0] / "manifest.json")["sessions"]
    assert len(sessions) == 2 and "hydra/launcher=ray" in sessions[-1]["argv"]  # the user's command line
    sharded = Run.at(run)
    assert sharded.complete and [without_timings(r) for r in sharded.records] == [
        without_timings(r) for r in tiny_plain_records]
