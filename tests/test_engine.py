"""Engine exactness on SmolLM2 (CPU, fp32) against transformers' own generate."""

from __future__ import annotations

import pytest
import torch
from transformers import TopPLogitsWarper

from aisp_bench.engine import Engine, sample_top_p, top_p_filter
from aisp_bench.types import Prompt

PROMPTS = [
    Prompt.single("a", "What is the capital of France?"),
    Prompt.single("b", "Write a haiku about autumn leaves falling on a quiet pond near the old temple."),
    Prompt.single("c", "Hi"),
]
T = 20


@pytest.fixture(scope="module", params=["shared_prefix", "copy"])
def engine(smollm2, request):
    """Both attention paths: the prompt KV shared by its rows, and copied to each row."""
    eng = Engine(smollm2.model, smollm2.tokenizer, smollm2.render, max_new_tokens=T, max_batch_rows=64,
                 add_special_tokens=False, attention=request.param)
    assert eng.attention == request.param
    return eng


_HF_ROWS: dict = {}


def hf_generate(smollm2, prompts, n=1, hook=None, max_new_tokens=T, hook_key=None):
    """transformers' generate on the left-padded batch, each prompt repeated n times.

    (generate refuses num_return_sequences > 1 for greedy decoding, so the rows are
    repeated in the input, as num_return_sequences would do internally.) Results are
    kept for the module (the reference does not depend on the engine's attention path);
    a call with a hook is kept only under a ``hook_key`` naming what the hook adds.
    """
    key = (tuple(p.id for p in prompts), n, max_new_tokens, hook_key)
    if hook is not None and hook_key is None:
        return _generate(smollm2, prompts, n, hook, max_new_tokens)
    if key not in _HF_ROWS:
        _HF_ROWS[key] = _generate(smollm2, prompts, n, hook, max_new_tokens)
    return [list(r) for r in _HF_ROWS[key]]


def _generate(smollm2, prompts, n, hook, max_new_tokens):
    tok, model = smollm2.tokenizer, smollm2.model
    tok.padding_side = "left"
    if tok.pad_token is None:  # some transformers versions give the GGUF tokenizer none
        tok.pad_token = tok.eos_token
    texts = [smollm2.render(p) for p in prompts for _ in range(n)]
    enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    # the engine's stop ids: the generation config's EOS and the tokenizer's (they differ
    # on some transformers versions for this GGUF model)
    gen_eos = model.generation_config.eos_token_id
    eos = sorted({tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None})
    handle = model.lm_head.register_forward_pre_hook(hook) if hook else None
    try:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos[0])
    finally:
        if handle:
            handle.remove()
    rows = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        end = next((i for i, x in enumerate(row) if x in eos), None)
        rows.append(row if end is None else row[: end + 1])
    return rows


@pytest.mark.slow
def test_zero_noise_equals_hf_greedy(engine, smollm2):
    prefix = engine.prefill(PROMPTS)
    ours = engine.decode(prefix, [0, 1, 2])
    ref = hf_generate(smollm2, PROMPTS)
    assert [s.token_ids for s in ours] == ref
    # zero noise given explicitly is the same as no noise
    zero = engine.decode(prefix, [0, 1, 2], noise=torch.zeros(3, 8, engine.hidden_size))
    assert [s.token_ids for s in zero] == ref
    # unpadded, one prompt at a time
    for i, p in enumerate(PROMPTS):
        assert hf_generate(smollm2, [p])[0] == ref[i]
    # text and finish reasons
    for s in ours:
        assert s.finish_reason in ("eos", "length")
        assert (s.finish_reason == "eos") == (s.token_ids[-1] in engine.eos_token_ids)
        assert s.text == smollm2.tokenizer.decode(s.token_ids, skip_special_tokens=True).strip()


@pytest.mark.slow
def test_noise_equals_hf_with_lm_head_hook(engine, smollm2):
    """Greedy on lm_head(z_t + v_t) equals generate with a pre-hook adding the same v_t."""
    n, noise, ref = noisy_reference(smollm2, engine.hidden_size)
    prefix = engine.prefill(PROMPTS)
    ours = engine.decode(prefix, torch.arange(len(PROMPTS)).repeat_interleave(n), noise=noise)
    assert [s.token_ids for s in ours] == ref
    # the noise changed something, and rows of one prompt differ
    plain = hf_generate(smollm2, PROMPTS)
    assert any(ours[i * n].token_ids != plain[i] for i in range(len(PROMPTS)))
    assert len({tuple(s.token_ids) for s in ours[:n]}) > 1


