"""Engine checks and timings on CUDA (``make bench-gpu-engine``; run where a GPU is present).

1. Correctness, fp32, a tiny random Llama: the engine equals ``transformers`` generate
   token for token, with zero noise and with pre-logit noise added by an ``lm_head``
   forward pre-hook, for prompts of different lengths in one batch; the three methods
   run on CUDA (noise drawn by CUDA generators) and are reproducible.
2. Speed, bf16, a Llama-3-8B-shaped model (its real config, random weights: nothing is
   downloaded): one AISP/BoN-Gaussian iteration's workload (P prompts x n rows, Gaussian
   noise on the first τ steps, greedy) through
   * ``hf``: per prompt, ``generate`` on the prompt repeated n times + the lm_head hook
     (what peers do: n prefills of the prompt, one prompt at a time);
   * ``hf_batched``: all P·n rows in one ``generate`` call;
   * ``engine``: one prefill per prompt, the KV cache shared by its rows.
   Reports tokens/s, samples/s, peak memory, and the fraction of the HBM floor (the
   bytes a decode step must read, weights + KV cache, over the measured copy bandwidth).

Prompts are random token ids (a random model has no use for text); the tokenizer is a
stand-in that writes ids as text. Results go to --out (JSON) and a table to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEV = "cuda"  # --device cpu runs the same script small, to check it without a GPU

from aisp_bench.engine import Engine  # noqa: E402
from aisp_bench.types import Prompt  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                 tie_word_embeddings=False)


class IdTokenizer:
    """Text is a space-separated list of token ids (for random-weight models)."""

    def __init__(self, eos: int, pad: int | None = None):
        self.eos_token_id, self.pad_token_id = eos, pad

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))


def random_prompts(k: int, lengths: list[int], vocab: int, seed: int = 0) -> list[Prompt]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        ids = torch.randint(10, vocab - 10, (lengths[i % len(lengths)],), generator=g).tolist()
        out.append(Prompt.single(f"p{i}", " ".join(map(str, ids))))
    return out


def hf_rows(model, prompts, n, noise, tau, new_tokens, eos, groups):
    """generate on each group of prompts (each repeated n times), noise by an lm_head hook."""
    rows = []
    for g in groups:
        seqs = [[int(t) for t in prompts[i].text.split()] for i in g for _ in range(n)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), eos, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, width - len(s):] = torch.tensor(s)
            mask[j, width - len(s):] = 1
        v = torch.cat([noise[i * n:(i + 1) * n] for i in g]) if noise is not None else None
        step = {"t": 0}

        def hook(module, args, v=v, step=step):
            t = step["t"]
            step["t"] += 1
            if v is None or t >= tau:
                return None
            return (args[0] + v[:, t].unsqueeze(1).to(args[0].dtype),)

        h = model.lm_head.register_forward_pre_hook(hook)
        try:
            with torch.inference_mode():
                out = model.generate(input_ids=ids.to(DEV), attention_mask=mask.to(DEV), max_new_tokens=new_tokens,
                                     do_sample=False, pad_token_id=eos, eos_token_id=eos)
        finally:
            h.remove()
        for row in out[:, width:].tolist():
            rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def agreement(rows, ref) -> float:
    """Mean fraction of a row's tokens before its first difference from the reference row."""
    fr = []
    for a, b in zip(rows, ref):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        fr.append(k / max(len(a), len(b)))
    return sum(fr) / len(fr)


def engine_rows(eng, prompts, n, noise):
    prefix = eng.prefill(prompts)
    out = eng.decode(prefix, torch.arange(len(prompts)).repeat_interleave(n), noise=noise)
    return [s.token_ids for s in out]


def correctness() -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from aisp_bench.methods import AISP, BoNGaussian, BoNTopP
    from aisp_bench.rewards.base import RewardModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=3,
                      bos_token_id=1)
    model = LlamaForCausalLM(cfg).to(DEV).float().eval()
    tok = IdTokenizer(eos=3)
    prompts = random_prompts(3, [5, 17, 9], 512)
    eng = Engine(model, tok, lambda p: p.text, max_new_tokens=24, max_batch_rows=64)
    n, tau = 4, 12
    noise = 2.0 * torch.randn(3 * n, tau, 64, device=DEV)
    zero = engine_rows(eng, prompts, 1, None)
    ref0 = hf_rows(model, prompts, 1, None, 0, 24, 3, [[0, 1, 2]])
    noisy = engine_rows(eng, prompts, n, noise)
    ref1 = hf_rows(model, prompts, n, noise, tau, 24, 3, [[0, 1, 2]])
    eng_copy = Engine(model, tok, lambda p: p.text, max_new_tokens=24, max_batch_rows=64, attention="copy")
    copy_ok = engine_rows(eng_copy, prompts, n, noise) == ref1

    class Toy(RewardModel):
        def _score_batch(self, p, r):
            return torch.tensor([float(len(set(x.split()))) for x in r])

    methods_ok = True
    for m in (BoNTopP(num_samples=6), BoNGaussian(num_samples=6, tau=12), AISP(n=3, kappa=3, tau=12, lam=1.0)):
        a = m(prompts, eng, Toy(), seed=0)
        b = m(prompts[1:2], eng, Toy(), seed=0)
        methods_ok &= a[1].sample_rewards == b[0].sample_rewards and a[0].num_samples == len(a[0].sample_rewards)
    return {"attention": eng.attention, "zero_noise_equal": zero == ref0, "noise_equal": noisy == ref1,
            "noise_equal_copy_attention": copy_ok,
            "noise_changes_rows": noisy[0] != zero[0], "methods_reproducible_on_cuda": bool(methods_ok)}


