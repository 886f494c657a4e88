"""How the pairwise judge's verdicts depend on the answers' order and length, from the
judgements the win-rate files already hold (both orders asked for every prompt).

Per comparison (a win-rate file, in ``method_a``'s view), every rate is a mean over
trials of the per-trial percentage, with the tables' bootstrap interval (the judged
prompts resampled as clusters: ``Bootstrap.shares`` of :mod:`aisp_bench.report.stats`):

* **flips**: of the prompts with two valid replies, the share whose preferred answer
  changes with the order (A preferred in one order, B or a tie in the other, ...);
  ``reversed``: the share preferring A in one order and B in the other;
* **first position**: of the valid replies that are not ties, the share preferring the
  answer shown first (50% = no position bias);
* **longer answer wins**: of the prompts with a decisive outcome (win or loss) and
  answers of different length, the share won by the longer answer;
* **by length**: win / draw / loss of A on the prompts where A's answer is longer, B's
  is longer, or both are as long. Lengths are the cleaned answers' words (whitespace
  separated), as the judge saw them: recorded in the judgements (``words``) since this
  report exists, read from the runs' records for older files.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from aisp_bench.metrics import EvalBatch
from aisp_bench.results import OUTCOMES, Selection, preference, runs_root
from aisp_bench.rundir import RECORDS, SHARDS, Run, read_records

from .common import display_dataset, display_method, display_pair, fmt_interval, render_markdown, write_texts
from .stats import Bootstrap
from .tables import comparison_files

BUCKETS = ("a_longer", "b_longer", "equal")
RATES = ("flips", "reversed", "first_position", "longer_wins")


# --------------------------------------------------------------------------- answer lengths


def record_words(results_dir: Path | str) -> Callable[[str], dict[str, int] | None]:
    """For files without ``words``: per prompt, the words of the cleaned response of the run a
    win-rate file names (as shown then: maybe relative to another cwd); None if not found."""

    @functools.cache
    def of(shown: str) -> dict[str, int] | None:
        p = Path(shown)
        for path in (p, runs_root(results_dir).joinpath(*p.parts[-5:])):
            if (path / RECORDS).is_file() or (path / SHARDS).is_dir():
                run = Run.at(path)
                records = run.records if run else read_records(path)
                batch = EvalBatch.from_records(records, run.config if run else None)  # what metrics and the judge read
                return {str(r.get("prompt_id")): len(t.split()) for r, t in zip(records, batch.responses, strict=True)}
        return None

    return of


def _words(j: dict[str, Any], trial: dict[str, Any], lookup: Callable) -> tuple[int, int] | None:
    w = j.get("words")
    if isinstance(w, list) and len(w) == 2:
        return int(w[0]), int(w[1])
    a, b = lookup(str(trial.get("run_a", ""))), lookup(str(trial.get("run_b", "")))
    pid = str(j.get("prompt_id"))
    return (a[pid], b[pid]) if a and b and pid in a and pid in b else None


# --------------------------------------------------------------------------- per trial


def _preferences(j: dict[str, Any]) -> list[str | None]:
    """'A', 'B', 'tie' or None (invalid) per order asked."""
    return [preference(s if isinstance(s, list) and len(s) == 2 else None, order == "AB")
            for order, s in zip(j.get("orders") or [], j.get("scores") or [])]


Items = dict[str, list[tuple[str, int]]]  # per rate or bucket: (prompt id, code) per item


def trial_items(trial: dict[str, Any], lookup: Callable, swap: bool = False) -> Items:
    """One trial's items, coded: per rate (prompt id, 1/0) per item (see the module
    docstring), per length bucket (prompt id, outcome code: index in ``OUTCOMES``);
    ``words_missing`` lists the judgements without lengths. ``swap``: in B's view (win and
    loss exchanged, A's and B's lengths too; the rates do not change)."""
    out: Items = {k: [] for k in (*RATES, *BUCKETS, "words_missing")}
    for j in trial.get("judgements") or []:
        pid, prefs = str(j.get("prompt_id")), _preferences(j)
        if len(prefs) == 2 and None not in prefs:
            out["flips"].append((pid, int(prefs[0] != prefs[1])))
            out["reversed"].append((pid, int(set(prefs) == {"A", "B"})))
        for s in j.get("scores") or []:
            if isinstance(s, list) and len(s) == 2 and s[0] != s[1]:
                out["first_position"].append((pid, int(s[0] > s[1])))
        words = _words(j, trial, lookup)
        if words is None:
            out["words_missing"].append((pid, 1))
            continue
        res = j.get("outcome")
        if swap:
            words, res = words[::-1], {"win": "loss", "loss": "win"}.get(res, res)
        longer = "a_longer" if words[0] > words[1] else "b_longer" if words[1] > words[0] else "equal"
        if res in OUTCOMES:
            out[longer].append((pid, OUTCOMES.index(res)))
        if res in ("win", "loss") and longer != "equal":
            out["longer_wins"].append((pid, int((res == "win") == (longer == "a_longer"))))
    return out


# --------------------------------------------------------------------------- tables


def comparison_bias(d: dict[str, Any], swap: bool, lookup: Callable, boot: Bootstrap) -> dict[str, Any]:
    """One row of :func:`bias_table` from a win-rate file's contents."""
    trials = [trial_items(t, lookup, swap) for t in d.get("trials") or [] if isinstance(t, dict)]
    row: dict[str, Any] = dict(dataset=d.get("dataset"), model=d.get("model"), reward=d.get("reward"),
                               method_a=d.get("method_b") if swap else d.get("method_a"),
                               method_b=d.get("method_a") if swap else d.get("method_b"),
                               judge_model=d.get("judge_model"), mode=d.get("mode"), trials=len(trials),
                               words_missing=sum(len(t["words_missing"]) for t in trials))
    for rate in RATES:
        iv = boot.shares([t[rate] for t in trials], 2)[1]
        row.update({rate: iv.mean, f"{rate}_lo": iv.lo, f"{rate}_hi": iv.hi, f"{rate}_n": iv.items})
    for bucket in BUCKETS:
        ivs = boot.shares([t[bucket] for t in trials], len(OUTCOMES))
        row[f"{bucket}_n"] = ivs[0].items
        for k, iv in zip(OUTCOMES[:3], ivs, strict=False):
            row.update({f"{bucket}_{k}": iv.mean, f"{bucket}_{k}_lo": iv.lo, f"{bucket}_{k}_hi": iv.hi})
    return row


