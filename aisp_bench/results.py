"""Run folder files: per-prompt records (JSONL), manifest and summary (JSON).

Crash safety: records are appended one line per prompt and flushed + fsynced; a torn
last line (a crash mid-write) is detected on the next start and cut off, and only that
line; JSON files are written to a temporary file and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RECORDS = "records.jsonl"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"


class RunFolderError(ValueError):
    pass


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class RecordScan:
    records: list[dict]
    good_end: int  # byte offset just after the last complete record
    dropped_tail: bool  # a torn last line was left out
    needs_repair: bool  # the file must be cut at good_end (and end with "\n") before appending


def scan_records(path: str | Path) -> RecordScan:
    """Parse a records file, tolerating a torn last line only.

    A bad line followed by good ones is corruption (``RunFolderError`` naming the file
    and line). Blank lines are ignored. A complete record whose newline never reached the
    disk is kept.
    """
    path = Path(path)
    records: list[dict] = []
    good_end = 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    offset = 0
    for i, raw in enumerate(lines):
        end = offset + len(raw) + 1
        last = i == len(lines) - 1
        if raw.strip():
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except ValueError:
                if last or all(not x.strip() for x in lines[i + 1 :]):
                    return RecordScan(records, good_end, dropped_tail=True, needs_repair=True)
                raise RunFolderError(f"{path}: line {i + 1} is corrupt and is not the last line") from None
            records.append(rec)
            if last:  # a complete record whose "\n" never reached the disk: keep it
                return RecordScan(records, offset + len(raw), dropped_tail=False, needs_repair=True)
            good_end = end
        elif not last:
            good_end = end
        offset = end
    return RecordScan(records, good_end, dropped_tail=False, needs_repair=False)


def read_records(run_dir: str | Path) -> list[dict]:
    """Per-prompt records of a run folder; a torn final line is skipped."""
    path = Path(run_dir) / RECORDS
    if not path.is_file():
        return []
    return scan_records(path).records


class RecordWriter:
    """Appends records to ``records.jsonl``; on open it cuts off a torn last line."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / RECORDS
        self.repaired = False
        existing: list[dict] = []
        if self.path.is_file():
            scan = scan_records(self.path)
            existing = scan.records
            if scan.needs_repair:
                with open(self.path, "r+b") as f:
                    f.truncate(scan.good_end)
                    if scan.good_end:
                        f.seek(scan.good_end - 1)
                        if f.read(1) != b"\n":
                            f.write(b"\n")
                self.repaired = scan.dropped_tail
        self.existing = existing
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summarize(records: Iterable[dict], num_prompts: int, skipped: list[str], truncated: list[str]) -> dict:
    """Counts and totals of a run, a pure function of its records."""
    recs = list(records)
    rewards = [float(r["reward"]) for r in recs]
    n = len(rewards)
    mean = sum(rewards) / n if n else None
    std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / n) if n else None
    return {
        "num_prompts": num_prompts,
        "num_done": n,
        "num_skipped": len(skipped),
        "skipped_ids": skipped,
        "num_truncated": len(truncated),
        "truncated_ids": truncated,
        "complete": n + len(skipped) >= num_prompts,
        "mean_reward": mean,
        "std_reward": std,
        "total_samples": sum(int(r["num_samples"]) for r in recs),
        "total_tokens": sum(int(r["num_tokens"]) for r in recs),
        "total_seconds": sum(float(r["seconds"]) for r in recs),
        "mean_response_tokens": (sum(int(r["response_tokens"]) for r in recs) / n) if n else None,
    }
