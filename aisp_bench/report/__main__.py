"""``python -m aisp_bench.report [key=value ...]``: tables and figures rebuilt from the files on disk.

    python -m aisp_bench.report                                  # every target
    python -m aisp_bench.report target=table1 select.pair=llama3_8b__ultrarm select.dataset=shp
    python -m aisp_bench.report target=compare select.dataset=demo   # prints a method comparison
    python -m aisp_bench.report target=figure2 figure2.prompts=all   # Figure 2 over every prompt
    python -m aisp_bench.report target=budget                    # proxy and gold reward as the budget grows
    python -m aisp_bench.report target=compute 'compute.axes=[flops,depth]'   # the compute figure's x axes

The config is ``conf/report.yaml`` (``--help`` lists it). Tables go to ``<out>/tables/``,
figures to ``<out>/figures/``. A target whose inputs are missing is an error (exit 2);
with ``target=all`` it is skipped with a warning line, as long as some run is selected.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from aisp_bench.cli import UserError, launch, run_app, select_runs
from aisp_bench.config import CONF_DIR
from aisp_bench.results import Selection, runs_root
from aisp_bench.rundir import Run
from aisp_bench.validate import check

from .stats import Bootstrap

TARGETS = ("table1", "table2", "table3", "judge_bias", "figure2", "compute", "budget", "lambda_sweep", "sensitivity",
           "compare")


class NoInput(RuntimeError):
    """A target's inputs are not on disk."""


def build(target: str, cfg: DictConfig, runs: list[Run], select: Selection, boot: Bootstrap,
          bias: Callable[[], Any]) -> list[Path]:
    """Write one target from ``runs``; raise :class:`NoInput` when its inputs are missing.
    ``bias``: the judge bias of every comparison (computed once, for Tables 2-3 and its own table)."""
    from . import budget, costs, figures, judge_bias, sensitivity, table1, table1_extended, tables

    out = Path(cfg.out)
    what = f"under {runs_root(cfg.results_dir)}" + (f" for {select.describe()}" if select.describe() else "")
    if target == "table1":
        paths = table1.write_table1(_nonempty(table1.table1(runs), f"no run folders {what}"), out / "tables")
        return paths + table1_extended.write_table1_extended(table1_extended.table1_extended(runs, boot),
                                                             out / "tables", boot)
    if target in tables.TABLE_BASELINES:
        b = tables.TABLE_BASELINES[target]
        df = _nonempty(tables.winrate_table(cfg.results_dir, "aisp", b, select, boot),
                       f"no judge file aisp_vs_{b}.json {what}")
        return tables.write_winrate(df, out / "tables", target, boot=boot, extra_notes=judge_bias.bias_notes(bias(), b))
    if target == "judge_bias":
        df = _nonempty(bias(), f"no judge file aisp_vs_*.json {what}")
        print(judge_bias.render_bias(df, boot))
        return judge_bias.write_bias(df, out / "tables", boot)
    if target == "lambda_sweep":
        return tables.write_lambda_sweep(_nonempty(tables.lambda_sweep(runs), f"no AISP run folders {what}"),
                                         out / "tables")
    if target == "sensitivity":
        df = _nonempty(sensitivity.sensitivity_table(runs, boot),
                       f"no AISP run folders of experiment=sensitivity {what}")
        return sensitivity.write_sensitivity(df, out / "tables", out / "figures", boot)
    if target == "budget":
        df = _nonempty(budget.budget_table(runs, boot), f"no run folders with records {what}")
        return budget.write_budget(df, out / "tables", out / "figures", boot)
    if target == "compare":
        df = _nonempty(tables.compare(runs), f"no run folders with records {what}")
        print(tables.render_compare(df))
        return tables.write_compare(df, out / "tables")
    if target == "figure2":
        prompts = None if str(cfg.figure2.prompts) == "all" else int(cfg.figure2.prompts)
        paths = figures.write_figure2(runs, out / "figures", band=str(cfg.band), prompts=prompts,
                                      seed=int(cfg.figure2.seed))
    else:
        paths = figures.write_compute(runs, out / "figures", band=str(cfg.band), axes=_axes(cfg))
        paths += costs.write_compute_table(costs.compute_table(runs), out / "tables") if paths else []
    if not paths:
        raise NoInput(f"no {'AISP ' if target == 'figure2' else ''}run folders {what}")
    return paths


def _axes(cfg: DictConfig) -> list[str]:
    """``compute.axes``: the compute figure's x axes (one or a list; validate.check knows the names)."""
    axes = cfg.compute.axes
    return [str(a) for a in axes] if OmegaConf.is_list(axes) else [str(axes)]


def _nonempty(df, message: str):
    if df.empty:
        raise NoInput(message)
    return df


def main(cfg: DictConfig) -> int:
    from . import judge_bias, tables
    from .common import paper_order, unfinished_shards

    check(cfg)
    targets = list(cfg.target) if OmegaConf.is_list(cfg.target) else [str(cfg.target)]
    for t in targets:
        if t not in (*TARGETS, "all"):
            raise UserError(f"unknown target {t!r}; known: {', '.join((*TARGETS, 'all'))}")
    if "all" in targets:
        targets = list(TARGETS)
    boot = Bootstrap(int(cfg.bootstrap.resamples), int(cfg.bootstrap.seed), float(cfg.bootstrap.level))
    select = Selection.from_mapping(OmegaConf.to_container(cfg.select, resolve=True))
    runs = paper_order(select_runs(cfg, allow_none=set(targets) <= {"table2", "table3", "judge_bias"}))  # judge files only
    for note in unfinished_shards(runs):
        print(f"warning: {note}; read as an incomplete run", file=sys.stderr)
    bias = functools.cache(lambda: judge_bias.bias_table(cfg.results_dir, "aisp", list(tables.TABLE_BASELINES.values()),
                                                         select, boot))
    status = 0
    for t in targets:
        try:
            for p in build(t, cfg, runs, select, boot, bias):
                print(p)
        except NoInput as exc:
            print(f"{'warning: skipped ' + t if len(targets) > 1 else 'error'}: {exc}", file=sys.stderr)
            status = status if len(targets) > 1 else 2
        except (ValueError, OSError) as exc:
            print(f"error: {t}: {exc}", file=sys.stderr)
            status = 1
    return status


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
def app(cfg: DictConfig) -> None:
    run_app(main, cfg)


if __name__ == "__main__":
    launch(app, "report")
