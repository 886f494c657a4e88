"""The layout is the architecture: layers, imports between them, and module and function sizes.

Layers, lowest first; a module may import from its own layer and the ones below, never
from a higher one:

0. ``types``, ``registry``, ``seeding``, ``config``, ``validate``: plain values, names, seeds, config paths and checks
1. ``engine``, ``shared_prefix``, ``rewards``, ``data``, ``models``: models and data
2. ``methods``, ``metrics``: algorithms on the engine and reward interfaces, metrics on records
3. ``rundir``, ``results``, ``runlock``: one run folder (files, records, run identity, prompt
   shards), the results tree (selection, judge files), the run-folder lock
4. ``cli``: the front door shared by the commands
5. ``cluster``: the launchers of sweeps (Slurm, Ray), on the front door's errors and lines
6. the commands ``run`` (with ``__main__``), ``evaluate``, ``judge``, ``report``, ``plan``: none
   imports another (the judge does not import the evaluate command line)

Only the layers from ``config`` and ``cli`` up may import Hydra or OmegaConf: methods,
rewards, data and metrics never see the config.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aisp_bench"
LAYERS = [
    {"types", "registry", "seeding", "config", "validate"},
    {"engine", "shared_prefix", "rewards", "data", "models"},
    {"methods", "metrics"},
    {"rundir", "results", "runlock"},
    {"cli"},
    {"cluster"},
    {"run", "evaluate", "judge", "report", "plan"},
]
COMMANDS = LAYERS[-1]
CONFIG_FREE = LAYERS[1] | LAYERS[2] | LAYERS[3] | {"types", "registry", "seeding"}
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


def violations(text: str, rel: Path) -> list[str]:
    """What a module at ``rel`` (below aisp_bench/) imports against the layer rules."""
    here, out = component(rel), []
    if here == "__init__":
        return out
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
