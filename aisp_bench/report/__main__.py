"""Command line: rebuild tables and figures from the run folders on disk.

    python -m aisp_bench.report all --results results --out results
    python -m aisp_bench.report table1 --pair llama3_8b__ultrarm --dataset shp
    python -m aisp_bench.report compare --dataset demo     # prints a method comparison

Tables go to ``<out>/tables/``, figures to ``<out>/figures/``. A single target whose
inputs are missing exits non-zero with a one-line error; ``all`` needs run folders and
skips (with a warning line) targets whose other inputs (judge files, AISP runs) are
missing.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import figures, tables
from .io import discover_runs, runs_root

TARGETS = ("table1", "table2", "table3", "figure2", "compute", "lambda_sweep", "compare")


class NoInput(RuntimeError):
    """A target's inputs are not on disk."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aisp_bench.report", description=__doc__.splitlines()[0])
    p.add_argument("target", choices=TARGETS + ("all",))
    p.add_argument("--results", default="results", help="results root holding runs/ and judge/ (default: results)")
    p.add_argument("--out", default=None, help="output root for tables/ and figures/ (default: --results)")
    p.add_argument("--dataset", action="append", help="keep only this dataset (repeatable)")
    p.add_argument("--pair", action="append", help="keep only this <model>__<reward> pair (repeatable)")
    p.add_argument("--method", action="append", help="keep only this method (repeatable)")
    p.add_argument("--variant", action="append",
                   help="keep only this override dirname (repeatable; default per cell: 'default', "
                        "else the variant with most seeds)")
    p.add_argument("--band", choices=("auto", "seeds", "prompts"), default="auto", help="figure band")
    return p


def _filters(a: argparse.Namespace) -> str:
    parts = [f"--{k} {','.join(v)}" for k, v in (("dataset", a.dataset), ("pair", a.pair), ("method", a.method),
                                                  ("variant", a.variant)) if v]
    return f" (filters: {' '.join(parts)})" if parts else ""


def run_target(target: str, a: argparse.Namespace, runs: list | None = None) -> list[Path]:
    """Build one target from ``runs`` (discovered with the filters when None); raise
    :class:`NoInput` when its inputs are missing."""
    if runs is None:
        runs = discover_runs(a.results, datasets=a.dataset, pairs=a.pair, methods=a.method, variants=a.variant)
    out = Path(a.out or a.results)
    tdir, fdir = out / "tables", out / "figures"
    if target == "table1":
        df = tables.table1(a.results, runs=runs)
        if df.empty:
            raise NoInput(f"no run folders found under {runs_root(a.results)}{_filters(a)}")
        return tables.write_table1(df, tdir)
    if target in ("table2", "table3"):
        df = (tables.table2 if target == "table2" else tables.table3)(a.results, datasets=a.dataset, pairs=a.pair)
        if df.empty:
            b = "bon_topp" if target == "table2" else "bon_gaussian"
            raise NoInput(f"no judge file aisp_vs_{b}.json under {Path(a.results) / 'judge'}{_filters(a)}")
        return tables.write_winrate(df, tdir, target)
    if target == "lambda_sweep":
        df = tables.lambda_sweep(a.results, runs=runs)
        if df.empty:
            raise NoInput(f"no AISP run folders found under {runs_root(a.results)}{_filters(a)}")
        return tables.write_lambda_sweep(df, tdir)
    if target == "compare":
        df = tables.compare(a.results, runs=runs)
        if df.empty:
            raise NoInput(f"no run folders with records under {runs_root(a.results)}{_filters(a)}")
        print(tables.render_compare(df))
        return tables.write_compare(df, tdir)
    if target == "figure2":
        paths = figures.write_figure2(a.results, fdir, datasets=a.dataset, band=a.band, runs=runs)
        if not paths:
            raise NoInput(f"no AISP run folders found under {runs_root(a.results)}{_filters(a)}")
        return paths
    if target == "compute":
        paths = figures.write_compute(a.results, fdir, datasets=a.dataset, band=a.band, runs=runs)
        if not paths:
            raise NoInput(f"no run folders found under {runs_root(a.results)}{_filters(a)}")
        return paths
    raise ValueError(target)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *args, **kw: f"warning: {msg}\n"
    runs = discover_runs(a.results, datasets=a.dataset, pairs=a.pair, methods=a.method, variants=a.variant)
    if not runs and a.target not in ("table2", "table3"):
        print(f"error: no run folders found under {runs_root(a.results)}{_filters(a)}", file=sys.stderr)
        return 2
    targets = TARGETS if a.target == "all" else (a.target,)
    status = 0
    for t in targets:
        try:
            for p in run_target(t, a, runs):
                print(p)
        except NoInput as exc:
            if a.target == "all":
                print(f"warning: skipped {t}: {exc}", file=sys.stderr)
            else:
                print(f"error: {exc}", file=sys.stderr)
                status = 2
        except (ValueError, OSError) as exc:
            print(f"error: {t}: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
