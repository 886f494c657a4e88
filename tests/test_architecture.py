"""The layout is the architecture: layers, imports between them, and module and function sizes.

Layers, lowest first; a module may import from its own layer and the ones below, never
from a higher one:

0. ``types``, ``registry``, ``seeding``, ``config``, ``validate``: plain values, names, seeds, config paths and checks
1. ``engine``, ``data``, ``models``: the policy's decode loop, data, model loading
2. ``prefix_scoring``: given responses scored against their prompt's KV (rewards, base_logprob)
3. ``rewards``: the reward models
4. ``methods``, ``metrics``: algorithms on the engine and reward interfaces, metrics on records
5. ``rundir``, ``results``, ``runlock``: one run folder (files, records, run identity, prompt
   shards), the results tree (selection, judge files), the run-folder lock
6. ``cli``: the front door shared by the commands
7. ``cluster``: the launchers of sweeps (Slurm, Ray), on the front door's errors and lines
8. the commands ``run`` (with ``__main__``), ``evaluate``, ``judge``, ``report``, ``plan``: none
   imports another (the judge does not import the evaluate command line)

Only the layers from ``config`` and ``cli`` up may import Hydra or OmegaConf: methods,
rewards, data and metrics never see the config. Only ``engine`` and ``prefix_scoring``
touch KV caches and the decode path's internals (``transformers``' cache classes and
attention registry, ``engine.attention`` but for ``supported``, ``engine.steps``,
``engine.chunk``). Methods import no model code: they reach the policy through the engine
and the reward through ``reward.score``, objects they are handed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aisp_bench"
LAYERS = [
    {"types", "registry", "seeding", "config", "validate"},
    {"engine", "data", "models"},
    {"prefix_scoring"},
    {"rewards"},
    {"methods", "metrics"},
    {"rundir", "results", "runlock"},
    {"cli"},
    {"cluster"},
    {"eval_cache"},
    {"run", "evaluate", "judge", "report", "plan"},
]
COMMANDS = LAYERS[-1]
CONFIG_FREE = set().union(*LAYERS[1:6]) | {"types", "registry", "seeding"}
KV_USERS = {"engine", "prefix_scoring"}
KV_MODULES = ("transformers.cache_utils", "aisp_bench.engine.steps", "aisp_bench.engine.chunk",
              "aisp_bench.engine.attention")
KV_NAMES = ("transformers.DynamicCache", "transformers.AttentionInterface")
KV_PUBLIC = ("aisp_bench.engine.attention.supported",)  # whether a model can share its prompt KV
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 60
MODULES = sorted(PACKAGE.rglob("*.py"))


def component(rel: Path) -> str:
    """``judge/client.py`` -> ``judge``; ``__main__.py`` is the run command."""
    part = rel.parts[0].removesuffix(".py")
    return "run" if part == "__main__" else part


def layer(name: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if name in names)


def imports(text: str, rel: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module at ``rel``, relative ones resolved."""
    package = ["aisp_bench", *rel.parent.parts]
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level else node.module
            out += [(node.lineno, base.rstrip("."))] + [(node.lineno, f"{base.rstrip('.')}.{a.name}") for a in node.names]
    return out


def imported_names(text: str, rel: Path) -> list[tuple[int, str]]:
    """(line, what is imported): a module for ``import m``, ``m.name`` for ``from m import name``."""
    return [(line, name) for line, name in imports(text, rel)
            if not any(other.startswith(name + ".") and ln == line for ln, other in imports(text, rel))]


def touches_kv(name: str) -> bool:
    """Whether an imported name is a KV cache or a decode-path internal (see the module docstring)."""
    if name in KV_PUBLIC:
        return False
    return name in KV_NAMES or any(name == m or name.startswith(m + ".") for m in KV_MODULES)


def violations(text: str, rel: Path) -> list[str]:
    """What a module at ``rel`` (below aisp_bench/) imports against the layer rules."""
    here, out = component(rel), []
    if here == "__init__":
        return out
    for line, name in imported_names(text, rel):
        if touches_kv(name) and here not in KV_USERS:
            out.append(f"{rel}:{line} imports {name}: only the engine and prefix_scoring touch KV caches")
        if here == "methods" and (name.split(".")[0] == "transformers"
                                  or name.startswith(("aisp_bench.models", "aisp_bench.engine", "aisp_bench.rewards"))):
            out.append(f"{rel}:{line} imports {name}: methods reach models only through the objects they are given")
    for line, name in imports(text, rel):
        parts = name.split(".")
        if parts[0] in ("hydra", "omegaconf") and here in CONFIG_FREE:
            out.append(f"{rel}:{line} imports {name}: only config, the front door and the commands see Hydra")
        if parts[0] != "aisp_bench" or len(parts) < 2:
            continue
        there = component(Path(parts[1]))
        if there not in set().union(*LAYERS):
            continue  # a name imported from the package's __init__
        if layer(there) > layer(here):
            out.append(f"{rel}:{line} imports {name} from a higher layer")
        elif here in COMMANDS and there in COMMANDS and there != here:
            out.append(f"{rel}:{line}: the {here} command imports the {there} command")
    return out


def test_every_module_has_a_layer():
    assert {component(p.relative_to(PACKAGE)) for p in MODULES} - {"__init__"} <= set().union(*LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_layers(path):
    assert violations(path.read_text(), path.relative_to(PACKAGE)) == []


def test_the_layer_check_can_fail():
    assert violations("from ..rundir import read_records\n", Path("methods/aisp.py")) == [
        "methods/aisp.py:1 imports aisp_bench.rundir from a higher layer",
        "methods/aisp.py:1 imports aisp_bench.rundir.read_records from a higher layer"]
    assert violations("def f():\n    from aisp_bench.evaluate import main\n", Path("judge/winrate.py")) == [
        "judge/winrate.py:2: the judge command imports the evaluate command",
        "judge/winrate.py:2: the judge command imports the evaluate command"]
    assert violations("import omegaconf\n", Path("rewards/base.py"))[0].endswith("see Hydra")
    assert violations("from aisp_bench import run\n", Path("cli.py")) == [
        "cli.py:1 imports aisp_bench.run from a higher layer"]
    assert violations("from . import figures\nfrom aisp_bench.rundir import Run\n", Path("report/x.py")) == []
    assert violations("from transformers import DynamicCache\n", Path("rewards/base.py")) == [
        "rewards/base.py:1 imports transformers.DynamicCache: only the engine and prefix_scoring touch KV caches"]
    assert violations("from aisp_bench.engine import attention\n", Path("rewards/x.py"))[0].endswith("KV caches")
    assert violations("from aisp_bench.engine.attention import supported\n", Path("rewards/x.py")) == []
    assert violations("from aisp_bench.engine.steps import CopyStep\n", Path("prefix_scoring.py")) == []
    assert violations("from aisp_bench.models.policy import Policy\n", Path("methods/aisp.py")) == [
        "methods/aisp.py:1 imports aisp_bench.models.policy.Policy: methods reach models only through the objects "
        "they are given"]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_function_sizes(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: {len(text.splitlines())} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"
