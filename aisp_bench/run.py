"""Run orchestration: the only code that sees the config.

``run(cfg)`` builds the method, dataset, policy and reward from the composed config,
checks everything before touching the results folder, then decodes the prompts that are
not yet in ``records.jsonl`` batch by batch, appending one record per prompt as it
finishes, and writes ``manifest.json`` and ``summary.json``. Re-running the same command
resumes; a folder made with a different config is refused unless ``overwrite=true``.

A prompt shard (``dataset.num_shards=K dataset.shard=i``) is the same, in the run
folder's ``shards/<i>-of-<K>/``. The folder being written is held with ``run.lock``
(``runlock.RunLock``), so two processes never write one folder.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from aisp_bench.cli import UserError, first_line, instantiate_node
from aisp_bench.config import config_diff, semantic_config
from aisp_bench.rundir import (
    MANIFEST, RECORDS, RUN_LOCK, RUN_LOG, SUMMARY, RecordWriter, Shards, make_record, read_json, read_records,
    read_summary, shard_dir, summarize, write_json_atomic,
)  # fmt: skip
from aisp_bench.runlock import RunLock
from aisp_bench.types import Prompt

log = logging.getLogger("aisp_bench")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("aisp-bench", "torch", "transformers", "hydra-core", "omegaconf", "datasets", "accelerate", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# Loaded models survive between the jobs of one multirun (same process, same config).
_LOADED: dict[str, Any] = {}


def _cached(kind: str, node: DictConfig, build):
    key = kind + OmegaConf.to_yaml(node)
    if key not in _LOADED:
        _LOADED[key] = build()
    return _LOADED[key]


def _choose_batch_prompts(cfg: DictConfig, method, batch_rows: int) -> int:
    bp = cfg.get("batch_prompts", "auto")
    if bp in (None, "auto"):
        return max(1, batch_rows // max(1, method.rows_per_prompt))
    if isinstance(bp, bool) or not isinstance(bp, int) or bp < 1:
        raise UserError(f"batch_prompts must be 'auto' or an integer >= 1, got {bp!r}")
    return bp


def _check_generation(cfg: DictConfig) -> None:
    g = cfg.generation
    for key in ("max_new_tokens", "batch_rows", "sync_every"):
        v, auto_ok = g.get(key, "auto"), key != "max_new_tokens"
        if not (auto_ok and v == "auto") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            what = "auto or an integer >= 1" if auto_ok else "an integer >= 1"
            raise UserError(f"generation.{key} must be {what}, got {v!r}")
    from aisp_bench.engine import DECODE_STEPS

    if g.get("decode_step", "eager") not in DECODE_STEPS:
        raise UserError(f"generation.decode_step must be one of {', '.join(DECODE_STEPS)}, "
                        f"got {g.get('decode_step')!r}")
    if g.get("attention", "auto") not in ("auto", "shared_prefix", "copy"):
        raise UserError(f"generation.attention must be auto, shared_prefix or copy, got {g.get('attention')!r}")
    if g.get("prompt_overflow") not in ("truncate_left", "skip"):
        raise UserError(f"generation.prompt_overflow must be 'truncate_left' or 'skip', got {g.get('prompt_overflow')!r}")
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be an integer >= 0, got {seed!r}")


@dataclass
class Job:
    """One configuration, checked and built (nothing loaded, no file touched yet)."""

    run_dir: Path
    resolved: dict  # the config as written to manifest.json
    method: Any
    prompts: list[Prompt]
    policy: Any
    reward: Any
    overwrite: bool
    run_root: Path  # the run's folder: run_dir itself, or the folder of run_dir's shards
    shard: int
    num_shards: int


def run(cfg: DictConfig) -> Path:
    """Run (or resume) one configuration; returns its run folder (a shard's: its own)."""
    job = prepare(cfg)
    if in_other_layout(job):
        return job.run_root
    old_manifest = resume_check(job)
    if is_complete(job, old_manifest):  # nothing to load, nothing to do
        log.info("%s: complete (%d prompts); nothing to do", job.run_dir, len(job.prompts))
        return job.run_dir
    engine, reward = load(cfg, job)
    fit, skipped, truncated = fit_prompts(engine, job.prompts, str(cfg.generation.prompt_overflow))
    with RunLock(job.run_dir):
        manifest = open_folder(job, old_manifest, engine, reward)
        done_before = generate(cfg, job, engine, reward, fit, len(skipped), len(truncated))
        finalize(job, manifest, skipped, truncated, done_before)
    return job.run_dir


def prepare(cfg: DictConfig) -> Job:
    """Check the config and build its objects; bad input raises ``UserError`` before any file is touched."""
    from aisp_bench.data.datasets import DatasetError

    _check_generation(cfg)
    method = instantiate_node(cfg.method, "method")
    dataset = instantiate_node(cfg.dataset, "dataset")
    try:
        prompts = dataset.load()
    except DatasetError as e:
        raise UserError(str(e)) from None
    policy = instantiate_node(cfg.model, "model")
    reward = instantiate_node(cfg.reward, "reward")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    root, shard, k = Path(cfg.run_dir), dataset.shard, dataset.num_shards
    return Job(root if k == 1 else shard_dir(root, shard, k), resolved, method, prompts, policy, reward,
               bool(cfg.get("overwrite", False)), root, shard, k)


def in_other_layout(job: Job) -> bool:
    """True when the run folder holds every prompt of ``job`` in the other layout (shards for
    an unsharded job, an unsharded run for a shard): nothing to do, it is read as it is.

    Refused: shards of another ``dataset.num_shards``, the other layout unfinished, or
    either made with another config (a shard is also checked against the shards beside it).
    """
    root, sharded = job.run_root, job.num_shards > 1
    shards = Shards.of(root)  # refuses shards of two counts, or beside an unsharded run
    if shards is not None:
        if sharded and shards.num_shards != job.num_shards:
            raise UserError(f"run folder {root} holds shards of dataset.num_shards={shards.num_shards}; run with "
                            "that count, or delete the folder to reshard the run")
        theirs = next((m for m in shards.manifests().values() if m), {})
    elif sharded and ((root / RECORDS).is_file() or (root / MANIFEST).is_file()):
        theirs = read_json(root / MANIFEST) if (root / MANIFEST).is_file() else {}
    else:
        return False  # the unsharded layout for an unsharded job (resume_check's), or a fresh folder
    diff = config_diff(semantic_config(theirs.get("config", {})), semantic_config(job.resolved))
    if diff:
        raise UserError(f"run folder {root} was made with a different config ({'; '.join(diff[:3])}); delete it, "
                        "or use another results_dir")
    if sharded and shards is not None:
        return False  # a shard beside its own kind
    what = f"{shards.num_shards} prompt shards" if shards else "an unsharded run"
    summary = read_summary(root) or {}
    done = {r["prompt_id"] for r in read_records(root)} | set(summary.get("skipped_ids") or [])
    if summary.get("complete") and {p.id for p in job.prompts} <= done:
        log.info("%s: complete (as %s); nothing to do", root, what)
        return True
    how = f"with dataset.num_shards={shards.num_shards} ({shards.describe()})" if shards else "unsharded"
    raise UserError(f"run folder {root} holds {what}, not complete: finish it {how}, or delete the folder")


def resume_check(job: Job) -> dict | None:
    """The run folder's manifest when it was made with this config (None: a new folder).

    A folder made with another config, or holding files but no manifest, is refused
    unless ``overwrite=true``.
    """
    path = job.run_dir / MANIFEST
    if path.is_file():
        old = read_json(path)
        diff = config_diff(semantic_config(old.get("config", {})), semantic_config(job.resolved))
        if diff and not job.overwrite:
            raise UserError(
                f"run folder {job.run_dir} was made with a different config ({'; '.join(diff[:3])}"
                f"{'; ...' if len(diff) > 3 else ''}); pass overwrite=true to replace it"
            )
        return old
    if job.run_dir.exists() and any(p.name != RUN_LOCK for p in job.run_dir.iterdir()) and not job.overwrite:
        raise UserError(f"run folder {job.run_dir} exists without a {MANIFEST}; pass overwrite=true to replace it")
    return None


def is_complete(job: Job, old_manifest: dict | None) -> bool:
    """True when the folder already holds every prompt of this config (or skipped it)."""
    summary_path = job.run_dir / SUMMARY
    if old_manifest is None or job.overwrite or not summary_path.is_file():
        return False
    skipped_before = set(read_json(summary_path).get("skipped_ids") or [])
    done_before = {r["prompt_id"] for r in read_records(job.run_dir)}
    return {p.id for p in job.prompts} - skipped_before <= done_before


def _loaded(policy):
    policy.load()
    return policy


def load(cfg: DictConfig, job: Job):
    """(engine, loaded reward): models are loaded once per process, an engine is built per job."""
    from aisp_bench.models.policy import build_engine

    gen = cfg.generation
    # how the engine decodes (``generation.decode_step``, ``attention``, ``sync_every``)
    engine_options = {k: gen.get(k, "auto" if k != "decode_step" else "eager")
                      for k in ("decode_step", "attention", "sync_every")}
    try:
        policy = _cached("model", cfg.model, lambda: _loaded(job.policy))
        reward = _cached("reward", cfg.reward, lambda: job.reward.load())
        # built after the reward model is on its device: batch_rows=auto sizes from the memory left
        engine = build_engine(policy, max_new_tokens=int(gen.max_new_tokens), batch_rows=gen.batch_rows,
                              prompt_overflow=str(gen.prompt_overflow), **engine_options)
    except (OSError, RuntimeError, ValueError) as e:  # errors here still leave the folder untouched
        raise UserError(first_line(e)) from None
    return engine, reward


def fit_prompts(engine, prompts: list[Prompt], overflow: str) -> tuple[list[Prompt], list[str], list[str]]:
    """(prompts to run, skipped ids, truncated ids): prompts longer than the engine allows are
    skipped (``overflow="skip"``) or truncated, and counted."""
    fit, skipped, truncated = [], [], []
    limit = engine.max_prompt_tokens
    for p in prompts:
        if limit is not None and len(engine.prompt_ids(p)) > limit:
            (skipped if overflow == "skip" else truncated).append(p.id)
            if overflow == "skip":
                continue
        fit.append(p)
    return fit, skipped, truncated


def open_folder(job: Job, old_manifest: dict | None, engine, reward) -> dict:
    """Create (or replace, with ``overwrite``) the run folder; write the manifest with a new session."""
    if old_manifest is not None and job.overwrite:
        log.warning("overwrite=true: replacing %s", job.run_dir)
        for p in job.run_dir.iterdir():  # everything but the lock we hold
            if p.is_dir():
                shutil.rmtree(p)
            elif p.name != RUN_LOCK:
                p.unlink()
        old_manifest = None
    job.run_dir.mkdir(parents=True, exist_ok=True)
    _attach_log_file(job.run_dir)
    session = {"started": _now(), "device": str(engine.device), "git_commit": git_commit(), "argv": sys.argv}
    manifest = {
        "config": job.resolved,
        "versions": versions(),
        "git_commit": session["git_commit"],
        "device": str(engine.device),
        "reward_device": str(getattr(reward, "device", "")) or None,
        "started": old_manifest["started"] if old_manifest else session["started"],
        "finished": None,
        "sessions": (old_manifest.get("sessions", []) if old_manifest else []) + [session],
    }
    if job.num_shards > 1:  # the shard's prompts in the dataset's order: how its records merge with the others'
        manifest["shard"] = {"index": job.shard, "num_shards": job.num_shards,
                             "prompt_ids": [p.id for p in job.prompts]}
    write_json_atomic(job.run_dir / MANIFEST, manifest)
    return manifest


def generate(cfg: DictConfig, job: Job, engine, reward, fit: list[Prompt], skipped: int, truncated: int) -> int:
    """Decode the prompts not yet recorded, appending a record per prompt; returns how many were done before."""
    with RecordWriter(job.run_dir) as writer:
        if writer.repaired:
            log.warning("%s: cut off a torn last line left by an interrupted run", writer.path)
        done = {r["prompt_id"] for r in writer.existing}
        todo = [p for p in fit if p.id not in done]
        log.info("%s: %d prompts, %d done, %d to run, %d skipped, %d truncated", job.run_dir, len(job.prompts),
                 len(done), len(todo), skipped, truncated)
        rewards = [float(r["reward"]) for r in writer.existing]
        batch = _choose_batch_prompts(cfg, job.method, engine.max_batch_rows)
        _run_batches(job.method, engine, reward, todo, batch, int(cfg.seed), writer, rewards, cfg.get("progress", True))
    return len(done)


def finalize(job: Job, manifest: dict, skipped: list[str], truncated: list[str], done_before: int) -> None:
    """Write ``summary.json`` (evaluation metrics stay while the records do) and close the session."""
    records = read_records(job.run_dir)
    summary_path = job.run_dir / SUMMARY
    old_summary = read_json(summary_path) if summary_path.is_file() else {}
    summary = summarize(records, len(job.prompts), skipped, truncated)
    if "metrics" in old_summary and old_summary.get("num_done") == summary["num_done"]:
        summary["metrics"] = old_summary["metrics"]  # evaluation results stay valid
    write_json_atomic(summary_path, summary)
    session = manifest["sessions"][-1]
    session["finished"] = manifest["finished"] = _now()
    session["prompts_run"] = summary["num_done"] - done_before
    write_json_atomic(job.run_dir / MANIFEST, manifest)
    mean = None if summary["mean_reward"] is None else round(summary["mean_reward"], 4)
    log.info("done: %d/%d prompts, mean reward %s -> %s", summary["num_done"], len(job.prompts), mean, job.run_dir)


def _run_batches(method, engine, reward, todo, batch, seed, writer, rewards, progress) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=method.name, unit="prompt", disable=not progress, dynamic_ncols=True)
    try:
        for s in range(0, len(todo), batch):
            chunk = todo[s : s + batch]
            t0 = time.perf_counter()
            results = method(chunk, engine, reward, seed)
            per_prompt = (time.perf_counter() - t0) / len(chunk)
            for p, res in zip(chunk, results):
                writer.write(make_record(p, res, per_prompt))
                rewards.append(res.reward)
            bar.update(len(chunk))
            bar.set_postfix(mean_reward=f"{sum(rewards) / len(rewards):.4f}")
    finally:
        bar.close()


def _attach_log_file(run_dir: Path) -> None:
    root = logging.getLogger()
    path = str(run_dir / RUN_LOG)
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path) for h in root.handlers):
        return
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler) and h.baseFilename.endswith(RUN_LOG)]:
        root.removeHandler(h)
        h.close()
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(fh)
