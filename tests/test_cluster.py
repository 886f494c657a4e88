"""The launchers' parts that need no cluster: their configs, the resources a sweep asks for and
the checks against a partition or a Ray cluster, a job's outcome, the one-line report of failed
jobs, a SIGTERM's clean stop, and the Makefile's cluster variables. The real Slurm and Ray
runs are tests/test_slurm.py and tests/test_ray.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aisp_bench.cli import ARGV_ENV, Exit, UserError, command_line
from aisp_bench.cluster.jobs import Outcome, finish, run_task, runs_on_gpu
from aisp_bench.cluster.ray import request
from aisp_bench.cluster.slurm import Node, ended_task, gpu_count, settle
from aisp_bench.runlock import RunLock, Stopped, no_stop, stop_on_sigterm

ROOT = Path(__file__).resolve().parents[1]
AUTO = {"gpus_per_task": "auto", "cpus_per_task": "auto", "mem_gb": "auto", "gres": None, "gpus_per_node": None}
CPU_NODE, GPU_NODE = Node("c1", 2, 20000, 0), Node("g1", 32, 512000, 8)


def launcher(*overrides):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "aisp_bench" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


def test_launcher_configs_compose(tmp_path, monkeypatch):
    """conf/hydra/launcher/{slurm,ray,local}.yaml against their schemas (an unknown key fails here)."""
    monkeypatch.setenv("AISP_BENCH_RESULTS", str(tmp_path / "results"))
    slurm = launcher("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.setup=[module load cuda]")
    slurm = slurm.hydra.launcher
    assert slurm._target_ == "hydra_plugins.aisp_bench_launchers.launchers.SlurmLauncher" and slurm.partition == "gpu"
    assert (slurm.gpus_per_task, slurm.cpus_per_task, slurm.mem_gb, slurm.wait) == ("auto", "auto", "auto", True)
    assert slurm.max_num_timeout > 0 and slurm.setup == ["module load cuda"] and slurm.array_parallelism == 64
    assert slurm.submitit_folder == str(tmp_path / "results" / "slurm" / "%j")  # beside the runs
    ray = launcher("hydra/launcher=ray", "hydra.launcher.address=auto", "+hydra.launcher.init.num_cpus=2").hydra.launcher
    assert ray._target_.endswith("RayLauncher") and (ray.address, ray.num_gpus, ray.init) == ("auto", "auto", {
        "num_cpus": 2})
    assert launcher("hydra/launcher=local").hydra.launcher._target_.endswith("LocalLauncher")
    with pytest.raises(Exception, match="foo"):
        launcher("hydra/launcher=ray", "hydra.launcher.foo=1")


def test_a_job_wants_a_gpu_unless_smoke_or_cpu():
    assert runs_on_gpu(launcher())  # the paper's budgets on the default pair
    assert not runs_on_gpu(launcher("scale=smoke"))
    assert not runs_on_gpu(launcher("model.device=cpu"))
    assert runs_on_gpu(launcher("model.device=cpu", "reward.device=cuda:1"))


def test_slurm_resources_settle_and_refuse():
    assert gpu_count("(null)") == 0 and gpu_count("gpu:a100:4(S:0-1),gpu:2,shard:8") == 6 and gpu_count("gpu") == 1
    cpu = settle(AUTO, False, "cpu", [CPU_NODE])  # smoke on a CPU partition: no GPU, what a tiny run needs
    assert (cpu["gpus_per_task"], cpu["cpus_per_task"], cpu["mem_gb"]) == (None, 1, 4)
    gpu = settle(AUTO, True, "gpu", [CPU_NODE, GPU_NODE])
    assert (gpu["gpus_per_task"], gpu["cpus_per_task"], gpu["mem_gb"]) == (1, 8, 64)
    small = settle(AUTO, True, "gpu", [Node("g2", 4, 30000, 1)])  # auto never asks for more than a node has
    assert (small["cpus_per_task"], small["mem_gb"]) == (4, 29)
    assert settle({**AUTO, "gres": "gpu:2"}, True, "gpu", [GPU_NODE])["gpus_per_task"] is None  # gres asks
    for params, gpu, key in (({**AUTO, "cpus_per_task": 8}, False, "hydra.launcher.cpus_per_task=8 asks for 8"),
                             ({**AUTO, "mem_gb": 64}, False, "hydra.launcher.mem_gb=64 asks for 64 GB"),
                             (AUTO, True, "hydra.launcher.gpus_per_task=1 asks for 1 GPU(s) (auto: the jobs run"),
                             ({**AUTO, "gpus_per_task": None, "gres": "gpu:1"}, False, "hydra.launcher.gres=gpu:1"),
                             ({**AUTO, "cpus_per_task": "many"}, False, "cpus_per_task must be auto or a positive")):
        with pytest.raises(UserError, match=key.replace("(", r"\(").replace(")", r"\)")):
            settle(params, gpu, "cpu", [CPU_NODE])
    with pytest.raises(UserError, match="no node of partition mixed has 16 CPUs, 64 GB and 1 GPUs at once"):
        settle({**AUTO, "cpus_per_task": 16}, True, "mixed", [Node("c", 16, 512000, 0), Node("g", 4, 512000, 1)])


def test_ray_request_per_job():
    cpu, gpus = [{"CPU": 2.0}], [{"CPU": 64.0, "GPU": 8.0}]
    assert request({"num_gpus": "auto", "num_cpus": 1}, True, cpu) == (0, 1)  # no GPU in the cluster
    assert request({"num_gpus": "auto", "num_cpus": 1}, True, gpus) == (1, 1)
    assert request({"num_gpus": "auto", "num_cpus": 1}, False, gpus) == (0, 1)  # scale=smoke, model.device=cpu
    for params, message in (({"num_gpus": 1, "num_cpus": 1}, "num_gpus=1: no node of the Ray cluster has 1 GPUs"),
                            ({"num_gpus": 0, "num_cpus": 4}, "num_cpus=4: no node .* has 4 CPUs"),
                            ({"num_gpus": "two", "num_cpus": 1}, "num_gpus must be auto or a number")):
        with pytest.raises(UserError, match=message):
            request(params, True, cpu)


def test_a_jobs_outcome():
    from hydra.core.utils import JobReturn, JobStatus

    def failed():
        ret = JobReturn()
        ret.status, ret.return_value = JobStatus.FAILED, RuntimeError("CUDA out of memory\nmore")
        return ret

    def refused():
        raise Exit(2, "error: run folder x is being written by pid 7")

    assert run_task(refused) == (None, Outcome(2, "error: run folder x is being written by pid 7"))
    assert run_task(lambda: sys.exit(3)) == (None, Outcome(3, "exited with code 3"))
    assert run_task(failed)[1] == Outcome(1, "error: RuntimeError: CUDA out of memory")
    ok = JobReturn()
    ok.status = JobStatus.COMPLETED
    assert run_task(lambda: ok) == (ok, Outcome(0))


def test_failed_jobs_are_one_line_each(capsys):
    finish([("a", Outcome(0), "log/a")], "sweep")  # all done: nothing said, no exit
    assert capsys.readouterr().err == ""
    with pytest.raises(Exit) as e:
        finish([("a", Outcome(0), "log/a"), ("b", Outcome(2, "error: held"), "log/b")], "sweep")
    assert e.value.code == 2  # every failure a refusal
    assert capsys.readouterr().err.splitlines() == [
        "error: job b: held (log: log/b)",
        "error: 1 of 2 jobs failed; rerun the same command to run them again (finished runs and prompts are skipped)"]
    with pytest.raises(Exit) as e:
        finish([("b", Outcome(2, "error: held"), "l"), ("c", Outcome(143, "stopped: SIGTERM"), "l")], "sweep")
    assert e.value.code == 1 and "error: job c: stopped: SIGTERM (log: l)" in capsys.readouterr().err


def test_a_slurm_task_without_an_outcome_file(tmp_path):
    """A task killed before it could write its outcome: its state, else its log's last error line."""
    class Paths:
        folder, result_pickle, stderr = tmp_path, tmp_path / "r.pkl", tmp_path / "1_0_0_log.err"

    class Job:
        paths = Paths

    assert ended_task(Job, "CANCELLED") == Outcome(1, "ended (CANCELLED) without a result")
    assert ended_task(Job, "") == Outcome(1, "ended (no longer listed by squeue) without a result")
    Paths.stderr.write_text("loading\nerror: bad thing\nslurmstepd: error: *** JOB 1 CANCELLED ***\n")
    assert ended_task(Job, "FAILED") == Outcome(1, "error: bad thing")
    Outcome(143, "stopped: SIGTERM").save(tmp_path / "outcome.json")
    assert ended_task(Job, "CANCELLED") == Outcome(143, "stopped: SIGTERM")


