"""``hydra/launcher=ray``: each job of a sweep (a run, or a prompt shard of one) as a Ray task.

A task asks Ray for ``num_gpus`` GPUs and ``num_cpus`` CPUs; Ray starts it when they are
free, so a sweep larger than the machine waits its turn, and pins it to its GPU
(``CUDA_VISIBLE_DEVICES``). Each job runs in a fresh worker process (``max_calls=1``: its
GPU memory is freed when it ends) and is never retried by Ray (a rerun resumes it from its
records). ``address: null`` starts Ray on this machine for the sweep; ``auto`` or
``host:port`` joins a running Ray cluster (``ray start --head`` on one node, ``ray start
--address=...`` on the others; every node needs this environment and the models' files).
Ctrl-C cancels the jobs (each stops where it is, releasing its ``run.lock``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aisp_bench.cli import Exit, UserError, first_line, refuse
from aisp_bench.cluster.jobs import (
    Outcome, command_env, describe, finish, run_task, runs_on_gpu, sample_configs, set_job_number,
)  # fmt: skip

log = logging.getLogger("aisp_bench.cluster")


def ray_job(hydra_context: Any, task_function: Any, config: Any, singleton_state: Any, env: dict) -> tuple:
    """In the Ray worker: run one job; (its ``JobReturn`` or None, its ``Outcome``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals

    os.environ.update(env)
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(config)
    return run_task(lambda: run_job(hydra_context=hydra_context, task_function=task_function, config=config,
                                    job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))


def connect(params: dict) -> Any:
    """``ray.init`` on ``address`` (None: a Ray instance of this sweep on this machine)."""
    try:
        import ray
    except ImportError:
        raise UserError("hydra/launcher=ray needs Ray: pip install 'aisp-bench[ray]' (or pip install ray)") from None
    address, extra = params.get("address"), dict(params.get("init") or {})
    if address and {"num_cpus", "num_gpus", "resources"} & set(extra):
        raise UserError("hydra.launcher.init cannot set num_cpus, num_gpus or resources of a running cluster "
                        f"(hydra.launcher.address={address}): set them in its `ray start`")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, **extra)
    except (ConnectionError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"hydra.launcher.address={address}: Ray did not start or connect: {first_line(e)}") from None
    return ray


def request(params: dict, gpu: bool, nodes: list[dict]) -> tuple[float, float]:
    """(GPUs, CPUs) per job: ``num_gpus=auto`` is 1 where the jobs run on a GPU and the cluster has
    one, else 0; refused where no node has that many."""
    most = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in ("GPU", "CPU")}
    gpus, cpus = params.get("num_gpus", "auto"), params.get("num_cpus", 1)
    if gpus == "auto":
        gpus = 1 if gpu and most["GPU"] >= 1 else 0
    for key, value, kind in (("num_gpus", gpus, "GPU"), ("num_cpus", cpus, "CPU")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < (0 if kind == "GPU" else 0.01):
            raise UserError(f"hydra.launcher.{key} must be {'auto or ' if kind == 'GPU' else ''}a number >= 0, "
                            f"got {value!r}")
        if value > most[kind]:
            raise UserError(f"hydra.launcher.{key}={value:g}: no node of the Ray cluster has {value:g} {kind}s "
                            f"(at most {most[kind]:g}); every job would wait forever")
    return float(gpus), float(cpus)


def log_path(cfg: Any) -> str:
    """The job's log (Hydra's job log in its sweep folder)."""
    return str(Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir) / f"{cfg.hydra.job.name}.log")


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], first: int) -> list[Any]:
    """The launcher's ``launch``: every job as a Ray task; returns when all have ended."""
    from hydra.core.singleton import Singleton

    params = launcher.params
    try:
        gpu = any(runs_on_gpu(cfg) for cfg in sample_configs(launcher, job_overrides))
        ray = connect(params)
    except UserError as e:
        refuse(str(e))
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        try:
            gpus, cpus = request(params, gpu, nodes)
        except UserError as e:
            refuse(str(e))
        total = ray.cluster_resources()
        log.info("Ray: %d jobs, each %g GPU and %g CPU, on %g GPUs and %g CPUs (%d nodes)", len(job_overrides), gpus,
                 cpus, total.get("GPU", 0), total.get("CPU", 0), len(nodes))
        remote = ray.remote(num_gpus=gpus, num_cpus=cpus, max_retries=0, max_calls=1)(ray_job)
        configs, refs = [], {}
        state, env = Singleton.get_state(), command_env()
        for i, overrides in enumerate(job_overrides):
            cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
            set_job_number(cfg, first + i, f"ray_{first + i}")
            configs.append(cfg)
            refs[remote.remote(launcher.hydra_context, launcher.task_function, cfg, state, env)] = i
        results = wait_all(ray, refs)
    finally:
        ray.shutdown()
    finish([(f"#{first + i} ({describe(o)})", results[i][1], log_path(configs[i]))
            for i, o in enumerate(job_overrides)], "Ray sweep")
    return [ret for ret, _ in results]


def wait_all(ray: Any, refs: dict) -> list[tuple[Any, Outcome]]:
    """Each task's (``JobReturn`` or None, ``Outcome``), in job order, as they end; Ctrl-C cancels them."""
    from ray.exceptions import RayError

    results: dict[int, tuple[Any, Outcome]] = {}
    pending = list(refs)
    try:
        while pending:
            [ready], pending = ray.wait(pending, num_returns=1)
            try:
                results[refs[ready]] = ray.get(ready)
            except RayError as e:  # the worker died (killed, out of memory) or the task was cancelled
                results[refs[ready]] = (None, Outcome(1, f"error: the Ray task failed: {first_line(e)}"))
            log.info("Ray: %d of %d jobs ended", len(results), len(refs))
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)
        line = f"stopped: {len(pending)} jobs cancelled; rerun the same command to resume them"
        print(line, flush=True)
        raise Exit(130, line) from None
    return [results[i] for i in range(len(refs))]
