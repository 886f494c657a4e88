"""The methods end to end on one GPU at paper settings (``make bench-gpu``).

One command, one JSON, one table:

    python scripts/bench_methods.py                   # CUDA: writes results/bench/methods_gpu.json (what plan reads)
    python scripts/bench_methods.py --device cpu --out /tmp/m.json   # tiny shapes, seconds: the dry run the tests run

What runs, in this order (a time budget, ``--budget-s``, skips what is left; the JSON is
rewritten after every part, so a run cut short keeps what it measured):

1. ``checks``: fp32, a tiny random Llama: the engine equals ``transformers`` generate
   token for token (zero noise, noise through an ``lm_head`` hook, shared-prefix and
   copied caches) and every ``decode_step`` (eager, static, and ``cuda_graph`` on CUDA)
   gives the same tokens as eager, with rows ending at different steps; a tiny
   ``RegressionHeadReward`` scores the same with the prompt shared, in full and alone.
2. ``device``: the measured ceilings: HBM bandwidth (a device-to-device copy, bytes read
   plus written) and the bf16 matrix-product rate (8192^3).
3. Models, bf16, random weights N(0, 0.02) (nothing is downloaded): a Llama-3-8B-shaped
   ``LlamaForCausalLM`` (the policy) and an UltraRM-13B-shaped ``RegressionHeadModel``
   inside a ``RegressionHeadReward`` built from ``conf/reward/ultrarm.yaml``. Sanity
   probes: finite logits and rewards with a spread.
4. ``decode``: one AISP iteration's decode alone (P prompts x n rows, noise on τ steps)
   through each ``decode_step`` and ``attention`` path: seconds, tokens/s, % of the floor.
   (These and the reward's ``attention`` are the engine tuning of BENCHMARKS.md, "Engine
   tuning": set here through the ``Engine``'s and the reward's constructor arguments.)
5. ``reward``: one AISP iteration's scoring alone (``reward_variants``): the configured
   reward settings, each reward ``attention`` (``full``: no shared prompt; ``split``,
   ``sdpa``) and a larger token budget, then a profiler table of one call.
6. ``aisp`` (κ iterations + the final candidate), ``bon_topp`` and ``bon_gaussian``
   (N = 256 and 1024, one prompt), and at the largest N's generated-token budget
   ``spec_rejection`` (2N rows, half dropped every T/4 tokens) and ``particle_filter`` (N
   particles resampled every T/8 tokens) through their real classes, with the engine as
   ``python -m aisp_bench`` builds it (``batch_rows`` auto, ``decode_step`` auto) and
   with each other decode step but ``static``: seconds per prompt (and per AISP iteration) split
   into prefill / decode / reward / other (``engine.prefill``, ``engine.decode``, the
   segments of ``engine.start``'s paused decode and ``reward.score`` are wrapped, with a
   device synchronise on both sides; partial scoring is reward time), tokens/s,
   peak memory and the fraction of the floor.

Decode lengths are fixed: a random model's text is noise, and its EOS would come at
random. The policy's EOS id is set outside its vocabulary, so every row decodes exactly
``--new-tokens`` tokens (checked); the stop strings of ``conf/model/llama3_8b.yaml`` stay
on (digit text never contains them, but the engine's checks run). Prompts are random
token ids of ``--prompt-len`` tokens rendered with the Llama-3 config's template;
tokenizers are stand-ins that read numbers as ids and hash other words.

The floor of a phase is the larger of (bytes it must move) / bandwidth and (FLOPs it must
do) / peak, summed over phases: a decode step reads every weight once, each prompt's KV
once, each row's generated KV and writes the logits; prefill and reward scoring do
2·params FLOPs per token plus attention (where the reward shares a prompt across its
responses, the prompt counted once). ``floor_fraction`` = floor / measured seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
import zlib
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_gpu  # noqa: E402  (the tiny-model correctness checks, the Llama-3-8B shape)

from aisp_bench.engine import Engine, sampling  # noqa: E402
from aisp_bench.methods import AISP, BoNGaussian, BoNTopP, ParticleFilter, SpecRejection  # noqa: E402
from aisp_bench.models.templates import TranscriptFormat  # noqa: E402
from aisp_bench.rewards.batching import common_prefix_len  # noqa: E402
from aisp_bench.rewards.regression_head import RegressionHeadModel, RegressionHeadReward  # noqa: E402
from aisp_bench.types import Prompt  # noqa: E402

ULTRARM_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                   num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_POLICY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1000)
TINY_REWARD = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=500)
CONF = ROOT / "aisp_bench" / "conf"


class WordTokenizer:
    """Whitespace words to ids: a number is its own id (modulo the vocabulary), any
    other word a hash of it. ``decode`` writes ids as numbers. A stand-in for
    random-weight models: nothing is downloaded, and text round-trips to the same ids."""

    def __init__(self, vocab: int, eos: int, pad: int = 0, bos: int | None = None) -> None:
        self.vocab, self.eos_token_id, self.pad_token_id, self.bos_token_id = vocab, eos, pad, bos
        self.bos_token = None
        self.all_special_ids = [i for i in (eos, bos) if i is not None]

    def __len__(self) -> int:
        return self.vocab

    def _id(self, word: str) -> int:
        return int(word) % self.vocab if word.isdigit() else zlib.crc32(word.encode()) % self.vocab

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        ids = [self._id(w) for w in text.split()]
        bos = [self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []
        return {"input_ids": bos + ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in self.all_special_ids))

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def now(dev: str) -> float:
    sync(dev)
    return time.perf_counter()


# ---------------------------------------------------------------------------- device ceilings
def measure_device(dev: str) -> dict:
    """HBM bandwidth (copy, read + write) and the bf16 (CPU: fp32) matrix-product rate."""
    small = dev == "cpu"
    nbytes = (64 if small else 2048) * 1024**2
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).normal_()
    y = torch.empty_like(x)
    reps = 3 if small else 10
    y.copy_(x)
    t0 = now(dev)
    for _ in range(reps):
        y.copy_(x)
    bw = 2 * nbytes * reps / (now(dev) - t0)
    del x, y
    m = 512 if small else 8192
    dtype = torch.float32 if small else torch.bfloat16
    a = torch.randn(m, m, device=dev, dtype=dtype)
    b = torch.randn(m, m, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    t0 = now(dev)
    for _ in range(reps):
        a @ b
    flops = 2 * m**3 * reps / (now(dev) - t0)
    return {"bandwidth_bytes_s": bw, "matmul_flops_s": flops, "matmul_dtype": str(dtype).replace("torch.", ""),
            "note": "copy of %d MiB (read + write), %d^3 product, mean of %d" % (nbytes // 1024**2, m, reps)}


# ---------------------------------------------------------------------------- models
def random_weights_(model, seed: int) -> None:
    """N(0, 0.02) everywhere, norms at 1: never time on uninitialised memory."""
    dev = next(model.parameters()).device
    g = torch.Generator(dev).manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "norm" in name:
                prm.fill_(1.0)
            else:
                prm.normal_(0.0, 0.02, generator=g)


def matmul_params(model) -> int:
    """Parameters that take part in a matrix product (all but the input embedding table)."""
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def build_policy(dev: str, tiny: bool, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(bench_gpu.LLAMA3_8B)
    if tiny:
        shape.update(TINY_POLICY)
    vocab = shape["vocab_size"]
    shape.update(eos_token_id=None, bos_token_id=None)
    cfg = LlamaConfig(**shape)
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    random_weights_(model, 0)
    model.generation_config.eos_token_id = vocab  # EOS outside the vocabulary: every row decodes in full
    conf = yaml.safe_load((CONF / "model" / "llama3_8b.yaml").read_text())
    fmt = {k: v for k, v in conf["prompt_format"].items() if k != "_target_"}
    return model, WordTokenizer(vocab, eos=vocab), TranscriptFormat(**fmt), conf["stop_strings"]


def build_reward(dev: str, tiny: bool, dtype, batch_size: int | None):
    from transformers import LlamaConfig

    shape = dict(ULTRARM_13B)
    if tiny:
        shape.update(TINY_REWARD)
    with torch.device(dev):
        model = RegressionHeadModel._from_config(LlamaConfig(**shape), dtype=dtype).eval()
    random_weights_(model, 1)
    conf = yaml.safe_load((CONF / "reward" / "ultrarm.yaml").read_text())
    fmt = {k: v for k, v in conf.pop("template").items() if k != "_target_"}
    kwargs = {k: v for k, v in conf.items() if k != "_target_"}
    if batch_size:
        kwargs["batch_size"] = batch_size
    reward = RegressionHeadReward(template=TranscriptFormat(**fmt), **kwargs)
    tok = WordTokenizer(shape["vocab_size"], eos=shape["eos_token_id"], pad=shape["pad_token_id"],
                        bos=shape["bos_token_id"])
    return reward.attach(model, tok), kwargs


def random_prompts(k: int, length: int, vocab: int, seed: int) -> list[Prompt]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab - 10, (k, length), generator=g).tolist()
    return [Prompt.single(f"bench{seed}_{i}", " ".join(map(str, row))) for i, row in enumerate(ids)]


# ---------------------------------------------------------------------------- timing
class Timed:
    """Wraps ``engine.prefill``, ``engine.decode``, ``engine.start`` and ``reward.score`` of these
    objects (instance attributes shadow the methods), recording (phase, start, end, detail). A
    paused decode (``engine.start``: Speculative Rejection, particle filtering) has its
    segments (``run``) recorded as phase ``segment``, detail the tokens each row decoded."""

    def __init__(self, dev: str, engine, reward) -> None:
        self.dev, self.events = dev, []
        for obj, name, phase in ((engine, "prefill", "prefill"), (engine, "decode", "decode"),
                                 (engine, "start", "start"), (reward, "score", "reward")):
            setattr(obj, name, self._wrap(getattr(obj, name), phase, reward))

    def _wrap(self, fn, phase, reward):
        def timed(*args, **kwargs):
            if phase == "start":  # nothing decoded yet: its segments are timed
                decoding = fn(*args, **kwargs)
                decoding.run = self._wrap(decoding.run, "segment", reward)
                return decoding
            t0 = now(self.dev)
            out = fn(*args, **kwargs)
            t1 = now(self.dev)
            if phase == "reward":  # token ids and prompts for the floor, outside the timed part
                detail = reward_detail(reward, args[0], args[1])
            elif phase == "decode":
                detail = [s.num_tokens for s in out]
            elif phase == "segment":
                detail = out.tolist()
            else:
                detail = [len(p.text.split()) for p in args[0]]
            self.events.append((phase, t0, t1, detail))
            return out

        return timed

    def total(self, phase: str) -> float:
        return sum(e[2] - e[1] for e in self.events if e[0] == phase)


def reward_detail(reward, prompts, responses) -> tuple[list, list]:
    """What a reward call reads: each pair's token ids and its prompt's id (the floor counts
    a prompt's tokens once, whether or not the reward shares them: the least work)."""
    return [reward.encode(p, r) for p, r in zip(prompts, responses)], [p.id for p in prompts]


class Floor:
    """Bytes and FLOPs a phase cannot do without, over the measured ceilings."""

    def __init__(self, device: dict, policy, reward_model, kv_bytes: int, prompt_len: int) -> None:
        self.bw, self.peak = device["bandwidth_bytes_s"], device["matmul_flops_s"]
        pc, rc = policy.config, reward_model.config
        self.p_flop_params = matmul_params(policy)  # lm_head included (decode computes logits)
        self.p_prefill_params = self.p_flop_params - policy.get_output_embeddings().weight.numel()
        self.p_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
        emb = policy.get_input_embeddings().weight
        self.p_bytes -= emb.numel() * emb.element_size()
        self.p_attn = 4 * pc.num_hidden_layers * pc.num_attention_heads * (pc.hidden_size // pc.num_attention_heads)
        self.vocab = pc.vocab_size
        self.r_flop_params = matmul_params(reward_model)
        self.r_attn = 4 * rc.num_hidden_layers * rc.num_attention_heads * (rc.hidden_size // rc.num_attention_heads)
        self.r_bytes = sum(p.numel() * p.element_size() for p in reward_model.parameters())
        self.kv, self.L = kv_bytes, prompt_len
        self.elt = next(policy.parameters()).element_size()

    def decode(self, prompts: int, rows: int, steps: int) -> float:
        total = 0.0
        for t in range(steps):
            by = self.p_bytes + (prompts * self.L + rows * t) * self.kv + 2 * rows * self.vocab * self.elt
            fl = rows * (2 * self.p_flop_params + self.p_attn * (self.L + t))
            total += max(by / self.bw, fl / self.peak)
        return total

    def prefill(self, lengths: list[int]) -> float:  # the backbone only: no logits
        fl = sum(2 * self.p_prefill_params * n + self.p_attn / 2 * n * n for n in lengths)
        return max(self.p_bytes / self.bw, fl / self.peak)

    def reward(self, seqs: list, keys: list) -> float:
        """Sequences of one prompt (equal keys) read their common prefix once: what
        shared-prefix scoring must compute; the rest is read row by row."""
        groups: dict = {}
        for s, k in zip(seqs, keys):
            groups.setdefault(k, []).append(s)
        fl = 0.0
        for group in groups.values():
            c = min(common_prefix_len(group), min(map(len, group)) - 1) if len(group) > 1 else 0
            fl += 2 * self.r_flop_params * c + self.r_attn / 2 * c * c
            fl += sum(2 * self.r_flop_params * (len(s) - c) + self.r_attn / 2 * (len(s) ** 2 - c * c) for s in group)
        return max(self.r_bytes / self.bw, fl / self.peak)


def phase_floor(floor: Floor, events, prompt_count: int, chunk: int) -> dict[str, float]:
    """Floors of the recorded calls; a decode call runs in chunks of ``chunk`` rows, each
    for its longest row's steps."""
    out = {"prefill": 0.0, "decode": 0.0, "reward": 0.0}
    for phase, _, _, detail in events:
        if phase == "prefill":
            out["prefill"] += floor.prefill([n + 4 for n in detail])
        elif phase in ("decode", "segment"):  # a segment as if from step 0: a lower floor, still a floor
            for s in range(0, len(detail), chunk):
                part = detail[s : s + chunk]
                out["decode"] += floor.decode(min(prompt_count, len(part)), len(part), max(part))
        else:
            out["reward"] += floor.reward(*detail)
    return out


def peak_gb(dev: str) -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else float("nan")


def reset_peak(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()


# ---------------------------------------------------------------------------- workloads
def make_engine(ctx, **kw) -> Engine:
    opts = dict(max_new_tokens=ctx.args.new_tokens, max_batch_rows=ctx.args.batch_rows, stop_strings=ctx.stop_strings,
                add_special_tokens=True, check_prelogit=False)
    opts.update(kw)
    return Engine(ctx.policy, ctx.ptok, ctx.fmt_render, **opts)


def guarded(ctx, label: str, fn):
    """Run one workload; a failure (say, a CUDA graph that does not capture) is recorded
    and the benchmark goes on with the next one."""
    if ctx.over_budget():
        return {"skipped": "time budget"}
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (reported in the JSON and on stdout)
        import traceback

        ctx.log(f"{label}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    finally:
        if ctx.dev == "cuda":
            torch.cuda.empty_cache()


def decode_variants(ctx) -> dict:
    """One AISP iteration's decode (P prompts x n rows, noise on τ steps) per decode path."""
    a, dev = ctx.args, ctx.dev
    P = max(1, a.decode_rows // a.n)
    prompts = random_prompts(P, a.prompt_len, ctx.vocab, seed=11)
    g = torch.Generator(dev).manual_seed(0)
    noise = a.sigma * torch.randn(P * a.n, a.tau, ctx.policy.config.hidden_size, device=dev, generator=g)
    prompt_of_row = torch.arange(P).repeat_interleave(a.n)
    variants = {"eager_copy": dict(attention="copy"), "eager_shared": dict(attention="shared_prefix")}
    variants.update({step: dict(decode_step=step) for step in ctx.steps if step == "cuda_graph"})
    variants["eager_shared_sync1"] = dict(attention="shared_prefix", sync_every=1)
    variants.update({step: dict(decode_step=step) for step in ctx.steps if step == "static"})
    base = make_engine(ctx, max_batch_rows=P * a.n)
    out = {"prompts": P, "rows": P * a.n, "auto_attention": base.attention}
    ref: list = []

    def one(name, kw):
        eng = make_engine(ctx, max_batch_rows=P * a.n, **kw)
        prefix = eng.prefill(prompts)
        t0 = now(dev)
        eng.decode(prefix, prompt_of_row, noise=noise)  # warm-up: kernels chosen, allocator grown, graphs captured
        warm = now(dev) - t0
        reset_peak(dev)
        t0 = now(dev)
        samples = eng.decode(prefix, prompt_of_row, noise=noise)
        sec = now(dev) - t0
        toks = sum(s.num_tokens for s in samples)
        fl = ctx.floor.decode(P, P * a.n, max(s.num_tokens for s in samples))
        rows = [s.token_ids for s in samples]
        ref[:] = ref or rows
        ctx.log(f"decode {name:>20}: {sec:6.2f} s  {toks / sec:8.0f} tok/s  {100 * fl / sec:5.1f}% of floor  "
                f"(warm-up {warm:.2f} s)")
        return {"seconds": sec, "warmup_seconds": warm, "tokens": toks, "tokens_per_s": toks / sec,
                "peak_gb": peak_gb(dev), "floor_s": fl, "floor_fraction": fl / sec,
                "agreement_with_eager_copy": bench_gpu.agreement(rows, ref),
                "graph_captures": eng.stats["graph_captures"]}

    for name, kw in variants.items():
        out[name] = guarded(ctx, f"decode {name}", lambda: one(name, kw))
        ctx.save()
    return out


def profile_steps(ctx) -> dict:
    """The PyTorch profiler over a short AISP-shaped decode (8 steps): noise (eager and,
    on CUDA, cuda_graph) and top-p sampling (eager): the operators that take the time,
    for the next round of work."""
    from torch.profiler import ProfilerActivity, profile

    a, dev = ctx.args, ctx.dev
    P = max(1, a.decode_rows // a.n)
    prompts = random_prompts(P, a.prompt_len, ctx.vocab, seed=12)
    noise = a.sigma * torch.randn(P * a.n, 8, ctx.policy.config.hidden_size, device=dev)
    uniforms = torch.rand(P * a.n, 8, dtype=torch.float64)
    prompt_of_row = torch.arange(P).repeat_interleave(a.n)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    variants = {"eager_noise": ("eager", dict(noise=noise)),
                "eager_topp": ("eager", dict(uniforms=uniforms, temperature=0.6, top_p=0.9))}
    if "cuda_graph" in ctx.steps:
        variants["cuda_graph_noise"] = ("cuda_graph", dict(noise=noise))
    out = {}
    for name, (step, kw) in variants.items():
        def one(step=step, kw=kw):
            eng = make_engine(ctx, max_batch_rows=P * a.n, max_new_tokens=8, decode_step=step)
            prefix = eng.prefill(prompts)
            eng.decode(prefix, prompt_of_row, **kw)
            with profile(activities=acts) as prof:
                eng.decode(prefix, prompt_of_row, **kw)
                sync(dev)
            key = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
            return {"table": prof.key_averages().table(sort_by=key, row_limit=30)}
        out[name] = guarded(ctx, f"profile {name}", one)
    return out


def reward_variants(ctx) -> dict:
    """One AISP iteration's scoring, as ``aisp/default`` batches it (``batch_rows // n``
    prompts x n responses of ``--new-tokens`` words), per reward setting: the
    configured one, each ``attention``: ``full`` (every row reads its prompt), ``split``
    (split products) and ``sdpa`` (one fused SDPA call on gathered KV), and 2x the token
    budget per forward (``batch_size`` and ``max_batch_tokens``). Seconds per prompt-iteration, the floor, and max |reward - default's|; then the
    profiler over one call of the configured setting."""
    from torch.profiler import ProfilerActivity, profile

    a, dev, rw = ctx.args, ctx.dev, ctx.reward
    P = max(1, make_engine(ctx).max_batch_rows // a.n)
    prompts = [p for p in random_prompts(P, a.prompt_len, ctx.vocab, seed=21) for _ in range(a.n)]
    g = torch.Generator().manual_seed(2)
    responses = [" ".join(map(str, row)) for row in torch.randint(10, 30000, (P * a.n, a.new_tokens), generator=g).tolist()]
    conf = {k: getattr(rw, k) for k in ("attention", "batch_size", "max_batch_tokens")}
    variants = {"configured": {}, "full": dict(attention="full"), "split": dict(attention="split"),
                "sdpa": dict(attention="sdpa"),
                "tokens_x2": dict(batch_size=2 * conf["batch_size"], max_batch_tokens=2 * conf["max_batch_tokens"])}
    out: dict = {"prompts": P, "rows": len(prompts), "settings": dict(conf)}
    floor = ctx.floor.reward(*reward_detail(rw, prompts, responses))  # the same pairs for every setting
    ref: list = []

    def one(kw):
        try:
            for k, v in kw.items():
                setattr(rw, k, v)
            rw.score(prompts, responses)  # warm-up
            reset_peak(dev)
            t0 = now(dev)
            r = rw.score(prompts, responses)
            sec = now(dev) - t0
        finally:  # back to the configured settings
            for k, v in conf.items():
                setattr(rw, k, v)
        ref[:] = ref or [r]
        return {"seconds_per_prompt_iteration": sec / P, "floor_fraction": floor / sec, "peak_gb": peak_gb(dev),
                "max_abs_diff_to_configured": float((r - ref[0]).abs().max()), "reward_std": float(r.std())}

    for name, kw in variants.items():
        out[name] = guarded(ctx, f"reward {name}", lambda: one(kw))
        if "seconds_per_prompt_iteration" in out[name]:
            r = out[name]
            ctx.log(f"reward {name:>12}: {r['seconds_per_prompt_iteration']:.3f} s per prompt-iteration  "
                    f"{100 * r['floor_fraction']:5.1f}% of floor  |diff| {r['max_abs_diff_to_configured']:.2g}")
        ctx.save()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])

    def prof():
        with profile(activities=acts) as pr:
            rw.score(prompts, responses)
            sync(dev)
        key = "self_device_time_total" if dev == "cuda" else "self_cpu_time_total"
        return {"table": pr.key_averages().table(sort_by=key, row_limit=30)}

    out["profile"] = guarded(ctx, "reward profile", prof)
    return out


@contextlib.contextmanager
def top_p_prefilter(dev: str, k: int | None):
    """``engine.sampling.TOP_P_PREFILTER_K`` for this device set to k within the block
    (None: unchanged): BoN top-p with and without the top-k prefilter."""
    saved = dict(sampling.TOP_P_PREFILTER_K)
    if k is not None:
        sampling.TOP_P_PREFILTER_K[dev] = k
    try:
        yield
    finally:
        sampling.TOP_P_PREFILTER_K.clear()
        sampling.TOP_P_PREFILTER_K.update(saved)


def run_method(ctx, label: str, method, prompts: list[Prompt], engine_kw: dict) -> dict:
    dev = ctx.dev
    engine_kw = dict(engine_kw)
    with top_p_prefilter(dev, engine_kw.pop("top_p_prefilter_k", None)):
        return _run_method(ctx, label, method, prompts, engine_kw)


def _run_method(ctx, label: str, method, prompts: list[Prompt], engine_kw: dict) -> dict:
    dev = ctx.dev
    eng = make_engine(ctx, **engine_kw)
    timed = Timed(dev, eng, ctx.reward)
    reset_peak(dev)
    t0 = now(dev)
    results = method(prompts, eng, ctx.reward, seed=0)
    total = now(dev) - t0
    timed_events = timed.events
    for obj, name in ((eng, "prefill"), (eng, "decode"), (eng, "start"), (ctx.reward, "score")):
        obj.__dict__.pop(name, None)  # unwrap
    P = len(prompts)
    parts = {ph: timed.total(ph) for ph in ("prefill", "decode", "reward")}
    parts["decode"] += timed.total("segment")
    parts["other"] = total - sum(parts.values())
    floors = phase_floor(ctx.floor, timed_events, P, eng.max_batch_rows)
    toks = sum(r.num_tokens for r in results)
    lengths = [n for e in timed_events if e[0] == "decode" for n in e[3]]
    # a paused decode: each segment's rows all decode it whole (none ends early), responses full length
    segments = [e[3] for e in timed_events if e[0] == "segment"]
    lengths += [r.response_tokens for r in results] if segments else []
    out = {"prompts": P, "seconds": total, "seconds_per_prompt": total / P,
           "per_prompt": {k: v / P for k, v in parts.items()}, "tokens": toks, "tokens_per_s": toks / total,
           "peak_gb": peak_gb(dev), "floor_s": sum(floors.values()), "floor_by_phase_s": floors,
           "floor_fraction": sum(floors.values()) / total,
           "decode_floor_fraction": floors["decode"] / parts["decode"] if parts["decode"] else None,
           "batch_rows": eng.max_batch_rows,
           "attention": eng.attention,
           "decode_step": eng.decode_step, "sync_every": eng.sync_every, "graph_captures": eng.stats["graph_captures"],
           "all_rows_full_length": all(n == ctx.args.new_tokens for n in lengths)
           and all(len(set(d)) == 1 for d in segments),
           "reward_calls": sum(1 for e in timed_events if e[0] == "reward"),
           "rewards_finite": all(math.isfinite(x) for r in results for x in r.sample_rewards),
           "results_sha256": hashlib.sha256(json.dumps([(r.response, r.sample_rewards) for r in results],
                                                       default=str).encode()).hexdigest()[:16]}
    if isinstance(method, AISP):
        out["iterations"] = aisp_iterations(timed_events, method.kappa, P)
        steady = out["iterations"][1:] or out["iterations"]
        out["seconds_per_prompt_iteration"] = sum(it["seconds"] for it in steady) / len(steady)
        out["per_prompt_iteration"] = {k: sum(it[k] for it in steady) / len(steady)
                                       for k in ("decode", "reward", "other")}
    ctx.log(f"{label:>28}: {total / P:7.2f} s/prompt  decode {parts['decode'] / P:6.2f}  reward "
            f"{parts['reward'] / P:6.2f}  other {parts['other'] / P:5.2f}  {toks / total:7.0f} tok/s  "
            f"{100 * out['floor_fraction']:5.1f}% of floor"
            + (f"  | per iteration {out['seconds_per_prompt_iteration']:.3f} s" if "iterations" in out else ""))
    return out


def aisp_iterations(events, kappa: int, P: int) -> list[dict]:
    """Per iteration k, per prompt: decode, reward, and other (the update, drawing V, ...):
    the time from the end of the previous iteration's scoring to the end of this one's."""
    dec = [e for e in events if e[0] == "decode"]
    rew = [e for e in events if e[0] == "reward"]
    pre_end = next(e[2] for e in events if e[0] == "prefill")
    out = []
    for k in range(min(kappa, len(dec), len(rew))):
        start = rew[k - 1][2] if k else pre_end
        span = rew[k][2] - start
        d, r = dec[k][2] - dec[k][1], rew[k][2] - rew[k][1]
        out.append({"k": k + 1, "seconds": span / P, "decode": d / P, "reward": r / P, "other": (span - d - r) / P})
    return out


def methods(ctx) -> dict:
    """Each method as ``python -m aisp_bench`` runs a batch: as many prompts as fill
    ``batch_rows`` (AISP: rows // n; BoN: rows // N, at least one)."""
    a = ctx.args
    out = {}
    default = make_engine(ctx).decode_step  # decode_step="auto": cuda_graph on a GPU, eager on the CPU
    variants = [("default", {})] + [(s, {"decode_step": s}) for s in ctx.steps if s not in (default, "static")]
    rows = {v: make_engine(ctx, **kw).max_batch_rows for v, kw in variants}
    jobs = [(f"aisp/{v}", lambda: AISP(n=a.n, kappa=a.kappa, tau=a.tau, lam=0.7, sigma=a.sigma),
             max(1, rows[v] // a.n), kw) for v, kw in variants]
    for N in a.bon_n:
        for v, kw in variants[::-1]:  # the fast path first: the slow one is what a budget cuts
            P = max(1, rows[v] // N)
            jobs.append((f"bon_gaussian/N{N}/{v}", lambda N=N: BoNGaussian(num_samples=N, tau=a.tau), P, kw))
            jobs.append((f"bon_topp/N{N}/{v}", lambda N=N: BoNTopP(num_samples=N), P, kw))
        if N == a.bon_n[-1]:  # the reward-guided decoders at BoN's generated-token budget (conf/method/*.yaml)
            T = a.new_tokens
            P = max(1, rows["default"] // (2 * N))
            jobs.append((f"spec_rejection/N{2 * N}/default", lambda N=N, T=T: SpecRejection(
                num_samples=2 * N, rejection_rate=0.5, decision_tokens=max(1, T // 4)), P, {}))
            jobs.append((f"particle_filter/N{N}/default", lambda N=N, T=T: ParticleFilter(
                num_particles=N, segment_tokens=max(1, T // 8)), max(1, rows["default"] // N), {}))
        if a.top_p_prefilter_k:  # the default engine with the other setting of the top-p prefilter
            P = max(1, rows["default"] // N)
            other = 0 if sampling.TOP_P_PREFILTER_K.get(ctx.dev) else a.top_p_prefilter_k
            jobs.append((f"bon_topp/N{N}/prefilter{other}", lambda N=N: BoNTopP(num_samples=N), P,
                         {"top_p_prefilter_k": other}))
    seeds: dict[str, int] = {}  # a workload's variants read the same prompts
    for i, (label, make, P, kw) in enumerate(jobs):
        prompts = random_prompts(P, a.prompt_len, ctx.vocab, seed=seeds.setdefault(label.rsplit("/", 1)[0], 100 + i))
        out[label] = guarded(ctx, label, lambda: run_method(ctx, label, make(), prompts, kw))
        ctx.save()
    return out


# ---------------------------------------------------------------------------- checks
def step_checks(dev: str) -> dict:
    """fp32 tiny Llama: every decode step gives eager's tokens, rows ending at different steps."""
    from collections import Counter

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, eos_token_id=511, bos_token_id=1)
    model = LlamaForCausalLM(cfg).to(dev).float().eval()
    prompts = random_prompts(3, 9, 500, seed=5)
    prompts[1] = Prompt.single("long", prompts[1].text + " " + prompts[0].text)
    noise = 2.0 * torch.randn(12, 10, 64, generator=torch.Generator().manual_seed(1)).to(dev)
    prompt_of_row = torch.arange(3).repeat_interleave(4)

    def rows(tok, **kw):
        eng = Engine(model, tok, max_new_tokens=24, check_prelogit=False, **kw)
        return [(s.token_ids, s.finish_reason) for s in eng.decode(eng.prefill(prompts), prompt_of_row, noise=noise)]

    tok = WordTokenizer(512, eos=511)
    free = rows(tok, attention="copy")  # make a frequent token the EOS, so rows end early
    eos = Counter(t for r, _ in free for t in r[2:]).most_common(1)[0][0]
    model.generation_config.eos_token_id = int(eos)
    tok = WordTokenizer(512, eos=int(eos))
    ref = rows(tok, attention="copy", sync_every=1)
    steps = ["static"] + (["cuda_graph"] if dev == "cuda" else [])
    out = {"eos_rows": sum(r == "eos" for _, r in ref), "rows": len(ref)}
    out["eager_shared_equal"] = rows(tok, attention="shared_prefix", sync_every=3) == ref
    for step in steps:
        out[f"{step}_equal"] = rows(tok, decode_step=step, sync_every=1) == ref
        out[f"{step}_sync4_small_batches_equal"] = rows(tok, decode_step=step, sync_every=4, max_batch_rows=5) == ref
    return out


def reward_checks(dev: str) -> dict:
    """fp32 tiny ``RegressionHeadReward`` (the UltraRM layout): scoring with each prompt read
    once equals full scoring and one-by-one scoring, prompts mixed in one call."""
    torch.manual_seed(0)
    reward, _ = build_reward(dev, True, torch.float32, None)
    g = torch.Generator().manual_seed(4)
    prompts, responses = [], []
    for i, length in enumerate((9, 30, 17)):
        p = random_prompts(1, length, 500, seed=30 + i)[0]
        for k in range(5):
            prompts.append(p)
            responses.append(" ".join(map(str, torch.randint(10, 490, (1 + 4 * k,), generator=g).tolist())))
    order = torch.randperm(len(prompts), generator=g).tolist()  # prompts interleaved in the call
    prompts, responses = [prompts[i] for i in order], [responses[i] for i in order]
    saved = reward.stats["prefix_tokens_saved"]
    reward.attention = "split"
    shared = reward.score(prompts, responses)
    reward.attention = "sdpa"
    fused = reward.score(prompts, responses)
    saved = reward.stats["prefix_tokens_saved"] - saved
    reward.attention = "full"
    full = reward.score(prompts, responses)
    reward.batch_size = 1
    alone = reward.score(prompts, responses)
    return {"reward_prefix_tokens_saved": saved, "reward_shared_vs_full_max_diff": float((shared - full).abs().max()),
            "reward_shared_equal": bool(saved > 0 and torch.allclose(shared, alone, atol=1e-4)),
            "reward_shared_sdpa_equal": bool(torch.allclose(fused, alone, atol=1e-4)),
            "reward_full_equal": bool(torch.allclose(full, alone, atol=1e-4))}


# ---------------------------------------------------------------------------- main
class Context:
    def __init__(self, args) -> None:
        self.args, self.dev = args, args.device
        self.t_start = time.perf_counter()
        self.report: dict = {}
        self.lines: list[str] = []

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t_start > self.args.budget_s

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self) -> None:
        self.report["elapsed_s"] = time.perf_counter() - self.t_start
        self.args.out.parent.mkdir(parents=True, exist_ok=True)
        self.args.out.write_text(json.dumps(self.report, indent=2, default=str) + "\n")

    def fmt_render(self, prompt: Prompt) -> str:
        return self.fmt.render(prompt.messages)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: tiny shapes, a dry run")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON (default results/bench/methods_gpu.json; cpu: methods_cpu.json)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 256; cpu 12)")
    ap.add_argument("--n", type=int, default=None, help="AISP rows per prompt (default 32; cpu 4)")
    ap.add_argument("--kappa", type=int, default=3, help="AISP iterations timed (the first one is reported apart)")
    ap.add_argument("--tau", type=int, default=None, help="noisy steps (default 128; cpu 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per row (default 128; cpu 8)")
    ap.add_argument("--bon-n", type=int, nargs="*", default=None,
                    help="BoN sample counts (default 256 1024; cpu 8 16; none: AISP only)")
    ap.add_argument("--batch-rows", default="auto", help="generation.batch_rows (default auto)")
    ap.add_argument("--decode-rows", type=int, default=None, help="rows of the decode comparison (default 256; cpu 16)")
    parts = ["decode", "reward", "methods", "profile"]
    ap.add_argument("--parts", nargs="+", default=parts, choices=parts, help="what to run after the checks")
    ap.add_argument("--reward-batch-size", type=int, default=None, help="default: conf/reward/ultrarm.yaml")
    ap.add_argument("--steps", nargs="+", default=None, help="decode steps to compare (default: all the device has)")
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--top-p-prefilter-k", type=int, default=64,
                    help="also run BoN top-p with the top-k prefilter switched the other way (0: do not)")
    ap.add_argument("--budget-s", type=float, default=360.0, help="skip what is left after this many seconds")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    for key, gpu_default, cpu_default in (("prompt_len", 256, 12), ("n", 32, 4), ("tau", 128, 8),
                                          ("new_tokens", 128, 8), ("bon_n", [256, 1024], [8, 16]),
                                          ("decode_rows", 256, 16)):
        if getattr(args, key) is None:
            setattr(args, key, cpu_default if cpu else gpu_default)
    if args.batch_rows != "auto":
        args.batch_rows = int(args.batch_rows)
    args.out = args.out or ROOT / "results" / "bench" / f"methods_{'cpu' if cpu else 'gpu'}.json"  # gpu: plan's
    if not cpu and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (use --device cpu for a small dry run)")
    import transformers

    ctx = Context(args)
    dev = ctx.dev
    ctx.steps = args.steps or (["eager", "static"] + ([] if cpu else ["cuda_graph"]))
    bench_gpu.DEV = dev
    ctx.report.update({"device": torch.cuda.get_device_name(0) if not cpu else "cpu (dry run, tiny shapes)",
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S"), "args": vars(args)})
    ctx.report["checks"] = {"engine_vs_generate": bench_gpu.correctness(), "decode_steps": step_checks(dev),
                            "reward": reward_checks(dev)}
    ctx.log(f"checks: {json.dumps(ctx.report['checks'])}")
    ctx.report["device_ceilings"] = measure_device(dev)
    c = ctx.report["device_ceilings"]
    ctx.log(f"device: {c['bandwidth_bytes_s'] / 1e12:.3f} TB/s copy, {c['matmul_flops_s'] / 1e12:.3f} TFLOP/s "
            f"{c['matmul_dtype']} matmul")
    ctx.save()

    dtype = torch.float32 if cpu else torch.bfloat16
    t0 = time.perf_counter()
    ctx.policy, ctx.ptok, ctx.fmt, ctx.stop_strings = build_policy(dev, cpu, dtype)
    ctx.reward, reward_conf = build_reward(dev, cpu, dtype, args.reward_batch_size)
    ctx.vocab = ctx.policy.config.vocab_size
    probe_eng = make_engine(ctx, check_prelogit=True)
    with torch.inference_mode():
        logits = ctx.policy(input_ids=torch.tensor([[5, 6, 7]], device=dev)).logits[0, -1].float()
    pr = random_prompts(2, args.prompt_len, ctx.vocab, seed=3)
    rw = ctx.reward.score(pr, ["1 2 3 4 5", "6 7 8 9 10 11 12"])
    ctx.floor = Floor(c, ctx.policy, ctx.reward.model, probe_eng.kv_bytes_per_token, args.prompt_len + 4)
    ctx.report["models"] = {
        "policy": "Llama-3-8B shape" + (" (tiny)" if cpu else ""),
        "reward": "UltraRM-13B shape" + (" (tiny)" if cpu else ""),
        "dtype": str(dtype), "init_seconds": time.perf_counter() - t0,
        "policy_gb": sum(p.numel() * p.element_size() for p in ctx.policy.parameters()) / 1e9,
        "reward_gb": sum(p.numel() * p.element_size() for p in ctx.reward.model.parameters()) / 1e9,
        "reward_config": {k: v for k, v in reward_conf.items() if k not in ("name_or_path",)},
        "batch_rows_auto": probe_eng.max_batch_rows, "sync_every_auto": probe_eng.sync_every,
        "kv_bytes_per_token": probe_eng.kv_bytes_per_token,
        "sanity": {"logits_finite": bool(torch.isfinite(logits).all()), "logits_std": float(logits.std()),
                   "rewards": rw.tolist(), "rewards_differ": bool(rw[0] != rw[1])},
    }
    ctx.log(f"models: {json.dumps(ctx.report['models'])}")
    del probe_eng
    ctx.save()
    if "decode" in args.parts:
        ctx.report["decode"] = decode_variants(ctx)
        ctx.save()
    if "reward" in args.parts:
        ctx.report["reward"] = reward_variants(ctx)
        ctx.save()
    if "methods" in args.parts:
        ctx.report["methods"] = methods(ctx)
        ctx.save()
    if "profile" in args.parts:
        ctx.report["profile"] = profile_steps(ctx)
    ctx.report["table"] = table(ctx.report)
    ctx.save()
    print("\n".join(ctx.report["table"]))
    bad = sanity_failures(ctx.report)
    ctx.report["sanity_failures"] = bad
    ctx.save()
    print(f"wrote {args.out}" + (f"; SANITY FAILURES: {bad}" if bad else ""))
    return ctx.report


def not_run(r: dict) -> str:
    return r.get("skipped") or "FAILED: " + r.get("error", "")[:60]


def table(report: dict) -> list[str]:
    lines = ["| workload | s/prompt | s/iteration | decode | reward | other | tok/s | peak GB | % floor "
             "| % decode floor |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in report.get("decode", {}).items():
        if isinstance(r, dict) and not isinstance(r.get("seconds"), float):
            lines.append(f"| decode {name} | {not_run(r)} | | | | | | | | |")
        elif isinstance(r, dict):
            shape = f"{report['decode']['prompts']}x{report['decode']['rows'] // report['decode']['prompts']}"
            lines.append(f"| decode {shape}"
                         f" {name} | | | {r['seconds']:.2f} | | | {r['tokens_per_s']:.0f} | {r['peak_gb']:.1f} | "
                         f"{100 * r['floor_fraction']:.1f} | {100 * r['floor_fraction']:.1f} |")
    rewards = report.get("reward", {})
    for name, r in rewards.items():
        if name in ("settings", "profile") or not isinstance(r, dict):
            continue
        label = f"reward {rewards['prompts']}x{rewards['rows'] // rewards['prompts']} {name}"
        if "seconds_per_prompt_iteration" not in r:
            lines.append(f"| {label} | {not_run(r)} | | | | | | | | |")
        else:
            lines.append(f"| {label} | | {r['seconds_per_prompt_iteration']:.3f} | | "
                         f"{r['seconds_per_prompt_iteration']:.3f} | | | {r['peak_gb']:.1f} | "
                         f"{100 * r['floor_fraction']:.1f} | |")
    for name, r in report.get("methods", {}).items():
        if "seconds" not in r:
            lines.append(f"| {name} | {not_run(r)} | | | | | | | | |")
            continue
        it = r.get("per_prompt_iteration")
        parts = it or r["per_prompt"]
        lines.append(f"| {name} ({r['prompts']} prompts, {r['batch_rows']} rows) | {r['seconds_per_prompt']:.2f} | "
                     f"{r.get('seconds_per_prompt_iteration', float('nan')):.3f} | {parts['decode']:.3f} | "
                     f"{parts['reward']:.3f} | {parts['other']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_gb']:.1f} | "
                     f"{100 * r['floor_fraction']:.1f} | {100 * (r['decode_floor_fraction'] or 0):.1f} |")
    return lines


def sanity_failures(report: dict) -> list[str]:
    """What says the numbers are not to be trusted: a failed check, a degenerate model, rows
    that did not decode the full length (timings no longer comparable), non-finite rewards."""
    bad = [f"checks.{k}" for part in report["checks"].values() for k, v in part.items() if v is False]
    s = report["models"]["sanity"]
    if not (s["logits_finite"] and s["logits_std"] > 0.05 and s["rewards_differ"]):
        bad.append("models.sanity")
    for name, r in report.get("methods", {}).items():
        if "error" in r or ("seconds" in r and not (r["all_rows_full_length"] and r["rewards_finite"])):
            bad.append(f"methods.{name}")
    methods = report.get("methods", {})
    bad += [f"methods.{k} differs from default" for k, r in methods.items() if "/prefilter" in k and "seconds" in r
            and r["results_sha256"] != methods.get(k.rsplit("/", 1)[0] + "/default", {}).get("results_sha256")]
    bad += [f"decode.{k}" for k, r in report.get("decode", {}).items() if isinstance(r, dict) and "error" in r]
    bad += [f"reward.{k}" for k, r in report.get("reward", {}).items() if isinstance(r, dict) and "error" in r]
    return bad


if __name__ == "__main__":
    report = main()
    if report.get("sanity_failures"):
        sys.exit(1)