def copy_bandwidth() -> float:
    if DEV == "cpu":
        return float("nan")
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    ms = s.elapsed_time(e) / 10
    del x, y
    return 2 * 2 * 1024**3 / (ms / 1e3)  # bytes read + written per second


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def speed(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(LLAMA3_8B)
    if DEV == "cpu":  # the same code path, small
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1000, eos_token_id=999)
    cfg = LlamaConfig(**shape)
    t0 = time.perf_counter()
    with torch.device(DEV):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16 if DEV == "cuda" else torch.float32).eval()
    with torch.no_grad():  # explicit random weights: never time on uninitialised (often zero) memory
        g = torch.Generator(DEV).manual_seed(0)
        for name, prm in model.named_parameters():
            if "norm" in name:
                prm.fill_(1.0)
            else:
                prm.normal_(0.0, 0.02, generator=g)
    init_s = time.perf_counter() - t0
    eos = shape["eos_token_id"]
    tok = IdTokenizer(eos=eos)
    P, n, tau, T = args.prompts, args.n, args.tau, args.new_tokens
    prompts = random_prompts(P, args.prompt_lengths, shape["vocab_size"], seed=1)
    d = shape["hidden_size"]
    noise = args.sigma * torch.randn(P * n, tau, d, device=DEV, generator=torch.Generator(DEV).manual_seed(0))
    eng = Engine(model, tok, lambda p: p.text, max_new_tokens=T, max_batch_rows=P * n, check_prelogit=True)
    eng_copy = Engine(model, tok, lambda p: p.text, max_new_tokens=T, max_batch_rows=P * n, check_prelogit=False,
                      attention="copy")
    with torch.inference_mode():
        probe = model(input_ids=torch.tensor([[5, 6, 7]], device=DEV)).logits[0, -1].float()
    sanity = {"logits_finite": bool(torch.isfinite(probe).all()), "logits_std": float(probe.std())}
    print("weights:", sanity, flush=True)
    bw = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (d // cfg.num_attention_heads) * 2
    results, outputs = {}, {}
    def run(variant):
        if variant == "engine":
            return engine_rows(eng, prompts, n, noise)
        if variant == "engine_copy":
            return engine_rows(eng_copy, prompts, n, noise)
        groups = [[i] for i in range(P)] if variant == "hf" else [list(range(P))]
        return hf_rows(model, prompts, n, noise, tau, T, eos, groups)

    for variant in ("engine", "engine_copy", "hf_batched", "hf"):
        if variant != "hf":  # a full untimed pass first: kernels chosen, allocator pool grown
            run(variant)  # (hf runs last, on a pool that the others already grew)
        sync()
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        rows = run(variant)
        sync()
        sec = time.perf_counter() - t0
        toks = sum(map(len, rows))
        # floor: the fewest bytes the decode steps must read (each weight once per step, each
        # prompt's KV once per step, each row's generated KV), over the measured bandwidth
        L = sum(args.prompt_lengths[i % len(args.prompt_lengths)] for i in range(P))
        steps = max(map(len, rows))
        kv_bytes = sum((L + n * P * t) * kv_per_token for t in range(steps))
        floor_s = (steps * weight_bytes + kv_bytes) / bw
        results[variant] = {"seconds": sec, "samples": len(rows), "tokens": toks, "tokens_per_s": toks / sec,
                            "samples_per_s": len(rows) / sec, "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if DEV == "cuda" else float("nan"),
                            "decode_floor_s": floor_s, "floor_fraction": floor_s / sec}
        outputs[variant] = rows
        print(f"{variant:>10}: {sec:7.2f} s {toks / sec:9.1f} tok/s {len(rows) / sec:7.2f} samples/s "
              f"peak {results[variant]['peak_mem_gb']:.1f} GB, {100 * floor_s / sec:5.1f}% of the HBM floor", flush=True)
    match = {v: {"rows_identical": sum(a == b for a, b in zip(outputs[v], outputs["engine"])) / len(outputs["engine"]),
                 "prefix_agreement": agreement(outputs[v], outputs["engine"])}
             for v in ("engine_copy", "hf", "hf_batched")}
    return {"model": "Llama-3-8B config, random bf16 weights (N(0, 0.02))", "init_seconds": init_s, "sanity": sanity, "weights_gb": weight_bytes / 1e9,
            "copy_bandwidth_tb_s": bw / 1e12, "workload": {"prompts": P, "n": n, "tau": tau, "new_tokens": T,
                                                            "prompt_lengths": args.prompt_lengths, "sigma": args.sigma},
            "results": results, "rows_equal_to_engine": match,
            "speedup_vs_hf": results["hf"]["seconds"] / results["engine"]["seconds"],
            "speedup_vs_engine_copy": results["engine_copy"]["seconds"] / results["engine"]["seconds"],
            "speedup_vs_hf_batched": results["hf_batched"]["seconds"] / results["engine"]["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tau", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[180, 420, 300, 250])
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a small dry run of this script")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "engine_gpu.json")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (use --device cpu for a small dry run)")
    import transformers

    report = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (dry run)", "torch": torch.__version__,
              "transformers": transformers.__version__}
    report["correctness"] = correctness()
    print("correctness:", report["correctness"], flush=True)
    if not args.skip_speed:
        report["speed"] = speed(args)
        s = report["speed"]
        print(f"engine speed-up: {s['speedup_vs_hf']:.2f}x over per-prompt generate, "
              f"{s['speedup_vs_hf_batched']:.2f}x over batched generate; "
              f"{s['speedup_vs_engine_copy']:.2f}x over the engine with copied caches; "
              f"agreement with the engine: {s['rows_equal_to_engine']}; copy BW {s['copy_bandwidth_tb_s']:.2f} TB/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
