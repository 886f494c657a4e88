"""The run folder: file names, the record schema, reading, writing, run identity and selection.

Everything that reads or writes results goes through this module::

    <results_dir>/runs/<dataset>/<model>__<reward>/<method>/<variant>/seed<k>/
        records.jsonl   one record per prompt (``make_record``), appended and fsynced
        manifest.json   the resolved config, versions, sessions (written by the run)
        summary.json    counts and totals (``summarize``); evaluation adds ``metrics``
        run.log         the run's log (opened once the manifest exists)
    <results_dir>/judge/<dataset>/<model>__<reward>/<method_a>_vs_<method_b>.json

``variant`` is the experiment name and the command-line overrides (``default`` when
there are none). Crash safety: a torn last line of ``records.jsonl`` (a crash while a
record was written) is dropped by every reader and cut off by the next writer, and only
that line: a bad line before the last one is corruption (``RunFolderError`` naming file
and line). JSON files are written to a temp file (``.<name>.<random>.tmp``) and renamed
into place; one left by a kill is removed by the next run (the life cycle: ``run.py``).

Not built yet, and where it goes: prompt shards (``dataset.num_shards``/``dataset.shard``,
several folders that read as one run) plug into ``record_files`` (the record files of a
run) and ``discover_runs``; the run-folder lock belongs in ``RecordWriter``, the one
writer of records.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Sequence
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


def read_json(path: str | Path, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """The JSON object in ``path`` (None if missing and ``missing_ok``); anything else: ``RunFolderError``."""
    if missing_ok and not Path(path).is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(obj, dict):
        raise RunFolderError(f"{path} is not a JSON object")
    return obj


def read_json_or_none(path: str | Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when it is missing, not JSON (with a warning) or not an object."""
    try:
        return read_json(path, missing_ok=True)
    except RunFolderError as e:
        warnings.warn(f"{e}; ignored", stacklevel=2)
        return None


def is_temp_file(name: str) -> bool:
    """A temp file of ``write_json_atomic`` (``.<name>.<random>.tmp``), left behind when a write was killed."""
    return name.startswith(".") and name.endswith(".tmp")


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
    def manifest(self) -> dict[str, Any]:  # a corrupt one raises RunFolderError, as summary
        return read_json(self.path / MANIFEST, missing_ok=True) or {}

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config the run was made with ({} without a manifest)."""
        return get_path(self.manifest, "config", {})

    @cached_property
    def summary(self) -> dict[str, Any] | None:
        return read_json(self.path / SUMMARY, missing_ok=True)

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


# -- selection ------------------------------------------------------------------------------
SELECT_KEYS = ("dataset", "pair", "method", "variant", "seed")


@dataclass(frozen=True)
class Selection:
    """Which runs a command works on: per key, None (all) or the accepted values.

    ``dataset``, ``pair`` (``<model>__<reward>``), ``method`` and ``variant`` take names or
    shell patterns (``lambda_sweep*``); ``seed`` takes integers.
    """

    dataset: tuple[str, ...] | None = None
    pair: tuple[str, ...] | None = None
    method: tuple[str, ...] | None = None
    variant: tuple[str, ...] | None = None
    seed: tuple[int, ...] | None = None

    @classmethod
    def from_mapping(cls, values: Any) -> Selection:
        """From a plain mapping such as a config's ``select`` block (scalars or lists; unknown keys refused)."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(SELECT_KEYS))
        if unknown:
            raise RunFolderError(f"unknown selection key select.{unknown[0]}; known: {', '.join(SELECT_KEYS)}")
        out: dict[str, tuple | None] = {}
        for key, v in values.items():
            if v is None:
                continue
            items = list(v) if isinstance(v, (list, tuple)) else [v]
            if key == "seed":
                if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in items):
                    raise RunFolderError(f"select.seed must be integers >= 0, got {v!r}")
            elif not all(isinstance(s, (str, int, float)) and not isinstance(s, bool) for s in items):
                raise RunFolderError(f"select.{key} must be names or patterns, got {v!r}")
            out[key] = tuple(items if key == "seed" else (str(s) for s in items))
        return cls(**out)

    def accepts(self, key: str, value: str | int) -> bool:
        """Whether ``value`` passes the selection's ``key`` (``"seed"``: an int, else a name)."""
        accepted = getattr(self, key)
        if accepted is None:
            return True
        if key == "seed":
            return value in accepted
        return any(fnmatch.fnmatchcase(str(value), p) for p in accepted)

    def matches(self, run: Run) -> bool:
        return all(self.accepts(key, getattr(run, key)) for key in SELECT_KEYS)

    def describe(self) -> str:
        """``select.dataset=shp select.seed=[0, 1]`` (empty when everything is selected)."""
        parts = []
        for key in SELECT_KEYS:
            v = getattr(self, key)
            if v is not None:
                parts.append(f"select.{key}={v[0] if len(v) == 1 else list(v)}")
        return " ".join(parts)


def runs_root(results_dir: str | Path) -> Path:
    """``<results_dir>/runs`` when it exists, else ``results_dir`` itself (a runs folder was given)."""
    results_dir = Path(results_dir)
    return results_dir / "runs" if (results_dir / "runs").is_dir() else results_dir


def discover_runs(results_dir: str | Path, select: Selection | None = None) -> list[Run]:
    """Every run folder under ``results_dir`` (or ``results_dir/runs``) that holds a
    ``records.jsonl`` or a ``summary.json`` and matches ``select``, sorted by path."""
    select = select or Selection()
    found = []
    for path in sorted(runs_root(results_dir).glob("*/*/*/*/seed*")):
        if not ((path / RECORDS).is_file() or (path / SUMMARY).is_file()):
            continue
        run = Run.at(path)
        if run is not None and select.matches(run):
            found.append(run)
    return found


def group_runs(runs: Iterable[Run]) -> dict[tuple[str, str, str, str, str], list[Run]]:
    """Runs grouped by (dataset, model, reward, method, variant), seeds sorted; insertion-ordered."""
    groups: dict[tuple[str, str, str, str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    return {k: sorted(v, key=lambda r: r.seed) for k, v in groups.items()}


OUTCOMES = ("win", "draw", "loss", "invalid")  # of method A, per judged prompt


def trial_percentages(trials: Iterable[dict[str, Any]]) -> list[dict[str, float]]:
    """Per trial of a win-rate file, each outcome in percent of the trial's ``n`` (trials
    with ``n`` = 0, or whose counts do not sum to ``n``, are left out)."""
    out = []
    for t in trials:
        counts = [t.get(k) for k in OUTCOMES]
        n = t.get("n")
        if all(isinstance(c, int) for c in counts) and isinstance(n, int) and n > 0 and sum(counts) == n:
            out.append({k: 100.0 * c / n for k, c in zip(OUTCOMES, counts, strict=True)})
    return out


def judge_file(results_dir: str | Path, dataset: str, pair: str, method_a: str, method_b: str) -> Path:
    """Where the win rates of ``method_a`` against ``method_b`` are written."""
    return Path(results_dir) / "judge" / dataset / pair / f"{method_a}_vs_{method_b}.json"


def judge_files(results_dir: str | Path) -> Sequence[Path]:
    """Every win-rate file under ``results_dir`` (``judge_file``'s layout), sorted."""
    return sorted((Path(results_dir) / "judge").glob("*/*/*_vs_*.json"))
