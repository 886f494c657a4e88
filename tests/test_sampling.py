"""The top-p prefilter (engine/sampling.py) draws the full sort's tokens, bit for bit.

Pure tests on rows built to hit each case (a nucleus well inside the top k, exactly at
its edge, outside it; ties, bf16-rounded logits, flat rows; top_p = 1), on real SmolLM2
logits, and BoN top-p through the engine with the prefilter on and off.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from aisp_bench.engine import Engine, sampling, sample_top_p
from aisp_bench.methods import BoNTopP
from aisp_bench.types import Prompt


def full(logits, temperature, top_p, u):
    return sample_top_p(logits, temperature, top_p, u, k=0)


def peaked(rows: int, V: int, g: torch.Generator) -> torch.Tensor:
    """A Gaussian tail and 1-24 head tokens: the nucleus (T 0.6, p 0.9) inside the top 64."""
    logits = 2.0 * torch.randn(rows, V, generator=g)
    for r in range(rows):
        h = int(torch.randint(1, 25, (1,), generator=g))
        logits[r, torch.randperm(V, generator=g)[:h]] = 14.0 + 2.0 * torch.randn(h, generator=g)
    return logits


def head_of(n: int, V: int, tie: bool = False) -> torch.Tensor:
    """n head tokens holding 95% of the mass (T = 1) over a tail of V - n tokens at 0 (all
    tied): with top_p 0.9 the nucleus is exactly the head (for n < 19)."""
    row = torch.zeros(V)
    step = 0.0 if tie else 1e-3
    row[torch.arange(n) * 7 % V] = math.log(19 * (V - n) / n) + step * torch.arange(n)
    return row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1000, 49152])
def test_prefilter_draws_the_full_paths_tokens(V, dtype):
    g = torch.Generator().manual_seed(V)
    logits = peaked(48, V, g).to(dtype)
    u = torch.rand(48, dtype=torch.float64, generator=g)
    for temperature, top_p in ((0.6, 0.9), (1.0, 0.9), (0.3, 0.99)):
        want = full(logits, temperature, top_p, u)
        for k in (8, 64):
            assert torch.equal(sample_top_p(logits, temperature, top_p, u, k=k), want)
    scores = logits.float() / 0.6
    _, ok = sampling._nucleus_in_top_k(scores, scores.topk(64).values.sort().values, 0.9)
    assert ok.float().mean() > 0.9  # most rows take the prefilter, not the fallback


def test_ties_are_ordered_by_token_id_even_across_the_nucleus_edge():
    """bf16 rows, 37 tied top tokens over a low tail, on an even grid of uniforms: the
    nucleus edge falls inside the tie group (the 3 lowest ids are removed, as a stable sort
    orders them), and every draw, bucket edges included, equals the full path's."""
    g = torch.Generator().manual_seed(3)
    row = (torch.randn(1, 4096, generator=g) - 12.0).to(torch.bfloat16)
    row[0, 100:137] = 4.0  # each holds 1/37 of the mass: the edge (0.1) falls between two of them
    m = 4001
    u = torch.linspace(0, 1, m, dtype=torch.float64).clamp(max=1 - 1e-12)
    logits = row.expand(m, -1)
    want = full(logits, 0.6, 0.9, u)
    assert torch.equal(sample_top_p(logits, 0.6, 0.9, u, k=64), want)
    drawn = set(want.tolist())
    assert drawn == set(range(103, 137))
    scores = row.float() / 0.6
    _, ok = sampling._nucleus_in_top_k(scores, scores.topk(64).values.sort().values, 0.9)
    assert ok.all()  # decided by the prefilter, not the fallback


@pytest.mark.parametrize("tie", [False, True])
def test_nucleus_at_the_edge_of_the_top_k(tie):
    """k = 8: a nucleus of 7 tokens is inside (the 8th candidate, tied with the whole tail,
    is removed); of 8 it reaches the lowest candidate, of 9 it leaves the top k: both fall
    back. Every draw equals the full path's either way."""
    V, k = 1000, 8
    rows = torch.stack([head_of(n, V, tie) for n in (7, 8, 9)])
    scores = rows / 1.0
    kept, ok = sampling._nucleus_in_top_k(scores, scores.topk(k).values.sort().values, 0.9)
    assert ok.tolist() == [True, False, False]
    assert kept[0].sum() == 7
    u = torch.linspace(0, 1, 101, dtype=torch.float64).clamp(max=1 - 1e-12)
    for r in range(3):
        logits = rows[r].expand(len(u), -1)
        want = full(logits, 1.0, 0.9, u)
        assert len(set(want.tolist())) == (7, 8, 9)[r]
        assert torch.equal(sample_top_p(logits, 1.0, 0.9, u, k=k), want)