def noisy_reference(smollm2, d, n=3, tau=12):
    """(n, noise (3n, τ, d), generate's rows with that noise added by an lm_head pre-hook)."""
    g = torch.Generator().manual_seed(0)
    noise = 0.5 * torch.randn(len(PROMPTS) * n, tau, d, generator=g)
    step = {"t": 0}

    def hook(module, args):
        (h,) = args
        t = step["t"]
        step["t"] += 1
        if t >= tau:
            return None
        return (h + noise[:, t].unsqueeze(1).to(h.dtype),)

    return n, noise, hf_generate(smollm2, PROMPTS, n=n, hook=hook, hook_key=f"0.5 randn seed 0, {n} rows, tau {tau}")


@pytest.mark.slow
def test_static_decode_step_equals_hf(smollm2):
    """The static-shape step (fixed buffers, bucketed batch, spans of generated keys: what
    CUDA graphs capture) decodes what generate does, on the real model, with noise and
    left padding; its rows end at EOS at different steps."""
    eng = Engine(smollm2.model, smollm2.tokenizer, smollm2.render, max_new_tokens=T, add_special_tokens=False,
                 check_prelogit=False, decode_step="static", sync_every=4)
    n, noise, ref = noisy_reference(smollm2, eng.hidden_size)
    out = eng.decode(eng.prefill(PROMPTS), torch.arange(len(PROMPTS)).repeat_interleave(n), noise=noise)
    assert [s.token_ids for s in out] == ref
    assert min(map(len, ref)) < T


@pytest.mark.slow
def test_chunking_and_batch_composition_do_not_change_rows(engine):
    g = torch.Generator().manual_seed(1)
    noise = 0.5 * torch.randn(6, 10, engine.hidden_size, generator=g)
    prompt_of_row = [0, 0, 1, 1, 2, 2]
    full = engine.decode(engine.prefill(PROMPTS), prompt_of_row, noise=noise)
    small = Engine(engine.model, engine.tokenizer, engine.render, max_new_tokens=T, max_batch_rows=2,
                   add_special_tokens=False, check_prelogit=False, attention=engine.attention)
    chunked = small.decode(small.prefill(PROMPTS), prompt_of_row, noise=noise)
    alone = small.decode(small.prefill([PROMPTS[1]]), [0, 0], noise=noise[2:4])
    assert [s.token_ids for s in chunked] == [s.token_ids for s in full]
    assert [s.token_ids for s in alone] == [s.token_ids for s in full[2:4]]


@pytest.mark.slow
def test_prefill_runs_each_prompt_once(engine):
    before = dict(engine.stats)
    prefix = engine.prefill(PROMPTS)
    lengths = [len(engine.encode(p)) for p in PROMPTS]
    assert engine.stats["prefill_tokens"] - before["prefill_tokens"] == sum(lengths)
    assert engine.stats["forward_calls"] - before["forward_calls"] == 1
    # 16 rows per prompt decode without any further prefill
    engine.decode(prefix, [0] * 16 + [2] * 16)
    assert engine.stats["prefill_tokens"] - before["prefill_tokens"] == sum(lengths)
    assert engine.stats["forward_calls"] - before["forward_calls"] <= 1 + T


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["shared_prefix", "copy"])
def test_finished_rows_leave_the_batch(smollm2, attention):
    """Rows that end early stop costing compute (generated tokens = sum of lengths), and
    the rows left after compaction still decode exactly as generate does."""
    eng = Engine(smollm2.model, smollm2.tokenizer, smollm2.render, max_new_tokens=40, add_special_tokens=False,
                 check_prelogit=False, attention=attention)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    prompt_of_row = [0, 1, 2, 0, 2, 1]  # rows of a prompt need not be adjacent
    out = eng.decode(eng.prefill(prompts), prompt_of_row)
    lengths = [s.num_tokens for s in out]
    assert out[0].finish_reason == "eos" and min(lengths) < 40 and max(lengths) == 40
    assert eng.stats["generated_tokens"] == sum(lengths)
    ref = hf_generate(smollm2, prompts, max_new_tokens=40)
    assert [s.token_ids for s in out] == [ref[i] for i in prompt_of_row]


