"""``prefix_scoring.response_logprobs`` (base_logprob) on SmolLM2 against a plain forward of prompt + response."""

from __future__ import annotations

import pytest
import torch

from aisp_bench.engine import Engine
from aisp_bench.prefix_scoring import response_logprobs
from aisp_bench.types import Prompt

PROMPTS = [
    Prompt.single("a", "What is the capital of France?"),
    Prompt.single("b", "Write a haiku about autumn leaves falling on a quiet pond near the old temple."),
]
RESPONSES = [
    ["The capital of France is Paris.", "", "Paris, obviously. It has been the capital for centuries."],
    ["Leaves drift on still water"],
]


def make_engine(smollm2, attention: str = "auto") -> Engine:
    return Engine(smollm2.model, smollm2.tokenizer, smollm2.render, max_new_tokens=24, max_batch_rows=64,
                  add_special_tokens=False, attention=attention)


@pytest.fixture(scope="module")
def engine(smollm2):
    return make_engine(smollm2)


def reference(smollm2, prompt: Prompt, text: str) -> tuple[float, int]:
    """Σ log p of the response's tokens from one forward of the whole sequence, and their count."""
    tok = smollm2.tokenizer
    p = tok(smollm2.render(prompt), add_special_tokens=False)["input_ids"]
    r = tok(text, add_special_tokens=False)["input_ids"]
    if not r:
        return 0.0, 0
    with torch.inference_mode():
        logits = smollm2.model(input_ids=torch.tensor([p + r])).logits[0].float()
    logp = torch.log_softmax(logits[len(p) - 1 : -1], dim=-1)
    return float(logp[torch.arange(len(r)), torch.tensor(r)].double().sum()), len(r)


@pytest.mark.slow
@pytest.mark.parametrize(("attention", "max_rows"), [("shared_prefix", 64), ("shared_prefix", 2), ("copy", 2)])
def test_logprobs_equal_a_forward_of_prompt_and_response(smollm2, attention, max_rows):
    """Left-padded prompts, right-padded responses, an empty one, and chunks of 2 rows
    (a prompt's responses split over passes) give the full forward's numbers, through
    shared-prefix attention (the prompt KV read in place) and through the cache copy."""
    engine = make_engine(smollm2, attention)
    calls = engine.stats["forward_calls"]
    got = response_logprobs(engine, PROMPTS, RESPONSES, max_rows=max_rows)
    assert [len(g) for g in got] == [3, 1]
    for prompt, texts, scored in zip(PROMPTS, RESPONSES, got):
        for text, s in zip(texts, scored):
            total, n = reference(smollm2, prompt, text)
            assert s.tokens == n
            assert s.total == pytest.approx(total, abs=1e-4)  # float32 rounding (measured: under 2e-5)
            assert (s.mean is None) if n == 0 else s.mean == pytest.approx(total / n, abs=1e-5)
    # one prefill per pass of prompts, one forward per chunk of rows
    passes = engine.stats["forward_calls"] - calls
    assert passes == (2 if max_rows == 64 else 2 + 3)


@pytest.mark.slow
def test_greedy_responses_are_likely_and_retokenise_to_their_ids(engine):
    """The re-tokenised text of a greedy response is the ids the engine generated (the
    choice documented in prefix_scoring.py), and its mean log-prob beats another prompt's."""
    prefix = engine.prefill(PROMPTS)
    samples = engine.decode(prefix, [0, 1])
    eos = set(engine.eos_token_ids)
    for s in samples:
        ids = [t for t in s.token_ids if t not in eos]
        assert engine.tokenizer(s.text, add_special_tokens=False)["input_ids"] == ids
    own = response_logprobs(engine, PROMPTS, [[samples[0].text], [samples[1].text]])
    swapped = response_logprobs(engine, PROMPTS, [[samples[1].text], [samples[0].text]])
    assert own[0][0].mean > swapped[0][0].mean and own[1][0].mean > swapped[1][0].mean
    assert own[0][0].mean > -1.0  # greedy tokens are each the most likely one


def test_bad_arguments(engine):
    with pytest.raises(ValueError, match="2 prompts but 1 response lists"):
        response_logprobs(engine, PROMPTS, [["x"]])


@pytest.mark.gpu
def test_logprobs_on_cuda_in_bf16_match_the_cpu(engine, smollm2):
    """The path base_logprob takes on a GPU (bf16 weights): close to the fp32 CPU numbers."""
    import copy

    model = copy.deepcopy(smollm2.model).to("cuda", torch.bfloat16)
    gpu = Engine(model, smollm2.tokenizer, smollm2.render, max_new_tokens=24, add_special_tokens=False)
    want = response_logprobs(engine, PROMPTS, RESPONSES)
    got = response_logprobs(gpu, PROMPTS, RESPONSES)
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            assert b.tokens == a.tokens
            assert (a.mean is None and b.mean is None) or b.mean == pytest.approx(a.mean, abs=0.1)
