"""Read run folders and judge results from disk, tolerantly; display names.

Layout (written by the run orchestration, only read here)::

    <results>/runs/<dataset>/<model>__<reward>/<method>/<variant>/seed<k>/
        records.jsonl   one JSON object per prompt (a torn last line is skipped)
        manifest.json   the resolved config, versions, timing
        summary.json    counts, totals and (after evaluation) ``metrics``
    <results>/judge/<dataset>/<model>__<reward>/<method_a>_vs_<method_b>.json

``variant`` is Hydra's override dirname (``default`` when there were no overrides).
Everything here is a pure function of those files: no model, no torch.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from aisp_bench.results import scan_records

# --------------------------------------------------------------------------- names

METHOD_ORDER = ("bon_topp", "bon_gaussian", "aisp")  # the paper's row order
PAIR_ORDER = (
    ("llama3_8b", "ultrarm"),
    ("vicuna_7b", "ultrarm"),
    ("llama3_8b", "eurus"),
    ("vicuna_7b", "eurus"),
)
DATASET_ORDER = ("shp", "hh_rlhf")

METHOD_NAMES = {"aisp": "AISP", "bon_topp": "BoN (top-p)", "bon_gaussian": "BoN (N(0,σ²I))"}
METHOD_NAMES_TEX = {
    "aisp": "AISP",
    "bon_topp": "BoN (top-$p$)",
    "bon_gaussian": r"BoN ($\mathcal{N}(\mathbf{0},\sigma^2\mathbf{I})$)",
}
MODEL_NAMES = {"llama3_8b": "Llama3_8B", "vicuna_7b": "Vicuna_7B", "smollm2_135m": "SmolLM2-135M"}
REWARD_NAMES = {"ultrarm": "UltraRM", "eurus": "Eurus"}
DATASET_NAMES = {"shp": "SHP", "hh_rlhf": "HH-RLHF"}

_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    """Escape LaTeX special characters in plain text (names such as ``Llama3_8B``)."""
    return "".join(_TEX_SPECIAL.get(c, c) for c in str(text))


def display_method(name: str, latex: bool = False) -> str:
    """Display name of a method (``aisp`` -> ``AISP``); unknown names as-is (escaped for LaTeX)."""
    if latex:
        return METHOD_NAMES_TEX.get(name, tex_escape(name))
    return METHOD_NAMES.get(name, name)


def display_model(name: str) -> str:
    return MODEL_NAMES.get(name, name)


def display_reward(name: str) -> str:
    return REWARD_NAMES.get(name, name)


def display_dataset(name: str) -> str:
    return DATASET_NAMES.get(name, name)


def display_pair(model: str, reward: str) -> str:
    """The paper's row label: ``Llama3_8B & UltraRM``."""
    return f"{display_model(model)} & {display_reward(reward)}"


def split_pair(pair: str) -> tuple[str, str]:
    """``llama3_8b__ultrarm`` -> (``llama3_8b``, ``ultrarm``)."""
    model, sep, reward = pair.partition("__")
    if not sep or not model or not reward:
        raise ValueError(f"not a <model>__<reward> folder name: {pair!r}")
    return model, reward


def _rank(value: str, order: Iterable) -> tuple[int, str]:
    order = list(order)
    return (order.index(value), "") if value in order else (len(order), str(value))


def method_key(name: str) -> tuple[int, str]:
    """Sort key: the paper's method order, then unknown names alphabetically."""
    return _rank(name, METHOD_ORDER)


def pair_key(pair: tuple[str, str]) -> tuple[int, str]:
    """Sort key: the paper's pair order, then unknown pairs alphabetically."""
    return _rank(tuple(pair), PAIR_ORDER)


def dataset_key(name: str) -> tuple[int, str]:
    """Sort key: SHP, HH-RLHF, then unknown datasets alphabetically."""
    return _rank(name, DATASET_ORDER)


# --------------------------------------------------------------------------- files


def read_jsonl_tolerant(path: Path | str) -> list[dict[str, Any]]:
    """Read a JSON-lines file; a last line that fails to parse (torn by a crash) is skipped.

    The rules are those of ``aisp_bench.results.scan_records`` (a corrupt line before
    the last one is an error naming file and line). A missing file gives ``[]``.
    """
    path = Path(path)
    if not path.is_file():
        return []
    scan = scan_records(path)
    if scan.dropped_tail:
        warnings.warn(f"{path}: skipping a torn last line", stacklevel=2)
    return scan.records


