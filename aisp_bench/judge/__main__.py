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

    # offline: a reward model judges (win rate under a held-out RM), no key or network needed;
    # judge_model in the output is rm:smollm2_judge (rm:NAME@tie=X with a tie margin)
    python -m aisp_bench.judge --runs-a ... --runs-b ... --local-reward-judge smollm2_judge [--tie-margin 0.1]

``--runs-a``/``--runs-b`` take run folders (``.../seed<k>``), folders above them, or
quoted globs; repeat the option to give several. Trial k pairs seed k of A with seed k
of B. Overrides are ``KEY=VALUE`` (or ``judge.KEY=VALUE``) for the keys of the judge
config (``--judge NAME`` picks ``conf/judge/NAME.yaml``; ``--judge-config FILE`` any
file); an unknown key is an error. ``--out`` replaces the default output path
``<results-dir>/judge/<dataset>/<model>__<reward>/<method_a>_vs_<method_b>.json``
(``--results-dir`` defaults to ``$AISP_BENCH_RESULTS`` or ``results``, as for runs).

``--local-reward-judge REWARD`` (a ``conf/reward`` name or a reward YAML path) judges with
a reward model instead (:mod:`aisp_bench.judge.rm_server`): the server starts in this
process on a free 127.0.0.1 port, only when some request is not cached (and within the
budget), and stops at the end; the judge config's ``model`` becomes ``rm:<name>`` (with
``@tie=<margin>`` for ``--tie-margin``), its ``base_url`` the server's, and the cache keys
hold ``local-reward-judge`` instead of the changing port, so re-runs hit the cache.
``OPENAI_API_KEY`` is set to a dummy value in this process's environment only if unset
(and removed again at the end). ``--reward-device`` places the reward model. The other
judge settings (``num_prompts``, ``trials``, ``mode``, ``cache_dir``, ...) apply as usual;
``model=``/``base_url=`` overrides are refused with it.

Exit codes: 0 done, 1 the judge failed (missing key, budget, API errors, a reward model
that cannot load), 2 bad arguments (no run folder, unknown config key or reward).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


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
    p.add_argument(
        "--local-reward-judge",
        default=None,
        metavar="REWARD",
        help="judge with this reward model (conf/reward name or YAML path) served in-process as model rm:REWARD",
    )
    p.add_argument(
        "--tie-margin",
        type=float,
        default=None,
        help="with --local-reward-judge: reward difference at or below which the verdict is a tie (default 0)",
    )
    p.add_argument("--reward-device", default=None, help="with --local-reward-judge: the reward model's device")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="judge config overrides")
    return p


PAIRWISE_TARGETS = ("aisp_bench.judge.client.PairwiseJudge", "aisp_bench.judge.PairwiseJudge")
LOCAL_JUDGE_TARGET = "aisp_bench.judge.rm_server.LocalRewardJudge"


def local_reward_judge(cfg: Any, overrides: Sequence[str], spec: str, tie_margin: float, device: str | None) -> Any:
    """(judge config pointed at a local reward-model server, the server, not yet started).

    Raises ``ValueError`` for a ``model``/``base_url`` override, a config that is not a
    ``PairwiseJudge``'s, a bad tie margin, or a reward config that cannot be built.
    """
    import math

    from aisp_bench.evaluate import load_reward_model
    from aisp_bench.judge.rm_server import RewardJudgeServer

    for o in overrides:
        key = o.split("=", 1)[0].removeprefix("judge.").removeprefix("+")
        if key in ("model", "base_url"):
            raise ValueError(f"--local-reward-judge sets model and base_url itself; drop the override {o!r}")
    if cfg.get("_target_") not in PAIRWISE_TARGETS:
        raise ValueError(f"--local-reward-judge needs a PairwiseJudge config, not _target_={cfg.get('_target_')!r}")
    if not math.isfinite(tie_margin) or tie_margin < 0:
        raise ValueError(f"--tie-margin must be a finite number >= 0, got {tie_margin!r}")
    reward, name = load_reward_model(spec, device=device)
    server = RewardJudgeServer(reward, name=name, tie_margin=tie_margin)
    cfg._target_ = LOCAL_JUDGE_TARGET
    cfg.model = server.model
    cfg.base_url = "http://127.0.0.1:0/v1"  # replaced by the server's address once it runs
    return cfg, server


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # KEY=VALUE may come between options
    from aisp_bench.judge.client import JudgeError, print_progress
    from aisp_bench.judge.winrate import run_comparison
    from aisp_bench.metrics.records import RunNotFoundError, find_run_dirs

    server = None
    try:
        if args.local_reward_judge is None:
            for flag, value in (("--tie-margin", args.tie_margin), ("--reward-device", args.reward_device)):
                if value is not None:
                    raise ValueError(f"{flag} needs --local-reward-judge")
        cfg = load_judge_config(args.judge, args.overrides, args.conf_dir, args.judge_config)
        if args.local_reward_judge is not None:
            tie = 0.0 if args.tie_margin is None else args.tie_margin
            cfg, server = local_reward_judge(cfg, args.overrides, args.local_reward_judge, tie, args.reward_device)
        judge = build_judge(cfg)
        runs_a = find_run_dirs(args.runs_a)
        runs_b = find_run_dirs(args.runs_b)
    except (RunNotFoundError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - e.g. an unknown override key (omegaconf)
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 2

    key_set = False
    try:
        if server is not None and not args.dry_run:
            # start (and load) the reward model only when something must be sent
            plan, _, _ = run_comparison(judge, runs_a, runs_b, out=args.out, results_dir=args.results_dir, dry_run=True)
            if 0 < plan.num_to_send <= plan.budget_left:
                try:
                    server.start()
                except Exception as e:  # noqa: BLE001 - the reward model cannot load, or no port
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    print(f"error: local reward judge {server.name}: {msg}", file=sys.stderr)
                    return 1
                judge.base_url = server.base_url
                if not os.environ.get("OPENAI_API_KEY"):
                    os.environ["OPENAI_API_KEY"] = "local-reward-judge"  # the server checks no key
                    key_set = True
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
    finally:
        if server is not None:
            server.close()
        if key_set:
            os.environ.pop("OPENAI_API_KEY", None)
    print(("dry run: " if args.dry_run else "") + plan.describe())
    if server is not None and not args.dry_run:
        print(
            f"local reward judge {server.model}: {server.requests_served} requests, {server.pairs_scored} pairs scored"
        )
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
