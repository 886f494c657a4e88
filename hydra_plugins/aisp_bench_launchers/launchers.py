"""aisp-bench's Hydra launchers (``hydra/launcher=slurm``, ``hydra/launcher=ray``): a thin shell
that Hydra finds as a plugin; the work is in ``aisp_bench.cluster``. Hydra imports this module
for every command, so it imports nothing heavy (Ray, submitit) until a sweep is launched.

Their schemas are registered here as ``hydra/launcher`` options ``aisp_slurm`` and ``aisp_ray``;
``aisp_bench/conf/hydra/launcher/{slurm,ray}.yaml`` build on them (an unknown key is an error).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import DictConfig, OmegaConf


class SlurmLauncher(SubmititSlurmLauncher):
    """hydra-submitit-launcher's, with resources checked against the partition first, one-line
    errors, and a submitter that ends when every task has (aisp_bench/cluster/slurm.py)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from aisp_bench.cluster import slurm

        return slurm.launch(self, job_overrides, initial_job_idx)

    def __call__(self, *args: Any) -> JobReturn:  # in the Slurm task
        import submitit

        from aisp_bench.cluster import slurm

        run = super().__call__
        return slurm.in_task(lambda: run(*args), Path(submitit.JobEnvironment().paths.folder))


class RayLauncher(Launcher):
    """Each job as a Ray task with its own GPU (aisp_bench/cluster/ray.py)."""

    def __init__(self, **params: Any) -> None:
        self.params = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                       for k, v in params.items()}
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from aisp_bench.cluster import ray

        return ray.launch(self, job_overrides, initial_job_idx)


@dataclass
class AispSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.aisp_bench_launchers.launchers.SlurmLauncher"
    gpus_per_task: Any = "auto"  # auto: 1 where the jobs run on a GPU (not scale=smoke, not model.device=cpu)
    cpus_per_task: Any = "auto"  # auto: 8 for a GPU job, 1 for a CPU one (at most a node's)
    mem_gb: Any = "auto"  # auto: 64 for a GPU job, 4 for a CPU one (at most a node's)
    wait: bool = True  # false: return once submitted
    poll_s: float = 10.0  # how often the submitter looks at squeue


@dataclass
class AispRayConf:
    _target_: str = "hydra_plugins.aisp_bench_launchers.launchers.RayLauncher"
    address: Optional[str] = None  # None: Ray on this machine for this sweep; "auto" or host:port: a running cluster
    num_gpus: Any = "auto"  # per job; auto: 1 where the jobs run on a GPU and the cluster has GPUs, else 0
    num_cpus: float = 1.0  # per job
    init: Dict[str, Any] = field(default_factory=dict)  # more ray.init arguments, e.g. {num_cpus: 2}


ConfigStore.instance().store(group="hydra/launcher", name="aisp_slurm", node=AispSlurmConf, provider="aisp_bench")
ConfigStore.instance().store(group="hydra/launcher", name="aisp_ray", node=AispRayConf, provider="aisp_bench")
