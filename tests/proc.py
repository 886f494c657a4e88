"""Run a command for a test and end its whole process tree on timeout (no orphans).

``subprocess.run(..., timeout=...)`` kills only the direct child: a ``make`` or a shell
that started Python processes would leave them running. Here the command gets its own
process session, and on timeout (or any error while waiting) the whole group is killed.
Subprocesses get ``OMP_NUM_THREADS=1`` unless the caller sets it, so several of them do
not oversubscribe a 2-core machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence


def run_tree(cmd: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None, cwd=None,
             input: str | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` that kills the process group on timeout."""
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=full_env, stdin=subprocess.PIPE if input is not None else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except BaseException:
        kill_tree(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process group started by ``proc`` (its own session) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()
