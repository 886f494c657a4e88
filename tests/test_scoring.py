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


def reference(lm, prompt: Prompt, text: str) -> tuple[float, int]:
    """Σ log p of the response's tokens from one forward of the whole sequence, and their
    count; ``lm`` has ``model``, ``tokenizer`` and ``render`` (a ``Policy``, ``TinyChat``)."""
    tok = lm.tokenizer
    p = tok(lm.render(prompt), add_special_tokens=False)["input_ids"]
    r = tok(text, add_special_tokens=False)["input_ids"]
    if not r:
        return 0.0, 0
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([p + r], device=lm.model.device)).logits[0].float()
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


class TinyChat:
    """A random 4-layer Llama with a SmolLM2-like tokenizer and chat template, built at
    test time (tests/tiny_models.py): runs wherever the repository is, no model package."""

    def __init__(self) -> None:
        from tiny_models import chat_tokenizer, tiny_llama

        from aisp_bench.models.templates import ChatTemplateFormat

        self.tokenizer = chat_tokenizer()
        self.model = tiny_llama(len(self.tokenizer))
        self.format = ChatTemplateFormat()

    def render(self, prompt: Prompt) -> str:
        return self.format.render(prompt.messages, tokenizer=self.tokenizer)

    def engine(self, model=None, **kw) -> Engine:
        return Engine(model or self.model, self.tokenizer, self.render, max_new_tokens=24, add_special_tokens=False,
                      **kw)


@pytest.fixture(scope="module")
def tiny_chat() -> TinyChat:
    return TinyChat()


@pytest.mark.parametrize("attention", ["shared_prefix", "copy"])
def test_logprobs_on_a_tiny_model_equal_a_forward(tiny_chat, attention):
    got = response_logprobs(tiny_chat.engine(attention=attention), PROMPTS, RESPONSES, max_rows=2)
    for prompt, texts, scored in zip(PROMPTS, RESPONSES, got):
        for text, s in zip(texts, scored):
            total, n = reference(tiny_chat, prompt, text)
            assert s.tokens == n and (n > 0) == (text != "")
            assert s.total == pytest.approx(total, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["shared_prefix", "copy"])
def test_logprobs_on_cuda_in_bf16_match_fp32(tiny_chat, attention):
    """The path base_logprob takes on a GPU (bf16 weights, the prompt KV shared or copied):
    within 0.05 nats per token of the fp32 CPU numbers (logits spread as a trained
    model's), and as close as a plain bf16 forward of prompt + response on the GPU."""
    import copy

    model = copy.deepcopy(tiny_chat.model).to("cuda", torch.bfloat16)
    want = response_logprobs(tiny_chat.engine(), PROMPTS, RESPONSES)
    got = response_logprobs(tiny_chat.engine(model, attention=attention), PROMPTS, RESPONSES)
    bf16 = TinyChat.__new__(TinyChat)
    bf16.__dict__.update(tiny_chat.__dict__, model=model)
    for prompt, texts, w, g in zip(PROMPTS, RESPONSES, want, got):
        for text, a, b in zip(texts, w, g):
            assert b.tokens == a.tokens
            if a.tokens:
                forward = reference(bf16, prompt, text)[0] / a.tokens
                assert abs(b.mean - a.mean) < 0.05
                assert abs(b.mean - a.mean) <= abs(forward - a.mean) + 0.02
