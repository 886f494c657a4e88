"""Every reward and model config instantiates offline; the real checkpoint loading path works.

UltraRM-13b and Eurus-RM-7b cannot be downloaded here. Their published layout is
reproduced instead: the model cards' own classes (``LlamaRewardModel``,
``EurusRewardModel``: backbone under ``model.*`` plus ``regression_head``) are built from
tiny random configs and written to a folder the way the hub checkpoints are (config with
the cards' architecture names, weights under those keys), then loaded by local path
through ``conf/reward/{ultrarm,eurus}.yaml``; the rewards must equal the cards' own
forward on the cards' own input strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    LlamaModel,
    MistralConfig,
    MistralModel,
    PreTrainedTokenizerFast,
)

from aisp_bench.models.policy import Policy
from aisp_bench.models.templates import TranscriptFormat
from aisp_bench.rewards import RegressionHeadModel, RewardModel
from aisp_bench.types import Message, Prompt

CONF = Path(__file__).resolve().parents[1] / "aisp_bench" / "conf"
REWARD_YAMLS = sorted((CONF / "reward").glob("*.yaml"))
MODEL_YAMLS = sorted((CONF / "model").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """300-token byte-level BPE adding <s> in front (as the Llama/Mistral tokenizers do)."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["Human: hello\nAssistant: hi, how can I help?", "[INST] capital of France [/INST] Paris"]
    tk.train_from_iterator(corpus * 5, trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_kwargs(vocab_size: int) -> dict:
    return dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=vocab_size, max_position_embeddings=512, initializer_range=0.2)


# ---------------------------------------------------------------------------- configs instantiate


@pytest.mark.parametrize("path", REWARD_YAMLS, ids=lambda p: p.stem)
def test_reward_config_instantiates_without_loading(path):
    cfg = OmegaConf.load(path)
    for key in ("name", "device", "dtype", "batch_size", "max_length"):
        assert key in cfg, f"{path.name} lacks {key}"
    assert cfg.name == path.stem
    assert any(k in cfg for k in ("template", "judge_prompt", "context_format")), f"{path.name} has no template"
    rm = instantiate(cfg)
    assert isinstance(rm, RewardModel) and rm.name == path.stem
    assert rm.model is None  # lazy: constructing downloaded and loaded nothing


def test_the_expected_reward_configs_exist():
    assert {p.stem for p in REWARD_YAMLS} >= {"smollm2_judge", "minilm_similarity", "ultrarm", "eurus", "hf_classifier"}
    assert {p.stem for p in MODEL_YAMLS} >= {"smollm2_135m", "llama3_8b", "vicuna_7b"}


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_model_config_instantiates_without_loading(path):
    cfg = OmegaConf.load(path)
    policy = instantiate(cfg)
    assert isinstance(policy, Policy) and policy.name == path.stem and policy.model is None
    for key in ("stop_strings", "eos_tokens", "dtype", "device", "device_map", "add_special_tokens"):
        assert key in cfg, f"{path.name} lacks {key}"
    if isinstance(policy.prompt_format, TranscriptFormat):  # renders without a tokenizer
        assert policy.render(Prompt.single("x", "q")).endswith(policy.prompt_format.generation_prompt)


def test_a_conversations_system_message_keeps_the_formats_separator():
    from aisp_bench.types import Message

    vicuna = instantiate(OmegaConf.load(CONF / "model" / "vicuna_7b.yaml").prompt_format)
    text = vicuna.render([Message("system", "Be brief."), Message("user", "q")])
    assert text == "Be brief. USER: q ASSISTANT:"
    assert vicuna.render([Message("user", "q")]).endswith("questions. USER: q ASSISTANT:")


def test_pair_is_chosen_by_model_and_reward_groups():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(overrides=["+model=llama3_8b", "+reward=ultrarm"])
    assert f"{cfg.model.name}__{cfg.reward.name}" == "llama3_8b__ultrarm"
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B"
    assert cfg.reward.name_or_path == "openbmb/UltraRM-13b"
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(overrides=["+model=vicuna_7b", "+reward=eurus", "reward.device=cpu"])
    assert cfg.reward.name_or_path == "openbmb/Eurus-RM-7b" and cfg.reward.device == "cpu"
    assert instantiate(cfg.reward).device == "cpu"


# ---------------------------------------------------------------------------- real loading path


class CardRewardModel(nn.Module):
    """The model cards' LlamaRewardModel / EurusRewardModel, as published."""

    def __init__(self, backbone: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.model = backbone
        self.regression_head = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, input_ids, attention_mask):
        hidden_states = self.model(input_ids, attention_mask=attention_mask)[0]
        rewards = self.regression_head(hidden_states).squeeze(-1)
        ends = attention_mask.cumsum(dim=1).argmax(dim=1).view(-1, 1)
        return torch.gather(rewards, 1, ends)


