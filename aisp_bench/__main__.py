"""``python -m aisp_bench [overrides]``: run one configuration (or a sweep with ``-m``).

Examples::

    python -m aisp_bench                                   # offline default (SmolLM2, demo prompts)
    python -m aisp_bench method=aisp dataset=shp model=llama3_8b reward=ultrarm
    python -m aisp_bench -m method=aisp method.lam=0.1,0.3,0.7
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from aisp_bench.config import register_resolvers
from aisp_bench.registry import UnknownNameError
from aisp_bench.results import RunFolderError
from aisp_bench.run import UserError

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    from aisp_bench.run import run

    try:
        run(cfg)
    except (UserError, UnknownNameError, RunFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
