"""``hydra/launcher=slurm``: a sweep as one Slurm job array, through submitit.

Before submitting, the resources a task asks for are settled and checked against the
partition (``sinfo``): ``auto`` asks for a GPU only where a job runs on one
(``jobs.runs_on_gpu``), and for the CPUs and memory of ``AUTO`` (at most what the
partition's largest node has); a value that no node of the partition can satisfy, or a
partition that does not exist, is refused in one ``error:`` line naming the key, and so is
a submission that ``sbatch`` refuses (its files are removed).

Then the submitting command watches the array with ``squeue`` (no accounting needed) and
each task's ``outcome.json`` (``jobs.Outcome``, written by the task itself) until every task
has ended, and prints one line per failed task. ``wait=false`` returns after submitting.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aisp_bench.cli import Exit, UserError, first_line, refuse
from aisp_bench.cluster.jobs import (
    OUTCOME, Outcome, command_env, describe, finish, run_task, runs_on_gpu, sample_configs,
)  # fmt: skip

log = logging.getLogger("aisp_bench.cluster")
AUTO = {"gpu": {"cpus_per_task": 8, "mem_gb": 64}, "cpu": {"cpus_per_task": 1, "mem_gb": 4}}
OUR_KEYS = ("wait", "poll_s")  # this launcher's; the rest are submitit's
# states a task is still in (it may run again: requeued after a preemption or a timeout)
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "RESIZING", "SUSPENDED",
          "PREEMPTED", "SIGNALING", "STAGE_OUT"}  # fmt: skip
# why a pending task can never start: it is cancelled and reported
NEVER = {"BadConstraints", "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "InvalidQOS",
         "InvalidAccount", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob", "QOSMaxMemoryPerJob"}  # fmt: skip


# -- the partition ----------------------------------------------------------------------------
@dataclass
class Node:
    name: str
    cpus: int
    mem_mb: int
    gpus: int


def slurm_command(args: list[str]) -> subprocess.CompletedProcess:
    """Run a Slurm client command (``sinfo``, ``squeue``, ``scancel``); absent: a ``UserError``."""
    if shutil.which(args[0]) is None:
        raise UserError(f"hydra/launcher=slurm needs Slurm's commands on this machine: {args[0]} is not on PATH")
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def gpu_count(gres: str) -> int:
    """GPUs in an ``sinfo`` gres field (``gpu:a100:4(S:0-1),gpu:2``; ``(null)``: none)."""
    total = 0
    for entry in gres.split(","):
        fields = entry.split("(")[0].split(":")
        if fields[0] == "gpu":
            total += int(fields[-1]) if len(fields) > 1 and fields[-1].isdigit() else 1
    return total


def partition_nodes(partition: str | None) -> tuple[str, list[Node]]:
    """(the partition's name, its nodes); ``None``: the default partition."""
    out = slurm_command(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G", *(["-p", partition] if partition else [])])
    if out.returncode:
        raise UserError(f"sinfo failed: {first_line(RuntimeError(out.stderr))}")
    rows = [line.split("|") for line in out.stdout.splitlines() if line.count("|") == 4]
    if not partition:
        rows = [r for r in rows if r[0].endswith("*")]
    if not rows:
        names = sorted({r.split("|")[0] for r in slurm_command(["sinfo", "-h", "-o", "%P|"]).stdout.split()})
        which = f"hydra.launcher.partition={partition}: no such partition" if partition else "no default partition"
        raise UserError(f"{which} (this cluster has: {', '.join(n.rstrip('|') for n in names) or 'none'})")
    name = rows[0][0].rstrip("*")
    return name, [Node(r[1], int(r[2]), int(r[3].rstrip("+")), gpu_count(r[4])) for r in rows]


# -- the request ------------------------------------------------------------------------------
def _number(params: dict, key: str, allow_none: bool) -> float | None:
    v = params.get(key)
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and key != "gpus_per_task"):
        raise UserError(f"hydra.launcher.{key} must be auto or a positive number, got {v!r}")
    return v


def settle(params: dict, gpu: bool, partition: str, nodes: list[Node]) -> dict:
    """``params`` with the ``auto`` resources settled; refused where no node of ``partition`` fits."""
    out = dict(params)
    defaults = AUTO["gpu" if gpu else "cpu"]
    most = {"cpus_per_task": max(n.cpus for n in nodes), "mem_gb": max(n.mem_mb for n in nodes) // 1024}
    for key in ("cpus_per_task", "mem_gb"):
        if out.get(key) == "auto":
            out[key] = max(1, min(defaults[key], most[key]))
    if out.get("gpus_per_task") == "auto":
        out["gpus_per_task"] = 1 if gpu and not out.get("gres") and not out.get("gpus_per_node") else None
    cpus, mem = _number(out, "cpus_per_task", True), _number(out, "mem_gb", True)
    gpus = max(_number(out, "gpus_per_task", True) or 0, gpu_count(str(out.get("gres") or "")),
               _number(out, "gpus_per_node", True) or 0)
    wants = [("cpus_per_task", cpus, lambda n: n.cpus, "CPU(s)"), ("mem_gb", mem, lambda n: n.mem_mb // 1024, "GB"),
             ("gpus_per_task" if out.get("gpus_per_task") else "gres", gpus, lambda n: n.gpus, "GPU(s)")]
    for key, want, has, unit in wants:
        if want and not any(has(n) >= want for n in nodes):
            why = " (auto: the jobs run on a GPU; scale=smoke or model.device=cpu need none)" \
                if key == "gpus_per_task" and params.get(key) == "auto" else ""
            raise UserError(f"hydra.launcher.{key}={out.get(key)} asks for {want:g} {unit}{why}, but no node of "
                            f"partition {partition} has that many (at most {max(has(n) for n in nodes):g}): "
                            "lower it, or pick another partition (hydra.launcher.partition=...)")
    if not any(n.cpus >= (cpus or 0) and n.mem_mb >= (mem or 0) * 1024 and n.gpus >= gpus for n in nodes):
        raise UserError(f"hydra.launcher: no node of partition {partition} has {cpus} CPUs, {mem} GB and {gpus} "
                        "GPUs at once: lower cpus_per_task, mem_gb or gpus_per_task")
    return out


# -- submission -------------------------------------------------------------------------------
def _executor(params: dict) -> Any:
    """A submitit executor on ``params`` (the keys as hydra-submitit-launcher maps them)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    executor = submitit.AutoExecutor(cluster="slurm", folder=params["submitit_folder"],
                                     slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    return executor


def sbatch_message(e: BaseException) -> str:
    """The line of ``sbatch``'s complaint in a submitit exception (else its first line)."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    errors = [ln for ln in lines if "error:" in ln]
    return (errors[-1].split("error:", 1)[1].strip() if errors else first_line(e)) or type(e).__name__


def submit(launcher: Any, params: dict, job_overrides: Sequence[Sequence[str]], first: int) -> list[Any]:
    """Submit the jobs as one array; ``sbatch`` refusing it: ``UserError``, and its files removed."""
    from hydra.core.singleton import Singleton

    folder = Path(str(params["submitit_folder"]).split("%j")[0])
    existed, before = folder.exists(), set(folder.iterdir()) if folder.exists() else set()
    executor = _executor(params)
    state = Singleton.get_state()
    args = [(list(o), "hydra.sweep.dir", first + i, f"job_id_for_{first + i}", state)
            for i, o in enumerate(job_overrides)]
    os.environ.update(command_env())  # sbatch passes the environment on to the tasks
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's complaint: said below, once
            return executor.map_array(launcher, *zip(*args))
    except Exception as e:  # noqa: BLE001 - sbatch's refusal, however submitit words it
        for p in set(folder.iterdir()) - before if folder.exists() else ():
            if p.is_file() and (p.suffix == ".pkl" or p.name.startswith(".submission_file_")):
                p.unlink()
        if not existed and folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
        raise UserError(f"sbatch refused the job array: {sbatch_message(e)}") from None


# -- the watch --------------------------------------------------------------------------------
def task_states(array_id: str) -> dict[int, tuple[str, str]] | None:
    """task -> (state, reason) of the array's tasks ``squeue`` still lists; None: squeue failed."""
    out = slurm_command(["squeue", "-h", "-r", "-t", "all", "-j", array_id, "-o", "%K|%T|%r"])
    if out.returncode:
        if "Invalid job id" in out.stderr:
            return {}  # every task ended long enough ago to be forgotten (MinJobAge)
        log.warning("squeue failed (%s); trying again", first_line(RuntimeError(out.stderr)))
        return None
    states = {}
    for line in out.stdout.splitlines():
        task, state, reason = (line.split("|") + ["", ""])[:3]
        states[int(task) if task.isdigit() else 0] = (state, reason)  # a sweep of one job is no array: N/A
    return states


def ended_task(job: Any, state: str) -> Outcome:
    """A task's outcome: the one it wrote, else what its state and its log say."""
    found = Outcome.load(Path(job.paths.folder) / OUTCOME)
    if found is not None:
        return found
    if state == "COMPLETED" and Path(job.paths.result_pickle).exists():
        return Outcome(0)
    lines = Path(job.paths.stderr).read_text(errors="replace").splitlines() if Path(job.paths.stderr).exists() else []
    said = next((ln for ln in reversed(lines) if ln.startswith(("error:", "stopped:"))), "")
    return Outcome(1, said or f"ended ({state or 'no longer listed by squeue'}) without a result")


def watch(jobs: list[Any], poll_s: float) -> list[Outcome]:
    """Wait until every task of the array has ended (``squeue``; no accounting needed); their outcomes."""
    array_id = jobs[0].job_id.split("_")[0]
    outcomes: dict[int, Outcome] = {}
    shown = None
    while len(outcomes) < len(jobs):
        states = task_states(array_id)
        for i, job in enumerate(jobs):
            if states is None or i in outcomes:
                continue
            state, reason = states.get(i, ("", ""))
            done_writing = state == "COMPLETING" and (Path(job.paths.folder) / OUTCOME).exists()
            if state == "PENDING" and reason in NEVER:
                slurm_command(["scancel", job.job_id])
                outcomes[i] = Outcome(1, f"error: pending, and can never start ({reason}): cancelled")
            elif state not in ACTIVE or done_writing:
                outcomes[i] = ended_task(job, state)
        running = sum(1 for s, _ in (states or {}).values() if s == "RUNNING")
        tally = (len(outcomes), sum(1 for o in outcomes.values() if o.code), running)
        if tally != shown:
            shown = tally
            log.info("job array %s: %d of %d tasks ended (%d failed), %d running", array_id, tally[0], len(jobs),
                     tally[1], running)
        if len(outcomes) < len(jobs):
            time.sleep(poll_s)
    return [outcomes[i] for i in range(len(jobs))]


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], first: int) -> list[Any]:
    """The launcher's ``launch``: check, submit, watch (``wait=false``: return once submitted)."""
    from hydra.core.utils import JobReturn, JobStatus

    params = {k: v for k, v in launcher.params.items() if k not in OUR_KEYS}
    try:
        gpu = any(runs_on_gpu(cfg) for cfg in sample_configs(launcher, job_overrides))
        partition, nodes = partition_nodes(params.get("partition"))
        params = settle(params, gpu, partition, nodes)
        jobs = submit(launcher, params, job_overrides, first)
    except UserError as e:
        refuse(str(e))
    array_id = jobs[0].job_id.split("_")[0]
    logs = Path(jobs[0].paths.folder)
    logs = logs.parent / f"{array_id}_<task>" if "_" in jobs[0].job_id else logs
    log.info("submitted job array %s: %d tasks on partition %s (%s CPUs, %s GB, %s GPUs each); logs: %s/",
             array_id, len(jobs), partition, params.get("cpus_per_task"), params.get("mem_gb"),
             params.get("gpus_per_task") or params.get("gres") or 0, logs)
    stubs = []
    for _ in jobs:
        stubs.append(JobReturn())
        stubs[-1].status = JobStatus.COMPLETED
    if not launcher.params.get("wait", True):
        log.info("not waiting (hydra.launcher.wait=false): follow it with `squeue -r -j %s`, stop it with "
                 "`scancel %s`; rerun this command afterwards to finish what is missing", array_id, array_id)
        return stubs
    try:
        outcomes = watch(jobs, float(launcher.params.get("poll_s", 10)))
    except KeyboardInterrupt:
        line = f"stopped waiting: job array {array_id} goes on (squeue -r -j {array_id}; scancel {array_id} stops it)"
        print(line, flush=True)
        raise Exit(130, line) from None
    finish([(f"{job.job_id} ({describe(o)})", out, str(job.paths.stderr))
            for o, out, job in zip(job_overrides, outcomes, jobs)], f"job array {array_id}")
    return stubs


def in_task(call: Any, folder: Path) -> Any:
    """Run one Slurm task's job; write its ``outcome.json``; exit with its code where it failed."""
    path = folder / OUTCOME
    path.unlink(missing_ok=True)  # a requeued task's previous outcome
    ret, outcome = run_task(call)
    outcome.save(path)
    if outcome.code:
        raise SystemExit(outcome.code)
    return ret
