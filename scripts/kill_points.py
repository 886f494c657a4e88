"""Kill a run with SIGKILL at one step of its life cycle (``aisp_bench/run.py``), for fault injection.

The run module has no hooks of its own: ``install(step)`` wraps, in this process only, the
function that performs the step, so that the process SIGKILLs itself right after it (or,
for ``summary_written``, right before the manifest is closed). ``make fault-injection``
(``scripts/fault_injection.py``) and ``tests/test_fault_injection.py`` use it::

    python scripts/kill_points.py manifest_written method=aisp dataset=demo ...   # python -m aisp_bench, killed there

=================  ============================================================
step               the process is killed
=================  ============================================================
folder_created     after the run folder is made, before anything is in it
manifest_written   after the first manifest.json (finished: null)
log_opened         after run.log is opened
record_written     after the first record is appended
summary_written    after summary.json, before the manifest is closed
finished           after the manifest is closed
=================  ============================================================
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

STEPS = ("folder_created", "manifest_written", "log_opened", "record_written", "summary_written", "finished")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(step: str) -> None:
    """From now on, this process SIGKILLs itself at ``step`` of a run (one of ``STEPS``)."""
    from aisp_bench import run as run_module
    from aisp_bench.rundir import MANIFEST, RecordWriter

    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; known: {', '.join(STEPS)}")
    if step == "folder_created":  # the first thing open_folder does in the new folder
        run_module.clean_temp_files = lambda run_dir: _die()
    elif step == "log_opened":
        attach = run_module._attach_log_file
        run_module._attach_log_file = lambda run_dir: (attach(run_dir), _die())
    elif step == "record_written":
        write = RecordWriter.write
        RecordWriter.write = lambda self, record: (write(self, record), _die())
    else:  # the manifest's writes: the first (finished null), the last (finished set)
        write_json = run_module.write_json_atomic

        def write_json_then_die(path, obj):
            closing = Path(path).name == MANIFEST and obj.get("finished") is not None
            if closing and step == "summary_written":
                _die()
            write_json(path, obj)
            if Path(path).name == MANIFEST and closing == (step == "finished"):
                _die()

        run_module.write_json_atomic = write_json_then_die


def main() -> None:
    """``python scripts/kill_points.py STEP [overrides]``: ``python -m aisp_bench [overrides]`` killed at STEP."""
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} STEP [overrides]  (STEP: {', '.join(STEPS)})")
    install(sys.argv[1])
    from aisp_bench.__main__ import main as run_main

    sys.argv = ["python -m aisp_bench", *sys.argv[2:]]
    run_main()


if __name__ == "__main__":
    main()
