"""What the launchers share.

* In a job (a Slurm task, a Ray task): ``run_task`` runs Hydra's job and turns how it ended
  into an ``Outcome``: its exit code (0 done, 2 refused: bad input or a held ``run.lock``,
  143 stopped by a SIGTERM, else failed) and its last ``error:``/``stopped:`` line.
* Before submitting: ``sample_configs`` composes the sweep's distinct jobs (shards and seeds
  aside) and ``runs_on_gpu`` says whether one needs a GPU.
* After: ``finish`` logs the tally and prints one line per failed job (its line and its log),
  then exits 2 when every failure was a refusal, else 1.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from aisp_bench.cli import ARGV_ENV, Exit, first_line

log = logging.getLogger("aisp_bench.cluster")
OUTCOME = "outcome.json"  # a Slurm task's, in its log folder
PER_RUN_KEYS = ("dataset.shard", "seed")  # jobs that differ only in these need the same resources


@dataclass
class Outcome:
    """How a job ended: ``code`` 0 done, 2 refused, 143 stopped by SIGTERM, else failed; ``line``: why."""

    code: int
    line: str = ""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Outcome | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(int(data["code"]), str(data.get("line", "")))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def run_task(call: Callable[[], Any]) -> tuple[Any, Outcome]:
    """(Hydra's ``JobReturn`` or None, the ``Outcome``) of ``call()``, which runs one job."""
    from hydra.core.utils import JobStatus

    try:
        ret = call()
    except Exit as e:  # the command's own error: or stopped: line
        return None, Outcome(int(e.code), e.line)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        return None, Outcome(code, f"exited with code {code}")
    if ret.status == JobStatus.FAILED:
        err = ret._return_value
        print("".join(traceback.format_exception(type(err), err, err.__traceback__)), file=sys.stderr, flush=True)
        return None, Outcome(1, f"error: {type(err).__name__}: {first_line(err)}")
    return ret, Outcome(0)


def command_env() -> dict[str, str]:
    """The environment a launcher gives its jobs: the command line that submitted them (the manifest's)."""
    return {ARGV_ENV: json.dumps(sys.argv)}


def sample_configs(launcher: Any, job_overrides: Sequence[Sequence[str]]) -> list[DictConfig]:
    """The composed configs of the sweep's distinct jobs, ``PER_RUN_KEYS`` aside (one per run kind)."""
    seen: dict[tuple[str, ...], list[str]] = {}
    for overrides in job_overrides:
        key = tuple(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in PER_RUN_KEYS)
        seen.setdefault(key, list(overrides))
    loader = launcher.hydra_context.config_loader
    return [loader.load_sweep_config(launcher.config, overrides) for overrides in seen.values()]


def runs_on_gpu(cfg: DictConfig) -> bool:
    """A job wants a GPU unless it runs at ``scale=smoke`` or with ``model.device=cpu`` (and a
    reward model not placed on CUDA)."""
    scale = OmegaConf.select(cfg, "hydra.runtime.choices.scale")
    model, reward = str(cfg.model.get("device") or "auto"), str(cfg.reward.get("device") or "auto")
    return scale != "smoke" and (not model.startswith("cpu") or reward.startswith("cuda"))


def describe(overrides: Sequence[str]) -> str:
    """A job as its overrides (Hydra's own left out)."""
    from hydra.core.utils import filter_overrides

    return " ".join(filter_overrides(list(overrides))) or "(no overrides)"


def finish(ended: Sequence[tuple[str, Outcome, str]], what: str) -> None:
    """Tally ``(job, outcome, log)``; with failures, one line each on stderr, then ``Exit`` (2 when
    every failure was a refusal, else 1)."""
    failed = [(job, out, where) for job, out, where in ended if out.code]
    log.info("%s: %d of %d jobs done, %d failed", what, len(ended) - len(failed), len(ended), len(failed))
    if not failed:
        return
    for job, out, where in failed:
        line = out.line.removeprefix("error: ") or f"exited with code {out.code}"
        print(f"error: job {job}: {line} (log: {where})", file=sys.stderr)
    last = (f"error: {len(failed)} of {len(ended)} jobs failed; rerun the same command to run them again "
            "(finished runs and prompts are skipped)")
    print(last, file=sys.stderr, flush=True)
    raise Exit(2 if all(o.code == 2 for _, o, _ in failed) else 1, last)


def set_job_number(cfg: DictConfig, num: int, job_id: str) -> None:
    """Hydra's ``hydra.job.num`` and ``hydra.job.id`` of one job of the sweep."""
    from omegaconf import open_dict

    with open_dict(cfg.hydra.job):
        cfg.hydra.job.num, cfg.hydra.job.id = num, job_id
