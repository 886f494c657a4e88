"""What the tables and figures share: display names, the paper's orders, which variant of
a cell a table uses, number formats, and Markdown/LaTeX rendering through pandas
(``DataFrame.to_markdown``, ``Styler.to_latex``). Pure functions: no model, no torch.

Conventions: "mean (std) over seeds" is the mean over seeds of a per-seed value and the
*sample* standard deviation over seeds (``ddof=1``); undefined (NaN, shown "—") with one
seed.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from aisp_bench.results import group_runs
from aisp_bench.rundir import Run

T = TypeVar("T")

# --------------------------------------------------------------------------- names

METHOD_ORDER = ("bon_topp", "bon_gaussian", "aisp", "spec_rejection", "particle_filter")  # the paper's, then the rest
PAIR_ORDER = (
    ("llama3_8b", "ultrarm"),
    ("vicuna_7b", "ultrarm"),
    ("llama3_8b", "eurus"),
    ("vicuna_7b", "eurus"),
)
DATASET_ORDER = ("shp", "hh_rlhf")

METHOD_NAMES = {"aisp": "AISP", "bon_topp": "BoN (top-p)", "bon_gaussian": "BoN (N(0,σ²I))",
                "spec_rejection": "Speculative Rejection", "particle_filter": "Particle filtering"}
METHOD_NAMES_TEX = {
    "aisp": "AISP",
    "bon_topp": "BoN (top-$p$)",
    "bon_gaussian": r"BoN ($\mathcal{N}(\mathbf{0},\sigma^2\mathbf{I})$)",
    "spec_rejection": "Speculative Rejection",
    "particle_filter": "Particle filtering",
}
MODEL_NAMES = {"llama3_8b": "Llama3_8B", "vicuna_7b": "Vicuna_7B", "smollm2_135m": "SmolLM2-135M"}
REWARD_NAMES = {"ultrarm": "UltraRM", "eurus": "Eurus"}
DATASET_NAMES = {"shp": "SHP", "hh_rlhf": "HH-RLHF"}

_TEX_SPECIAL = str.maketrans({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                              "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"})


def tex_escape(text: str) -> str:
    """Escape LaTeX special characters in plain text (names such as ``Llama3_8B``)."""
    return str(text).translate(_TEX_SPECIAL)


def best_of_pool(method: str) -> bool:
    """A best-of-N method: i.i.d. samples, the best returned; its curves use the unbiased best-of-m
    over the recorded pool (:mod:`.bestof`)."""
    return method.startswith("bon")


def display_method(name: str, latex: bool = False) -> str:
    """Display name of a method (``aisp`` -> ``AISP``); unknown names as-is (escaped for LaTeX)."""
    if latex:
        return METHOD_NAMES_TEX.get(name, tex_escape(name))
    return METHOD_NAMES.get(name, name)


def display_dataset(name: str) -> str:
    return DATASET_NAMES.get(name, name)


def display_pair(model: str, reward: str) -> str:
    """The paper's row label: ``Llama3_8B & UltraRM``."""
    return f"{MODEL_NAMES.get(model, model)} & {REWARD_NAMES.get(reward, reward)}"


def _order_key(order: Sequence) -> Callable[[Any], tuple[int, str]]:
    return lambda value: (order.index(value), "") if value in order else (len(order), str(value))


# Sort keys: the paper's order (methods, pairs, datasets: SHP then HH-RLHF), then unknown names alphabetically.
method_key = _order_key(METHOD_ORDER)
pair_key = _order_key(PAIR_ORDER)
dataset_key = _order_key(DATASET_ORDER)


# --------------------------------------------------------------------------- numbers


