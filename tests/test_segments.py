"""A decode that pauses (``Engine.start``): segments, partial responses and row selection, on
the tiny random Llama of test_decode_steps (fp32, CPU), through every decode path: the
prompt KV copied per row, shared-prefix eager, the static step (what a CUDA graph
replays), and chunks smaller than the rows (selection moves rows between chunks)."""

from __future__ import annotations

import pytest
import torch
from test_decode_steps import T, VOCAB, tiny  # noqa: F401  (the module fixture)

from aisp_bench.engine import Engine

PATHS = [dict(attention="copy", sync_every=1), dict(attention="shared_prefix", sync_every=3),
         dict(decode_step="static", sync_every=1), dict(decode_step="static", sync_every=4, max_batch_rows=5),
         dict(attention="shared_prefix", sync_every=1, max_batch_rows=5)]
TOP_P = dict(temperature=1.0, top_p=0.9)


def engine(model, tok, **kw):
    return Engine(model, tok, max_new_tokens=T, check_prelogit=False, **kw)


def uniforms(rows: int, seed: int) -> torch.Tensor:
    return torch.rand(rows, T, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def fresh(model, tok, prompts, prompt_of_row, u, **kw):
    """(tokens, finish reason) of each row decoded from start to end in one call."""
    eng = engine(model, tok, **kw)
    return [(s.token_ids, s.finish_reason) for s in eng.decode(eng.prefill(prompts), prompt_of_row, uniforms=u, **TOP_P)]


@pytest.mark.parametrize("kw", PATHS)
def test_identity_selection_between_segments_changes_nothing(tiny, kw):  # noqa: F811
    """Segments of any lengths with select(all rows) between them give the uninterrupted
    rows token for token, and the segments' generated tokens add up to theirs."""
    model, tok, prompts, prompt_of_row, noise = tiny
    u = uniforms(len(prompt_of_row), 0)
    ref = fresh(model, tok, prompts, prompt_of_row, u, attention="copy", sync_every=1)
    assert {r for _, r in ref} >= {"eos", "length"}
    eng = engine(model, tok, **kw)
    dec = eng.start(eng.prefill(prompts), prompt_of_row)
    generated = 0
    for until in (1, 7, 19, 33, T):
        generated += int(dec.run(until, uniforms=u, **TOP_P).sum())
        dec.select(range(dec.rows))
    assert dec.done and [(s.token_ids, s.finish_reason) for s in dec.responses()] == ref
    assert generated == sum(len(ids) for ids, _ in ref) == eng.stats["generated_tokens"]
    # greedy on noisy pre-logits pauses as well
    eng = engine(model, tok, **kw)
    dec = eng.start(eng.prefill(prompts), prompt_of_row)
    for until in (5, 11, T):
        dec.run(until, noise=noise)
    assert [s.token_ids for s in dec.responses()] == [s.token_ids for s in eng.decode(eng.prefill(prompts),
                                                                                        prompt_of_row, noise=noise)]


@pytest.mark.parametrize("kw", PATHS)
def test_a_duplicated_row_continued_is_a_fresh_decode_of_its_prefix(tiny, kw):  # noqa: F811
    """After select (rows kept, dropped, duplicated, more rows than before), each new row
    continues as a fresh decode whose uniforms are its source row's before the pause and
    its own after: same tokens, same end. Finished rows move with their samples."""
    model, tok, prompts, prompt_of_row, _ = tiny
    u0 = uniforms(len(prompt_of_row), 4)  # rows 3 and 9 end before the pause
    eng = engine(model, tok, **kw)
    dec = eng.start(eng.prefill(prompts), prompt_of_row)
    s = 9
    dec.run(s, uniforms=u0, **TOP_P)
    before = dec.responses()
    done = dec.finished.nonzero().squeeze(1).tolist()
    live = (~dec.finished).nonzero().squeeze(1).tolist()
    assert done and live  # some rows ended before the pause
    idx = [live[0]] * 4 + [done[0], live[1], live[1], live[2]] + live[3:] + [done[0], live[0]]
    assert len(idx) > len(prompt_of_row)
    dec.select(idx)
    assert dec.prompt_of_row.tolist() == prompt_of_row[idx].tolist()
    assert [r.token_ids for r in dec.responses()] == [before[i].token_ids for i in idx]
    u1 = uniforms(len(idx), 2)
    dec.run(T, uniforms=u1, **TOP_P)
    got = [(x.token_ids, x.finish_reason) for x in dec.responses()]
    expected_u = torch.cat([u0[idx, :s], u1[:, s:]], dim=1)
    assert got == fresh(model, tok, prompts, prompt_of_row[idx], expected_u, attention="copy", sync_every=1)
    assert got[0] != got[1]  # duplicates with their own uniforms diverge


def test_dropping_rows_keeps_the_static_step_and_its_buckets(tiny):  # noqa: F811
    """Speculative Rejection's selection (rows dropped, the rest in order): the chunk keeps
    its static step (no new buffers, no new CUDA graphs), the batch shrinks to a bucket,
    and the kept rows end exactly as undisturbed rows do."""
    model, tok, prompts, prompt_of_row, _ = tiny
    u = uniforms(len(prompt_of_row), 3)
    ref = fresh(model, tok, prompts, prompt_of_row, u, attention="copy", sync_every=1)
    eng = engine(model, tok, decode_step="static")
    prefix = eng.prefill(prompts)
    dec = eng.start(prefix, prompt_of_row)
    step = dec.chunks[0].step
    dec.run(6, uniforms=u, **TOP_P)
    keep = [0, 2, 3, 7, 10]
    dec.select(keep)
    sizes = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]),
                                                 with_kwargs=True)
    try:
        dec.run(T, uniforms=u[keep], **TOP_P)
    finally:
        hook.remove()
    assert dec.chunks[0].step is step and len(prefix.static_steps) == 1
    assert sizes[0] == 4 and set(sizes) <= {4, 2, 1}  # 4 live rows (row 7 ended at its first token)
    assert [(x.token_ids, x.finish_reason) for x in dec.responses()] == [ref[i] for i in keep]