def bias_table(results_dir: Path | str, method_a: str, methods_b: Sequence[str], select: Selection | None = None,
               boot: Bootstrap | None = None) -> pd.DataFrame:
    """One row per win-rate file of ``method_a`` against each of ``methods_b`` (the tables'
    files, :func:`aisp_bench.report.tables.comparison_files`): the rates of the module
    docstring (``<rate>``, ``<rate>_lo``, ``<rate>_hi``, ``<rate>_n``) and per length bucket
    ``<bucket>_n`` and ``<bucket>_{win,draw,loss}`` with intervals. Files without per-prompt
    judgements are left out."""
    boot, lookup = boot or Bootstrap(), record_words(results_dir)
    rows = [comparison_bias(d, swap, lookup, boot)
            for b in methods_b for d, swap, _ in comparison_files(results_dir, method_a, b, select)
            if any(isinstance(t, dict) and t.get("judgements") for t in d.get("trials") or [])]
    return pd.DataFrame(rows)


def _cell(r: Any, key: str, n_key: str | None = None) -> str:
    """``rate [lo, hi] (n=items)`` of row ``r``."""
    n = int(getattr(r, n_key or f"{key}_n"))
    return f"{fmt_interval(getattr(r, key), getattr(r, f'{key}_lo'), getattr(r, f'{key}_hi'), 1)} (n={n})"


def render_bias(df: pd.DataFrame, boot: Bootstrap) -> str:
    """``judge_bias.md``: one row per comparison."""
    a = display_method(df["method_a"].iloc[0])
    header = ["Dataset", "Models", "Against", "Verdict flips with order %", "First position preferred %",
              "Longer answer wins %", f"{a} wins, {a} longer %", f"{a} wins, other longer %", f"{a} wins, equal %"]
    rows = [[display_dataset(r.dataset), display_pair(r.model, r.reward), display_method(r.method_b),
             _cell(r, "flips"), _cell(r, "first_position"), _cell(r, "longer_wins"),
             *(_cell(r, f"{b}_win", f"{b}_n") for b in BUCKETS)] for r in df.itertuples()]
    notes = ["Judge bias, from the judgements behind Tables 2-3 (aisp_bench/report/judge_bias.py): flips = "
             "prompts with two valid replies whose preferred answer changes with the order; first position = "
             "valid, non-tied replies preferring the answer shown first (50 = no position bias); longer answer "
             "wins = decisive outcomes (win or loss) between answers of different length won by the longer one; "
             "the last three columns: win rate by which cleaned answer has more words.",
             "Percent, mean over trials of the per-trial rate; n = items over all trials. "
             f"{boot.describe()}."]
    if (df["words_missing"] > 0).any():
        notes.append("Some judgements have no answer lengths (neither recorded nor found in the runs' records).")
    return render_markdown(header, rows, title="Judge position and length bias", notes=notes,
                           align=["l", "l", "l"] + ["r"] * 6)


def bias_notes(df: pd.DataFrame, method_b: str) -> list[str]:
    """One line per comparison against ``method_b``, for the notes of Tables 2-3."""
    return [f"Judge bias ({display_dataset(r.dataset)}, {display_pair(r.model, r.reward)}): the verdict changes "
            f"with the order for {_cell(r, 'flips')} of the prompts with two valid replies; the answer shown first "
            f"is preferred in {_cell(r, 'first_position')} of the decisive replies; the longer answer wins "
            f"{_cell(r, 'longer_wins')} of the decisive outcomes, in percent (judge_bias.md)."
            for r in df.itertuples() if r.method_b == method_b and (r.flips_n or r.first_position_n)]


def write_bias(df: pd.DataFrame, out_dir: Path | str, boot: Bootstrap, name: str = "judge_bias") -> list[Path]:
    """Write ``<name>.csv`` (every number) and ``<name>.md``."""
    return write_texts(out_dir, name, {"md": render_bias(df, boot), "csv": df.to_csv(index=False)})