def as_float_array(values: Any) -> np.ndarray:
    """A list of numbers (``None`` -> NaN) as a float array; anything else -> empty array."""
    if not isinstance(values, (list, tuple)):
        return np.zeros(0)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def finite_or_nan(value: Any) -> float:
    """``value`` as a float, NaN when it is missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------- runs


def paper_order(runs: Iterable[Run]) -> list[Run]:
    """Runs sorted by dataset, pair, method (the paper's order first), variant, seed."""
    return sorted(runs, key=lambda r: (dataset_key(r.dataset), pair_key((r.model, r.reward)), method_key(r.method),
                                       r.variant, r.seed))


def prompt_source(run: Run) -> str:
    """Where a run's prompts came from (its manifest's ``dataset``): a local file (its last two
    path parts) or the hub's split, subset included, and how many were drawn with which seed."""
    d = run.config.get("dataset") or {}
    if not d.get("path") and not d.get("hub_id"):
        return "not recorded"
    if d.get("path"):
        where = "file " + "/".join(Path(str(d["path"])).parts[-2:])
    else:
        subset = f"/{d['hub_data_dir']}" if d.get("hub_data_dir") else " (all subsets)"
        where = f"hub {d.get('hub_id')}{subset}, {d.get('split')} split"
    return f"{where}, {d.get('num_prompts')} drawn with sample_seed {d.get('sample_seed')}"


def unfinished_shards(runs: Iterable[Run]) -> list[str]:
    """``<dataset>/<pair>/<method>/<variant>/seed<k>: shards 03 of 16 not complete (03 missing)``
    for each sharded run with a shard missing or unfinished (read as an incomplete run)."""
    return [f"{r.dataset}/{r.pair}/{r.method}/{r.variant}/seed{r.seed}: {r.unfinished}" for r in runs if r.unfinished]


STUDIES = ("lambda_sweep", "sensitivity")  # experiments whose variants sweep one method's settings


def select_variants(runs: Iterable[Run]) -> tuple[dict[tuple[str, str, str, str], list[Run]], list[str]]:
    """One variant per (dataset, model, reward, method): the runs a table cell averages.

    Rule: ``default`` when present; otherwise the variant with the most seeds (ties:
    alphabetically first). The sweeps of one method's hyper-parameters (variants of
    ``STUDIES``: the λ sweep, the fixed-budget sensitivity) are never chosen: their own
    targets report them. Returns the chosen runs per cell and human-readable notes for
    every cell where a choice among several variants was made.
    """
    by_cell: dict[tuple[str, str, str, str], dict[str, list[Run]]] = defaultdict(dict)
    for key, rs in group_runs(runs).items():
        if not key[4].startswith(STUDIES):
            by_cell[key[:4]][key[4]] = rs
    chosen: dict[tuple[str, str, str, str], list[Run]] = {}
    notes: list[str] = []
    for cell, variants in by_cell.items():
        name = "default" if "default" in variants else min(variants, key=lambda v: (-len(variants[v]), v))
        chosen[cell] = variants[name]
        if len(variants) > 1:
            others = ", ".join(sorted(v for v in variants if v != name))
            notes.append(f"{cell[0]}/{cell[1]}__{cell[2]}/{cell[3]}: used variant '{name}' (also on disk: {others})")
    return chosen, notes


# --------------------------------------------------------------------------- formats and rendering

DASH = "—"


def one_scale(items: Sequence[T], scale: Callable[[T], str]) -> tuple[list[T], str]:
    """The ``items`` on one scale (``scale(item)``: who scored it, e.g. a reward model's name):
    the scale most items share (ties: the first name in sorted order), and that name. A mean
    over items of different scorers mixes scales, so the others are left out (and named by the
    caller)."""
    counts = Counter(scale(x) for x in items)
    if not counts:
        return [], ""
    name = min(counts, key=lambda k: (-counts[k], k))
    return [x for x in items if scale(x) == name], name


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (``ddof=1``) of the finite values; NaN where undefined."""
    x = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), (float(x.std(ddof=1)) if x.size > 1 else math.nan)


def nanmean(x: np.ndarray) -> float:
    """Mean of the finite entries; NaN when there are none (no warning)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def records_mean(records: Iterable[dict[str, Any]], key: str) -> float:
    """Mean of the records' finite ``key`` values (NaN when there are none)."""
    return nanmean(as_float_array([r.get(key) for r in records]))


def fmt_num(x: float, decimals: int) -> str:
    """Fixed decimals, "—" for NaN."""
    return DASH if x is None or not np.isfinite(x) else f"{x:.{decimals}f}"


def fmt_std(x: float) -> str:
    """A std with two significant digits, no exponent ("0.07", "0.0004", "2.1")."""
    if x is None or not np.isfinite(x):
        return DASH
    if x == 0:
        return "0"
    digits = max(0, 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{digits}f}"


def fmt_mean_std(mean: float, std: float, decimals: int) -> str:
    """``mean (std)``; only ``mean`` when the std is undefined; "—" when the mean is."""
    if mean is None or not np.isfinite(mean):
        return DASH
    return fmt_num(mean, decimals) if not np.isfinite(std) else f"{fmt_num(mean, decimals)} ({fmt_std(std)})"


def fmt_interval(mean: float, lo: float, hi: float, decimals: int, sign: bool = False) -> str:
    """``mean [lo, hi]`` (``mean`` alone where the interval is undefined; "—" without a mean)."""
    if mean is None or not np.isfinite(mean):
        return DASH
    f = (lambda x: f"{x:+.{decimals}f}") if sign else (lambda x: fmt_num(x, decimals))
    return f(mean) if not (np.isfinite(lo) and np.isfinite(hi)) else f"{f(mean)} [{f(lo)}, {f(hi)}]"


def render_markdown(header: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None,
                    notes: Sequence[str] = (), align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table (``align``: "l"/"r" per column), title and notes."""
    cells = pd.DataFrame([[str(c).replace("|", "\\|").replace("\n", " ") for c in row] for row in rows],
                         columns=list(header))
    colalign = ["left" if a == "l" else "right" for a in (align or ["l"] * len(header))]
    table = cells.to_markdown(index=False, tablefmt="pipe", colalign=colalign, disable_numparse=True)
    lines = ([f"**{title}**", ""] if title else []) + [table]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


_TEX_UNICODE = (("σ²", r"$\sigma^2$"), ("σ", r"$\sigma$"), ("λ", r"$\lambda$"), ("†", r"$^\dagger$"),
                ("‡", r"$^\ddagger$"), ("≤", r"$\le$"), ("·", r"$\cdot$"), ("±", r"$\pm$"), ("—", "---"),
                ("‖Û‖²", r"$\Vert\hat U\Vert^2$"), (r"Q\_Û‖P", r"$Q_{\hat U}\Vert P$"), ("κ", r"$\kappa$"),
                ("×", r"$\times$"), ("−", "$-$"))


def tex_text(text: str) -> str:
    """Plain text (a note, a caption) as LaTeX: special characters escaped, the few
    Unicode symbols used in notes (σ², λ, †, ‡, ≤, ·, ±, —, ‖Û‖², κ, ×, −) as math or dashes."""
    out = tex_escape(text)
    for u, t in _TEX_UNICODE:
        out = out.replace(u, t)
    return out


def render_latex(header_levels: Sequence[Sequence[str]], rows: Sequence[Sequence[str]], *, caption: str = "",
                 label: str = "", notes: Sequence[str] = (), align: str | None = None) -> str:
    """A booktabs ``table`` with a multi-level header (equal neighbouring labels merged).

    ``header_levels`` lists header rows top to bottom. Cells must already be LaTeX
    (escaped); "—" becomes "---". Needs ``booktabs``.
    """
    cells = pd.DataFrame([[str(c).replace("—", "---") for c in row] for row in rows],
                         columns=pd.MultiIndex.from_arrays(header_levels))
    tex = cells.style.hide(axis="index").to_latex(
        hrules=True, multicol_align="c", caption=caption or None, label=label or None, position="t",
        position_float="centering", column_format=align or "l" * len(header_levels[-1]))
    if notes:
        foot = "\\par\\smallskip\\footnotesize\n" + "".join(tex_text(n) + "\\\\\n" for n in notes)
        tex = tex.replace("\\end{table}", foot + "\\end{table}")
    return tex


def write_texts(out_dir: Path | str, name: str, contents: dict[str, str]) -> list[Path]:
    """Write ``<name>.<ext>`` per item of ``contents`` in that order; returns the paths."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = [Path(out_dir) / f"{name}.{ext}" for ext in contents]
    for p, text in zip(paths, contents.values()):
        p.write_text(text, encoding="utf-8")
    return paths
