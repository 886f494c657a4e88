"""The engine's decode paths on a tiny random Llama (fp32, CPU, fast): every path, sync
interval, bucket size and chunking gives the same rows; the static step can be replayed
as a CUDA graph; stop strings are checked only where they can appear; the
attention and batch-size choices."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from aisp_bench.engine import SPAN, Engine, stop_candidates
from aisp_bench.engine.tuning import choose
from aisp_bench.types import Prompt

VOCAB, T = 512, 40  # T > engine.SPAN: the static step reads the generated keys in two spans


class Tok:
    """Ids written as numbers; EOS set per test."""

    pad_token_id = 0

    def __init__(self, eos: int) -> None:
        self.eos_token_id = eos

    def __len__(self) -> int:
        return VOCAB

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))


@pytest.fixture(scope="module")
def tiny():
    """A random Llama whose EOS is a token it often produces (rows end at different steps),
    three prompts of different lengths (left padding), noise that makes rows differ."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(1)
    prompts = [Prompt.single(f"p{i}", " ".join(map(str, torch.randint(10, 500, (n,), generator=g).tolist())))
               for i, n in enumerate([5, 17, 9])]
    prompt_of_row = torch.tensor([0, 2, 1, 0, 1, 2, 2, 0, 1, 0, 2, 1])  # a prompt's rows are not adjacent
    noise = 2.0 * torch.randn(len(prompt_of_row), 12, 64, generator=g)
    model.generation_config.eos_token_id = VOCAB  # none: find a frequent token
    free = rows_of(model, Tok(VOCAB), prompts, prompt_of_row, noise, attention="copy")
    eos = collections.Counter(t for r, _ in free for t in r[2:]).most_common(1)[0][0]
    model.generation_config.eos_token_id = eos
    return model, Tok(eos), prompts, prompt_of_row, noise


def rows_of(model, tok, prompts, prompt_of_row, noise, **kw):
    eng = Engine(model, tok, max_new_tokens=T, check_prelogit=False, **kw)
    return [(s.token_ids, s.finish_reason) for s in eng.decode(eng.prefill(prompts), prompt_of_row, noise=noise)]


def test_every_decode_path_gives_the_same_rows(tiny):
    """Reference: the prompt cache copied per row, the host looking at every step (what
    tests/test_engine.py checks against transformers' generate). The static step runs
    at shrinking bucket sizes (seen by the forward's batch sizes)."""
    model, tok, prompts, prompt_of_row, noise = tiny
    ref = rows_of(model, tok, prompts, prompt_of_row, noise, attention="copy", sync_every=1)
    reasons = [r for _, r in ref]
    assert "eos" in reasons and "length" in reasons  # rows end at different steps
    sizes = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]),
                                                 with_kwargs=True)
    try:
        for kw in (dict(attention="copy", sync_every=5), dict(attention="shared_prefix", sync_every=1),
                   dict(attention="shared_prefix", sync_every=3), dict(decode_step="static", sync_every=1),
                   dict(decode_step="static", sync_every=4, max_batch_rows=5)):
            sizes.clear()
            assert rows_of(model, tok, prompts, prompt_of_row, noise, **kw) == ref, kw
            if kw.get("decode_step") == "static" and "max_batch_rows" not in kw:
                assert set(sizes) - {3} <= {12, 8, 4, 2, 1} and min(sizes) < 12  # prefill: 3 prompts
    finally:
        hook.remove()


def test_static_rows_are_reused_across_decodes(tiny):
    """A second decode of the same rows (AISP's next iteration) reuses the state kept on
    the prefix and still gives the same rows."""
    model, tok, prompts, prompt_of_row, noise = tiny
    eng = Engine(model, tok, max_new_tokens=T, check_prelogit=False, decode_step="static")
    prefix = eng.prefill(prompts)
    first = [s.token_ids for s in eng.decode(prefix, prompt_of_row, noise=noise)]
    assert len(prefix.static_steps) == 1
    again = [s.token_ids for s in eng.decode(prefix, prompt_of_row, noise=noise)]
    other = [s.token_ids for s in eng.decode(prefix, prompt_of_row, noise=-noise)]
    assert again == first and other != first and len(prefix.static_steps) == 1


