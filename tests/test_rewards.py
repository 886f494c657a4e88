"""Reward models: batching, read-out token, padding, truncation, templates, offline rewards.

The regression-head and classifier rewards are checked on tiny randomly initialised
Llama and Mistral models built from small configs (nothing is downloaded); every batched
score is compared with a direct, unbatched computation written out here. The offline
rewards (SmolLM2 judge, MiniLM similarity) load real weights and are marked slow.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tiny_models import tiny_tokenizer
from transformers import LlamaConfig, MistralConfig

from aisp_bench.engine import pad
from aisp_bench.rewards import (
    EmbeddingSimilarityReward,
    HFClassifierReward,
    LMJudgeReward,
    RegressionHeadModel,
    RegressionHeadReward,
    RewardModel,
)
from aisp_bench.rewards.base import last_token_index, truncate_keep_end
from aisp_bench.types import Message, Prompt

CONF = Path(__file__).resolve().parents[1] / "aisp_bench" / "conf"


def tiny_config(kind: str, vocab_size: int):
    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[kind]
    return cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        initializer_range=0.2,  # larger random weights: rewards far apart, easy to tell apart
    )


def reward_from_yaml(name: str, **overrides):
    cfg = OmegaConf.load(CONF / "reward" / f"{name}.yaml")
    cfg = OmegaConf.merge(cfg, overrides)
    return instantiate(cfg)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["llama", "mistral"])
def tiny_rm(request, tok):
    """(kind, RegressionHeadModel) with random weights."""
    torch.manual_seed(0)
    return request.param, RegressionHeadModel(tiny_config(request.param, len(tok))).eval()


# Pairs of different lengths (so batches are padded), one multi-turn.
PROMPTS = [
    Prompt.single("a", "What is the capital of France?"),
    Prompt.single("b", "hello"),
    Prompt("c", (Message("user", "hi"), Message("assistant", "Hello! How can I help?"),
                 Message("user", "Tell me a joke."))),
    Prompt.single("d", "How can I help you today with a long question that goes on and on?"),
    Prompt.single("e", "Why?"),
]
RESPONSES = [
    "Paris.", "hi there, how can I help you today? I am here to help you.", "No.", "", "Because the sky is blue."
]


def direct_reward(model: RegressionHeadModel, ids: list[int]) -> float:
    """The reward of one unpadded sequence, computed by hand: head(last hidden state)."""
    with torch.inference_mode():
        h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return float(model.regression_head(h))


# ---------------------------------------------------------------------------- base


class _LenReward(RewardModel):
    """Reward = len(response); records the batches it saw."""

    def __init__(self, batch_size):
        self.batch_size = batch_size
        self.batches = []

    def _score_batch(self, prompts, responses):
        self.batches.append(list(responses))
        assert torch.is_inference_mode_enabled()
        return torch.tensor([float(len(r)) for r in responses])


def test_score_sorts_batches_and_restores_order():
    rm = _LenReward(batch_size=2)
    responses = ["ccc", "a", "bbbb", "dd", ""]
    out = rm.score([Prompt.single(str(i), "q") for i in range(5)], responses)
    assert out.dtype == torch.float32 and out.tolist() == [3.0, 1.0, 4.0, 2.0, 0.0]
    assert rm.batches == [["", "a"], ["dd", "ccc"], ["bbbb"]]
    assert rm.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rm.score([Prompt.single("x", "q")] * 2, ["r"])


def test_padding_helpers():
    ids, mask, pos = pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and pos.tolist() == [[0, 1, 2], [1, 1, 0]]  # padding: 1
    assert last_token_index(mask).tolist() == [2, 2]
    ids, mask, pos = pad([[5, 6, 7], [8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and last_token_index(mask).tolist() == [2, 0]
    assert pos[0].tolist() == [0, 1, 2] and pos[1, 0] == 0
    ids, mask, _ = pad([[], []], pad_id=9)  # nothing to pad: one masked column
    assert ids.tolist() == [[9], [9]] and mask.sum() == 0
    assert truncate_keep_end(list(range(10)), 4, keep_head=1) == [0, 7, 8, 9]
    assert truncate_keep_end(list(range(3)), 4, keep_head=1) == [0, 1, 2]
    # a prompt's own cut (min_cut) drops more than the overflow alone, never the last token
    assert truncate_keep_end(list(range(10)), 8, keep_head=1, min_cut=4) == [0, 5, 6, 7, 8, 9]
    assert truncate_keep_end(list(range(10)), 8, keep_head=1, min_cut=1) == [0, 3, 4, 5, 6, 7, 8, 9]
    assert truncate_keep_end(list(range(6)), 8, keep_head=1, min_cut=2) == [0, 3, 4, 5]  # within max_length
    assert truncate_keep_end(list(range(6)), 8, keep_head=1, min_cut=20) == [0, 5]


# ---------------------------------------------------------------------------- regression head


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_regression_head_reads_last_real_token(tiny_rm, tok, padding_side):
    kind, model = tiny_rm
    rm = reward_from_yaml("ultrarm" if kind == "llama" else "eurus", batch_size=5, padding_side=padding_side)
    rm.attach(model, tok)
    lengths = {len(rm.encode(p, r)) for p, r in zip(PROMPTS, RESPONSES)}
    assert len(lengths) == len(PROMPTS)  # one batch of five different lengths: real padding
    got = rm.score(PROMPTS, RESPONSES)
    want = torch.tensor([direct_reward(model, rm.encode(p, r)) for p, r in zip(PROMPTS, RESPONSES)])
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert want.std() > 1e-3  # the rewards differ, so a wrong read-out would show


def test_regression_head_same_whatever_batch_size_and_padding(tiny_rm, tok):
    kind, model = tiny_rm
    runs = []
    for bs in (1, 2, 5):
        for side in ("left", "right"):
            rm = RegressionHeadReward(
                name="t", name_or_path="unused", template=reward_from_yaml("ultrarm").template,
                batch_size=bs, padding_side=side,
            ).attach(model, tok)
            runs.append(rm.score(PROMPTS, RESPONSES))
    for r in runs[1:]:
        assert torch.allclose(r, runs[0], atol=1e-5)


def test_regression_head_forward_matches_model_card_readout(tiny_rm, tok):
    """The model cards read the reward at attention_mask.cumsum(1).argmax(1)."""
    _, model = tiny_rm
    ids, mask, _ = pad([[1, 5, 6, 7, 8], [1, 9, 10]], pad_id=0, side="right")
    with torch.inference_mode():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        ends = mask.cumsum(dim=1).argmax(dim=1).view(-1, 1)
        card = torch.gather(model.regression_head(hidden).squeeze(-1), 1, ends).squeeze(1)
        assert torch.allclose(model(ids, mask), card, atol=1e-6)


def test_truncation_keeps_bos_and_end_of_response(tiny_rm, tok):
    _, model = tiny_rm
    long = "word " * 80 + "THE END"
    full = reward_from_yaml("ultrarm", max_length=None).attach(model, tok)
    short = reward_from_yaml("ultrarm", max_length=16, response_tokens=8).attach(model, tok)
    p = Prompt.single("x", "A long question " * 10)
    f, s = full.encode(p, long), short.encode(p, long)
    assert len(f) > 16 and len(s) == 16
    assert s[0] == tok.bos_token_id and s[1:] == f[-15:]
    assert tok.decode(s).endswith("THE END")
    got = short.score([p, PROMPTS[0]], [long, RESPONSES[0]])
    assert got[0].item() == pytest.approx(direct_reward(model, s), abs=1e-5)


def test_bos_added_once(tok):
    rm = reward_from_yaml("eurus").attach(RegressionHeadModel(tiny_config("mistral", len(tok))), tok)
    ids = rm.encode(PROMPTS[0], "Paris.")
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=False) == "<s>[INST] What is the capital of France? [/INST] Paris."


# ---------------------------------------------------------------------------- templates

MULTI = Prompt("m", (Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2")))


def test_reward_templates_render_exactly():
    ultra = reward_from_yaml("ultrarm")
    assert ultra.render(Prompt.single("s", "q"), "r") == "Human: q\nAssistant: r"
    assert ultra.render(MULTI, "r") == "Human: q1\nAssistant: a1\nHuman: q2\nAssistant: r"
    eurus = reward_from_yaml("eurus")
    assert eurus.render(Prompt.single("s", "q"), "r") == "[INST] q [/INST] r"
    assert eurus.render(MULTI, "r") == "[INST] q1 [/INST] a1</s>[INST] q2 [/INST] r"


def test_policy_templates_render_exactly():
    llama = instantiate(OmegaConf.load(CONF / "model" / "llama3_8b.yaml"))
    assert llama.render(Prompt.single("s", "q")) == "\n\nHuman: q\n\nAssistant:"
    assert llama.render(MULTI) == "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:"
    vicuna = instantiate(OmegaConf.load(CONF / "model" / "vicuna_7b.yaml"))
    sys_line = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    assert vicuna.render(Prompt.single("s", "q")) == f"{sys_line} USER: q ASSISTANT:"
    assert vicuna.render(MULTI) == f"{sys_line} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    assert "\nHuman:" in llama.stop_strings and "USER:" in vicuna.stop_strings


# ---------------------------------------------------------------------------- hf_classifier


def _chat_tok():
    t = tiny_tokenizer()
    # ends every turn with </s>: the EOS is also the pad token, and it ends the text
    t.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    )
    return t


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_hf_classifier_decoder_reads_last_token_even_when_it_is_the_pad(padding_side):
    from transformers import LlamaForSequenceClassification

    t = _chat_tok()
    torch.manual_seed(1)
    cfg = tiny_config("llama", len(t))
    cfg.num_labels = 1
    model = LlamaForSequenceClassification(cfg).eval()
    rm = reward_from_yaml("hf_classifier", batch_size=5, padding_side=padding_side).attach(model, t)
    assert t.pad_token_id is None and model.config.pad_token_id == t.eos_token_id
    text = rm.render(PROMPTS[0], "Paris.")
    assert text == "<s>user: What is the capital of France?</s>assistant: Paris.</s>"
    ids0 = rm.encode(PROMPTS[0], "Paris.")
    assert ids0.count(t.bos_token_id) == 1 and ids0[-1] == t.eos_token_id
    got = rm.score(PROMPTS, RESPONSES)
    want = []
    with torch.inference_mode():
        for p, r in zip(PROMPTS, RESPONSES):
            h = model.model(input_ids=torch.tensor([rm.encode(p, r)])).last_hidden_state[0, -1]
            want.append(float(model.score(h)))
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)


def test_hf_classifier_encoder_and_fallback_template():
    from transformers import BertConfig, BertForSequenceClassification

    t = tiny_tokenizer()  # no chat template: the fallback transcript is used
    torch.manual_seed(2)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=len(t), num_labels=1, max_position_embeddings=512)
    model = BertForSequenceClassification(cfg).eval()
    rm = reward_from_yaml("hf_classifier", batch_size=3).attach(model, t)
    assert rm.render(PROMPTS[0], "Paris.") == "\n\nHuman: What is the capital of France?\n\nAssistant: Paris."
    got = rm.score(PROMPTS, RESPONSES)
    with torch.inference_mode():
        want = [float(model(input_ids=torch.tensor([rm.encode(p, r)])).logits[0, 0])
                for p, r in zip(PROMPTS, RESPONSES)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)
    no_fallback = reward_from_yaml("hf_classifier", fallback_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        no_fallback.attach(model, t)
    cfg2 = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                      vocab_size=len(t), num_labels=2)
    with pytest.raises(ValueError, match="one output, got num_labels=2"):
        reward_from_yaml("hf_classifier").attach(BertForSequenceClassification(cfg2), t)


# ---------------------------------------------------------------------------- offline rewards (real weights)

# Hand-written pairs: (prompt, better response, worse response). The judge's measured
# margins on these (docs/models.md) are 0.3-2.3 nats.
RANKING_PAIRS = [
    (Prompt.single("r1", "How do I reverse a list in Python?"),
     "Use slicing: my_list[::-1] returns a reversed copy, or call my_list.reverse() to reverse it in place.", ""),
    (Prompt.single("r2", "Can you recommend a good book for learning to cook?"),
     "'Salt, Fat, Acid, Heat' by Samin Nosrat is a great start: it explains the principles behind cooking "
     "rather than just recipes.", "No. Go away."),
    (Prompt.single("r3", "What year did World War II end?"), "World War II ended in 1945.",
     "Nobody cares about history, loser."),
    (Prompt("r4", (Message("user", "I want to learn the guitar."),
                   Message("assistant", "Great idea! Do you already have a guitar?"),
                   Message("user", "Yes, an acoustic one. Where do I start?"))),
     "Start with a few basic chords such as G, C and D, practise switching between them slowly, and keep the "
     "guitar in tune with a tuner app.", "That's a stupid hobby, don't bother."),
]


@pytest.fixture(scope="module")
def judge(smollm2):
    """The configured judge, sharing the already loaded SmolLM2 weights."""
    return reward_from_yaml("smollm2_judge", device="cpu").attach(smollm2.model, smollm2.tokenizer)


@pytest.mark.slow
def test_judge_ranks_helpful_above_empty_and_rude(judge):
    prompts = [p for p, _, _ in RANKING_PAIRS for _ in (0, 1)]
    responses = [x for _, good, bad in RANKING_PAIRS for x in (good, bad)]
    s = judge.score(prompts, responses).view(-1, 2)
    margins = s[:, 0] - s[:, 1]
    assert (margins > 0).all(), margins


@pytest.mark.slow
def test_judge_prefix_sharing_and_batching_match_direct_computation(judge, smollm2):
    p = RANKING_PAIRS[1][0]
    responses = [RANKING_PAIRS[1][1], "No. Go away.", "It depends.", ""]
    assert judge.render(p, "R") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nIs this response helpful, polite and correct? Answer Yes or No.\n\n"
        f"Question: {p.text}\n\nResponse: R<|im_end|>\n<|im_start|>assistant\n"
    )
    before = judge.stats["prefix_tokens_saved"]
    shared = judge.score([p] * 4, responses)
    assert judge.stats["prefix_tokens_saved"] > before  # the prefix path ran
    plain = reward_from_yaml("smollm2_judge", device="cpu", attention="full", batch_size=1)
    plain.attach(smollm2.model, smollm2.tokenizer)
    assert torch.allclose(shared, plain.score([p] * 4, responses), atol=1e-4)
    tok = smollm2.tokenizer
    yes, no = tok("Yes", add_special_tokens=False)["input_ids"][0], tok("No", add_special_tokens=False)["input_ids"][0]
    with torch.inference_mode():
        ids = tok(judge.render(p, responses[2]), add_special_tokens=False, return_tensors="pt")["input_ids"]
        lp = smollm2.model(ids).logits[0, -1].float().log_softmax(-1)
    assert shared[2].item() == pytest.approx((lp[yes] - lp[no]).item(), abs=1e-4)


@pytest.mark.slow
def test_minilm_similarity_relevance_and_batching():
    rm = reward_from_yaml("minilm_similarity", device="cpu", batch_size=2).load()
    p = Prompt.single("s", "How do I boil an egg?")
    responses = ["Put the egg in boiling water for about nine minutes, then cool it in cold water.",
                 "The stock market rose two percent today.", "", "Eggs: boil them in water for nine minutes."]
    s = rm.score([p] * 4, responses)
    assert s[0] > s[1] and s[3] > s[1] and s[2].item() == -1.0
    rm.batch_size = 8
    assert torch.allclose(rm.score([p] * 4, responses), s, atol=1e-5)
    # against a plain sentence-transformers-style computation of one pair
    with torch.inference_mode():
        enc = rm.tokenizer([p.text, responses[0]], padding=True, return_tensors="pt")
        h = rm.model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert s[0].item() == pytest.approx(float(e[0] @ e[1]), abs=1e-5)


def test_offline_reward_classes_are_lazy():
    assert isinstance(reward_from_yaml("smollm2_judge"), LMJudgeReward)
    assert isinstance(reward_from_yaml("minilm_similarity"), EmbeddingSimilarityReward)
    assert isinstance(reward_from_yaml("hf_classifier"), HFClassifierReward)
    assert reward_from_yaml("smollm2_judge").model is None


# ---------------------------------------------------------------------------- judge plumbing (tiny model)


def tiny_judge(tok, device="cpu", **kw) -> LMJudgeReward:
    """The judge class around a tiny random causal LM; answers 'Y'/'N' (one byte token each)."""
    from transformers import LlamaForCausalLM

    from aisp_bench.models.templates import TranscriptFormat

    torch.manual_seed(5)
    lm = LlamaForCausalLM(tiny_config("llama", len(tok))).eval().to(device)
    judge = LMJudgeReward(
        name="tiny_judge",
        judge_prompt="Is it good? Y or N.\n{conversation}\nResponse: {response}",
        conversation_format=TranscriptFormat(user="Q: {content}", assistant="\nA: {content}\n", generation_prompt=""),
        judge_format=TranscriptFormat(user="{content}", generation_prompt="\nAnswer:"),
        yes_answer="Y", no_answer="N", name_or_path="unused", device=device, **kw,
    )
    return judge.attach(lm, tok)


@pytest.mark.parametrize("attention", ["split", "sdpa"])
def test_judge_prefix_sharing_truncation_and_readout_tiny(tok, attention):
    judge = tiny_judge(tok, batch_size=3, max_length=40, response_tokens=16, attention=attention)
    plain = tiny_judge(tok, batch_size=1, max_length=40, response_tokens=16, attention="full")
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[2]] * 2 + [PROMPTS[3]]
    responses = ["Paris.", "It is Paris, the big city.", "", "ha", "A joke: " + "la " * 40, "ok"]
    got = judge.score(prompts, responses)
    assert judge.stats["prefix_tokens_saved"] > 0
    assert torch.allclose(got, plain.score(prompts, responses), atol=1e-5)
    y, n = tok("Y", add_special_tokens=False)["input_ids"][0], tok("N", add_special_tokens=False)["input_ids"][0]
    for i in (1, 4):  # one ordinary row, one truncated row
        ids = judge.encode(prompts[i], responses[i])
        with torch.inference_mode():
            logits = judge.model(torch.tensor([ids])).logits[0, -1]
        assert got[i].item() == pytest.approx((logits[y] - logits[n]).item(), abs=1e-5)
    long_ids = judge.encode(prompts[4], responses[4])
    head = tok(judge.render(prompts[4], "").split("Q: ")[0])["input_ids"]
    assert len(long_ids) == 40 and long_ids[: len(head) - 1] == head[:-1]  # instruction kept
    assert tok.decode(long_ids).endswith("la \nAnswer:")  # end of the response kept
    with pytest.raises(ValueError, match="answer word 'Yes please' is"):
        LMJudgeReward(
            name="x", judge_prompt="{conversation}{response}", conversation_format=judge.conversation_format,
            judge_format=judge.judge_format, yes_answer="Yes please", name_or_path="unused",
        ).attach(judge.model, tok)


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("device_map", [None, "auto"])
def test_regression_head_on_gpu_in_bf16_matches_cpu(tmp_path, tok, device_map):
    if device_map == "auto":
        pytest.importorskip("accelerate")  # device_map needs it (a GPU machine may lack it)
    torch.manual_seed(0)
    RegressionHeadModel(tiny_config("mistral", len(tok))).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cpu = reward_from_yaml("eurus", name_or_path=str(tmp_path), device="cpu", dtype="float32")
    gpu = reward_from_yaml("eurus", name_or_path=str(tmp_path), device="cuda", dtype="bfloat16",
                           device_map=device_map, padding_side="left", batch_size=2)
    a, b = cpu.score(PROMPTS, RESPONSES), gpu.score(PROMPTS, RESPONSES)
    assert gpu.model.regression_head.weight.device.type == "cuda" and b.device.type == "cpu"
    assert torch.allclose(a, b, rtol=0.05, atol=0.05 * float(a.abs().max()))


@pytest.mark.gpu
def test_judge_prefix_sharing_on_gpu(tok):
    judge = tiny_judge(tok, device="cuda", batch_size=4)
    cpu = tiny_judge(tok, device="cpu", batch_size=1, attention="full")
    prompts, responses = [PROMPTS[0]] * 4 + [PROMPTS[2]], ["Paris.", "It is Paris.", "", "ha", "no"]
    assert torch.allclose(judge.score(prompts, responses), cpu.score(prompts, responses), atol=1e-3)


def test_response_tokens_must_leave_room_for_the_prompt():
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=r"response_tokens=512 must be at least 0 and below max_length=100"):
        reward_from_yaml("ultrarm", max_length=100)
    assert reward_from_yaml("ultrarm", max_length=None).response_tokens == 512  # nothing is ever cut