def test_partial_responses_and_bad_calls(tiny):  # noqa: F811
    """A live row's response is the text of its tokens so far, marked partial; run and
    select refuse what cannot be done."""
    model, tok, prompts, prompt_of_row, _ = tiny
    eng = engine(model, tok)
    dec = eng.start(eng.prefill(prompts), prompt_of_row)
    gen = dec.run(4, uniforms=uniforms(len(prompt_of_row), 4), **TOP_P)
    for r, f, g in zip(dec.responses(), dec.finished.tolist(), gen.tolist()):
        assert r.num_tokens == g and (r.finish_reason == "partial") == (not f)
        assert r.text == tok.decode(r.token_ids).strip()
        assert f or r.num_tokens == 4
    with pytest.raises(ValueError, match="already decoded"):
        dec.run(4)
    with pytest.raises(ValueError, match="select"):
        dec.select([0, len(prompt_of_row)])
    with pytest.raises(ValueError, match="uniforms must have shape"):
        dec.run(8, uniforms=uniforms(3, 0))
    assert VOCAB > 0


@pytest.mark.gpu
def test_cuda_graph_steps_pause_and_select_like_eager(tiny):  # noqa: F811
    """On CUDA, fp32: the captured step pauses, keeps, drops and duplicates rows (graphs
    replayed on the reloaded buffers) and gives the eager rows."""
    model, tok, prompts, prompt_of_row, _ = tiny
    model = model.cuda()
    try:
        u0, u1 = uniforms(len(prompt_of_row), 4), uniforms(14, 5)
        idx = [0, 0, 3, 5, 5, 5, 6, 7, 8, 9, 10, 11, 1, 2]
        out = []
        for kw in (dict(attention="copy", sync_every=1), dict(decode_step="cuda_graph", sync_every=4)):
            eng = engine(model, tok, **kw)
            dec = eng.start(eng.prefill(prompts), prompt_of_row)
            dec.run(9, uniforms=u0, **TOP_P)
            dec.select(idx)
            dec.run(T, uniforms=u1, **TOP_P)
            out.append([(s.token_ids, s.finish_reason) for s in dec.responses()])
        assert out[0] == out[1]
    finally:
        model.cpu()
