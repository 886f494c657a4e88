"""``pip install .`` works: the built wheel carries its configs and runs from anywhere.

The wheel is built from a copy of the package's files, installed into a fresh virtual
environment outside the source tree (its dependencies come from this environment's
site-packages through a ``.pth`` file, which does not activate this environment's
editable install), and the commands run from a folder outside the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from proc import run_tree

ROOT = Path(__file__).resolve().parents[1]


def _ok(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, (out.args, out.stdout[-2000:], out.stderr[-3000:])
    return out.stdout


@pytest.mark.slow
def test_wheel_installs_and_runs_a_tiny_demo_outside_the_source_tree(tmp_path):
    src = tmp_path / "src"
    for package in ("aisp_bench", "hydra_plugins"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    _ok(run_tree([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(tmp_path / "dist"), str(src)], timeout=300))
    [wheel] = (tmp_path / "dist").glob("aisp_bench-*.whl")

    venv = tmp_path / "venv"
    _ok(run_tree([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120))
    python = venv / "bin" / "python"
    _ok(run_tree([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                 timeout=300))
    site = Path(_ok(run_tree([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             timeout=60)).strip())
    (site / "_aisp_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["AISP_BENCH_RESULTS"] = str(tmp_path / "results")
    where = _ok(run_tree([str(python), "-c", "import aisp_bench; print(aisp_bench.__file__)"], cwd=work, env=env,
                         timeout=60))
    assert Path(where.strip()).is_relative_to(site), where  # the wheel, not the source tree

    tiny = ["budget.n=1", "budget.kappa=1", "budget.tau=2", "generation.max_new_tokens=4", "dataset.num_prompts=1"]
    _ok(run_tree([str(python), "-m", "aisp_bench", "experiment=demo", "method=aisp", "progress=false", *tiny],
                 cwd=work, env=env, timeout=600))
    run_dir = tmp_path / "results" / "runs" / "demo" / "smollm2_135m__smollm2_judge" / "aisp"
    [records] = run_dir.glob("demo,*/seed0/records.jsonl")
    assert records.read_text().count("\n") == 1
    table = _ok(run_tree([str(python), "-m", "aisp_bench.report", "target=compare", "select.dataset=demo"],
                         cwd=work, env=env, timeout=120))
    assert "| AISP" in table and "demo," in table
    assert "select:" in _ok(run_tree([str(python), "-m", "aisp_bench.evaluate", "--help"], cwd=work, env=env,
                                     timeout=60))
    launcher = _ok(run_tree([str(python), "-m", "aisp_bench", "hydra/launcher=ray", "--cfg", "hydra", "-p",
                             "hydra.launcher"], cwd=work, env=env, timeout=120))  # the launchers' plugin and schemas
    assert "hydra_plugins.aisp_bench_launchers.launchers.RayLauncher" in launcher and "num_gpus: auto" in launcher
    assert not any(work.iterdir())  # no outputs/ or log files where the commands ran