def read_json_tolerant(path: Path | str) -> dict[str, Any] | None:
    """A JSON object from ``path``; ``None`` when the file is missing, unparsable or not an object."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        warnings.warn(f"{path}: not valid JSON, ignored", stacklevel=2)
        return None
    return obj if isinstance(obj, dict) else None


def read_records(run_dir: Path | str) -> list[dict[str, Any]]:
    """Per-prompt records of one run folder (``records.jsonl``), torn last line skipped.

    When a prompt id occurs more than once (a resumed run re-wrote it) the last
    occurrence wins; the order of first appearance is kept.
    """
    recs = read_jsonl_tolerant(Path(run_dir) / "records.jsonl")
    by_id: dict[Any, dict[str, Any]] = {}
    for i, r in enumerate(recs):
        by_id[r.get("prompt_id", f"#{i}")] = r
    return list(by_id.values())


def as_float_array(values: Any) -> np.ndarray:
    """A list of numbers (``None`` -> NaN) as a float array; anything else -> empty array."""
    if not isinstance(values, (list, tuple)):
        return np.zeros(0)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def finite_or_nan(value: Any) -> float:
    """``value`` as a float, NaN when it is missing or not a number."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x


# --------------------------------------------------------------------------- runs

_SEED_RE = re.compile(r"^seed(-?\d+)$")


@dataclass
class Run:
    """One run folder: identity from the path, files read lazily and cached."""

    path: Path
    dataset: str
    model: str
    reward: str
    method: str
    variant: str
    seed: int

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
        return read_json_tolerant(self.path / "manifest.json") or {}

    @cached_property
    def summary(self) -> dict[str, Any] | None:
        return read_json_tolerant(self.path / "summary.json")

    @property
    def method_config(self) -> dict[str, Any]:
        cfg = self.manifest.get("config") or {}
        m = cfg.get("method") if isinstance(cfg, dict) else None
        return m if isinstance(m, dict) else {}

    @property
    def complete(self) -> bool:
        """True when ``summary.json`` says the run finished every prompt."""
        return bool(self.summary and self.summary.get("complete"))

    @property
    def metrics(self) -> dict[str, Any]:
        s = self.summary or {}
        m = s.get("metrics")
        return m if isinstance(m, dict) else {}

    def method_param(self, key: str, default: Any = None) -> Any:
        """A method hyper-parameter from the manifest, else parsed from the variant name
        (``method.lam=0.3,...``), else ``default``."""
        v = self.method_config.get(key)
        if v is not None:
            return v
        for part in self.variant.split(","):
            k, sep, val = part.partition("=")
            if sep and k.strip().lstrip("+~") == f"method.{key}":
                try:
                    return float(val) if any(c in val for c in ".eE") else int(val)
                except ValueError:
                    return val
        return default


def runs_root(results: Path | str) -> Path:
    """``<results>/runs`` when it exists, else ``results`` itself (a runs folder was given)."""
    results = Path(results)
    return results / "runs" if (results / "runs").is_dir() else results


