"""One run folder: file names, the record schema, reading, writing, run identity.

Everything that reads or writes a run folder goes through this module (the tree around
it, selection and judge files: ``results.py``)::

    <results_dir>/runs/<dataset>/<model>__<reward>/<method>/<variant>/seed<k>/
        records.jsonl   one record per prompt (``make_record``), appended and fsynced
        manifest.json   the resolved config, versions, sessions (written by the run)
        summary.json    counts and totals (``summarize``); evaluation adds ``metrics``
        run.log         the run's log

``variant`` is the experiment name and the command-line overrides (``default`` when
there are none). Crash safety: a torn last line of ``records.jsonl`` (a crash while a
record was written) is dropped by every reader and cut off by the next writer, and only
that line: a bad line before the last one is corruption (``RunFolderError`` naming file
and line). JSON files are written to a temporary file and renamed into place.

Not built yet, and where it goes: prompt shards (``dataset.num_shards``/``dataset.shard``,
several folders that read as one run) plug into ``record_files`` (the record files of a
run) and ``results.discover_runs``; the run-folder lock belongs in ``RecordWriter``, the one
writer of records.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from aisp_bench.types import Prompt, Result

RECORDS = "records.jsonl"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
RUN_LOG = "run.log"


class RunFolderError(ValueError):
    """A run folder or selection that cannot be read; the message is one line."""


# -- JSON files -----------------------------------------------------------------------------
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


def read_json_or_none(path: str | Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when it is missing, not JSON (with a warning) or not an object."""
    try:
        obj = read_json(path) if Path(path).is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        warnings.warn(f"{path}: not valid JSON, ignored", stacklevel=2)
        return None
    return obj if isinstance(obj, dict) else None


# -- records ------------------------------------------------------------------------------
def make_record(prompt: Prompt, result: Result, seconds: float) -> dict:
    """One line of ``records.jsonl`` (the schema README.md describes)."""
    rec = {
        "prompt_id": prompt.id,
        "prompt": prompt.transcript(),
        "messages": prompt.to_json(),
        "response": result.response,
        "reward": result.reward,
        "sample_rewards": result.sample_rewards,
        "num_samples": result.num_samples,
        "num_tokens": result.num_tokens,
        "response_tokens": result.response_tokens,
        "sample_tokens": result.sample_tokens,
        "seconds": seconds,
        "finish_reason": result.finish_reason,
    }
    if result.iterations:
        rec["iterations"] = result.iterations
    rec.update(result.extra)
    return rec


def record_prompt(record: dict[str, Any]) -> Prompt:
    """The record's prompt: its ``messages``, else one user turn holding ``prompt``."""
    pid = str(record.get("prompt_id", ""))
    if record.get("messages"):
        return Prompt.from_json(pid, record["messages"])
    return Prompt.single(pid, str(record.get("prompt", "")))


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
    lines = path.read_bytes().split(b"\n")
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


def record_files(run_dir: str | Path) -> list[Path]:
    """The records files of a run (prompt shards will add theirs here)."""
    path = Path(run_dir) / RECORDS
    return [path] if path.is_file() else []


def read_records(run_dir: str | Path) -> list[dict]:
    """Every record of a run folder in file order ([] before the first one).

    A torn last line is dropped with a warning; a corrupt line before it raises
    ``RunFolderError``.
    """
    out: list[dict] = []
    for path in record_files(run_dir):
        scan = scan_records(path)
        if scan.dropped_tail:
            warnings.warn(f"{path}: dropping a torn last line", stacklevel=2)
        out += scan.records
    return out


def records_sha256(run_dir: str | Path) -> str:
    """sha256 of the records' bytes (what metrics were computed from)."""
    h = hashlib.sha256()
    for path in record_files(run_dir):
        h.update(path.read_bytes())
    return h.hexdigest()


class RecordWriter:
    """Appends records to ``records.jsonl``; on open it cuts off a torn last line."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / RECORDS
        self.repaired = False
        self.existing: list[dict] = []
        if self.path.is_file():
            scan = scan_records(self.path)
            self.existing = scan.records
            if scan.needs_repair:
                with open(self.path, "r+b") as f:
                    f.truncate(scan.good_end)
                    if scan.good_end:
                        f.seek(scan.good_end - 1)
                        if f.read(1) != b"\n":
                            f.write(b"\n")
                self.repaired = scan.dropped_tail
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


def get_path(obj: Any, dotted: str, default: Any = None) -> Any:
    """``obj['a']['b']`` for ``'a.b'``, or ``default`` where a key is missing."""
    cur = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


# -- run identity -------------------------------------------------------------------------
_SEED_RE = re.compile(r"^seed(\d+)$")


@dataclass(frozen=True)
class Run:
    """One run folder: identity from its path, files read once, when first asked for."""

    path: Path
    dataset: str
    model: str
    reward: str
    method: str
    variant: str
    seed: int

    @classmethod
    def at(cls, path: str | Path) -> Run | None:
        """The run at ``.../<dataset>/<model>__<reward>/<method>/<variant>/seed<k>``, else None."""
        path = Path(path)
        m = _SEED_RE.match(path.name)
        parts = path.parts
        if m is None or len(parts) < 5:
            return None
        model, sep, reward = parts[-4].partition("__")
        if not (sep and model and reward):
            return None
        return cls(path, parts[-5], model, reward, parts[-3], parts[-2], int(m.group(1)))

    @property
    def pair(self) -> str:
        return f"{self.model}__{self.reward}"

    @property
    def group(self) -> tuple[str, str, str, str, str]:
        """(dataset, model, reward, method, variant): the seeds of one cell share it."""
        return (self.dataset, self.model, self.reward, self.method, self.variant)

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        return read_records(self.path)

    @cached_property
    def manifest(self) -> dict[str, Any]:
        return read_json_or_none(self.path / MANIFEST) or {}

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config the run was made with ({} without a manifest)."""
        return get_path(self.manifest, "config", {})

    @cached_property
    def summary(self) -> dict[str, Any] | None:
        return read_json_or_none(self.path / SUMMARY)

    @property
    def complete(self) -> bool:
        """True when ``summary.json`` says the run finished every prompt."""
        return bool(self.summary and self.summary.get("complete"))

    @property
    def metrics(self) -> dict[str, Any]:
        return get_path(self.summary or {}, "metrics", {})

    def method_param(self, key: str, default: Any = None) -> Any:
        """A method hyper-parameter from the manifest's config (``default`` where absent)."""
        v = get_path(self.config, f"method.{key}")
        return default if v is None else v
