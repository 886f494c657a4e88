"""Command line for pairwise win rates: ``python -m aisp_bench.judge``.

Usage::

    # what it would cost: distinct requests, cached, to send, estimated tokens; sends nothing
    python -m aisp_bench.judge \\
        --runs-a 'results/runs/shp/llama3_8b__ultrarm/aisp/default/seed*' \\
        --runs-b 'results/runs/shp/llama3_8b__ultrarm/bon_topp/default/seed*' --dry-run

    # judge (OPENAI_API_KEY must be set); writes
    # results/judge/shp/llama3_8b__ultrarm/aisp_vs_bon_topp.json
    python -m aisp_bench.judge --runs-a '...aisp/default/seed*' --runs-b '...bon_topp/default/seed*'

    # any OpenAI-compatible server, other settings: KEY=VALUE overrides of conf/judge/gpt4.yaml
    python -m aisp_bench.judge --runs-a ... --runs-b ... \\
        base_url=http://127.0.0.1:8000/v1 model=Qwen2.5-7B-Instruct mode=random_order

``--runs-a``/``--runs-b`` take run folders (``.../seed<k>``), folders above them, or
quoted globs; repeat the option to give several. Trial k pairs seed k of A with seed k
of B. Overrides are ``KEY=VALUE`` (or ``judge.KEY=VALUE``) for the keys of the judge
config (``--judge NAME`` picks ``conf/judge/NAME.yaml``; ``--judge-config FILE`` any
file); an unknown key is an error. ``--out`` replaces the default output path
``<results-dir>/judge/<dataset>/<model>__<reward>/<method_a>_vs_<method_b>.json``
(``--results-dir`` defaults to ``$AISP_BENCH_RESULTS`` or ``results``, as for runs).

Exit codes: 0 done, 1 the judge failed (missing key, budget, API errors), 2 bad
arguments (no run folder, unknown config key).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def load_judge_config(
    name: str = "gpt4", overrides: Sequence[str] = (), conf_dir: str | Path | None = None, path: str | None = None
) -> Any:
    """The judge config (an OmegaConf node with ``_target_``), with ``KEY=VALUE`` overrides."""
    from omegaconf import OmegaConf

    if path is None:
        base = Path(conf_dir) if conf_dir is not None else CONF_DIR
        if not base.is_dir():
            base = Path.cwd() / "conf"
        path = str(base / "judge" / f"{name}.yaml")
    if not Path(path).is_file():
        raise FileNotFoundError(f"judge config not found: {path}")
    cfg = OmegaConf.load(path)
    dotlist = []
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} is not KEY=VALUE")
        key, value = o.split("=", 1)
        key = key.removeprefix("judge.").removeprefix("+")
        dotlist.append(f"{key}={value}")
    OmegaConf.set_struct(cfg, True)  # an unknown key is an error, not a silent new setting
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))


def build_judge(cfg: Any) -> Any:
    from hydra.utils import instantiate

    return instantiate(cfg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aisp_bench.judge", description="Pairwise LLM-judge win rates (A vs B).")
    p.add_argument(
        "--runs-a", action="append", required=True, metavar="RUNS", help="method A's seed runs (glob/folder)"
    )
    p.add_argument(
        "--runs-b", action="append", required=True, metavar="RUNS", help="method B's seed runs (glob/folder)"
    )
    p.add_argument("--judge", default="gpt4", help="judge config name under conf/judge (default gpt4)")
    p.add_argument("--judge-config", default=None, help="path of a judge config YAML (overrides --judge)")
    p.add_argument("--conf-dir", default=None, help="the config folder (default: the repository's conf/)")
    p.add_argument(
        "--results-dir",
        default=os.environ.get("AISP_BENCH_RESULTS", "results"),
        help="root of the default output path (default: $AISP_BENCH_RESULTS or results)",
    )
    p.add_argument("--out", default=None, help="output JSON path (default under <results-dir>/judge/...)")
    p.add_argument("--dry-run", action="store_true", help="print the number of requests and tokens; send nothing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="judge config overrides")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from aisp_bench.judge.client import JudgeError, print_progress
    from aisp_bench.judge.winrate import run_comparison
    from aisp_bench.metrics.records import RunNotFoundError, find_run_dirs

    try:
        cfg = load_judge_config(args.judge, args.overrides, args.conf_dir, args.judge_config)
        judge = build_judge(cfg)
        runs_a = find_run_dirs(args.runs_a)
        runs_b = find_run_dirs(args.runs_b)
    except (RunNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - e.g. an unknown override key (omegaconf)
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 2

    try:
        plan, result, out = run_comparison(
            judge,
            runs_a,
            runs_b,
            out=args.out,
            results_dir=args.results_dir,
            dry_run=args.dry_run,
            progress=print_progress,
        )
    except (JudgeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(("dry run: " if args.dry_run else "") + plan.describe())
    if result is None:
        print(f"would write {out}")
        return 0
    m = result["mean"]
    fmt = lambda x: "n/a" if x is None else f"{x:.1f}%"  # noqa: E731
    print(
        f"{result['method_a']} vs {result['method_b']} ({result['mode']}, {len(result['trials'])} trial(s)): "
        f"win {fmt(m['win'])}, draw {fmt(m['draw'])}, loss {fmt(m['loss'])}, invalid {fmt(m['invalid'])} -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
