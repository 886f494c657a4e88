"""Run orchestration: the only code that sees the config.

``run(cfg)`` builds the method, dataset, policy and reward from the composed config,
checks everything before touching the results folder, then decodes the prompts that are
not yet in ``records.jsonl`` batch by batch, appending one record per prompt as it
finishes, and writes ``manifest.json`` and ``summary.json``. Re-running the same command
resumes; a folder made with a different config is refused unless ``overwrite=true``.
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
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from aisp_bench.results import MANIFEST, SUMMARY, RecordWriter, read_json, read_records, summarize, write_json_atomic
from aisp_bench.types import Prompt, Result

log = logging.getLogger("aisp_bench")

# Config keys that do not change what a run computes: a resumed run may differ in them.
NON_SEMANTIC = (
    "overwrite", "results_dir", "run_dir", "generation.batch_rows", "batch_prompts", "progress",
    "generation.decode_step", "generation.attention", "generation.sync_every",
    "model.device", "model.device_map", "model.attn_implementation", "reward.device", "reward.batch_size",
    "judge", "experiment_name", "report",
)


class UserError(Exception):
    """A bad input; reported as one line on stderr with a non-zero exit."""


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


def semantic_config(cfg: dict) -> dict:
    """The config without keys that do not change results (for the resume check)."""
    import copy

    c = copy.deepcopy(cfg)
    for key in NON_SEMANTIC:
        parts = key.split(".")
        node = c
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return c


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += config_diff(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def make_record(prompt: Prompt, result: Result, seconds: float) -> dict:
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


# Loaded models survive between the jobs of one multirun (same process, same config).
_LOADED: dict[str, Any] = {}


def _cached(kind: str, node: DictConfig, build):
    key = kind + OmegaConf.to_yaml(node)
    if key not in _LOADED:
        _LOADED[key] = build()
    return _LOADED[key]


def _instantiate(node: DictConfig, what: str):
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except Exception as e:  # Hydra wraps constructor errors; show the cause in one line
        cause = e
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        raise UserError(f"{what}: {cause}") from None


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


def run(cfg: DictConfig) -> Path:
    """Run (or resume) one configuration; returns its run folder."""
    from aisp_bench.data.datasets import DatasetError
    from aisp_bench.models.policy import build_engine

    _check_generation(cfg)
    method = _instantiate(cfg.method, "method")
    dataset = _instantiate(cfg.dataset, "dataset")
    try:
        prompts = dataset.load()
    except DatasetError as e:
        raise UserError(str(e)) from None
    policy = _instantiate(cfg.model, "model")
    reward = _instantiate(cfg.reward, "reward")
    run_dir = Path(cfg.run_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)

    # Compare with an existing run folder before loading anything heavy.
    manifest_path = run_dir / MANIFEST
    old_manifest = None
    if manifest_path.is_file():
        old_manifest = read_json(manifest_path)
        diff = config_diff(semantic_config(old_manifest.get("config", {})), semantic_config(resolved))
        if diff and not cfg.get("overwrite", False):
            raise UserError(
                f"run folder {run_dir} was made with a different config ({'; '.join(diff[:3])}"
                f"{'; ...' if len(diff) > 3 else ''}); pass overwrite=true to replace it"
            )
    elif run_dir.exists() and any(run_dir.iterdir()) and not cfg.get("overwrite", False):
        raise UserError(f"run folder {run_dir} exists without a {MANIFEST}; pass overwrite=true to replace it")

    # A complete run of the same config: nothing to load, nothing to do.
    if old_manifest is not None and not cfg.get("overwrite", False) and (run_dir / SUMMARY).is_file():
        skipped_before = set(read_json(run_dir / SUMMARY).get("skipped_ids") or [])
        done_before = {r["prompt_id"] for r in read_records(run_dir)}
        if {p.id for p in prompts} - skipped_before <= done_before:
            log.info("%s: complete (%d prompts); nothing to do", run_dir, len(done_before))
            return run_dir

    # Load models (errors here still leave the folder untouched).
    gen = cfg.generation
    # how the engine decodes (it keeps these; jobs that change them get their own engine)
    engine_options = {k: gen.get(k, "auto" if k != "decode_step" else "eager")
                      for k in ("decode_step", "attention", "sync_every")}
    try:
        engine = _cached("model", OmegaConf.create({"model": cfg.model, "engine": engine_options}),
                         lambda: build_engine(policy, int(gen.max_new_tokens), gen.batch_rows, str(gen.prompt_overflow),
                                              **engine_options))
        reward = _cached("reward", cfg.reward, lambda: reward.load())
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    # an engine reused from an earlier job of a multirun takes this job's settings
    engine.max_new_tokens = int(gen.max_new_tokens)
    engine.max_batch_rows = gen.batch_rows
    engine.context_length = cfg.model.get("max_context") or getattr(engine.model.config, "max_position_embeddings", None)
    engine.overflow = "error" if gen.prompt_overflow == "skip" else "truncate_left"

    # Prompts that do not fit the context: skipped or truncated, and counted.
    skipped, truncated, todo_all = [], [], []
    for p in prompts:
        if engine.max_prompt_tokens is not None:
            if len(engine.prompt_ids(p)) > engine.max_prompt_tokens:
                (skipped if gen.prompt_overflow == "skip" else truncated).append(p.id)
                if gen.prompt_overflow == "skip":
                    continue
        todo_all.append(p)

    if old_manifest is not None and cfg.get("overwrite", False):
        log.warning("overwrite=true: replacing %s", run_dir)
        shutil.rmtree(run_dir)
        old_manifest = None
    run_dir.mkdir(parents=True, exist_ok=True)
    _attach_log_file(run_dir)

    session = {"started": _now(), "device": str(engine.device), "git_commit": git_commit(), "argv": sys.argv}
    manifest = {
        "config": resolved,
        "versions": versions(),
        "git_commit": session["git_commit"],
        "device": str(engine.device),
        "reward_device": str(getattr(reward, "device", "")) or None,
        "started": old_manifest["started"] if old_manifest else session["started"],
        "finished": None,
        "sessions": (old_manifest.get("sessions", []) if old_manifest else []) + [session],
    }
    write_json_atomic(manifest_path, manifest)

    seed = int(cfg.seed)
    with RecordWriter(run_dir) as writer:
        if writer.repaired:
            log.warning("%s: cut off a torn last line left by an interrupted run", writer.path)
        done = {r["prompt_id"] for r in writer.existing}
        todo = [p for p in todo_all if p.id not in done]
        rewards = [float(r["reward"]) for r in writer.existing]
        log.info("%s: %d prompts, %d done, %d to run, %d skipped, %d truncated", run_dir, len(prompts),
                 len(done), len(todo), len(skipped), len(truncated))
        batch = _choose_batch_prompts(cfg, method, engine.max_batch_rows)
        _run_batches(method, engine, reward, todo, batch, seed, writer, rewards, cfg.get("progress", True))
    records = read_records(run_dir)
    summary_path = run_dir / SUMMARY
    old_summary = read_json(summary_path) if summary_path.is_file() else {}
    summary = summarize(records, len(prompts), skipped, truncated)
    if "metrics" in old_summary and old_summary.get("num_done") == summary["num_done"]:
        summary["metrics"] = old_summary["metrics"]  # evaluation results stay valid
    write_json_atomic(summary_path, summary)
    session["finished"] = _now()
    session["prompts_run"] = summary["num_done"] - len(done)
    manifest["finished"] = session["finished"]
    write_json_atomic(manifest_path, manifest)
    log.info("done: %d/%d prompts, mean reward %s -> %s", summary["num_done"], len(prompts),
             None if summary["mean_reward"] is None else round(summary["mean_reward"], 4), run_dir)
    return run_dir


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
    path = str(run_dir / "run.log")
    if any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path) for h in root.handlers):
        return
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler) and h.baseFilename.endswith("run.log")]:
        root.removeHandler(h)
        h.close()
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(fh)