def test_rows_outside_the_top_k_need_the_fallback():
    """Flat rows: the nucleus spans thousands of tokens. Every row is flagged, the tokens
    the prefilter alone would draw are often wrong, and the fallback makes them right."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 8192, generator=g)
    u = torch.rand(64, dtype=torch.float64, generator=g)
    want = full(logits, 0.6, 0.9, u)
    alone, ok = sampling._sample_prefiltered(logits, 0.6, 0.9, u, 64)
    assert not ok.any() and (alone != want).float().mean() > 0.5
    assert torch.equal(sample_top_p(logits, 0.6, 0.9, u, k=64), want)
    mixed = torch.cat([logits[:32], peaked(32, 8192, g)])  # half fall back, half do not
    assert torch.equal(sample_top_p(mixed, 0.6, 0.9, u, k=64), full(mixed, 0.6, 0.9, u))


def test_top_p_one_and_odd_rows_take_the_full_path():
    g = torch.Generator().manual_seed(6)
    logits = peaked(16, 2000, g)
    u = torch.rand(16, dtype=torch.float64, generator=g)
    assert torch.equal(sample_top_p(logits, 0.6, 1.0, u, k=64), full(logits, 0.6, 1.0, u))
    logits[0] = float("-inf")  # a row with nothing finite; one with -inf tokens
    logits[1, :1500] = float("-inf")
    _, ok = sampling._sample_prefiltered(logits, 0.6, 0.9, u, 64)
    assert not ok[0] and ok[1]
    assert torch.equal(sample_top_p(logits[1:], 0.6, 0.9, u[1:], k=64), full(logits[1:], 0.6, 0.9, u[1:]))
    assert sample_top_p(logits[:0], 0.6, 0.9, u[:0], k=64).shape == (0,)


def test_the_threshold_is_compared_in_float32():
    """1 - 0.9 is 0.09999999999999998 in float64 and 0.1 in float32: a token whose
    ascending cumulative probability is exactly float32 0.1 is removed, as the full path
    removes it, and the prefilter's margin sends such a row to the full path."""
    assert float(torch.tensor(1.0 - 0.9, dtype=torch.float32)) == float(torch.tensor(0.1, dtype=torch.float32))
    assert bool(torch.tensor([0.1], dtype=torch.float32) <= (1.0 - 0.9))


@pytest.fixture(scope="module")
def smollm2_logits(smollm2):
    """Real next-token logits: SmolLM2 teacher-forced on its own prompts and answers."""
    eng = Engine(smollm2.model, smollm2.tokenizer, smollm2.render, max_new_tokens=32, add_special_tokens=False)
    prompts = [Prompt.single("a", "Give three tips for learning the guitar."),
               Prompt.single("b", "Why is the sky blue? Explain briefly.")]
    samples = eng.decode(eng.prefill(prompts), [0, 1])
    out = []
    with torch.inference_mode():
        for p, s in zip(prompts, samples):
            ids = eng.encode(p) + s.token_ids
            out.append(smollm2.model(input_ids=torch.tensor([ids])).logits[0])
    return torch.cat(out)


@pytest.mark.slow
def test_prefilter_on_real_logits(smollm2_logits):
    logits = smollm2_logits
    g = torch.Generator().manual_seed(0)
    for temperature, top_p in ((0.6, 0.9), (1.0, 0.95), (0.7, 0.8)):
        u = torch.rand(len(logits), dtype=torch.float64, generator=g)
        want = full(logits, temperature, top_p, u)
        for k in (16, 64):
            assert torch.equal(sample_top_p(logits, temperature, top_p, u, k=k), want)


@pytest.mark.slow
def test_bon_top_p_records_equal_with_and_without_the_prefilter(smollm2, monkeypatch):
    """BoN top-p records through the engine (the CPU default: the prefilter) equal the
    full sort's (every sample's text and reward), rows that fall back and rows that do
    not in the same batches."""
    calls = {"rows": 0, "certain": 0}
    check = sampling._nucleus_in_top_k

    def counted(*args):
        kept, ok = check(*args)
        calls["rows"] += ok.numel()
        calls["certain"] += int(ok.sum())
        return kept, ok

    def run(k):
        monkeypatch.setitem(sampling.TOP_P_PREFILTER_K, "cpu", k)
        eng = Engine(smollm2.model, smollm2.tokenizer, smollm2.render, max_new_tokens=12, max_batch_rows=12,
                     add_special_tokens=False, check_prelogit=False)
        prompts = [Prompt.single("q1", "Name a fruit that is yellow."), Prompt.single("q2", "Write a short poem.")]
        reward = type("Length", (), {"score": lambda self, p, r: torch.tensor([float(len(x)) for x in r])})()
        method = BoNTopP(num_samples=8, temperature=0.6, top_p=0.9)  # the paper's setting
        return [dataclasses.asdict(r) for r in method(prompts, eng, reward, seed=3)]

    want = run(0)
    monkeypatch.setattr(sampling, "_nucleus_in_top_k", counted)
    assert run(64) == want
    assert 0 < calls["certain"] < calls["rows"]  # both paths taken


@pytest.mark.gpu
def test_prefilter_on_cuda_draws_the_full_paths_tokens():
    """On CUDA (its parallel softmax and scans), bf16-rounded and fallback rows included."""
    g = torch.Generator().manual_seed(7)
    logits = torch.cat([peaked(96, 128256, g), torch.randn(32, 128256, generator=g)]).to(torch.bfloat16)
    u = torch.rand(len(logits), dtype=torch.float64, generator=g)
    logits = logits.cuda()
    for temperature, top_p in ((0.6, 0.9), (1.0, 0.95)):
        want = full(logits, temperature, top_p, u)
        assert torch.equal(sample_top_p(logits, temperature, top_p, u, k=64), want)
