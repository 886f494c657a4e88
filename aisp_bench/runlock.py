"""``run.lock``: one writer per run folder (or per prompt shard's folder), and who it is.

``with RunLock(folder):`` creates ``folder/run.lock`` atomically and whole (a complete
draft hard-linked into place, which fails where the lock exists) holding its holder: host,
pid, Slurm job (``SLURM_JOB_ID``, array job and task) when there is one, and the start
time; it is removed on the way out, exception or not. A
second process on the same folder is refused with a ``RunLockError`` (one line naming
the holder), unless the holder is gone:

* the same host and its pid no longer exists (a killed run): taken over with a warning;
* the same Slurm job, array job and task, on any node (Slurm requeued it after a
  preemption or a timeout): taken over with a warning.

Anything else is refused: a live process here, or a process on another host whose
liveness cannot be checked from here (delete the file by hand if it is certainly gone).
An unreadable lock (a damaged file) counts as held for ``FRESH_S`` seconds. A kill
leaves at most a whole lock and a draft or aside file (``.run.lock.*``, ``is_lock_file``).
A takeover renames the stale file aside and checks it was the one judged stale, so two
processes taking over the same stale lock cannot both win. A folder that ``acquire`` had to
create is removed again on release when nothing but the lock was written there (a refusal
after the lock, e.g. a model that does not load, leaves no empty run folder behind).

``with stop_on_sigterm():`` makes a SIGTERM (``scancel``, ``kill``) stop the writer at once
with ``Stopped``, except inside a ``no_stop()`` block (a record being written), which ends
first: the lock is released on the way out and a rerun resumes from the records.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aisp_bench.rundir import RUN_LOCK, RunFolderError

log = logging.getLogger(__name__)
FRESH_S = 60.0  # an unreadable lock younger than this is being written by its holder
SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


class RunLockError(RunFolderError):
    """The folder is being written by another process; the message names it."""


def is_lock_file(name: str) -> bool:
    """``run.lock``, or a draft or aside file of ``RunLock`` that a kill left behind."""
    return name == RUN_LOCK or name.startswith(f".{RUN_LOCK}.")


def holder() -> dict[str, Any]:
    """This process as a lock holder."""
    slurm = {k.lower(): os.environ[k] for k in SLURM_KEYS if os.environ.get(k)}
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return {"host": socket.gethostname(), "pid": os.getpid(), **slurm, "started": started}


def describe(h: dict[str, Any] | None) -> str:
    """``pid 123 on node7 (Slurm job 456_3), since 2025-01-01T10:00:00+00:00``."""
    if not h:
        return "an unknown process (unreadable run.lock)"
    job = h.get("slurm_job_id")
    if h.get("slurm_array_job_id"):
        job = f"{h['slurm_array_job_id']}_{h.get('slurm_array_task_id', '?')}"
    slurm = f" (Slurm job {job})" if job else ""
    return f"pid {h.get('pid')} on {h.get('host')}{slurm}, since {h.get('started')}"


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's process, or nothing to check: assume it lives
    return True


def takeover_reason(old: dict[str, Any] | None, me: dict[str, Any], age_s: float) -> str | None:
    """Why ``me`` may take over a lock held by ``old`` (None: it may not)."""
    if old is None:
        return f"unreadable for {age_s:.0f} s" if age_s >= FRESH_S else None
    slurm = [k.lower() for k in SLURM_KEYS]
    if me.get("slurm_job_id") and all(old.get(k) == me.get(k) for k in slurm):
        return "the same Slurm job, requeued"
    if old.get("host") == me["host"] and (old.get("pid") == me["pid"] or not _pid_alive(old.get("pid"))):
        return "its process is gone"
    return None


class RunLock:
    """``with RunLock(folder):`` write ``folder`` alone (the module docstring has the rules)."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / RUN_LOCK
        self.text: str | None = None  # what we wrote, while we hold it
        self.created: list[Path] = []  # the folders acquire made, deepest first

    def acquire(self) -> None:
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = missing
        me = holder()
        text = json.dumps(me) + "\n"
        for _ in range(5):  # another process may take over or release between two steps
            draft = self.path.with_name(f".{RUN_LOCK}.{me['pid']}.new")  # complete before it is the lock
            with open(draft, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(draft, self.path)  # atomic, and fails where the lock exists: never a half-written lock
            except FileExistsError:
                self._take_over_or_refuse(me)
                continue
            except FileNotFoundError:  # the draft was removed meanwhile (a folder being replaced)
                continue
            finally:
                draft.unlink(missing_ok=True)
            self.text = text
            return
        raise RunLockError(f"{self.path.parent}: could not take {RUN_LOCK} (other processes keep taking it)")

    def _take_over_or_refuse(self, me: dict[str, Any]) -> None:
        try:
            seen, age = self.path.read_text(encoding="utf-8"), time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            old = json.loads(seen)
        except ValueError:
            old = None
        old = old if isinstance(old, dict) else None
        why = takeover_reason(old, me, age)
        if why is None:
            raise RunLockError(f"{self.path.parent} is being written by {describe(old)} ({self.path}); "
                               "if that process is certainly gone, delete the file and rerun")
        aside = self.path.with_name(f".{RUN_LOCK}.{me['pid']}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text(encoding="utf-8") != seen:  # a new holder came between our read and the rename
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            log.warning("%s: taking over %s from %s: %s", self.path.parent, RUN_LOCK, describe(old), why)
        aside.unlink()

    def release(self) -> None:
        """Remove the lock if it is still ours (a takeover by another process is left alone)."""
        try:
            if self.text is not None and self.path.read_text(encoding="utf-8") == self.text:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self.text = None
        for folder in self.created:  # only where nothing else was written
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Stopped(BaseException):
    """A SIGTERM stopped the writer (a ``BaseException``: no ``except Exception`` swallows it)."""


_held = {"depth": 0, "pending": False}


def _on_sigterm(signum, frame) -> None:
    _held["pending"] = True  # no_stop() raises when its block is done (also if this raise is lost, e.g. in a finalizer)
    if not _held["depth"]:
        raise Stopped("SIGTERM")


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block a SIGTERM raises ``Stopped`` (outside ``no_stop`` blocks); the previous
    handler is restored after it. Only the main thread receives signals: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _held["pending"] = False


@contextmanager
def no_stop() -> Iterator[None]:
    """Hold a SIGTERM until the block (a record's write) is done, then stop."""
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
    if not _held["depth"] and _held["pending"]:
        _held["pending"] = False
        raise Stopped("SIGTERM")
