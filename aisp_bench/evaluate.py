"""Compute Table 1's metrics for run folders into their ``summary.json``.

Usage::

    python -m aisp_bench.evaluate results/runs                       # every run below
    python -m aisp_bench.evaluate 'results/runs/shp/*/aisp/*/seed*'  # a glob (quote it)
    python -m aisp_bench.evaluate RUN_DIR ... --encoder minilm       # offline stand-in
    python -m aisp_bench.evaluate results/runs --reward ultrarm      # Table 1: rewards by UltraRM
    python -m aisp_bench.evaluate RUN_DIR --reward path/to/reward.yaml --reward-device cuda:1

Each argument is a run folder (one holding ``records.jsonl``), a folder above run
folders, or a glob of either. For each run the ``"metrics"`` block of
:func:`aisp_bench.metrics.compute_metrics` (reward, diversity, coherence and its encoder,
mean response length in tokens and words, number of records) is written into the run's
``summary.json``; its other keys are kept, and the file is replaced atomically.

**Which reward.** The paper's Table 1 reports every row's reward under one evaluation
model, UltraRM, whatever reward the method was guided by. ``--reward NAME`` (a
``conf/reward/NAME.yaml`` option, or the path of any reward YAML with ``_target_``)
re-scores each record's (prompt, cleaned response) with that model: the prompt is the
record's ``messages`` (``Prompt.from_json``; records without them fall back to a single
user turn holding ``prompt``), the response is the cleaned text every other metric and
the judge see (so it equals the run's own reward only where the run used the same
model and cleaning changed nothing). The block then holds

* ``reward_mean``: the mean under that model (finite scores only),
* ``reward_model``: its name, ``reward_source``: ``"evaluated"``,
* ``run_reward_mean``: the run's own mean (``records[].reward``), kept for reference.

Without ``--reward`` (the default) ``reward_mean`` is the run's own mean, as before,
``reward_model`` the run's reward name (from ``manifest.json``) and ``reward_source``
``"run"``. Scores are cached per run in ``eval_rewards_<name>.jsonl`` (one line per
(prompt, cleaned response): its sha256 key, ``prompt_id`` and ``reward``), written after
every chunk, so switching back to a model, an interrupted evaluation or a run that grew
only scores what is new; ``--force`` ignores and rewrites that cache.

Idempotent: the block carries a ``fingerprint`` of what it was computed from (the bytes
of ``records.jsonl``, the encoder, the evaluation reward's name, the metric names, the
cleaning settings, this module's version). A run whose fingerprint matches is left
alone, so a second call costs nothing and changes nothing; ``--force`` recomputes anyway
(with the same result).

Coherence needs the SimCSE checkpoint ``princeton-nlp/sup-simcse-bert-base-uncased``
from the Hugging Face hub (``--encoder simcse``, the default). Where the hub cannot be
reached, loading fails with a one-line error; ``--encoder minilm`` then uses the
packaged all-MiniLM-L6-v2 as a stand-in, and ``coherence_encoder`` says so. There is
no silent fallback.

A run folder without ``summary.json`` (still running, or crashed before the end) is
skipped with a warning. Exit codes: 0 done, 1 a run (or the encoder, or the evaluation
reward model) failed, 2 bad arguments (a path or glob that names no run folder, an
unknown metric or reward config).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aisp_bench.metrics import DEFAULT_METRICS, METRICS, compute_metrics
from aisp_bench.metrics.cleaning import clean_response, cleaning_options
from aisp_bench.metrics.records import (
    MANIFEST_FILE,
    SUMMARY_FILE,
    RunNotFoundError,
    find_run_dirs,
    get_path,
    read_json,
    read_records,
    records_sha256,
    write_json_atomic,
)

EVALUATE_VERSION = 2  # 2: reward_model / reward_source / run_reward_mean, --reward
CONF_DIR = Path(__file__).resolve().parent / "conf"
EVAL_REWARDS_PREFIX = "eval_rewards_"
REWARD_CHUNK = 256  # pairs scored between two writes of the eval-reward cache


class RewardUnavailableError(RuntimeError):
    """The evaluation reward model cannot be loaded (missing weights, no hub access)."""


# -- the evaluation reward model --------------------------------------------------------
def reward_config_path(spec: str, conf_dir: str | os.PathLike[str] | None = None) -> Path:
    """The YAML of a reward: ``conf/reward/<spec>.yaml`` for a name, else ``spec`` as a path.

    ``spec`` is taken as a path when it ends in ``.yaml``/``.yml`` or contains a path
    separator. Raises ``FileNotFoundError`` (one line, listing the known names) otherwise.
    """
    base = Path(conf_dir) if conf_dir is not None else CONF_DIR
    if conf_dir is None and not base.is_dir():  # an installed package: the working copy's conf/
        base = Path.cwd() / "conf"
    if spec.endswith((".yaml", ".yml")) or "/" in spec or os.sep in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"reward config not found: {spec}")
        return path
    path = base / "reward" / f"{spec}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (base / "reward").glob("*.yaml"))
        raise FileNotFoundError(f"unknown reward {spec!r} (no {path}); known: {', '.join(known) or 'none'}")
    return path


def load_reward_model(
    spec: str, *, device: str | None = None, conf_dir: str | os.PathLike[str] | None = None
) -> tuple[Any, str]:
    """(reward model, its name) from a ``conf/reward`` name or a reward YAML path.

    Instantiated with ``hydra.utils.instantiate`` exactly as a run does; nothing is
    loaded yet (models load lazily on first use). ``device`` replaces the config's
    ``device`` key. The name is the config's ``name`` key, else the file's stem. Raises
    ``FileNotFoundError``/``ValueError`` with a one-line message for a missing file, a
    config without that key or a constructor that refuses its arguments.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = reward_config_path(spec, conf_dir)
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - a YAML syntax error
        raise ValueError(f"cannot read reward config {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if not OmegaConf.is_dict(cfg) or "_target_" not in cfg:
        raise ValueError(f"reward config {path} has no _target_")
    if device is not None:
        if "device" not in cfg:
            raise ValueError(f"reward config {path} has no 'device' key to set to {device!r}")
        cfg.device = device
    try:
        reward = instantiate(cfg)
    except Exception as e:  # noqa: BLE001 - Hydra wraps constructor errors: show the cause
        cause: BaseException = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        msg = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise ValueError(f"cannot build reward from {path}: {msg}") from None
    if not callable(getattr(reward, "score", None)):
        raise ValueError(f"reward config {path} builds {type(reward).__name__}, which has no score()")
    name = str(cfg.get("name") or path.stem)
    return reward, name


def eval_rewards_path(run_dir: Path, reward_name: str) -> Path:
    """``run_dir/eval_rewards_<name>.jsonl`` (characters unsafe in a file name become ``_``)."""
    return run_dir / f"{EVAL_REWARDS_PREFIX}{re.sub(r'[^A-Za-z0-9._-]+', '_', reward_name)}.jsonl"


def _pair_key(messages: Any, response: str) -> str:
    blob = json.dumps({"messages": messages, "response": response}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _read_reward_cache(path: Path) -> dict[str, float | None]:
    """key -> reward from a cache file; an unreadable file or line is ignored (re-scored)."""
    out: dict[str, float | None] = {}
    if not path.is_file():
        return out
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        warnings.warn(f"ignoring unreadable {path}: {e}", stacklevel=2)
        return out
    for line in lines:
        try:
            entry = json.loads(line)
            r = entry["reward"]
            out[str(entry["key"])] = None if r is None else float(r)
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _write_reward_cache(path: Path, entries: Sequence[dict[str, Any]]) -> None:
    """Replace the cache file atomically (temporary file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for e in entries:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def record_prompt(record: dict[str, Any]):
    """The record's prompt as a ``Prompt``: its ``messages``, else one user turn of ``prompt``."""
    from aisp_bench.types import Prompt

    pid = str(record.get("prompt_id", ""))
    if record.get("messages"):
        return Prompt.from_json(pid, record["messages"])
    return Prompt.single(pid, str(record.get("prompt", "")))


def evaluation_rewards(
    run_dir: Path,
    records: Sequence[dict[str, Any]],
    responses: Sequence[str],
    reward: Any,
    reward_name: str,
    *,
    force: bool = False,
    chunk: int = REWARD_CHUNK,
) -> list[float | None]:
    """``reward``'s score of each (record prompt, response), via the run's score cache.

    Cached scores (``eval_rewards_<name>.jsonl``, keyed by a hash of the messages and
    the response) are reused unless ``force``; the rest are scored in chunks of
    ``chunk`` pairs, the cache being rewritten after each (it keeps the current records'
    entries only). Non-finite scores are ``None``. Raises ``RewardUnavailableError``
    when the model cannot be loaded.
    """
    prompts = [record_prompt(r) for r in records]
    keys = [_pair_key(p.to_json(), resp) for p, resp in zip(prompts, responses, strict=True)]
    path = eval_rewards_path(run_dir, reward_name)
    known = {} if force else _read_reward_cache(path)
    todo = [i for i, k in enumerate(keys) if k not in known]
    if todo:
        try:
            reward.load()
        except Exception as e:  # noqa: BLE001 - missing weights, no hub: one line, stop everything
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RewardUnavailableError(f"cannot load evaluation reward {reward_name!r}: {msg}") from None
    for s in range(0, len(todo), max(1, int(chunk))):
        idx = todo[s : s + chunk]
        scores = reward.score([prompts[i] for i in idx], [responses[i] for i in idx])
        for i, v in zip(idx, [float(x) for x in scores.tolist()], strict=True):
            known[keys[i]] = v if math.isfinite(v) else None
        entries = {
            k: {"key": k, "prompt_id": str(rec.get("prompt_id", "")), "reward": known[k]}
            for k, rec in zip(keys, records, strict=True)
            if k in known
        }
        _write_reward_cache(path, list(entries.values()))
    return [known[k] for k in keys]


# -- one run ------------------------------------------------------------------------------
def fingerprint(
    run_dir: Path,
    encoder_label: str | None,
    names: Sequence[str],
    config: dict[str, Any] | None,
    reward_name: str | None = None,
) -> str:
    """Hash of everything the metrics block depends on (see the module docstring)."""
    payload = {
        "version": EVALUATE_VERSION,
        "records_sha256": records_sha256(run_dir),
        "encoder": encoder_label if "coherence" in names else None,
        "eval_reward": reward_name if "reward_mean" in names else None,
        "metrics": list(names),
        "cleaning": {k: list(v) for k, v in cleaning_options(config).items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _with_reward_keys(
    metrics: dict[str, Any], run_mean: Any, model: str | None, source: str, mean: Any
) -> dict[str, Any]:
    """``metrics`` with reward_mean replaced and the reward provenance keys right after it."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if k == "reward_mean":
            out["reward_mean"] = mean
            out["reward_model"] = model
            out["reward_source"] = source
            out["run_reward_mean"] = run_mean
        else:
            out[k] = v
    return out


def evaluate_run(
    run_dir: Path,
    encoder: Any,
    *,
    names: Sequence[str] = DEFAULT_METRICS,
    force: bool = False,
    reward: Any = None,
    reward_name: str | None = None,
) -> tuple[str, dict[str, Any] | None]:
    """Write the metrics block into ``run_dir/summary.json``.

    ``reward`` (a ``RewardModel``; ``reward_name`` defaults to its ``name``) re-scores
    the records for ``reward_mean`` (see the module docstring); ``None`` keeps the
    run's own rewards. Returns (status, metrics): status is ``"updated"``, ``"up to
    date"`` or ``"skipped: <why>"``.
    """
    if reward is not None and reward_name is None:
        reward_name = str(getattr(reward, "name", None) or type(reward).__name__)
    if reward is None:
        reward_name = None
    if reward is not None and "reward_mean" not in names:
        raise ValueError("an evaluation reward needs the reward_mean metric")
    run_dir = Path(run_dir)
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        return "skipped: no summary.json (run unfinished or crashed)", None
    manifest_path = run_dir / MANIFEST_FILE
    config = read_json(manifest_path).get("config") if manifest_path.is_file() else None
    label = encoder.label if encoder is not None else None
    fp = fingerprint(run_dir, label, names, config, reward_name)
    summary = read_json(summary_path)
    old = summary.get("metrics")
    if not force and isinstance(old, dict) and old.get("fingerprint") == fp:
        return "up to date", old
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line is expected after a crash
        records = read_records(run_dir)
    metrics = compute_metrics(records, config=config, encoder=encoder, names=names)
    if "reward_mean" in metrics:
        run_mean = metrics["reward_mean"]
        if reward is None:
            own = get_path(config or {}, "reward.name")
            metrics = _with_reward_keys(metrics, run_mean, None if own is None else str(own), "run", run_mean)
        else:
            opts = cleaning_options(config)
            responses = [clean_response(r.get("response"), **opts) for r in records]
            scores = evaluation_rewards(run_dir, records, responses, reward, reward_name, force=force)
            finite = [s for s in scores if s is not None]
            mean = math.fsum(finite) / len(finite) if finite else None
            metrics = _with_reward_keys(metrics, run_mean, reward_name, "evaluated", mean)
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
        "--reward",
        default=None,
        metavar="NAME|YAML",
        help="score reward_mean with this reward model (a conf/reward name such as ultrarm, the paper's "
        "Table 1 evaluator, or a reward YAML path); default: keep each run's own rewards",
    )
    p.add_argument(
        "--reward-device", default=None, help="device of the --reward model (default: its config's, usually auto)"
    )
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
        reward, reward_name = None, None
        if args.reward_device is not None and args.reward is None:
            raise ValueError("--reward-device needs --reward")
        if args.reward is not None:
            if "reward_mean" not in names:
                raise ValueError(f"--reward {args.reward} needs the reward_mean metric in --metrics")
            reward, reward_name = load_reward_model(args.reward, device=args.reward_device)
    except (RunNotFoundError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from aisp_bench.metrics.coherence import ENCODERS, EncoderUnavailableError

    encoder = None
    if "coherence" in names:  # constructed now (its label is known), loaded on first use
        encoder = ENCODERS.get(args.encoder)(device=args.device, batch_size=args.batch_size)

    failed = updated = current = skipped = 0
    for run in runs:
        try:
            status, m = evaluate_run(
                run, encoder, names=names, force=args.force, reward=reward, reward_name=reward_name
            )
        except (EncoderUnavailableError, RewardUnavailableError) as e:
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
        rm = f" [{m['reward_model']}]" if m.get("reward_model") else ""
        print(
            f"{run}: {status}: reward {_fmt(m.get('reward_mean'))}{rm} diversity {_fmt(m.get('diversity'), '.3f')} "
            f"coherence {_fmt(m.get('coherence'), '.3f')}{enc} ({m.get('num_records')} records)"
        )
    print(f"{len(runs)} run(s): {updated} updated, {current} up to date, {skipped} skipped, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
