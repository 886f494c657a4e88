"""OmegaConf resolvers used by ``conf/`` (registered before any config is composed)."""

from __future__ import annotations

from omegaconf import OmegaConf


def run_segment(experiment_name: str | None, override_dirname: str) -> str:
    """Run-folder segment: the experiment name and the command-line overrides.

    ``table1`` + ``method.lam=0.3`` -> ``table1,method.lam=0.3``; nothing -> ``default``.
    """
    parts = [p for p in (experiment_name or "", override_dirname.replace("/", "_")) if p]
    return ",".join(parts) or "default"


def _mul(a, b) -> int:
    return int(a) * int(b)


def _scale(x, factor) -> float:
    return float(x) * float(factor)


def register_resolvers() -> None:
    for name, fn in (("aisp_run_segment", run_segment), ("aisp_mul", _mul), ("aisp_scale", _scale)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
