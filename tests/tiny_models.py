"""Tokenizers and models small enough to build at test time, from nothing but this
repository: byte-level BPE tokenizers trained in milliseconds on a few sentences (any
text still tokenizes, byte by byte where no merge applies) and random Llamas sized for
them. Tests that need no real weights use these, so they run wherever the repository is
(e.g. on a GPU machine that has torch and transformers but not the offline model
packages). Imports nothing beyond torch, tokenizers and transformers.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# SmolLM2's chat template with its default system line (ChatML).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ENGLISH = [
    "What is the capital of France? The capital of France is Paris, and it has been for centuries.",
    "Write a haiku about autumn leaves falling on a quiet pond near the old temple.",
    "Leaves drift on still water. Hello there, how can I help you today?",
    "You are a helpful AI assistant. Give three tips for sleeping better at night.",
]


def _bpe(corpus: list[str], specials: list[str], vocab_size: int) -> Tokenizer:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus * 5, trainer)
    return tk


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 300-token byte-level BPE that adds <s> in front, as Llama/Mistral tokenizers do."""
    corpus = [
        "Human: hello there\nAssistant: hi, how can I help you today?",
        "[INST] the capital of France [/INST] Paris",
    ]
    tk = _bpe(corpus, ["<unk>", "<s>", "</s>"], 300)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def chat_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A SmolLM2-like tokenizer: ChatML special tokens (<|im_start|> = 1 as BOS,
    <|im_end|> = 2 as EOS), SmolLM2's chat template, no BOS added, no pad token."""
    tk = _bpe(ENGLISH, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def tiny_llama(vocab_size: int, seed: int = 0, logit_std: float = 3.0, **shape) -> LlamaForCausalLM:
    """A random fp32 Llama (4 layers, hidden 128 unless ``shape`` says otherwise) whose
    ``lm_head`` is scaled so that its logits spread about ``logit_std``, as a trained
    model's do (SmolLM2's: about 3.2), rather than the near-uniform ones of its init."""
    torch.manual_seed(seed)
    kw = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    kw.update(shape)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **kw)).float().eval()
    with torch.no_grad():
        ids = torch.arange(min(vocab_size, 64))[None]
        std = float(model(input_ids=ids).logits.std())
        model.lm_head.weight.mul_(logit_std / std)
    return model
