"""``python -m aisp_bench.judge [key=value ...]``: pairwise win rates (Tables 2-3).

The config is ``conf/judge.yaml`` (``--help`` lists it, with examples): ``results_dir`` and
``select`` pick the runs, ``method_a``/``method_b`` the methods, ``mode``/``num_prompts``/
``trials``/``sample_seed`` what to ask (:mod:`aisp_bench.judge.winrate`), the ``judge``
group who answers (``gpt4``: any OpenAI-compatible server, ``OPENAI_API_KEY``;
``reward_model``: a reward model in process, offline). ``dry_run=true`` prints what it
would cost and sends nothing. Exit codes: 0 done, 1 the judge failed (missing key,
budget, API errors, a reward model that cannot load), 2 bad input.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from aisp_bench.cli import instantiate_node, launch, run_app, select_runs
from aisp_bench.config import CONF_DIR
from aisp_bench.validate import check


def main(cfg: DictConfig) -> int:
    from aisp_bench.judge.base import JudgeError
    from aisp_bench.judge.client import print_progress
    from aisp_bench.judge.winrate import Protocol, build_comparison, find_comparisons, run_comparisons

    check(cfg)
    runs = select_runs(cfg)
    protocol = Protocol(cfg.mode, cfg.num_prompts, cfg.trials, cfg.sample_seed)
    methods_b = [str(m) for m in (cfg.method_b if OmegaConf.is_list(cfg.method_b) else [cfg.method_b])]
    comps = [build_comparison(protocol, a, b, cfg.results_dir)
             for a, b in find_comparisons(runs, str(cfg.method_a), methods_b)]
    judge = instantiate_node(cfg.judge, "judge")
    try:
        plan, results = run_comparisons(judge, protocol, comps, dry_run=cfg.dry_run, progress=print_progress)
    except JudgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(("dry run: " if cfg.dry_run else "") + plan.describe())
    if cfg.dry_run:
        print("\n".join(f"would write {comp.out}" for comp in comps))
        return 0
    fmt = lambda x: "n/a" if x is None else f"{x:.1f}%"  # noqa: E731
    for comp, res in zip(comps, results, strict=True):
        m = res["mean"]
        print(f"{res['dataset']}: {res['method_a']} vs {res['method_b']} ({res['mode']}, {len(res['trials'])} "
              f"trial(s)): win {fmt(m['win'])}, draw {fmt(m['draw'])}, loss {fmt(m['loss'])}, "
              f"invalid {fmt(m['invalid'])} -> {comp.out}")
    return 0


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="judge")
def app(cfg: DictConfig) -> None:
    run_app(main, cfg)


if __name__ == "__main__":
    launch(app, "judge")
