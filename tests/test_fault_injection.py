"""A run killed with SIGKILL at any instant reruns to the records of an uninterrupted run.

Each attempt forks the test process after the models are loaded once (a warm parent: no
interpreter start per attempt) and runs the real ``run(cfg)`` in the child, which SIGKILLs
itself at one life-cycle step (``scripts/kill_points.py``) or is killed by
the parent after a random delay; the parent then reruns the config to the end and checks
the folder with ``scripts/fault_injection.py``'s ``check_folder``: every line parses, each
prompt once, records equal to the uninterrupted run's but for timings, the manifest
closed, the summary complete. One real ``python -m aisp_bench`` is killed at a phase too.
The script runs many random kill schedules on real processes (``--random N``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from aisp_bench import run as run_module
from aisp_bench.rundir import read_json, write_json_atomic
from aisp_bench.run import run
from aisp_bench.runlock import holder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fault_injection as fi  # noqa: E402
import kill_points  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread():
    """Torch on one thread: no OpenMP pool copied into a forked child, no oversubscribed cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def in_child(cfg, *, kill_at: str | None = None, kill_after: float | None = None, timeout: float = 120) -> int:
    """Exit status of ``run(cfg)`` in a forked child (its own process group): -SIGKILL when it was
    killed, at phase ``kill_at`` by itself or ``kill_after`` seconds after the fork by this process."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.setpgid(0, 0)
            if kill_at:
                kill_points.install(kill_at)
            run(cfg)
            code = 0
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
        finally:
            os._exit(code)
    try:
        os.setpgid(pid, pid)  # also here: the group exists whichever process gets there first
    except OSError:
        pass
    deadline, status = time.monotonic() + (timeout if kill_after is None else kill_after), None
    try:
        while status is None and time.monotonic() < deadline:
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            status = wait_status if done else None
            time.sleep(0 if done else 0.002)
    finally:  # the delay is over, the child hangs, or this process was interrupted: no orphan
        if status is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # not in its group yet
                os.kill(pid, signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def config(compose, tmp_path):
    """config(method, name) -> the tiny run config with results under tmp_path/name."""
    return lambda method, name: compose([f"method={method}", *fi.TINY, f"results_dir={tmp_path / name}"])


def reference(config, method: str) -> tuple[dict[str, dict], Path]:
    run_dir = run(config(method, "reference"))  # loads the models (once per process)
    return {r["prompt_id"]: r for r in fi.read_lines(run_dir)}, run_dir


@pytest.mark.parametrize("method", ["aisp", "bon_topp"])
def test_kill_at_every_phase_and_at_random_times(config, method):
    """One folder killed at each phase in turn (each rerun resumes what the kill before left), then
    two schedules of two kills at random times; each folder then runs to the end and is checked."""
    ref, _ = reference(config, method)
    cfg, window = config(method, "phases"), 0.0
    for phase in kill_points.STEPS:
        t0 = time.monotonic()
        assert in_child(cfg, kill_at=phase) == -signal.SIGKILL, f"phase {phase} was not reached"
        window = max(window, time.monotonic() - t0)  # the longest: decoding up to the first record
    run(cfg)
    assert fi.check_folder(Path(cfg.run_dir), ref) == []
    rng = random.Random(12)
    for i in range(2):
        cfg = config(method, f"random{i}")
        kills = [in_child(cfg, kill_after=rng.uniform(0.0, window)) for _ in range(2)]
        run(cfg)
        assert fi.check_folder(Path(cfg.run_dir), ref) == [], f"random schedule {i}: exits {kills}"


def test_left_overs_and_an_open_manifest_are_repaired(config, monkeypatch):
    """A folder holding only a log, a dead process's lock and temp files is new; a manifest left open after the
    summary is closed without loading a model; a corrupt summary is rebuilt."""
    ref, ref_dir = reference(config, "bon_topp")
    cfg = config("bon_topp", "leftovers")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    for name in ("run.log", ".manifest.json.x1y2.tmp", ".run.lock.77.new"):
        (run_dir / name).write_text("left by a killed run\n")
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()  # a lock whose holder is gone: what a kill leaves (the lock is never half written)
    (run_dir / "run.lock").write_text(json.dumps({**holder(), "pid": gone.pid}) + "\n")
    run(cfg)
    assert fi.check_folder(run_dir, ref) == [] and not list(run_dir.glob(".*.tmp"))

    cfg = config("bon_topp", "open")
    shutil.copytree(ref_dir.parents[4], Path(cfg.results_dir) / "runs")
    manifest = read_json(Path(cfg.run_dir) / "manifest.json")
    manifest["finished"] = manifest["sessions"][-1]["finished"] = None  # killed before its last write
    write_json_atomic(Path(cfg.run_dir) / "manifest.json", manifest)
    (Path(cfg.run_dir) / ".manifest.json.abc.tmp").write_text("{")
    monkeypatch.setattr(run_module, "load", lambda *a: pytest.fail("a model was loaded"))
    run(cfg)
    assert fi.check_folder(Path(cfg.run_dir), ref) == [] and not list(Path(cfg.run_dir).glob(".*.tmp"))
    assert len(read_json(Path(cfg.run_dir) / "manifest.json")["sessions"]) == 1
    monkeypatch.undo()

    (Path(cfg.run_dir) / "summary.json").write_text('{"num_done": 2,')  # corrupt: rebuilt from the records
    run(cfg)
    assert fi.check_folder(Path(cfg.run_dir), ref) == []


def test_real_process_killed_at_a_phase_resumes(config, tmp_path):
    """The real entry point: ``python -m aisp_bench`` SIGKILLed where a kill once left a folder
    that was refused for good (between the folder's creation and its manifest)."""
    ref, _ = reference(config, "aisp")
    args = ["method=aisp", *fi.TINY]
    assert fi.run_cli(args, tmp_path / "cli", kill_at="folder_created")[0] == -signal.SIGKILL
    code, err = fi.run_cli(args, tmp_path / "cli")
    assert code == 0, err[-2000:]
    assert fi.check_folder(fi.run_dir_of(tmp_path / "cli"), ref) == []