@pytest.mark.parametrize("form", ["rows_eager", "rows_static"])
def test_shared_prefix_attention_matches_sdpa(form):
    """The two-part attention (prompt once per prompt + own generated tokens) equals SDPA
    over each row's full sequence, with left padding, GQA and uneven rows per prompt,
    with the generated part exact-length (eager) or at full capacity with the rest
    masked (static)."""
    from aisp_bench.engine import attention as sp

    g = torch.Generator().manual_seed(0)
    P, Hkv, gq, D, L, t, cap = 3, 2, 3, 8, 7, 4, 9
    H = Hkv * gq
    mask = torch.ones(P, L, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :1] = 0
    kp, vp = torch.randn(P, Hkv, L, D, generator=g), torch.randn(P, Hkv, L, D, generator=g)
    prompt_of_row = torch.tensor([2, 0, 0, 1, 2, 2, 0])
    B = len(prompt_of_row)
    q = torch.randn(B, H, 1, D, generator=g)
    ks, vs = torch.randn(B, Hkv, cap, D, generator=g), torch.randn(B, Hkv, cap, D, generator=g)
    cache = type("Cache", (), {"layers": [type("L", (), {"keys": kp, "values": vp})()]})()
    module = type("M", (), {"layer_idx": 0})()
    n = cap if form == "rows_static" else t  # generated keys the attention is given
    row_of_cell, cell_of_row, R = sp.group_rows(prompt_of_row, P)
    suffix = torch.zeros(n).masked_fill(torch.arange(n) >= t, float("-inf"))
    bias = torch.cat([sp.padding_bias(mask, torch.float32)[prompt_of_row], suffix.expand(B, 1, 1, -1)], dim=-1)
    state = sp.AttentionState(*sp.prompt_kv(cache, torch.arange(P)), row_of_cell, cell_of_row, R, bias)
    sp._ACTIVE.append(state)
    try:
        out, _ = sp.attention(module, q, ks[:, :, :n], vs[:, :, :n], scaling=D**-0.5)
    finally:
        sp._ACTIVE.pop()
    for b, p in enumerate(prompt_of_row.tolist()):
        k = torch.cat([kp[p], ks[b, :, :t]], dim=1).repeat_interleave(gq, dim=0)  # (H, L+t, D)
        v = torch.cat([vp[p], vs[b, :, :t]], dim=1).repeat_interleave(gq, dim=0)
        m = torch.cat([mask[p].bool(), torch.ones(t, dtype=torch.bool)])
        ref = torch.nn.functional.scaled_dot_product_attention(q[b], k, v, attn_mask=m[None, None, :])
        torch.testing.assert_close(out[b, 0], ref[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_stop_strings_end_rows(smollm2):
    eng = Engine(smollm2.model, smollm2.tokenizer, smollm2.render, max_new_tokens=60, add_special_tokens=False,
                 stop_strings=["Paris"], check_prelogit=False)
    out = eng.decode(eng.prefill([PROMPTS[0]]), [0])[0]
    assert out.finish_reason == "stop_string"
    assert "Paris" not in out.text and out.text.startswith("The capital of France is")
    full = smollm2.tokenizer.decode(out.token_ids)
    assert full.rstrip().endswith("Paris") or "Paris" in full[-8:]


def test_top_p_filter_matches_transformers():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    probs, idx = top_p_filter(logits, temperature=0.6, top_p=0.9)
    ref = TopPLogitsWarper(top_p=0.9)(None, logits / 0.6).softmax(-1)
    ours = torch.zeros_like(ref).scatter(1, idx, probs)
    torch.testing.assert_close(ours, ref)


def test_top_p_sampling_follows_the_filtered_distribution():
    """Inverse CDF on an even grid of uniforms hits each token in proportion to its mass."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    probs, idx = top_p_filter(logits, 0.6, 0.9)
    target = torch.zeros(6, dtype=torch.float64).scatter(0, idx[0], probs[0].double())
    m = 20000
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    toks = sample_top_p(logits.expand(m, -1), 0.6, 0.9, u)
    freq = torch.bincount(toks, minlength=6).double() / m
    torch.testing.assert_close(freq, target, atol=2 / m, rtol=0)
    assert target[-1] == 0 and freq[-1] == 0  # outside the nucleus: never drawn