CARDS = {
    # reward config: (config class, backbone, architecture name, extra config, card input format, weights file)
    "ultrarm": (LlamaConfig, LlamaModel, "LlamaRewardModel", {}, "Human: {q}\nAssistant: {r}", "pytorch_model.bin"),
    "eurus": (MistralConfig, MistralModel, "EurusRewardModel",
              {"auto_map": {"AutoModel": "modeling_eurus_rm.EurusRewardModel"}}, "[INST] {q} [/INST] {r}",
              "model.safetensors"),
}


def write_card_checkpoint(name: str, folder: Path, tok) -> CardRewardModel:
    cfg_cls, backbone_cls, arch, extra, _, weights = CARDS[name]
    config = cfg_cls(**tiny_kwargs(len(tok)))
    torch.manual_seed(3)
    card = CardRewardModel(backbone_cls(config), config.hidden_size).eval()
    folder.mkdir(parents=True, exist_ok=True)
    d = config.to_dict()
    d.update({"architectures": [arch], **extra})
    (folder / "config.json").write_text(json.dumps(d))
    state = {k: v.contiguous() for k, v in card.state_dict().items()}
    assert "regression_head.weight" in state and any(k.startswith("model.layers.") for k in state)
    if weights.endswith(".bin"):
        torch.save(state, folder / weights)
    else:
        save_file(state, str(folder / weights), metadata={"format": "pt"})
    tok.save_pretrained(folder)
    return card


PAIRS = [
    (Prompt.single("a", "What is the capital of France?"), "Paris."),
    (Prompt.single("b", "hello"), "hi there, how can I help you today? I am here to help."),
    (Prompt.single("c", "Why?"), ""),
]


@pytest.mark.parametrize("name", ["ultrarm", "eurus"])
def test_published_checkpoint_loads_by_path_and_matches_model_card(name, tmp_path):
    tok = tiny_tokenizer()
    card = write_card_checkpoint(name, tmp_path / name, tok)
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "reward" / f"{name}.yaml"),
                          {"name_or_path": str(tmp_path / name), "device": "cpu", "batch_size": 2})
    rm = instantiate(cfg)
    assert rm.model is None
    got = rm.score([p for p, _ in PAIRS], [r for _, r in PAIRS])
    assert torch.equal(rm.model.regression_head.weight, card.regression_head.weight)
    direct = RegressionHeadModel.from_pretrained(tmp_path / name)  # no config given: read from the folder
    assert type(direct.model).__name__ == CARDS[name][1].__name__
    fmt = CARDS[name][4]
    want = []
    with torch.inference_mode():
        for p, r in PAIRS:
            inputs = tok(fmt.format(q=p.text, r=r), return_tensors="pt")  # the cards' own usage
            want.append(card(inputs["input_ids"], inputs["attention_mask"]).item())
    assert torch.allclose(got, torch.tensor(want), atol=1e-5), (got, want)


def test_bfloat16_and_device_settings(tmp_path):
    tok = tiny_tokenizer()
    write_card_checkpoint("ultrarm", tmp_path / "u", tok)
    base = OmegaConf.merge(OmegaConf.load(CONF / "reward" / "ultrarm.yaml"), {"name_or_path": str(tmp_path / "u")})
    fp32 = instantiate(OmegaConf.merge(base, {"device": "cpu", "dtype": "float32"}))
    bf16 = instantiate(OmegaConf.merge(base, {"device": "cpu", "dtype": "bfloat16"}))
    a = fp32.score([p for p, _ in PAIRS], [r for _, r in PAIRS])
    b = bf16.score([p for p, _ in PAIRS], [r for _, r in PAIRS])
    assert bf16.model.regression_head.weight.dtype == torch.bfloat16 and b.dtype == torch.float32
    assert torch.allclose(a, b, rtol=0.05, atol=0.05 * float(a.abs().max()))
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        instantiate(OmegaConf.merge(base, {"dtype": "fp8"})).load()


def test_loading_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot load reward model 'ultrarm': no such folder"):
        instantiate(OmegaConf.merge(OmegaConf.load(CONF / "reward" / "ultrarm.yaml"),
                                    {"name_or_path": str(tmp_path / "missing")})).load()
    # a plain decoder (no regression head) must not load with a random head
    tok = tiny_tokenizer()
    LlamaModel(LlamaConfig(**tiny_kwargs(len(tok)))).save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    rm = instantiate(OmegaConf.merge(OmegaConf.load(CONF / "reward" / "ultrarm.yaml"),
                                     {"name_or_path": str(tmp_path / "plain"), "device": "cpu"}))
    with pytest.raises(RuntimeError, match="lacks regression_head.weight"):
        rm.load()


