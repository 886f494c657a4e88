"""``python -m aisp_bench [overrides]``: run one configuration (or a sweep with ``-m``).

Examples::

    python -m aisp_bench                                   # offline default (SmolLM2, demo prompts)
    python -m aisp_bench method=aisp dataset=shp model=llama3_8b reward=ultrarm
    python -m aisp_bench -m method=aisp method.lam=0.1,0.3,0.7
    python -m aisp_bench --help                            # every option
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from aisp_bench.cli import launch, run_app
from aisp_bench.config import CONF_DIR


def _run(cfg: DictConfig) -> None:
    from aisp_bench.run import run

    run(cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> None:
    run_app(_run, cfg)


def main() -> None:
    """``python -m aisp_bench`` and the ``aisp-bench`` script: the pre-flight check, then the Hydra app."""
    launch(app, "config")


if __name__ == "__main__":
    main()