class Record(TorchDispatchMode):
    """Every op of a region: name, scalar arguments, tensor shapes, and for tensors not made
    inside the region their storage (a CUDA graph replays exactly this)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops, self.made = [], set()

    def _arg(self, a):
        if isinstance(a, torch.Tensor):
            ptr = a.untyped_storage().data_ptr()
            return ("T", tuple(a.shape), a.dtype, "made" if ptr in self.made else ptr)
        if isinstance(a, (list, tuple)):
            return tuple(self._arg(x) for x in a)
        return a

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((str(func), self._arg(args), self._arg(tuple(sorted(kwargs.items())))))
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor):
                self.made.add(t.untyped_storage().data_ptr())
        return out


def test_static_step_replays_like_a_cuda_graph(tiny):
    """The static step at two different steps runs the same ops with the same scalars on
    the same buffers, and never reads a device value on the host: what makes capturing
    it once and replaying it valid. (The capture itself needs CUDA: tests marked gpu.)"""
    from aisp_bench.engine import StaticStep

    model, tok, prompts, prompt_of_row, noise = tiny
    eng = Engine(model, tok, max_new_tokens=T, check_prelogit=False, decode_step="static")
    step = StaticStep(eng, eng.prefill(prompts), prompt_of_row, graphs=False)
    records = []
    for t in (0, 1, 5):
        step.tok.random_(0, VOCAB)
        step.pos.fill_(20 + t)
        step.t.fill_(t)
        with torch.inference_mode(), Record() as rec:
            step._run(step.n, SPAN)
        records.append(rec.ops)
    assert records[1] == records[2]  # t = 0 allocates the KV buffers first
    names = {op for op, _, _ in records[1]}
    assert not names & {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}


def test_stop_strings_end_rows_where_their_text_first_holds_one(tiny):
    """With sync_every > 1 and only candidate tokens checked, each row ends at the first
    step whose recent text contains a stop string, exactly as checking every row at every
    step would (computed here from the rows decoded without stop strings)."""
    model, tok, prompts, prompt_of_row, noise = tiny
    free = rows_of(model, tok, prompts, prompt_of_row, noise, attention="copy")
    ids = [t for r, _ in free for t in r]
    stops = [f"{ids[3]} {ids[4]}", f"{ids[10]}", f"{ids[17]} {ids[18]}"]  # texts that occur
    eng = Engine(model, tok, max_new_tokens=T, check_prelogit=False, stop_strings=stops, sync_every=4)
    out = eng.decode(eng.prefill(prompts), prompt_of_row, noise=noise)
    window = max(map(len, stops)) + 2
    for (row, reason), s in zip(free, out):
        hit = next((j for j in range(len(row)) if reason != "eos" or j < len(row) - 1
                    if any(x in tok.decode(row[max(0, j + 1 - window) : j + 1]) for x in stops)), None)
        if hit is None:
            assert (s.token_ids, s.finish_reason) == (row, reason)
        else:
            assert (s.token_ids, s.finish_reason) == (row[: hit + 1], "stop_string")
    assert sum(s.finish_reason == "stop_string" for s in out) >= 3


@pytest.mark.slow
def test_stop_candidates_cover_every_completion_on_a_real_tokenizer(smollm2):
    """On SmolLM2's byte-level BPE: whenever appending a token makes the decoded text newly
    contain a stop string, that token is a candidate; and most tokens are not."""
    tok = smollm2.tokenizer
    stops = ["\nHuman:", "USER:", "Paris", "e."]
    mask = stop_candidates(tok, stops, len(tok))
    assert 0 < int(mask.sum()) < len(tok) // 2
    text = ("The capital of France is Paris. USER: hi\nHuman: what is the time? He said: see.\n" * 3)
    g = torch.Generator().manual_seed(0)
    seqs = [tok(text)["input_ids"]] + [torch.randint(0, len(tok), (40,), generator=g).tolist() for _ in range(20)]
    seen = 0
    for ids in seqs:
        for j in range(1, len(ids)):
            before = tok.decode(ids[:j], skip_special_tokens=True)
            after = tok.decode(ids[: j + 1], skip_special_tokens=True)
            if any(after.count(s) > before.count(s) for s in stops):
                seen += 1
                assert mask[ids[j]], (ids[j], tok.decode([ids[j]]))
    assert seen >= 10
    assert bool(stop_candidates(tok, ["Human: "], len(tok)).all())  # ends in a space: check every token


def test_auto_choices_follow_the_model_and_device(tiny):
    """``auto``: shared-prefix attention where it is exact and the model sits on one device,
    else the prompt KV copied per row; the captured step only on a GPU with shared-prefix
    attention (tested under the gpu mark); the host reads every step on the CPU."""
    import copy
    from dataclasses import astuple

    from transformers import MistralConfig, MistralForCausalLM

    model, *_ = tiny
    cpu = torch.device("cpu")
    assert astuple(choose(model, cpu)) == ("shared_prefix", "eager", 1)
    window = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256, sliding_window=64))
    assert (choose(window, cpu).attention, choose(window, cpu).decode_step) == ("copy", "eager")
    split = copy.deepcopy(model)
    split.model.layers[1].to("meta")  # a model on two devices: its prompt KV cannot sit beside every layer
    assert choose(split, cpu).attention == "copy"
    with pytest.raises(ValueError, match="attention='copy'"):
        choose(window, cpu, attention="shared_prefix")
    assert astuple(choose(model, cpu, attention="copy", decode_step="eager", sync_every=3)) == ("copy", "eager", 3)


def test_engine_settings_are_checked(tiny):
    model, tok, *_ = tiny
    eng = Engine(model, tok, check_prelogit=False, max_batch_rows="auto")
    assert eng.max_batch_rows == 64 and eng.sync_every == 1  # the CPU's
    assert eng.decode_step == "eager"  # decode_step="auto": CUDA graphs only on a GPU
    for kw, match in ((dict(decode_step="cuda_graph"), "CUDA"), (dict(decode_step="static", attention="copy"), "copy")):
        with pytest.raises(ValueError, match=match):
            Engine(model, tok, check_prelogit=False, **kw)


@pytest.mark.gpu
def test_cuda_graph_step_gives_eager_tokens(tiny):
    """On CUDA, fp32: the captured step (replayed per bucket) gives the eager rows."""
    model, tok, prompts, prompt_of_row, noise = tiny
    model = model.cuda()
    try:
        ref = rows_of(model, tok, prompts, prompt_of_row, noise.cuda(), attention="copy", sync_every=1)
        for kw in (dict(sync_every=1), dict(sync_every=4, max_batch_rows=5)):
            assert rows_of(model, tok, prompts, prompt_of_row, noise.cuda(), decode_step="cuda_graph", **kw) == ref
        # decode_step="auto" takes the captured step on one GPU, and eager where copies are asked for
        assert Engine(model, tok, check_prelogit=False).decode_step == "cuda_graph"
        assert Engine(model, tok, check_prelogit=False, attention="copy").decode_step == "eager"
    finally:
        model.cpu()
