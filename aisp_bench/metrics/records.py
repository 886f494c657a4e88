"""Reading run folders: ``records.jsonl``, JSON files, atomic JSON writes, run discovery.

A run folder is ``results/runs/<dataset>/<model>__<reward>/<method>/<variant>/seed<k>/``
holding ``records.jsonl`` (one JSON object per prompt), ``manifest.json`` and, once the
run has ended, ``summary.json``. Everything that reads a run folder goes through here so
that a crash mid-write is handled the same way everywhere:

* ``read_records`` drops a *final* line that does not parse (a record torn by a crash
  while it was being written) and only that: a bad line anywhere else is corruption and
  raises ``RecordsError`` naming the file and line.
* ``write_json_atomic`` writes a temporary file in the target's folder and renames it
  over the target (``os.replace``), so a reader never sees half a file.
"""

from __future__ import annotations

import glob
import hashlib
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aisp_bench.results import RunFolderError, read_json, scan_records, write_json_atomic  # noqa: F401 (re-exported)

RECORDS_FILE = "records.jsonl"
MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "summary.json"


class RecordsError(RunFolderError):
    """A records file that cannot be read (corrupt line other than a torn last one)."""


class RunNotFoundError(FileNotFoundError):
    """A path or glob on the command line that names no run folder."""


def read_records(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a run, in file order (``aisp_bench.results.scan_records`` rules).

    ``run_dir`` is a run folder or a ``records.jsonl`` path. A torn last line is dropped
    with a warning; a corrupt line before it raises ``RecordsError``.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / RECORDS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RECORDS_FILE} at {path}")
    try:
        scan = scan_records(path)
    except RunFolderError as e:
        raise RecordsError(str(e)) from None
    if scan.dropped_tail:
        warnings.warn(f"{path}: dropping a torn last line", stacklevel=2)
    return scan.records


def records_sha256(run_dir: str | os.PathLike[str]) -> str:
    """sha256 of the records file's bytes (what metrics were computed from)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / RECORDS_FILE
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder that holds a ``records.jsonl``."""
    return (Path(path) / RECORDS_FILE).is_file()


def find_run_dirs(specs: Iterable[str]) -> list[Path]:
    """Resolve command-line arguments to run folders (sorted, without duplicates).

    Each spec is a run folder, a folder above run folders (searched recursively for
    ``records.jsonl``), a ``records.jsonl`` path, or a glob of any of these (``**``
    allowed). A spec that names nothing raises ``RunNotFoundError`` with a one-line
    message: a missing path, a glob that matches nothing, or a folder without runs.
    """
    found: dict[Path, None] = {}
    for spec in specs:
        if glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise RunNotFoundError(f"glob {spec!r} matches nothing")
        else:
            if not os.path.exists(spec):
                raise RunNotFoundError(f"no such file or folder: {spec}")
            matches = [spec]
        runs: list[Path] = []
        for m in matches:
            p = Path(m)
            if p.is_file() and p.name == RECORDS_FILE:
                runs.append(p.parent)
            elif p.is_dir() and is_run_dir(p):
                runs.append(p)
            elif p.is_dir():
                runs.extend(sorted(r.parent for r in p.rglob(RECORDS_FILE)))
        if not runs:
            raise RunNotFoundError(f"no run folder (one with {RECORDS_FILE}) under {spec!r}")
        for r in runs:
            found[r.resolve()] = None
    return sorted(found)


def get_path(obj: Any, dotted: str, default: Any = None) -> Any:
    """``obj['a']['b']`` for ``'a.b'``, or ``default`` where a key is missing."""
    cur = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur
