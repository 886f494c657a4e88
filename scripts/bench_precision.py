"""bf16 against fp32 on the device: reward scoring with a shared prompt, and base_logprob.

    python scripts/bench_precision.py                 # CUDA: results/bench/precision_cuda.json
    python scripts/bench_precision.py --device cpu --out /tmp/p.json   # tiny shapes: the dry run the tests run

Does scoring a prompt's responses against one prefilled copy of the prompt (the rewards'
``engine.reward_attention``: split or sdpa) move rewards more than bf16 itself
does? Per reward shape (UltraRM-13B: LLaMA-2-13B; Eurus-RM-7B: Mistral-7B, grouped-query
attention), random weights N(0, 0.02) in bf16 (nothing is downloaded), P prompts x n
responses of random tokens (lengths n/2..n tokens, so batches are padded), scored:

* ``full``: every pair read whole (``engine.reward_attention=full``), the configured batching;
* ``full_rebatched``: the same, 8 rows per forward: other shapes and padding, hence
  other kernels and rounding. The noise reference: how much bf16 scores move with the
  batch a pair lands in;
* ``split``, ``sdpa``: the prompt shared, each attention path;
* ``fp32``: the same weights cast to float32, full scoring (TF32 off): the reference;
  ``fp32_split`` checks that shared scoring is exact there.

Reported per variant against fp32 (and against bf16 full): max and mean |difference|,
as a fraction of the rewards' within-prompt standard deviation (the mean over prompts of
the std of its n fp32 rewards: the spread a BoN argmax and AISP's weights exp(r/λ) act
on), and how often each prompt's best response stays the same. Deep random models map
every input to nearly the same final state, so their rewards spread far less than a
trained model's (a pessimistic yardstick); the second, the head scale |w| rms(final norm
weight), is the spread rewards would have if responses' final states were unrelated (an
optimistic one). A random regression head
is a random direction: scaling it scales the differences and the spread alike, so the
fraction does not depend on the head's scale (why it is the number reported); what it
assumes is that bf16's error is not aligned with the head, as it cannot be for a random
one. A trained head reads a direction along which responses differ by design; whether
its spread is wider or narrower, relative to bf16's error, than a random direction's is
what these numbers cannot say.

base_logprob: a Llama-3-8B-shaped policy (random weights, ``lm_head`` scaled so the
logits spread about 3, as SmolLM2's measured 3.2, rather than the near-uniform init),
``prefix_scoring.response_logprobs`` in bf16 (the prompt KV shared, and copied) against the
fp32 engine and a plain bf16 forward of each prompt + response alone: per-token mean
log-probability differences, and as a fraction of their std across responses.

Each part prints one ``verdict`` line. On a GPU the parts run one model at a time (the
13B model in fp32 takes 52 GB); ``--budget-s`` skips what is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import AttentionInterface

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_gpu  # noqa: E402  (the Llama-3-8B shape)
from bench_methods import (  # noqa: E402
    TINY_POLICY, TINY_REWARD, ULTRARM_13B, WordTokenizer, random_prompts, random_weights_)

from aisp_bench.engine import attention as shared_prefix  # noqa: E402
from aisp_bench.engine import Engine  # noqa: E402
from aisp_bench.prefix_scoring import response_logprobs  # noqa: E402
from aisp_bench.models.templates import TranscriptFormat  # noqa: E402
from aisp_bench.rewards.regression_head import RegressionHeadModel, RegressionHeadReward  # noqa: E402

CONF = ROOT / "aisp_bench" / "conf"
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, sliding_window=4096,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_MISTRAL = dict(TINY_REWARD, num_key_value_heads=2)
REWARD_SHAPES = {"ultrarm13b": ("llama", ULTRARM_13B, TINY_REWARD, "ultrarm"),
                 "eurus7b": ("mistral", MISTRAL_7B, TINY_MISTRAL, "eurus")}
VARIANTS = {"full": dict(attention="full"), "full_rebatched": dict(attention="full", batch_size=8),
            "split": dict(attention="split"), "sdpa": dict(attention="sdpa"),
            "split_fp32_attention": dict(attention="split")}  # with split_attention_in_fp32


@contextlib.contextmanager
def split_attention_in_fp32():
    """The split path with its attention computed in float32 (its inputs upcast, its output
    rounded back to bf16): a diagnostic that separates the attention's own bf16 rounding
    (scores and probabilities in bf16, where SDPA kernels keep them in fp32) from the rest
    of shared scoring (the prompt prefilled apart, other matrix shapes)."""
    split = shared_prefix.attention

    def in_fp32(module, query, key, value, attention_mask=None, scaling=None, **kwargs):
        st = shared_prefix._ACTIVE[-1]
        i = module.layer_idx
        saved = st.k[i], st.v[i], st.row_bias
        st.k[i], st.v[i], st.row_bias = st.k[i].float(), st.v[i].float(), st.row_bias.float()
        try:
            out, _ = split(module, query.float(), key.float(), value.float(), attention_mask, scaling, **kwargs)
        finally:
            st.k[i], st.v[i], st.row_bias = saved
        return out.to(query.dtype), None

    AttentionInterface.register(shared_prefix.ATTN_NAME, in_fp32)
    try:
        yield
    finally:
        AttentionInterface.register(shared_prefix.ATTN_NAME, split)


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def free(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.empty_cache()


def pairs(P: int, n: int, L: int, R: int, vocab: int, seed: int) -> tuple[list, list[str]]:
    """P prompts of L random tokens, each with n responses of R/2..R random tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts = [p for p in random_prompts(P, L, vocab, seed=seed) for _ in range(n)]
    lengths = torch.randint(max(1, R // 2), R + 1, (P * n,), generator=g).tolist()
    responses = [" ".join(map(str, torch.randint(10, vocab - 10, (m,), generator=g).tolist())) for m in lengths]
    return prompts, responses


def build_reward(name: str, dev: str, tiny: bool, layers: int | None = None) -> RegressionHeadReward:
    from transformers import LlamaConfig, MistralConfig

    kind, shape, tiny_shape, conf_name = REWARD_SHAPES[name]
    shape = dict(shape, **(tiny_shape if tiny else {}), **({"num_hidden_layers": layers} if layers else {}))
    cfg = (LlamaConfig if kind == "llama" else MistralConfig)(**shape)
    with torch.device(dev):
        model = RegressionHeadModel._from_config(cfg, dtype=torch.bfloat16).eval()
    random_weights_(model, 1)
    conf = yaml.safe_load((CONF / "reward" / f"{conf_name}.yaml").read_text())
    fmt = {k: v for k, v in conf.pop("template").items() if k != "_target_"}
    kwargs = {k: v for k, v in conf.items() if k != "_target_"}
    reward = RegressionHeadReward(template=TranscriptFormat(**fmt), **kwargs)
    tok = WordTokenizer(shape["vocab_size"], eos=shape["eos_token_id"], pad=shape["pad_token_id"],
                        bos=shape["bos_token_id"])
    return reward.attach(model, tok)


def score(rw, prompts, responses, **settings) -> torch.Tensor:
    saved = {k: getattr(rw, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(rw, k, v)
        return rw.score(prompts, responses)
    finally:
        for k, v in saved.items():
            setattr(rw, k, v)


def differences(got: torch.Tensor, ref: torch.Tensor, n: int, spread: float, scale: float | None = None) -> dict:
    """max/mean |got - ref|, as fractions of ``spread`` (and of ``scale``), and the share
    of prompts (groups of n) whose argmax is the same."""
    d = (got.double() - ref.double()).abs()
    same = (got.view(-1, n).argmax(-1) == ref.view(-1, n).argmax(-1)).double().mean()
    out = {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "max_frac_of_spread": float(d.max()) / spread,
           "mean_frac_of_spread": float(d.mean()) / spread, "same_best_fraction": float(same)}
    if scale:
        out.update(max_frac_of_head_scale=float(d.max()) / scale, mean_frac_of_head_scale=float(d.mean()) / scale)
    return out


def reward_precision(name: str, args) -> dict:
    dev, tiny = args.device, args.size == "tiny"
    t0 = time.perf_counter()
    rw = build_reward(name, dev, tiny, args.layers)
    m = rw.model  # the std rewards would have if responses' final states were unrelated: |w| rms(norm)
    with torch.no_grad():
        head_scale = float(m.regression_head.weight.float().norm() * m.model.norm.weight.float().pow(2).mean() ** 0.5)
    prompts, responses = pairs(args.prompts, args.n, args.prompt_len, args.new_tokens,
                               rw.model.config.vocab_size, seed=21)
    scores = {v: score(rw, prompts, responses, **kw) for v, kw in VARIANTS.items() if v != "split_fp32_attention"}
    with split_attention_in_fp32():
        scores["split_fp32_attention"] = score(rw, prompts, responses, **VARIANTS["split_fp32_attention"])
    rw.model.float()  # the same weights, exactly, in float32
    free(dev)
    scores["fp32"] = score(rw, prompts, responses, attention="full")
    scores["fp32_split"] = score(rw, prompts, responses, attention="split")
    saved = rw.stats["prefix_tokens_saved"]
    del rw, m
    free(dev)
    ref = scores["fp32"]
    spread = float(ref.view(-1, args.n).std(dim=-1).mean())
    out = {"pairs": len(prompts), "prompts": args.prompts, "n": args.n, "within_prompt_std": spread,
           "overall_std": float(ref.std()), "head_scale": head_scale, "reward_mean": float(ref.mean()),
           "prefix_tokens_saved": saved,
           "seconds": time.perf_counter() - t0}
    out["vs_fp32"] = {v: differences(s, ref, args.n, spread, head_scale) for v, s in scores.items() if v != "fp32"}
    out["vs_full"] = {v: differences(scores[v], scores["full"], args.n, spread, head_scale)
                      for v in ("full_rebatched", "split", "sdpa", "split_fp32_attention")}
    out["fp32_shared_equal"] = out["vs_fp32"]["fp32_split"]["max_frac_of_spread"] < 1e-3
    out["verdict"] = reward_verdict(name, out)
    return out


def reward_verdict(name: str, r: dict) -> str:
    """Shared scoring is fine when its distance to fp32 is within that of bf16 full scoring
    (mean 1.5x, max 2x, plus the re-batching noise): 64 pairs estimate a mean |difference|
    to about 10%, and the question is whether shared scoring adds an error of its own
    (BENCHMARKS.md: up to 0.45 at the 13B shape), not whether it differs by a few percent."""
    f, noise = r["vs_fp32"]["full"], r["vs_full"]["full_rebatched"]
    parts, worse = [], []
    for v in ("split", "sdpa"):
        s = r["vs_fp32"][v]
        parts.append(f"{v} {100 * s['mean_frac_of_spread']:.1f}% / {100 * s['max_frac_of_spread']:.1f}%")
        if (s["mean_abs"] > 1.5 * f["mean_abs"] + noise["mean_abs"]
                or s["max_abs"] > 2 * f["max_abs"] + noise["max_abs"]):
            worse.append(v)
    d = r["vs_fp32"]["split_fp32_attention"]
    parts.append(f"split with fp32 attention {100 * d['mean_frac_of_spread']:.1f}% / "
                 f"{100 * d['max_frac_of_spread']:.1f}%")
    verdict = ("SHARED SCORING WORSE THAN BF16 NOISE: " + ", ".join(worse)) if worse else \
        "shared scoring within bf16's own error"
    return (f"verdict reward {name}: |bf16 - fp32| mean / max as % of the within-prompt reward std "
            f"{r['within_prompt_std']:.3g}: full {100 * f['mean_frac_of_spread']:.1f}% / "
            f"{100 * f['max_frac_of_spread']:.1f}%, {', '.join(parts)}; re-batched full vs full "
            f"{100 * noise['mean_frac_of_spread']:.1f}% / {100 * noise['max_frac_of_spread']:.1f}%; "
            f"of the head scale {r['head_scale']:.3g}: full {100 * f['mean_frac_of_head_scale']:.2f}% / "
            f"{100 * f['max_frac_of_head_scale']:.2f}%; "
            f"best response unchanged (full) {100 * f['same_best_fraction']:.0f}%: {verdict}"
            + ("" if r["fp32_shared_equal"] else "; FP32 SHARED != FULL"))


# ---------------------------------------------------------------------------- base_logprob
def build_policy(dev: str, tiny: bool, layers: int | None = None, logit_std: float = 3.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(bench_gpu.LLAMA3_8B, **(TINY_POLICY if tiny else {}))
    shape.update({"num_hidden_layers": layers} if layers else {})
    vocab = shape["vocab_size"]
    shape.update(eos_token_id=None, bos_token_id=None)
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(LlamaConfig(**shape), dtype=torch.bfloat16).eval()
    random_weights_(model, 0)
    model.generation_config.eos_token_id = vocab
    with torch.inference_mode():
        std = float(model(input_ids=torch.arange(10, 74, device=dev)[None]).logits.float().std())
        model.lm_head.weight.mul_(logit_std / std)
    return model, WordTokenizer(vocab, eos=vocab)


def forward_means(model, tok, engine, prompts, texts) -> list[float]:
    """Per-token mean log-probability of each response from a plain forward of prompt + response alone."""
    out = []
    with torch.inference_mode():
        for p, text in zip(prompts, texts):
            pid, rid = engine.encode(p), tok(text)["input_ids"]
            logits = model(input_ids=torch.tensor([pid + rid], device=model.device)).logits[0, len(pid) - 1 : -1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            rows = torch.arange(len(rid), device=logp.device)
            out.append(float(logp[rows, torch.tensor(rid, device=logp.device)].double().mean()))
    return out


def logprob_precision(args) -> dict:
    dev, tiny = args.device, args.size == "tiny"
    t0 = time.perf_counter()
    model, tok = build_policy(dev, tiny, args.layers)
    n = max(2, args.n // 2)
    flat, texts = pairs(args.prompts, n, args.prompt_len, args.new_tokens, model.config.vocab_size, seed=31)
    prompts, groups = flat[::n], [texts[i * n : (i + 1) * n] for i in range(args.prompts)]

    def means(attention: str) -> list[float]:
        eng = Engine(model, tok, max_new_tokens=args.new_tokens, add_special_tokens=True, check_prelogit=False,
                     attention=attention)
        return [s.mean for g in response_logprobs(eng, prompts, groups) for s in g]

    got = {"shared_prefix": means("shared_prefix"), "copy": means("copy")}
    eng = Engine(model, tok, max_new_tokens=args.new_tokens, add_special_tokens=True, check_prelogit=False)
    got["forward"] = forward_means(model, tok, eng, flat, texts)
    model.float()
    free(dev)
    ref = torch.tensor(means("shared_prefix"), dtype=torch.float64)
    del model, eng
    free(dev)
    spread = float(ref.std())
    out = {"responses": len(texts), "mean_logprob": float(ref.mean()), "std_across_responses": spread,
           "seconds": time.perf_counter() - t0,
           "vs_fp32": {k: differences(torch.tensor(v, dtype=torch.float64), ref, n, spread) for k, v in got.items()}}
    f, parts = out["vs_fp32"]["forward"], []
    for k in ("shared_prefix", "copy"):
        d = out["vs_fp32"][k]
        parts.append(f"engine {k} {d['mean_abs']:.3g} / {d['max_abs']:.3g}")
    worse = [k for k in ("shared_prefix", "copy")
             if out["vs_fp32"][k]["max_abs"] > 2 * f["max_abs"] + 0.01]
    out["verdict"] = (f"verdict base_logprob: |bf16 - fp32| of the per-token mean log-prob, mean / max (nats): "
                      f"plain forward {f['mean_abs']:.3g} / {f['max_abs']:.3g}, {', '.join(parts)} (std across "
                      f"responses {spread:.3g}): " + (f"ENGINE WORSE THAN A PLAIN FORWARD: {worse}" if worse
                                                      else "the engine within a plain bf16 forward's error"))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: tiny shapes, a dry run")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default results/bench/precision_<device>.json)")
    ap.add_argument("--parts", nargs="+", default=[*REWARD_SHAPES, "logprob"], choices=[*REWARD_SHAPES, "logprob"])
    ap.add_argument("--size", choices=["real", "tiny"], default=None,
                    help="the models' widths: the real ones (default on cuda) or tiny (default on cpu)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the real models (e.g. a real "
                    "width that fits a CPU run: --device cpu --size real --layers 4)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default 4; cpu 3)")
    ap.add_argument("--n", type=int, default=None, help="responses per prompt (default 16; cpu 6)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 256; cpu 12)")
    ap.add_argument("--new-tokens", type=int, default=None, help="longest response (default 128; cpu 8)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip the parts left after this many seconds")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    args.size = args.size or ("tiny" if cpu else "real")
    for key, gpu_default, cpu_default in (("prompts", 4, 3), ("n", 16, 6), ("prompt_len", 256, 12),
                                          ("new_tokens", 128, 8)):
        if getattr(args, key) is None:
            setattr(args, key, cpu_default if cpu else gpu_default)
    args.out = args.out or ROOT / "results" / "bench" / f"precision_{args.device}.json"
    if not cpu and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (use --device cpu for a small dry run)")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is fp32
    torch.backends.cudnn.allow_tf32 = False
    import transformers

    report = {"device": torch.cuda.get_device_name(0) if not cpu else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args), "verdicts": []}
    t_start = time.perf_counter()
    for part in args.parts:
        if time.perf_counter() - t_start > args.budget_s:
            report[part] = {"skipped": "time budget"}
            continue
        try:
            report[part] = logprob_precision(args) if part == "logprob" else reward_precision(part, args)
            report["verdicts"].append(report[part]["verdict"])
            print(report[part]["verdict"], flush=True)
        except Exception as e:  # noqa: BLE001  (recorded; the next part still runs)
            report[part] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{part}: FAILED {type(e).__name__}: {e}", flush=True)
        free(args.device)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["elapsed_s"] = time.perf_counter() - t_start
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    rep = main()
    sys.exit(1 if any("error" in v for v in rep.values() if isinstance(v, dict)) else 0)
