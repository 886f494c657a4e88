"""The front door shared by the four commands: run, evaluate, judge and report.

Each is a Hydra app on a primary config in ``aisp_bench/conf`` (``config.yaml``,
``evaluate.yaml``, ``judge.yaml``, ``report.yaml``), so they share the override syntax
(``key=value``, ``group=option``, ``--help``), ``results_dir`` and, for the three that
read runs, the ``select`` block (``conf/app.yaml``). Models are chosen through the
config groups (``reward=ultrarm``) and built with ``instantiate_node``. Bad input ends a
command with one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from aisp_bench.registry import UnknownNameError
from aisp_bench.results import Selection, discover_runs, runs_root
from aisp_bench.rundir import Run, RunFolderError


class UserError(Exception):
    """A bad input; reported as one line on stderr with exit code 2."""


BAD_INPUT = (UserError, UnknownNameError, RunFolderError)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, else its type's name."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run_app(main: Callable[[DictConfig], int | None], cfg: DictConfig) -> None:
    """Call a command's ``main(cfg)``; bad input: one ``error:`` line, exit 2; other codes: exit with them.

    Warnings are printed as one ``warning:`` line each.
    """
    warnings.formatwarning = lambda msg, *args, **kw: f"warning: {msg}\n"
    try:
        code = main(cfg)
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    if code:
        sys.exit(code)


def instantiate_node(node: DictConfig, what: str) -> Any:
    """``hydra.utils.instantiate(node)``; a constructor's refusal becomes a one-line ``UserError``."""
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except Exception as e:  # Hydra wraps constructor errors; show the cause in one line
        cause: BaseException = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise UserError(f"{what}: {first_line(cause)}") from None


def select_runs(cfg: DictConfig) -> list[Run]:
    """The runs under ``cfg.results_dir`` that ``cfg.select`` picks; none is a ``UserError``."""
    select = Selection.from_mapping(OmegaConf.to_container(cfg.select, resolve=True))
    runs = discover_runs(cfg.results_dir, select)
    if not runs:
        where = f" for {select.describe()}" if select.describe() else ""
        raise UserError(f"no run folders under {runs_root(cfg.results_dir)}{where}")
    return runs
