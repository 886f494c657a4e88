"""Every bad input is refused cleanly: exit code 2, one ``error:`` line naming the key or file,
and not a byte written (the whole tree under tmp_path hashed before and after).

The table runs each command in process on its composed config (the ``command`` fixture,
as ``cli.run_app``); a few cases run the real entry points (``python -m ...``), whose
pre-flight (``cli.launch``) refuses bad overrides, unknown options and bad values before
Hydra writes anything.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from synthetic_runs import write_run

from aisp_bench.__main__ import _run as run_main
from aisp_bench.evaluate import main as evaluate_main
from aisp_bench.judge.__main__ import main as judge_main
from aisp_bench.report.__main__ import main as report_main
from proc import run_tree

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"run": (run_main, "config"), "evaluate": (evaluate_main, "evaluate"), "judge": (judge_main, "judge"),
         "report": (report_main, "report")}  # fmt: skip
RUN_DIR = "results/runs/demo/smollm2_135m__smollm2_judge/aisp/default/seed0"  # of the run command's defaults
SYNTHETIC = "results/runs/shp/tiny__rm/aisp/default/seed0"  # one of the runs the other commands read


# -- what a case finds on disk before it runs ------------------------------------------------
def corrupt_gzip(tmp: Path) -> None:
    data = bytearray(gzip.compress(b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo"}\n' * 200))
    data[20:40] = b"\xff" * 20  # a valid header, then garbage
    (tmp / "data").mkdir()
    (tmp / "data" / "hh.jsonl.gz").write_bytes(bytes(data))


def run_folder(tmp: Path, files: dict[str, str]) -> None:
    d = tmp / RUN_DIR
    d.mkdir(parents=True)
    for name, text in files.items():
        (d / name).write_text(text)


def manifest_of(cfg) -> str:
    return json.dumps({"config": OmegaConf.to_container(cfg, resolve=True), "finished": None, "sessions": []})


RECORDS_BAD_MIDDLE = '{"prompt_id": "demo-0"}\nnot json\n{"prompt_id": "demo-1"}\n'


def corrupt(path: str, text: str):
    return lambda tmp, cfg: (tmp / path).write_text(text)


SETUPS = {
    "gzip": lambda tmp, cfg: corrupt_gzip(tmp),
    "file": lambda tmp, cfg: (tmp / "afile").write_text("not a folder"),
    "manifest": lambda tmp, cfg: run_folder(tmp, {"manifest.json": '{"config": {', "records.jsonl": ""}),
    "manifest_list": lambda tmp, cfg: run_folder(tmp, {"manifest.json": "[1, 2]"}),
    "no_manifest": lambda tmp, cfg: run_folder(tmp, {"records.jsonl": '{"prompt_id": "demo-0"}\n'}),
    "records": lambda tmp, cfg: run_folder(tmp, {"manifest.json": manifest_of(cfg), "records.jsonl": RECORDS_BAD_MIDDLE}),
    "other_config": lambda tmp, cfg: run_folder(tmp, {"manifest.json": json.dumps(
        {"config": {**OmegaConf.to_container(cfg, resolve=True), "seed": 7}})}),
    "summary": corrupt(f"{SYNTHETIC}/summary.json", '{"num_done": 3,'),
    "synthetic_manifest": corrupt(f"{SYNTHETIC}/manifest.json", "{oops"),
    "synthetic_records": corrupt(f"{SYNTHETIC}/records.jsonl", RECORDS_BAD_MIDDLE),
}  # fmt: skip

# (command, overrides ({tmp}: tmp_path), what the error line must name, setup)
CASES = [
    ("run", ["method.sigma=inf"], "method.sigma", None),
    ("run", ["method.sigma=nan"], "method.sigma", None),
    ("run", ["method.lam=inf"], "method.lam", None),
    ("run", ["method.lam=-1"], "method.lam", None),
    ("run", ["method.alpha=1.5"], "method.alpha", None),
    ("run", ["method=bon_gaussian", "method.sigma2=inf"], "method.sigma2", None),
    ("run", ["method=bon_topp", "method.temperature=inf"], "method.temperature", None),
    ("run", ["method=bon_topp", "method.top_p=abc"], "method.top_p", None),
    ("run", ["method=bon_topp", "method.top_p=0"], "method.top_p", None),
    ("run", ["method.final_candidate=maybe"], "method.final_candidate", None),
    ("run", ["budget.n=0"], "budget.n", None),
    ("run", ["budget.kappa=-3"], "budget.kappa", None),
    ("run", ["budget.tau=1.5"], "budget.tau", None),
    ("run", ["seed=-1"], "seed", None),
    ("run", ["seed=abc"], "seed", None),
    ("run", ["generation.max_new_tokens=0"], "generation.max_new_tokens", None),
    ("run", ["generation.batch_rows=0"], "generation.batch_rows", None),
    ("run", ["generation.prompt_overflow=drop"], "generation.prompt_overflow", None),
    ("run", ["engine.sync_every=0"], "engine.sync_every", None),
    ("run", ["engine.decode_step=graph"], "engine.decode_step", None),
    ("run", ["engine.attention=paged"], "engine.attention", None),
    ("run", ["engine.reward_attention=none"], "engine.reward_attention", None),
    ("run", ["generation.batch_rows=many"], "generation.batch_rows", None),
    ("run", ["reward.max_batch_tokens=0"], "reward.max_batch_tokens", None),
    ("run", ["dataset.num_shards=2", "dataset.shard=2"], "dataset.shard", None),
    ("run", ["dataset.num_shards=0"], "dataset.num_shards", None),
    ("run", ["batch_prompts=0"], "batch_prompts", None),
    ("run", ["batch_prompts=many"], "batch_prompts", None),
    ("run", ["progress=maybe"], "progress", None),
    ("run", ["overwrite=2"], "overwrite", None),
    ("run", ["dataset.num_prompts=0"], "dataset.num_prompts", None),
    ("run", ["dataset.num_prompts=1e400"], "dataset.num_prompts", None),
    ("run", ["dataset.sample_seed=-1"], "dataset.sample_seed", None),
    ("run", ["model.max_context=100", "generation.max_new_tokens=128"], "model.max_context", None),
    ("run", ["model.max_context=0"], "model.max_context", None),
    ("run", ["reward.batch_size=0"], "reward.batch_size", None),
    ("run", ["reward.max_length=abc"], "reward.max_length", None),
    ("run", ["reward=minilm_similarity", "reward.empty_score=inf"], "reward.empty_score", None),
    ("run", ["lam_table.demo.smollm2_judge=0"], "lam_table.demo.smollm2_judge", None),
    ("run", ["dataset=hh_rlhf", "dataset.path={tmp}/data/hh.jsonl.gz"], "hh.jsonl.gz", "gzip"),
    ("run", ["dataset.path={tmp}/missing.jsonl"], "missing.jsonl", None),
    ("run", ["results_dir={tmp}/afile/results"], "results_dir", "file"),
    ("run", [], "manifest.json", "manifest"),
    ("run", [], "manifest.json", "manifest_list"),
    ("run", [], "manifest.json", "no_manifest"),
    ("run", [], "records.jsonl: line 2", "records"),
    ("run", [], "seed: 7 -> 0", "other_config"),
    ("evaluate", ["batch_size=0"], "batch_size", None),
    ("evaluate", ["force=maybe"], "force", None),
    ("evaluate", ["encoder=simcs"], "simcs", None),
    ("evaluate", ["reward=minilm_similarity", "reward.batch_size=-1"], "reward.batch_size", None),
    ("evaluate", ["engine.reward_attention=fused"], "engine.reward_attention", None),
    ("evaluate", ["results_dir={tmp}/afile"], "results_dir", "file"),
    ("evaluate", [], "summary.json", "summary"),
    ("evaluate", [], "records.jsonl: line 2", "synthetic_records"),
    ("judge", ["num_prompts=0"], "num_prompts", None),
    ("judge", ["trials=0"], "trials", None),
    ("judge", ["judge.concurrency=0"], "judge.concurrency", None),
    ("judge", ["mode=nosuch"], "mode", None),
    ("judge", ["judge.timeout=inf"], "judge.timeout", None),
    ("judge", ["judge.max_retries=-1"], "judge.max_retries", None),
    ("judge", ["judge.temperature=3"], "judge.temperature", None),
    ("judge", ["judge.max_tokens=abc"], "judge.max_tokens", None),
    ("judge", ["judge.max_requests=-5"], "judge.max_requests", None),
    ("judge", ["sample_seed=-1"], "sample_seed", None),
    ("judge", ["dry_run=maybe"], "dry_run", None),
    ("judge", ["judge=reward_model", "reward=minilm_similarity", "judge.tie_margin=nan"], "judge.tie_margin", None),
    ("judge", ["judge.cache_dir={tmp}/afile/cache"], "judge.cache_dir", "file"),
    ("judge", [], "manifest.json", "synthetic_manifest"),
    ("report", ["band=wide"], "band", None),
    ("report", ["out={tmp}/afile/out"], "out", "file"),
    ("report", ["target=tabel1"], "tabel1", None),
    ("report", ["select.seed=[x]"], "select.seed", None),
    ("report", [], "summary.json", "summary"),
    ("report", [], "records.jsonl: line 2", "synthetic_records"),
]


def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> sha256 of its bytes ("dir" for a folder)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def synthetic_runs(results: Path) -> None:
    for method in ("aisp", "bon_topp"):
        for seed in range(2):
            write_run(results, method, seed, {f"p{i}": f"answer {i} of {method}" for i in range(3)})


def one_error(code: int, err: str, needle: str) -> None:
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and needle in errors[0] and "Traceback" not in err, (code, err)


@pytest.mark.parametrize("cmd, overrides, needle, setup", CASES, ids=[f"{c[0]}-{c[3] or ' '.join(c[1])}" for c in CASES])
def test_bad_input_is_refused_and_nothing_is_written(command, compose, tmp_path, cmd, overrides, needle, setup):
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    synthetic_runs(tmp_path / "results")
    if setup:
        SETUPS[setup](tmp_path, compose(overrides) if cmd == "run" else None)
    before = tree(tmp_path)
    main, config_name = MAINS[cmd]
    code, _, err = command(main, config_name, *overrides)
    one_error(code, err, needle)
    assert tree(tmp_path) == before


ENTRY_POINTS = [
    ("aisp_bench", ["method=aspi"], "method/aspi"),  # an unknown option: Hydra's message, in one line
    ("aisp_bench", ["method.nosuch=1"], "method.nosuch"),
    ("aisp_bench", ["method.lam=[1"], "method.lam=[1"),
    ("aisp_bench", ["~progress"], "deletes progress"),  # a key the run reads, deleted
    ("aisp_bench", ["-m", "method.lam=0.1,-1"], "method.lam"),  # the second job of a sweep, before the first runs
    ("aisp_bench", ["results_dir={tmp}/afile/results"], "results_dir"),
    ("aisp_bench", ["generation.decode_step=eager"], "generation.decode_step is now engine.decode_step"),
    ("aisp_bench", ["reward.share_prefix=false"], "engine.reward_attention=full"),  # a key that moved: its new name
    ("aisp_bench.evaluate", ["reward=nosuch"], "reward/nosuch"),
    ("aisp_bench.evaluate", ["reward=ultrarm", "reward.shared_attention=sdpa"], "is now engine.reward_attention"),
    ("aisp_bench.judge", ["trials=0"], "trials"),
    ("aisp_bench.report", ["nosuch=1"], "nosuch"),
]


@pytest.mark.parametrize("module, args, needle", ENTRY_POINTS, ids=[" ".join(e[1]) for e in ENTRY_POINTS])
def test_entry_points_refuse_before_hydra_writes(tmp_path, module, args, needle):
    (tmp_path / "afile").write_text("not a folder")
    before = tree(tmp_path)
    env = dict(os.environ, AISP_BENCH_RESULTS=str(tmp_path / "results"))
    out = run_tree([sys.executable, "-m", module, *(a.format(tmp=tmp_path) for a in args)], cwd=tmp_path, env=env,
                   timeout=120)
    one_error(out.returncode, out.stderr, needle)
    assert tree(tmp_path) == before  # not even Hydra's own output folder
