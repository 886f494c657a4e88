"""One run folder: file names, the record schema, reading, writing, run identity, prompt shards.

Everything that reads or writes a run folder goes through this module (the tree around
it, selection and judge files: ``results.py``)::

    <results_dir>/runs/<dataset>/<model>__<reward>/<method>/<variant>/seed<k>/
        records.jsonl   one record per prompt (``make_record``), appended and fsynced
        manifest.json   the resolved config, versions, sessions (written by the run)
        summary.json    counts and totals (``summarize``); evaluation adds ``metrics``
        metrics_per_prompt.json  evaluation's per-prompt values behind those metrics
        run.log         the run's log (opened once the manifest exists)
        run.lock        who is writing the folder, while they are (``runlock.py``)
        shards/03-of-16/  a sharded run (``dataset.num_shards``): a folder per shard with its
                        own records, manifest, summary, lock; read together as one run

``variant`` is the experiment name and the command-line overrides (``default`` when
there are none). Crash safety: a torn last line of ``records.jsonl`` (a crash while a
record was written) is dropped by every reader and cut off by the next writer, and only
that line: a bad line before the last one is corruption (``RunFolderError`` naming file
and line). JSON files are written to a temp file (``.<name>.<random>.tmp``) and renamed
into place; one left by a kill is removed by the next run (the life cycle: ``run.py``).

A sharded run reads as one (``read_records``, ``read_summary``, ``Run``): records in the
dataset's order, a summary summed over the shards; shards of different configs or counts,
or beside an unsharded run's files, are a ``RunFolderError`` naming them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from aisp_bench.config import config_diff, get_path, semantic_config
from aisp_bench.types import Prompt, Result

RECORDS = "records.jsonl"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
PROMPT_METRICS = "metrics_per_prompt.json"
RUN_LOG = "run.log"
RUN_LOCK = "run.lock"
SHARDS = "shards"


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
        Path(tmp).unlink(missing_ok=True)
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
def make_record(prompt: Prompt, result: Result, seconds: float, prompt_tokens: int | None = None) -> dict:
    """One line of ``records.jsonl`` (the schema README.md describes); ``prompt_tokens``: the
    prompt's tokens as the policy read it (after any truncation)."""
    rec = {"prompt_id": prompt.id, "prompt": prompt.transcript(), "messages": prompt.to_json(),
           "response": result.response, "reward": result.reward, "sample_rewards": result.sample_rewards,
           "num_samples": result.num_samples, "num_tokens": result.num_tokens,
           "response_tokens": result.response_tokens, "sample_tokens": result.sample_tokens,
           "seconds": seconds, "finish_reason": result.finish_reason}
    optional = {"prompt_tokens": prompt_tokens, "decode_passes": result.decode_passes,
                "iterations": result.iterations or None, "checkpoints": result.checkpoints or None}
    return rec | {k: v for k, v in optional.items() if v is not None} | result.extra