def test_hf_classifier_loads_by_path(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    torch.manual_seed(4)
    model = LlamaForSequenceClassification(LlamaConfig(**tiny_kwargs(len(tok)), num_labels=1)).eval()
    model.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    rm = instantiate(OmegaConf.merge(OmegaConf.load(CONF / "reward" / "hf_classifier.yaml"),
                                     {"name_or_path": str(tmp_path / "clf"), "device": "cpu"}))
    prompts = [p for p, _ in PAIRS] + [Prompt("m", (Message("user", "q1"), Message("assistant", "a1"),
                                                    Message("user", "q2")))]
    responses = [r for _, r in PAIRS] + ["r"]
    got = rm.score(prompts, responses)
    assert rm.render(prompts[-1], "r") == "<s>user: q1\nassistant: a1\nuser: q2\nassistant: r\n"
    with torch.inference_mode():
        want = [float(model(**tok(rm.render(p, r), add_special_tokens=False, return_tensors="pt")).logits[0, 0])
                for p, r in zip(prompts, responses)]
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)


# --------------------------------------------------------------------------- the lineage's prompt forms
RECONTROL_WORD = {"llama3": "User: ", "vicuna": "Human: "}  # RE-Control's begin_word per model


def recontrol_prompt(model: str, dataset: str, row: dict) -> str:
    """RE-Control's own construction (inference_intervention.py, ``preprocessing``)."""
    if dataset == "hh":
        return row["chosen"].replace("Human:", RECONTROL_WORD[model]).rsplit("Assistant:", 1)[0] + "Assistant:"
    return RECONTROL_WORD[model] + row["history"] + "\nAssistant:"


def recontrol_formats(compose, model: str) -> dict:
    """The prompt formats of ``+model/format=recontrol_<model>_<hh|shp>``, on the matching model and dataset."""
    name = {"llama3": "llama3_8b", "vicuna": "vicuna_7b"}[model]
    return {ds: instantiate(compose([f"model={name}", f"dataset={full}", f"+model/format=recontrol_{model}_{ds}"]
                                    ).model.prompt_format) for ds, full in (("hh", "hh_rlhf"), ("shp", "shp"))}


@pytest.mark.parametrize("model", ["llama3", "vicuna"])
def test_recontrol_formats_render_the_lineages_prompts(compose, model):
    from aisp_bench.data.datasets import parse_hh, parse_shp

    fmt = recontrol_formats(compose, model)
    row = {"chosen": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine"}
    assert fmt["hh"].render(parse_hh([row], "x")[0].messages) == recontrol_prompt(model, "hh", row)
    shp_row = {"post_id": "p", "history": "Why is the sky blue?"}
    assert fmt["shp"].render(parse_shp([shp_row], "x")[0].messages) == recontrol_prompt(model, "shp", shp_row)


@pytest.mark.parametrize("model", ["llama3", "vicuna"])
def test_recontrol_formats_on_the_real_prompts(compose, model, shared_data):
    """Every real row whose turns our parser keeps verbatim gets RE-Control's exact text (the others differ
    in whitespace at turn edges, or in a "Human:" inside a turn, which RE-Control's replace also rewrites)."""
    from aisp_bench.data.datasets import parse_hh, parse_shp, read_rows

    fmt, plain = recontrol_formats(compose, model), TranscriptFormat()  # plain: the HH-RLHF transcript form
    hh_rows = read_rows(shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz")
    checked = 0
    for r in hh_rows:
        prompts, cut = parse_hh([r], "x"), r["chosen"].rsplit("Assistant:", 1)[0] + "Assistant:"  # RE-Control's cut
        verbatim = prompts and plain.render(prompts[0].messages) == cut  # no edge whitespace, same last turn
        if verbatim and "Human:" not in "".join(m.content for m in prompts[0].messages):
            assert fmt["hh"].render(prompts[0].messages) == recontrol_prompt(model, "hh", r)
            checked += 1
    assert checked > 0.9 * len(hh_rows)
    shp_rows = read_rows(shared_data / "shp" / "test_1000.jsonl")
    for r in (r for r in shp_rows if r["history"] == r["history"].strip()):
        assert fmt["shp"].render(parse_shp([r], "x")[0].messages) == recontrol_prompt(model, "shp", r)
