"""The results tree: which runs a command works on, and the judge's win-rate files::

    <results_dir>/runs/<dataset>/<model>__<reward>/<method>/<variant>/seed<k>/   one run (rundir.py)
    <results_dir>/judge/<dataset>/<model>__<reward>/<method_a>_vs_<method_b>.json

``Selection`` (the ``select`` block of conf/app.yaml) picks runs by dataset, pair, method,
variant and seed; ``discover_runs`` finds them (a sharded run is one run, see
``rundir.Shards``); ``group_runs`` gathers the seeds of one cell.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aisp_bench.rundir import PROMPT_METRICS, RECORDS, SHARDS, SUMMARY, Run, RunFolderError, read_json_or_none

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
        chosen = ((key, getattr(self, key)) for key in SELECT_KEYS)
        return " ".join(f"select.{key}={v[0] if len(v) == 1 else list(v)}" for key, v in chosen if v is not None)


def runs_root(results_dir: str | Path) -> Path:
    """``<results_dir>/runs`` when it exists, else ``results_dir`` itself (a runs folder was given)."""
    results_dir = Path(results_dir)
    return results_dir / "runs" if (results_dir / "runs").is_dir() else results_dir


def discover_runs(results_dir: str | Path, select: Selection | None = None) -> list[Run]:
    """Every run folder under ``results_dir`` (or ``results_dir/runs``) that holds a
    ``records.jsonl``, a ``summary.json`` or shards, and matches ``select``, sorted by path."""
    select = select or Selection()
    runs = (Run.at(p) for p in sorted(runs_root(results_dir).glob("*/*/*/*/seed*"))
            if (p / RECORDS).is_file() or (p / SUMMARY).is_file() or (p / SHARDS).is_dir())
    return [run for run in runs if run is not None and select.matches(run)]


def read_prompt_metrics(run_dir: str | Path, fingerprint: str | None) -> dict[str, Any] | None:
    """A run's ``metrics_per_prompt.json`` when written under ``fingerprint`` (the metrics block's); None
    when it is missing, unreadable (with a warning) or stale (evaluate's check, the report's read)."""
    per = read_json_or_none(Path(run_dir) / PROMPT_METRICS) or {}
    return per if fingerprint is not None and per.get("fingerprint") == fingerprint else None


def group_runs(runs: Iterable[Run]) -> dict[tuple[str, str, str, str, str], list[Run]]:
    """Runs grouped by (dataset, model, reward, method, variant), seeds sorted; insertion-ordered."""
    groups: dict[tuple[str, str, str, str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    return {k: sorted(v, key=lambda r: r.seed) for k, v in groups.items()}


OUTCOMES = ("win", "draw", "loss", "invalid")  # of method A, per judged prompt


def preference(scores: Sequence[float] | None, a_first: bool) -> str | None:
    """'A', 'B' or 'tie' from one judge reply's two scores (first shown, second shown); None if invalid."""
    if scores is None:
        return None
    sa, sb = scores if a_first else scores[::-1]
    return "A" if sa > sb else "B" if sb > sa else "tie"


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
