"""Compute Table 1's metrics for run folders into their ``summary.json``.

Usage::

    python -m aisp_bench.evaluate results/runs                       # every run below
    python -m aisp_bench.evaluate 'results/runs/shp/*/aisp/*/seed*'  # a glob (quote it)
    python -m aisp_bench.evaluate RUN_DIR ... --encoder minilm       # offline stand-in

Each argument is a run folder (one holding ``records.jsonl``), a folder above run
folders, or a glob of either. For each run the ``"metrics"`` block of
:func:`aisp_bench.metrics.compute_metrics` (reward, diversity, coherence and its encoder,
mean response length in tokens and words, number of records) is written into the run's
``summary.json``; its other keys are kept, and the file is replaced atomically.

Idempotent: the block carries a ``fingerprint`` of what it was computed from (the bytes
of ``records.jsonl``, the encoder, the metric names, the cleaning settings, this
module's version). A run whose fingerprint matches is left alone, so a second call costs
nothing and changes nothing; ``--force`` recomputes anyway (with the same result).

Coherence needs the SimCSE checkpoint ``princeton-nlp/sup-simcse-bert-base-uncased``
from the Hugging Face hub (``--encoder simcse``, the default). Where the hub cannot be
reached, loading fails with a one-line error; ``--encoder minilm`` then uses the
packaged all-MiniLM-L6-v2 as a stand-in, and ``coherence_encoder`` says so. There is
no silent fallback.

A run folder without ``summary.json`` (still running, or crashed before the end) is
skipped with a warning. Exit codes: 0 done, 1 a run (or the encoder) failed, 2 a path
or glob that names no run folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aisp_bench.metrics import DEFAULT_METRICS, METRICS, compute_metrics
from aisp_bench.metrics.cleaning import cleaning_options
from aisp_bench.metrics.records import (
    MANIFEST_FILE,
    SUMMARY_FILE,
    RunNotFoundError,
    find_run_dirs,
    read_json,
    read_records,
    records_sha256,
    write_json_atomic,
)

EVALUATE_VERSION = 1


def fingerprint(run_dir: Path, encoder_label: str | None, names: Sequence[str], config: dict[str, Any] | None) -> str:
    """Hash of everything the metrics block depends on (see the module docstring)."""
    payload = {
        "version": EVALUATE_VERSION,
        "records_sha256": records_sha256(run_dir),
        "encoder": encoder_label if "coherence" in names else None,
        "metrics": list(names),
        "cleaning": {k: list(v) for k, v in cleaning_options(config).items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def evaluate_run(
    run_dir: Path,
    encoder: Any,
    *,
    names: Sequence[str] = DEFAULT_METRICS,
    force: bool = False,
) -> tuple[str, dict[str, Any] | None]:
    """Write the metrics block into ``run_dir/summary.json``.

    Returns (status, metrics): status is ``"updated"``, ``"up to date"`` or
    ``"skipped: <why>"``.
    """
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        return "skipped: no summary.json (run unfinished or crashed)", None
    manifest_path = run_dir / MANIFEST_FILE
    config = read_json(manifest_path).get("config") if manifest_path.is_file() else None
    label = encoder.label if encoder is not None else None
    fp = fingerprint(run_dir, label, names, config)
    summary = read_json(summary_path)
    old = summary.get("metrics")
    if not force and isinstance(old, dict) and old.get("fingerprint") == fp:
        return "up to date", old
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line is expected after a crash
        records = read_records(run_dir)
    metrics = compute_metrics(records, config=config, encoder=encoder, names=names)
    metrics["fingerprint"] = fp
    summary = read_json(summary_path)  # re-read: keep whatever else changed meanwhile
    summary["metrics"] = metrics
    write_json_atomic(summary_path, summary)
    return "updated", metrics


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aisp_bench.evaluate",
        description="Compute reward/diversity/coherence/length metrics into each run's summary.json.",
    )
    p.add_argument("runs", nargs="+", help="run folders, folders above them, or globs (quote globs)")
    p.add_argument(
        "--encoder",
        default="simcse",
        choices=["simcse", "minilm"],
        help="coherence encoder: simcse (the paper's; needs the HF hub or its cache) or "
        "minilm (offline stand-in, labelled as such)",
    )
    p.add_argument("--device", default="auto", help="encoder device: auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"comma-separated metric names (known: {', '.join(METRICS.names())})",
    )
    p.add_argument("--force", action="store_true", help="recompute even where the fingerprint matches")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        names = [n.strip() for n in args.metrics.split(",") if n.strip()]
        for n in names:
            METRICS.get(n)
        runs = find_run_dirs(args.runs)
    except (RunNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from aisp_bench.metrics.coherence import ENCODERS, EncoderUnavailableError

    encoder = None
    if "coherence" in names:  # constructed now (its label is known), loaded on first use
        encoder = ENCODERS.get(args.encoder)(device=args.device, batch_size=args.batch_size)

    failed = updated = current = skipped = 0
    for run in runs:
        try:
            status, m = evaluate_run(run, encoder, names=names, force=args.force)
        except EncoderUnavailableError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except Exception as e:  # noqa: BLE001 - report and go on with the other runs
            failed += 1
            print(f"error: {run}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        if status.startswith("skipped"):
            skipped += 1
            print(f"warning: {run}: {status}", file=sys.stderr)
            continue
        updated += status == "updated"
        current += status == "up to date"
        m = m or {}
        enc = f" [{m['coherence_encoder']}]" if m.get("coherence_encoder") else ""
        print(
            f"{run}: {status}: reward {_fmt(m.get('reward_mean'))} diversity {_fmt(m.get('diversity'), '.3f')} "
            f"coherence {_fmt(m.get('coherence'), '.3f')}{enc} ({m.get('num_records')} records)"
        )
    print(f"{len(runs)} run(s): {updated} updated, {current} up to date, {skipped} skipped, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