def test_sigterm_stops_after_the_record_being_written():
    before, written = signal.getsignal(signal.SIGTERM), []
    with stop_on_sigterm():
        with pytest.raises(Stopped):
            with no_stop():
                os.kill(os.getpid(), signal.SIGTERM)
                written.append("record")  # the block ends before the stop
        assert written == ["record"]
        with pytest.raises(Stopped):  # outside a no_stop block: at once
            os.kill(os.getpid(), signal.SIGTERM)
            written.append("never")
    assert written == ["record"] and signal.getsignal(signal.SIGTERM) is before


def test_a_refusal_after_the_lock_leaves_no_folder(tmp_path):
    folder = tmp_path / "runs" / "a" / "shards" / "00-of-02"
    with pytest.raises(UserError):
        with RunLock(folder):
            assert (folder / "run.lock").is_file()
            raise UserError("the model did not load")
    assert not (tmp_path / "runs").exists()
    with RunLock(folder):
        (folder / "manifest.json").write_text("{}")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]


def test_the_manifests_command_line(monkeypatch):
    monkeypatch.delenv(ARGV_ENV, raising=False)
    assert command_line() == sys.argv
    monkeypatch.setenv(ARGV_ENV, json.dumps(["aisp_bench/__main__.py", "-m", "hydra/launcher=slurm"]))
    assert command_line() == ["aisp_bench/__main__.py", "-m", "hydra/launcher=slurm"]


def test_make_runs_on_a_cluster():
    out = subprocess.run(["make", "-n", "runs", "SKIP_SETUP=1", "RESULTS=/scratch/r", "CLUSTER=ray", "SHARDS=8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "-m aisp_bench -m" in ln)
    assert "results_dir=/scratch/r" in line and "hydra/launcher=ray" in line
    assert "dataset.num_shards=8 'dataset.shard=range(8)'" in line
    plan = subprocess.run(["make", "-n", "plan", "SKIP_SETUP=1", "CLUSTER=ray", "GPUS=8"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60).stdout
    assert "plan.gpus=8" in plan