def discover_runs(
    results: Path | str,
    *,
    datasets: Iterable[str] | None = None,
    pairs: Iterable[str] | None = None,
    methods: Iterable[str] | None = None,
    variants: Iterable[str] | None = None,
) -> list[Run]:
    """Every run folder ``<dataset>/<model>__<reward>/<method>/<variant>/seed<k>/`` under
    ``results`` (or ``results/runs``) holding a ``records.jsonl`` or ``summary.json``.

    Filters keep only the given names (``pairs`` as ``model__reward``). Sorted by
    dataset, pair, method (paper order first), variant, seed.
    """
    root = runs_root(results)
    keep = {k: (set(v) if v else None) for k, v in
            dict(dataset=datasets, pair=pairs, method=methods, variant=variants).items()}
    out: list[Run] = []
    if not root.is_dir():
        return out
    for seed_dir in root.glob("*/*/*/*/seed*"):
        m = _SEED_RE.match(seed_dir.name)
        if not m or not seed_dir.is_dir():
            continue
        if not ((seed_dir / "records.jsonl").is_file() or (seed_dir / "summary.json").is_file()):
            continue
        variant_dir = seed_dir.parent
        method_dir = variant_dir.parent
        pair_dir = method_dir.parent
        dataset_dir = pair_dir.parent
        try:
            model, reward = split_pair(pair_dir.name)
        except ValueError:
            continue
        run = Run(path=seed_dir, dataset=dataset_dir.name, model=model, reward=reward,
                  method=method_dir.name, variant=variant_dir.name, seed=int(m.group(1)))
        if keep["dataset"] is not None and run.dataset not in keep["dataset"]:
            continue
        if keep["pair"] is not None and run.pair not in keep["pair"]:
            continue
        if keep["method"] is not None and run.method not in keep["method"]:
            continue
        if keep["variant"] is not None and run.variant not in keep["variant"]:
            continue
        out.append(run)
    out.sort(key=lambda r: (dataset_key(r.dataset), pair_key((r.model, r.reward)), method_key(r.method),
                            r.variant, r.seed))
    return out


def group_runs(runs: Iterable[Run]) -> dict[tuple[str, str, str, str, str], list[Run]]:
    """Runs grouped by (dataset, model, reward, method, variant), seeds sorted; insertion-ordered."""
    groups: dict[tuple[str, str, str, str, str], list[Run]] = defaultdict(list)
    for r in runs:
        groups[r.group].append(r)
    return {k: sorted(v, key=lambda r: r.seed) for k, v in groups.items()}


def select_variants(runs: Iterable[Run]) -> tuple[dict[tuple[str, str, str, str], list[Run]], list[str]]:
    """One variant per (dataset, model, reward, method): the runs a table cell averages.

    Rule: ``default`` when present; otherwise the variant with the most seeds (ties:
    alphabetically first). Returns the chosen runs per cell and human-readable notes
    for every cell where a choice among several variants was made.
    """
    by_cell: dict[tuple[str, str, str, str], dict[str, list[Run]]] = defaultdict(dict)
    for key, rs in group_runs(runs).items():
        by_cell[key[:4]][key[4]] = rs
    chosen: dict[tuple[str, str, str, str], list[Run]] = {}
    notes: list[str] = []
    for cell, variants in by_cell.items():
        if "default" in variants:
            name = "default"
        else:
            name = sorted(variants, key=lambda v: (-len(variants[v]), v))[0]
        chosen[cell] = variants[name]
        if len(variants) > 1:
            others = ", ".join(sorted(v for v in variants if v != name))
            notes.append(f"{cell[0]}/{cell[1]}__{cell[2]}/{cell[3]}: used variant '{name}' (also on disk: {others})")
    return chosen, notes


# --------------------------------------------------------------------------- judge


@dataclass
class JudgeResult:
    """One ``<method_a>_vs_<method_b>.json`` win-rate file."""

    path: Path
    dataset: str
    model: str
    reward: str
    method_a: str
    method_b: str
    data: dict[str, Any]


_VS_RE = re.compile(r"^(?P<a>.+?)_vs_(?P<b>.+)$")


def discover_judge(results: Path | str, *, datasets: Iterable[str] | None = None,
                   pairs: Iterable[str] | None = None) -> list[JudgeResult]:
    """Every ``judge/<dataset>/<model>__<reward>/<a>_vs_<b>.json`` under ``results`` that parses."""
    root = Path(results) / "judge"
    ds_keep = set(datasets) if datasets else None
    pair_keep = set(pairs) if pairs else None
    out: list[JudgeResult] = []
    if not root.is_dir():
        return out
    for f in sorted(root.glob("*/*/*_vs_*.json")):
        m = _VS_RE.match(f.stem)
        try:
            model, reward = split_pair(f.parent.name)
        except ValueError:
            continue
        dataset = f.parent.parent.name
        if (ds_keep and dataset not in ds_keep) or (pair_keep and f.parent.name not in pair_keep) or not m:
            continue
        data = read_json_tolerant(f)
        if data is None:
            continue
        out.append(JudgeResult(f, dataset, model, reward, data.get("method_a") or m.group("a"),
                               data.get("method_b") or m.group("b"), data))
    return out