def record_checkpoints(record: dict) -> list[dict]:
    """The record's budget checkpoints (``types.Result``; none: []), each with its ``response`` resolved:
    the text stored at the first point returning that sample, else the record's ``response``."""
    texts: dict[Any, str] = {}
    for c in (c for c in record.get("checkpoints") or [] if "response" in c):
        texts.setdefault(c.get("sample"), str(c["response"]))
    return [{**c, "response": texts.get(c.get("sample"), str(record.get("response") or ""))}
            for c in record.get("checkpoints") or []]


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or ±inf float as None (JSON's null), so files stay strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    return [json_safe(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def finite_rewards(records: Iterable[dict]) -> list[float]:
    """The records' finite ``reward`` values (a null reward: every sample of that prompt was non-finite)."""
    rewards = (r.get("reward") for r in records)
    return [float(x) for x in rewards if isinstance(x, (int, float)) and math.isfinite(x)]


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
    """Parse a records file: a torn last line is left out, a bad line before it is a ``RunFolderError``
    naming file and line; blank lines are ignored, a complete last record without its newline is kept."""
    path = Path(path)
    records: list[dict] = []
    lines = path.read_bytes().split(b"\n")
    good_end = 0  # after every line but the last, whatever it holds (a bad line returns or raises)
    for i, raw in enumerate(lines):
        if raw.strip():
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
            except ValueError:
                if any(x.strip() for x in lines[i + 1 :]):
                    raise RunFolderError(f"{path}: line {i + 1} is corrupt and is not the last line") from None
                return RecordScan(records, good_end, dropped_tail=True, needs_repair=True)
            records.append(rec)
            if i == len(lines) - 1:  # a complete record whose "\n" never reached the disk: keep it
                return RecordScan(records, good_end + len(raw), dropped_tail=False, needs_repair=True)
        if i < len(lines) - 1:
            good_end += len(raw) + 1
    return RecordScan(records, good_end, dropped_tail=False, needs_repair=False)


def read_records(run_dir: str | Path) -> list[dict]:
    """Every record of a run folder in file order, a sharded run's in the dataset's order; a torn
    last line is dropped with a warning, a corrupt line before it raises ``RunFolderError``."""
    shards, path = Shards.of(run_dir), Path(run_dir) / RECORDS
    if shards is not None:
        return shards.records
    if not path.is_file():
        return []
    scan = scan_records(path)
    if scan.dropped_tail:
        warnings.warn(f"{path}: dropping a torn last line", stacklevel=2)
    return scan.records


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """``summary.json`` of a run; a sharded run's is summed over its shards (``Shards.summary``)."""
    shards = Shards.of(run_dir)
    return read_json(Path(run_dir) / SUMMARY, missing_ok=True) if shards is None else shards.summary


def records_sha256(run_dir: str | Path) -> str:
    """sha256 of the records' bytes (a sharded run's: its shards' files in shard order)."""
    shards, h = Shards.of(run_dir), hashlib.sha256()
    paths = [Path(run_dir) / RECORDS] if shards is None else [p / RECORDS for p in shards.folders.values()]
    for path in (p for p in paths if p.is_file()):
        h.update(path.read_bytes())
    return h.hexdigest()


class RecordWriter:
    """Appends records to ``records.jsonl``; on open it cuts off a torn last line. ``records``:
    every record of the file, those found (``scan``: already parsed, else read now) and those
    written since, as read back from the line written."""

    def __init__(self, run_dir: str | Path, scan: RecordScan | None = None) -> None:
        self.path = Path(run_dir) / RECORDS
        self.repaired = False
        if scan is None and self.path.is_file():
            scan = scan_records(self.path)
        self.records: list[dict] = list(scan.records) if scan else []
        if scan is not None and scan.needs_repair:
            with open(self.path, "r+b") as f:
                f.truncate(scan.good_end)
                if scan.good_end:
                    f.seek(scan.good_end - 1)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
            self.repaired = scan.dropped_tail
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        line = json.dumps(json_safe(record), ensure_ascii=False, allow_nan=False)
        self._f.write(line + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records.append(json.loads(line))

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def summarize(records: Iterable[dict], num_prompts: int, skipped: list[str], truncated: list[str]) -> dict:
    """Counts and totals of a run, a pure function of its records; ``mean_reward`` and
    ``std_reward`` over the finite rewards (``num_nonfinite_rewards`` counts the others, if any)."""
    recs = list(records)
    n, rewards = len(recs), finite_rewards(recs)
    mean = sum(rewards) / len(rewards) if rewards else None
    std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / len(rewards)) if rewards else None
    return {
        "num_prompts": num_prompts, "num_done": n, "num_skipped": len(skipped), "skipped_ids": skipped,
        "num_truncated": len(truncated), "truncated_ids": truncated, "complete": n + len(skipped) >= num_prompts,
        "mean_reward": mean, "std_reward": std,
        "total_samples": sum(int(r["num_samples"]) for r in recs),
        "total_tokens": sum(int(r["num_tokens"]) for r in recs),
        "total_seconds": sum(float(r["seconds"]) for r in recs),
        "mean_response_tokens": (sum(int(r["response_tokens"]) for r in recs) / n) if n else None,
    } | ({"num_nonfinite_rewards": n - len(rewards)} if len(rewards) < n else {})


# -- prompt shards ---------------------------------------------------------------------------
_SHARD_NAME = re.compile(r"^(\d+)-of-(\d+)$")


def shard_label(shard: int, num_shards: int) -> str:
    """``03`` for shard 3 of 16: zero-padded to at least two digits, as wide as ``num_shards``."""
    return f"{shard:0{max(2, len(str(num_shards)))}d}"


def shard_dir(run_dir: str | Path, shard: int, num_shards: int) -> Path:
    """``<run_dir>/shards/03-of-16``: the folder shard ``shard`` of ``num_shards`` writes."""
    return Path(run_dir) / SHARDS / f"{shard_label(shard, num_shards)}-of-{shard_label(num_shards, num_shards)}"


@dataclass(frozen=True)
class Shards:
    """The prompt shards of a run folder: ``folders`` maps each shard on disk to its folder."""

    run_dir: Path
    num_shards: int
    folders: dict[int, Path]

    @classmethod
    def of(cls, run_dir: str | Path) -> Shards | None:
        """The shards under ``run_dir`` (None: an unsharded folder); a mixed folder: ``RunFolderError``."""
        run_dir, found = Path(run_dir), {}
        root = run_dir / SHARDS
        for p in sorted(root.iterdir()) if root.is_dir() else []:
            m = _SHARD_NAME.match(p.name)
            if m and p.is_dir() and int(m[1]) < int(m[2]):
                found.setdefault(int(m[2]), {})[int(m[1])] = p
        if not found:
            return None
        if len(found) > 1:
            raise RunFolderError(f"{root} holds shards of different dataset.num_shards "
                                 f"({', '.join(map(str, sorted(found)))}); keep one set")
        if (run_dir / RECORDS).is_file() or (run_dir / MANIFEST).is_file():
            raise RunFolderError(f"{run_dir} holds both an unsharded run and shards in {SHARDS}/; keep one")
        (k, folders), = found.items()
        return cls(run_dir, k, dict(sorted(folders.items())))

    def names(self, shards: Iterable[int]) -> str:
        """``03, 07 of 16``."""
        return f"{', '.join(shard_label(i, self.num_shards) for i in shards)} of {self.num_shards}"

    def unfinished(self) -> list[int]:
        """Shards missing, or whose ``summary.json`` is absent or says incomplete."""
        return [i for i in range(self.num_shards) if not (self.summaries.get(i) or {}).get("complete")]

    def describe(self) -> str:
        """``shards 03, 05, 07 of 16 not complete (03, 07 missing)``; empty when every shard is complete."""
        todo, missing = self.unfinished(), [i for i in range(self.num_shards) if i not in self.folders]
        gone = f" ({', '.join(shard_label(i, self.num_shards) for i in missing)} missing)" if missing else ""
        return f"shards {self.names(todo)} not complete{gone}" if todo else ""

    @cached_property
    def manifests(self) -> dict[int, dict[str, Any]]:
        """Each shard's manifest; shards whose semantic configs differ from the first are a ``RunFolderError``."""
        out = {i: read_json(p / MANIFEST, missing_ok=True) or {} for i, p in self.folders.items()}
        configs = {i: semantic_config(m.get("config", {})) for i, m in out.items() if m}
        first, ref = next(iter(configs.items()), (0, {}))
        odd = [i for i, c in configs.items() if c != ref]
        if odd:
            raise RunFolderError(f"{self.run_dir}: shards {self.names(odd)} were made with another config than shard "
                                 f"{shard_label(first, self.num_shards)} ({config_diff(ref, configs[odd[0]])[0]}); "
                                 "rerun or delete them")
        return out

    @cached_property
    def summaries(self) -> dict[int, dict[str, Any] | None]:
        return {i: read_json(p / SUMMARY, missing_ok=True) for i, p in self.folders.items()}

    @cached_property
    def records(self) -> list[dict]:
        """The shards' records in the dataset's order: shard i's j-th prompt is the run's
        (j·K + i)-th (each manifest lists its shard's prompt ids); a prompt twice is an error."""
        records = [r for p in self.folders.values() for r in read_records(p)]
        pos = {pid: j * self.num_shards + i for i, m in self.manifests.items()
               for j, pid in enumerate(get_path(m, "shard.prompt_ids", []))}
        twice = [pid for pid, n in Counter(r.get("prompt_id") for r in records).items() if n > 1]
        if twice:
            raise RunFolderError(f"{self.run_dir}: prompt {twice[0]!r} is in the records of more than one shard")
        return sorted(records, key=lambda r: pos.get(r.get("prompt_id"), math.inf))

    @cached_property
    def summary(self) -> dict[str, Any] | None:
        """``summarize`` over the shards' records, ``complete`` when every shard is, plus
        ``num_shards``, ``unfinished_shards``, and the evaluation ``metrics`` of the run
        folder's own ``summary.json`` while its record count is the shards'."""
        parts = [s for s in self.summaries.values() if s]
        if not parts:
            return None
        ids = lambda key: [x for s in parts for x in s.get(key) or []]  # noqa: E731
        out = summarize(self.records, sum(int(s.get("num_prompts") or 0) for s in parts),
                        ids("skipped_ids"), ids("truncated_ids"))
        unfinished = self.unfinished()
        out.update(complete=not unfinished, num_shards=self.num_shards, unfinished_shards=unfinished)
        own = read_json_or_none(self.run_dir / SUMMARY) or {}
        if "metrics" in own and own.get("num_done") == out["num_done"]:
            out["metrics"] = own["metrics"]
        return out


# -- run identity -------------------------------------------------------------------------
_SEED_RE = re.compile(r"^seed(\d+)$")


@dataclass(frozen=True)
class Run:
    """One run folder: identity from its path, files read once when first asked for."""

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
        m, parts = _SEED_RE.match(path.name), path.parts
        model, sep, reward = parts[-4].partition("__") if len(parts) >= 5 else ("", "", "")
        if m is None or not (sep and model and reward):
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
        return read_records(self.path) if self.shards is None else self.shards.records

    @cached_property
    def shards(self) -> Shards | None:
        return Shards.of(self.path)

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """``manifest.json`` (corrupt: a ``RunFolderError``); a sharded run's: its first shard's (one config)."""
        if self.shards is None:
            return read_json(self.path / MANIFEST, missing_ok=True) or {}
        return next((m for m in self.shards.manifests.values() if m), {})

    @property
    def config(self) -> dict[str, Any]:
        return get_path(self.manifest, "config", {})

    @cached_property
    def summary(self) -> dict[str, Any] | None:
        return read_summary(self.path) if self.shards is None else self.shards.summary

    @property
    def complete(self) -> bool:
        return bool(self.summary and self.summary.get("complete"))

    @property
    def unfinished(self) -> str:
        """``Shards.describe`` of a sharded run that is not complete, else empty."""
        return self.shards.describe() if self.shards is not None and not self.complete else ""

    @property
    def metrics(self) -> dict[str, Any]:
        return get_path(self.summary or {}, "metrics", {})

    def method_param(self, key: str, default: Any = None) -> Any:
        """A method hyper-parameter from the manifest's config (``default`` where absent)."""
        v = get_path(self.config, f"method.{key}")
        return default if v is None else v
