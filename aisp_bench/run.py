"""Run orchestration: the only code that sees the config.

``run(cfg)`` decodes the prompts not yet in ``records.jsonl``, appending one record per
prompt, then writes ``summary.json`` and closes ``manifest.json``. Re-running resumes; a
folder of another config is refused unless ``overwrite=true``. A prompt shard
(``dataset.num_shards=K dataset.shard=i``) writes ``shards/<i>-of-<K>/`` alike.

One linear life cycle, each file of the folder read once::

    check the config, build its objects, load the prompts          (nothing touched)
    the other layout (shards beside an unsharded run, or the reverse): complete -> done,
        else refused                                               (``other_layout_done``)
    take run.lock                 a folder another process writes is refused before any model loads
    read the folder               (``read_folder``: manifest, summary, records, each once)
        NEW       no folder, or only run.log, run.lock, temp files (``overwrite=true``: any folder)
        STARTED   a manifest of the same config, records that parse (a torn last line aside)
        COMPLETE  STARTED with every prompt recorded and a summary: close the manifest if a kill
                  left it open, rewrite a stale summary; no model loaded, done
        refused   files without a manifest, another config, a corrupt manifest or records
    load the models, fit the prompts to the context
    open the folder               mkdir (``overwrite``: emptied), stale temp files removed,
                                  manifest.json {finished: null} with a new session, run.log
    append the missing records    (a SIGTERM stops after the record being written: ``Stopped``)
    close                         summary.json from the records, then the manifest finished

Nothing the resume depends on exists before the manifest, so a SIGKILL at any instant
leaves a folder that a rerun completes with the records an uninterrupted run writes
(``scripts/kill_points.py`` kills a run at each step for the tests and
``make fault-injection``; the lock is released on any exit).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from aisp_bench.cli import UserError, command_line, engine_options, first_line, instantiate_node, reward_node
from aisp_bench.config import config_diff, semantic_config
from aisp_bench.rundir import (
    MANIFEST, RECORDS, RUN_LOCK, RUN_LOG, SUMMARY, RecordScan, RecordWriter, RunFolderError, Shards, finite_rewards,
    is_temp_file, make_record, read_json, read_records, read_summary, scan_records, shard_dir, summarize,
    write_json_atomic,
)  # fmt: skip
from aisp_bench.runlock import RunLock, Stopped, is_lock_file, no_stop, stop_on_sigterm
from aisp_bench.types import Prompt
from aisp_bench.validate import check

log = logging.getLogger("aisp_bench")


def clean_temp_files(run_dir: Path) -> None:
    """Remove the temp files of a JSON write that a kill interrupted."""
    for p in run_dir.iterdir():
        if is_temp_file(p.name) and not is_lock_file(p.name) and p.is_file():
            p.unlink(missing_ok=True)


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


@dataclass
class Folder:
    """What the run folder holds when the run starts (``read_folder``): nothing for a NEW folder or
    ``overwrite``; else the manifest, the summary (None when missing or corrupt: rebuilt at the
    end) and the records as scanned (a torn last line left out, cut off when the writer opens)."""

    manifest: dict | None = None
    summary: dict | None = None
    scan: RecordScan | None = None
    complete: bool = False  # every prompt recorded (or skipped) and a summary: nothing to generate

    @property
    def records(self) -> list[dict]:
        return self.scan.records if self.scan else []


def run(cfg: DictConfig) -> Path:
    """Run (or resume) one configuration; returns its run folder (a shard's: its own)."""
    check(cfg)
    job = prepare(cfg)
    if other_layout_done(job):
        return job.run_root
    try:
        with RunLock(job.run_dir), stop_on_sigterm():
            folder = read_folder(job)
            if folder.complete:  # nothing to load, nothing to generate
                finish_complete(job, folder)
                return job.run_dir
            engine, reward = load(cfg, job)
            fit, skipped, truncated = fit_prompts(engine, job.prompts, str(cfg.generation.prompt_overflow))
            manifest = open_folder(job, folder, engine, reward)
            records = generate(cfg, job, engine, reward, fit, folder, len(skipped), len(truncated))
            close(job, manifest, folder, records, skipped, truncated, done_before=len(folder.records))
    except Stopped:
        raise Stopped(f"SIGTERM: {job.run_dir} stopped, its records kept and {RUN_LOCK} released; "
                      "rerun the same command to resume") from None
    return job.run_dir


def prepare(cfg: DictConfig) -> Job:
    """Build the config's objects and load the prompts (bad input: ``UserError``, no file touched)."""
    from aisp_bench.data.datasets import DatasetError

    method = instantiate_node(cfg.method, "method")
    dataset = instantiate_node(cfg.dataset, "dataset")
    try:
        prompts = dataset.load()
    except DatasetError as e:
        raise UserError(str(e)) from None
    policy = instantiate_node(cfg.model, "model")
    reward = instantiate_node(reward_node(cfg.reward, cfg.engine), "reward")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    root, shard, k = Path(cfg.run_dir), dataset.shard, dataset.num_shards
    return Job(root if k == 1 else shard_dir(root, shard, k), resolved, method, prompts, policy, reward,
               bool(cfg.overwrite), root, shard, k)


def other_layout_done(job: Job) -> bool:
    """True when the folder holds every prompt of ``job`` in the other layout (shards for an
    unsharded job, an unsharded run for a shard): nothing to do. Refused: shards of another
    ``dataset.num_shards``, the other layout unfinished, or another config (a shard is also
    checked against the shards beside it)."""
    root, sharded = job.run_root, job.num_shards > 1
    shards = Shards.of(root)  # refuses shards of two counts, or beside an unsharded run
    if shards is not None:
        if sharded and shards.num_shards != job.num_shards:
            raise UserError(f"run folder {root} holds shards of dataset.num_shards={shards.num_shards}; run with "
                            "that count, or delete the folder to reshard the run")
        theirs = next((m for m in shards.manifests.values() if m), None)  # None: shards only begun (a lock)
    elif sharded and ((root / RECORDS).is_file() or (root / MANIFEST).is_file()):
        theirs = read_json(root / MANIFEST, missing_ok=True) or {}
    else:
        return False  # the unsharded layout for an unsharded job (``read_folder``'s), or a fresh folder
    if theirs is not None:
        _same_config(root, theirs, job, "; delete it, or use another results_dir")
    if sharded and shards is not None:
        return False  # a shard beside its own kind
    what = f"{shards.num_shards} prompt shards" if shards else "an unsharded run"
    summary = (shards.summary if shards else read_summary(root)) or {}
    records = shards.records if shards else read_records(root)
    done = {r["prompt_id"] for r in records} | set(summary.get("skipped_ids") or [])
    if summary.get("complete") and {p.id for p in job.prompts} <= done:
        log.info("%s: complete (as %s); nothing to do", root, what)
        return True
    how = f"with dataset.num_shards={shards.num_shards} ({shards.describe()})" if shards else "unsharded"
    raise UserError(f"run folder {root} holds {what}, not complete: finish it {how}, or delete the folder")


def _same_config(folder: Path, manifest: dict, job: Job, advice: str) -> None:
    """Refuse ``folder`` when its manifest's config differs from the job's (``NON_SEMANTIC`` keys aside)."""
    diff = config_diff(semantic_config(manifest.get("config", {})), semantic_config(job.resolved))
    if diff:
        raise UserError(f"run folder {folder} was made with a different config ({'; '.join(diff[:3])}"
                        f"{'; ...' if len(diff) > 3 else ''}){advice}")


def read_folder(job: Job) -> Folder:
    """The run folder's state (nothing written; ``overwrite=true``: nothing read), each file read once.
    Refused: files without a manifest (FOREIGN), a manifest of another config or not JSON, records
    corrupt before their last line. A corrupt ``summary.json`` is rebuilt at the end."""
    if job.overwrite:
        return Folder()
    hint = "; pass overwrite=true to replace the folder"
    try:
        manifest = read_json(job.run_dir / MANIFEST, missing_ok=True)
        if manifest is None:  # NEW (nothing but a log, a lock or temp files), else FOREIGN
            names = [p.name for p in job.run_dir.iterdir()] if job.run_dir.is_dir() else []
            if all(n == RUN_LOG or is_lock_file(n) or is_temp_file(n) for n in names):
                return Folder()
            raise UserError(f"run folder {job.run_dir} exists without a {MANIFEST}{hint}")
        _same_config(job.run_dir, manifest, job, hint)
        path = job.run_dir / RECORDS
        scan = scan_records(path) if path.is_file() else None
    except RunFolderError as e:
        raise RunFolderError(f"{e}{hint}") from None
    try:
        summary = read_json(job.run_dir / SUMMARY, missing_ok=True)
    except RunFolderError as e:
        log.warning("%s; it is rebuilt from the records", e)
        summary = None
    folder = Folder(manifest, summary, scan)
    if summary is not None:
        done = {r["prompt_id"] for r in folder.records}
        folder.complete = {p.id for p in job.prompts} - set(summary.get("skipped_ids") or []) <= done
    return folder


def finish_complete(job: Job, folder: Folder) -> None:
    """A complete folder: close a manifest that a kill left open after the summary; else nothing."""
    if folder.manifest.get("finished"):
        log.info("%s: complete (%d prompts); nothing to do", job.run_dir, len(job.prompts))
        return
    log.warning("%s: complete, closing the manifest left open by an interrupted run", job.run_dir)
    close(job, folder.manifest, folder, folder.records, folder.summary.get("skipped_ids") or [],
          folder.summary.get("truncated_ids") or [])


def _loaded(policy):
    policy.load()
    return policy


def load(cfg: DictConfig, job: Job):
    """(engine, loaded reward): models loaded once per process, an engine per job."""
    from aisp_bench.models.policy import build_engine

    gen = cfg.generation
    try:
        policy = _cached("model", cfg.model, lambda: _loaded(job.policy))
        reward = _cached("reward", reward_node(cfg.reward, cfg.engine), lambda: job.reward.load())
        # built after the reward model is on its device: batch_rows=auto sizes from the memory left
        engine = build_engine(policy, max_new_tokens=int(gen.max_new_tokens), batch_rows=gen.batch_rows,
                              prompt_overflow=str(gen.prompt_overflow), **engine_options(cfg.engine))
    except (OSError, RuntimeError, ValueError) as e:  # errors here still leave the folder untouched
        raise UserError(first_line(e)) from None
    if engine.context_length and int(engine.context_length) <= engine.max_new_tokens:
        raise UserError(f"generation.max_new_tokens ({engine.max_new_tokens}) leaves no room for a prompt in "
                        f"the context of {cfg.model.name} ({engine.context_length} tokens)")
    return engine, reward


def fit_prompts(engine, prompts: list[Prompt], overflow: str) -> tuple[list[Prompt], list[str], list[str]]:
    """(prompts to run, skipped ids, truncated ids): prompts over the engine's limit, skipped or truncated."""
    limit = engine.max_prompt_tokens
    long = [p.id for p in prompts if limit is not None and len(engine.prompt_ids(p)) > limit]
    if overflow == "skip":
        too_long = set(long)
        return [p for p in prompts if p.id not in too_long], long, []
    return list(prompts), [], long


def open_folder(job: Job, folder: Folder, engine, reward) -> dict:
    """Create (or, ``overwrite``, replace) the folder; write the manifest with a new session, then open the log."""
    from aisp_bench.models.loading import parameter_count

    session = {"started": _now(), "device": str(engine.device), "git_commit": git_commit(), "argv": command_line(),
               # what the "auto" settings resolved to on this device (bf16 tokens depend on them)
               "engine": {"decode_step": engine.decode_step, "batch_rows": engine.max_batch_rows,
                          "sync_every": engine.sync_every}}
    old = folder.manifest
    manifest = {
        "config": job.resolved,
        "versions": versions(),
        "git_commit": session["git_commit"],
        "device": str(engine.device),
        "reward_device": str(getattr(reward, "device", "")) or None,
        # the loaded models' sizes: the report's FLOPs (2 x parameters x tokens)
        "parameters": {"policy": parameter_count(engine.model),
                       "reward": parameter_count(getattr(reward, "model", None))},
        "started": old["started"] if old else session["started"],
        "finished": None,
        "sessions": (old.get("sessions", []) if old else []) + [session],
    }
    if job.num_shards > 1:  # the shard's prompts in the dataset's order: how its records merge with the others'
        manifest["shard"] = {"index": job.shard, "num_shards": job.num_shards,
                             "prompt_ids": [p.id for p in job.prompts]}
    if job.overwrite and job.run_dir.exists():
        log.warning("overwrite=true: replacing %s", job.run_dir)
        for p in job.run_dir.iterdir():  # everything but the lock this process holds
            if p.is_dir():
                shutil.rmtree(p)
            elif not is_lock_file(p.name):
                p.unlink()
    job.run_dir.mkdir(parents=True, exist_ok=True)
    clean_temp_files(job.run_dir)
    write_json_atomic(job.run_dir / MANIFEST, manifest)
    _attach_log_file(job.run_dir)
    return manifest


def generate(cfg: DictConfig, job: Job, engine, reward, fit: list[Prompt], folder: Folder, skipped: int,
             truncated: int) -> list[dict]:
    """Append a record per prompt not yet recorded; returns every record of the folder.

    Batches are fixed slices of ``fit``: a batch a kill left half recorded is decoded whole
    again (its recorded prompts not written twice), so every record comes from the same batch
    as in an uninterrupted run, bit for bit. ``batch_prompts=auto`` fills ``batch_rows``.
    """
    from tqdm.auto import tqdm

    bp = cfg.batch_prompts
    size = max(1, engine.max_batch_rows // max(1, job.method.rows_per_prompt)) if bp == "auto" else int(bp)
    with RecordWriter(job.run_dir, folder.scan) as writer:
        if writer.repaired:
            log.warning("%s: cut off a torn last line left by an interrupted run", writer.path)
        done = {r["prompt_id"] for r in writer.records}
        batches = [b for b in (fit[s : s + size] for s in range(0, len(fit), size)) if any(p.id not in done for p in b)]
        log.info("%s: %d prompts, %d done, %d to run, %d skipped, %d truncated", job.run_dir, len(job.prompts),
                 len(done), sum(p.id not in done for b in batches for p in b), skipped, truncated)
        rewards = finite_rewards(writer.records)
        with tqdm(total=sum(len(b) for b in batches), desc=job.method.name, unit="prompt",
                  disable=not cfg.progress, dynamic_ncols=True) as bar:
            for chunk in batches:
                t0 = time.perf_counter()
                results = job.method(chunk, engine, reward, int(cfg.seed))
                per_prompt = (time.perf_counter() - t0) / len(chunk)
                for p, res in zip(chunk, results):
                    if p.id in done:  # decoded again only to keep the batch as it was
                        continue
                    with no_stop():  # a SIGTERM stops the run after this record, not inside it
                        writer.write(make_record(p, res, per_prompt, len(engine.encode(p))))
                    if math.isfinite(res.reward):  # NaN: every sample of the prompt was non-finite
                        rewards.append(res.reward)
                bar.update(len(chunk))
                bar.set_postfix(mean_reward=f"{sum(rewards) / max(1, len(rewards)):.4f}")
        return writer.records


def close(job: Job, manifest: dict, folder: Folder, records: list[dict], skipped: list[str], truncated: list[str],
          done_before: int | None = None) -> None:
    """``summary.json`` from the records (evaluation metrics kept while the records are), then the
    manifest and its last session finished. ``done_before`` None: closing an interrupted session."""
    clean_temp_files(job.run_dir)
    summary = summarize(records, len(job.prompts), skipped, truncated)
    old_summary = folder.summary or {}
    if "metrics" in old_summary and old_summary.get("num_done") == summary["num_done"]:
        summary["metrics"] = old_summary["metrics"]  # evaluation results stay valid
    if summary != old_summary:
        write_json_atomic(job.run_dir / SUMMARY, summary)
    session = manifest["sessions"][-1]
    session["finished"] = manifest["finished"] = _now()
    if done_before is not None:
        session["prompts_run"] = summary["num_done"] - done_before
    write_json_atomic(job.run_dir / MANIFEST, manifest)
    mean = None if summary["mean_reward"] is None else round(summary["mean_reward"], 4)
    log.info("done: %d/%d prompts, mean reward %s -> %s", summary["num_done"], len(job.prompts), mean, job.run_dir)


def _attach_log_file(run_dir: Path) -> None:
    root, path = logging.getLogger(), os.path.abspath(run_dir / RUN_LOG)
    logs = [h for h in root.handlers if isinstance(h, logging.FileHandler) and h.baseFilename.endswith(RUN_LOG)]
    if any(h.baseFilename == path for h in logs):
        return
    for h in logs:  # the previous job's of a multirun
        root.removeHandler(h)
        h.close()
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root.addHandler(fh)
