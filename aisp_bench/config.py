"""Where the configs are, the keys that do not change results, and the OmegaConf resolvers of ``conf/``.

Resolvers are registered on import, before any config is composed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # shipped in the wheel: every app's config_path

# The tuning block (conf/engine.yaml): how the engine and the reward scorer compute, never what.
ENGINE_KEYS: tuple[str, ...] = (
    "engine.decode_step", "engine.attention", "engine.sync_every", "engine.reward_attention",
)  # fmt: skip
# Where those settings were before they moved to the tuning block: the manifests of older runs
# hold them (and resume: they are non-semantic); an override naming one is refused with its
# new name (``cli.preflight``).
MOVED_KEYS: dict[str, str] = {
    "generation.decode_step": "engine.decode_step", "generation.attention": "engine.attention",
    "generation.sync_every": "engine.sync_every", "reward.shared_attention": "engine.reward_attention",
    "reward.share_prefix": "engine.reward_attention",  # false: engine.reward_attention=full
}  # fmt: skip
# Keys that do not change what a run computes: a resumed run may differ in them, and they
# are not part of the run folder name. (``judge``: manifests of older versions hold one.)
# The prompt shard keys pick which prompts a job runs, not what they give: the shards of a
# run share its folder (``<run_dir>/shards/<i>-of-<K>``) and its config.
NON_SEMANTIC: tuple[str, ...] = (
    "overwrite", "results_dir", "run_dir", "progress", "batch_prompts", "generation.batch_rows",
    "model.device", "model.device_map", "model.attn_implementation", "reward.device", "reward.batch_size",
    "reward.max_batch_tokens", "engine", *ENGINE_KEYS, *MOVED_KEYS,
    "experiment_name", "judge", "dataset.num_shards", "dataset.shard",
)  # fmt: skip
# Keys left out of the run folder's variant name besides those: already in its path, or a path.
FOLDER_KEYS: tuple[str, ...] = (
    "method", "model", "reward", "dataset", "seed", "experiment", "scale", "dataset.path", "hydra.verbose",
)  # fmt: skip


def semantic_config(cfg: dict) -> dict:
    """A resolved config (a plain dict, as in ``manifest.json``) without the ``NON_SEMANTIC`` keys."""
    c = copy.deepcopy(cfg)
    for key in NON_SEMANTIC:
        parent, _, leaf = key.rpartition(".")
        node = get_path(c, parent) if parent else c
        if isinstance(node, dict):
            node.pop(leaf, None)
    return c


def get_path(obj: Any, dotted: str, default: Any = None) -> Any:
    """``obj['a']['b']`` for ``'a.b'``, or ``default`` where a key is missing."""
    cur = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``["method.lam: 0.7 -> 0.3", ...]``: where two plain configs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += config_diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def run_segment(experiment_name: str | None, override_dirname: str) -> str:
    """Run-folder segment: the experiment name and the command-line overrides.

    ``table1`` + ``method.lam=0.3`` -> ``table1,method.lam=0.3``; nothing -> ``default``.
    """
    parts = [p for p in (experiment_name or "", override_dirname.replace("/", "_")) if p]
    return ",".join(parts) or "default"


def _div(total, n) -> int:
    """κ = total / n for a budget n·κ held fixed (``experiment=sensitivity``); n must divide it."""
    total, n = int(total), int(n)
    if n < 1 or total < n or total % n:
        raise ValueError(f"the fixed budget n·κ = {total} is not a multiple of n = {n}")
    return total // n


def register_resolvers() -> None:
    for name, fn in (("aisp_run_segment", run_segment), ("aisp_mul", lambda a, b: int(a) * int(b)),
                     ("aisp_scale", lambda x, factor: float(x) * float(factor)), ("aisp_div", _div),
                     # a token count as a fraction of another, at least 1 (decision points every T/4 tokens)
                     ("aisp_floordiv", lambda a, b: max(1, int(a) // int(b))),
                     # hydra.job.config.override_dirname.exclude_keys (conf/hydra/default.yaml)
                     ("aisp_variant_exclude_keys", lambda: [*FOLDER_KEYS, *NON_SEMANTIC])):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()
