"""run.lock: one writer per folder; a live holder refuses, a dead or requeued one is taken over."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from aisp_bench.runlock import FRESH_S, RunLock, RunLockError

SLURM = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for k in SLURM:
        monkeypatch.delenv(k, raising=False)


def plant(folder, **holder):
    """A run.lock as another process would have left it."""
    folder.mkdir(parents=True, exist_ok=True)
    h = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2025-01-01T00:00:00+00:00", **holder}
    (folder / "run.lock").write_text(json.dumps(h) + "\n")
    return folder / "run.lock"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_names_its_holder_and_goes_away(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with RunLock(tmp_path / "run") as lock:
        held = json.loads(lock.path.read_text())
        assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
        assert held["slurm_job_id"] == "4242" and "started" in held
    assert not lock.path.exists()
    with pytest.raises(ZeroDivisionError), RunLock(tmp_path / "run"):
        1 / 0
    assert not (tmp_path / "run" / "run.lock").exists()  # released on an exception too


def test_a_live_holder_refuses_with_one_line_naming_it(tmp_path):
    path = plant(tmp_path, pid=os.getppid(), slurm_job_id="77", slurm_array_job_id="76", slurm_array_task_id="3")
    with pytest.raises(RunLockError) as e:
        RunLock(tmp_path).acquire()
    msg = str(e.value)
    assert "\n" not in msg and f"pid {os.getppid()} on {socket.gethostname()} (Slurm job 76_3)" in msg
    assert "delete the file" in msg and path.read_text().count(str(os.getppid())) == 1  # left alone
    other_host = plant(tmp_path / "b", host="elsewhere", pid=dead_pid())
    with pytest.raises(RunLockError, match="pid .* on elsewhere"):  # its pid cannot be checked from here
        RunLock(tmp_path / "b").acquire()
    assert other_host.is_file()


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    plant(tmp_path, pid=dead_pid())
    with caplog.at_level(logging.WARNING), RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert "taking over run.lock" in caplog.text and "its process is gone" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left aside


def test_a_requeued_slurm_job_takes_its_own_lock_back(tmp_path, monkeypatch, caplog):
    ids = {"SLURM_JOB_ID": "900", "SLURM_ARRAY_JOB_ID": "899", "SLURM_ARRAY_TASK_ID": "5"}
    for k, v in ids.items():
        monkeypatch.setenv(k, v)
    mine = {k.lower(): v for k, v in ids.items()}
    plant(tmp_path / "a", host="node-before-requeue", pid=os.getppid(), **mine)
    with caplog.at_level(logging.WARNING), RunLock(tmp_path / "a"):
        pass
    assert "the same Slurm job, requeued" in caplog.text
    plant(tmp_path / "b", host="node-before-requeue", pid=1, **{**mine, "slurm_array_task_id": "6"})
    with pytest.raises(RunLockError, match=r"Slurm job 899_6"):  # another task of the array
        RunLock(tmp_path / "b").acquire()


def test_an_unreadable_lock_is_held_while_fresh(tmp_path):
    (tmp_path / "run.lock").write_text("")  # its holder is between creating and writing it
    with pytest.raises(RunLockError, match="an unknown process"):
        RunLock(tmp_path).acquire()
    old = time.time() - FRESH_S - 5
    os.utime(tmp_path / "run.lock", (old, old))
    with RunLock(tmp_path):
        pass


def test_release_leaves_another_holders_lock_alone(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    plant(tmp_path, pid=os.getppid())  # taken over meanwhile (e.g. the holder was thought dead)
    lock.release()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getppid()
