"""Speculative Rejection and particle filtering: the selection and resampling math (pure),
and on a tiny random Llama (CPU, fp32; SmolLM2 once, ``slow``) the exactness targets:
rejection rate 0 is BoN top-p and one segment of particles is BoN top-p, record for
record, whatever the chunking and decode step; resampled particles reproduce whatever the
batching. (Segmented decoding and duplicated rows on the engine: test_segments.py.)"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from test_methods import PROMPTS, WordCount, make_engine
from tiny_models import chat_tokenizer, tiny_llama

from aisp_bench.methods import (
    BoNTopP, ParticleFilter, SpecRejection, effective_sample_size, keep_top, resample, resampling_weights,
)  # fmt: skip
from aisp_bench.engine import Engine
from aisp_bench.methods.guided import decision_points
from aisp_bench.rewards.base import RewardModel

COMMON = ("response", "reward", "sample_rewards", "num_samples", "num_tokens", "finish_reason", "response_tokens",
          "sample_tokens")


# ---------------------------------------------------------------------------- pure math


def test_keep_top_keeps_the_highest_scores_in_row_order():
    s = torch.tensor([0.5, 2.0, -1.0, 2.0, float("nan"), 1.0])
    assert keep_top(s, 0.5).tolist() == [1, 3, 5]  # round(3.0) = 3: the two 2.0s, then 1.0
    assert keep_top(s, 0.0).tolist() == list(range(6))
    assert keep_top(s, 0.9).tolist() == [1]  # round(0.6) = 1: a tie keeps the lower index
    assert keep_top(torch.tensor([float("nan"), float("nan")]), 0.5).tolist() == [0]  # at least one, NaN last
    # Python's round (as the authors' code): round(2.5) = 2 keeps two of five at α = 0.5
    assert keep_top(torch.tensor([0.0, 4.0, 2.0, 3.0, 1.0]), 0.5).tolist() == [1, 3]


def test_resampling_weights_are_a_stable_softmax():
    r = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    w = resampling_weights(r, 0.5)
    e = torch.exp(torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64))
    assert w[:3].tolist() == pytest.approx((e / e.sum()).tolist()) and w[3] == 0 and w.dtype == torch.float64
    assert resampling_weights(r + 1e4, 0.5)[:3].tolist() == pytest.approx(w[:3].tolist())  # shift-invariant, no overflow
    assert resampling_weights(torch.full((4,), float("-inf")), 1.0).tolist() == [0.25] * 4  # nothing finite: uniform
    assert effective_sample_size(torch.full((8,), 1 / 8)) == pytest.approx(8)
    assert effective_sample_size(torch.tensor([0.0, 1.0, 0.0])) == pytest.approx(1)
    sharp = resampling_weights(torch.tensor([0.0, 1.0, 0.5]), 1e-3)
    assert sharp.tolist() == pytest.approx([0.0, 1.0, 0.0])  # β -> 0: the argmax


def test_systematic_resampling_gives_floor_or_ceil_copies():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        w = torch.rand(16, generator=g, dtype=torch.float64) ** 3
        w /= w.sum()
        a = resample(w, torch.rand(1, generator=g, dtype=torch.float64), "systematic")
        counts = torch.bincount(a, minlength=16)
        assert a.tolist() == sorted(a.tolist()) and counts.sum() == 16
        assert ((counts >= torch.floor(16 * w)) & (counts <= torch.ceil(16 * w))).all()


def test_multinomial_resampling_draws_by_the_weights():
    w = torch.tensor([0.5, 0.0, 0.3, 0.2], dtype=torch.float64)
    u = torch.rand(40_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    freq = torch.bincount(resample(torch.cat([w] * 10_000) / 10_000, u, "multinomial") % 4, minlength=4) / 40_000
    assert freq.tolist() == pytest.approx(w.tolist(), abs=0.01) and freq[1] == 0
    a = resample(w, torch.tensor([0.0, 0.49, 0.5, 0.79, 0.8, 0.999]), "multinomial")
    assert a.tolist() == [0, 0, 2, 2, 3, 3]  # inverse CDF: [0, .5) -> 0, [.5, .8) -> 2, [.8, 1) -> 3
    with pytest.raises(ValueError, match="resampling"):
        resample(w, u, "stratified")


def test_decision_points():
    assert decision_points(4, 16) == [4, 8, 12]
    assert decision_points(16, 16) == [] and decision_points([12, 3, 3, 40], 16) == [3, 12]
    with pytest.raises(ValueError):
        decision_points(0, 16)


# ---------------------------------------------------------------------------- the configs


def test_the_method_group_builds_both_at_the_shared_budget(compose):
    """``method=spec_rejection`` / ``particle_filter`` build the classes; their defaults follow
    budget.num_samples and generation.max_new_tokens (the docs' equal generated-token budget)."""
    from hydra.utils import instantiate

    over = ["budget.n=8", "budget.kappa=8", "generation.max_new_tokens=48"]
    sr = instantiate(compose(["method=spec_rejection", *over]).method)
    pf = instantiate(compose(["method=particle_filter", *over]).method)
    assert type(sr) is SpecRejection and (sr.num_samples, sr.rejection_rate, sr.decision_tokens) == (128, 0.5, 12)
    assert type(pf) is ParticleFilter and (pf.num_particles, pf.segment_tokens, pf.resampling) == (64, 6, "multinomial")
    # 128 rows to 12 tokens, 64 to 24, 32 to 36, 16 to 48: 15/16 of BoN's 64 x 48 at most
    assert sum(r * 12 for r in (128, 64, 32, 16)) == 64 * 48 * 15 // 16
    listed = instantiate(compose(["method=particle_filter", "method.segment_tokens=[8,16]"]).method)
    assert listed.segment_tokens == [8, 16]
    # experiment=table1_extended: the five methods, in Table 1's folders (the paper's three are not run again)
    import yaml

    from aisp_bench.config import CONF_DIR

    ext = yaml.safe_load(open(f"{CONF_DIR}/experiment/table1_extended.yaml"))
    assert ext["hydra"]["sweeper"]["params"]["method"] == "bon_topp,bon_gaussian,aisp,spec_rejection,particle_filter"
    assert "/spec_rejection/table1/seed0" in compose(["experiment=table1_extended", "method=spec_rejection"]).run_dir
    assert compose(["experiment=table1_extended"]).run_dir == compose(["experiment=table1"]).run_dir


# ---------------------------------------------------------------------------- exactness on a tiny Llama


class TextHash(RewardModel):
    """A deterministic reward spread over many values (few ties): a hash of the text."""

    batch_size = 4

    def _score_batch(self, prompts, responses):
        return torch.tensor([float(zlib.crc32(r.encode()) % 1000) / 100 for r in responses])


T = 16


@pytest.fixture(scope="module")
def tiny():
    tok = chat_tokenizer()
    return tiny_llama(len(tok)), tok


def engine(tiny, rows=64, **kw):
    """Rows end at max_new_tokens, EOS or the stop string "?" (some end early)."""
    model, tok = tiny
    return Engine(model, tok, max_new_tokens=T, max_batch_rows=rows, stop_strings=["?"], check_prelogit=False, **kw)


def same_records(a, b):
    for x, y in zip(a, b, strict=True):
        assert {k: getattr(x, k) for k in COMMON} == {k: getattr(y, k) for k in COMMON}


def untimed(r):
    """A record's method fields without wall times."""
    return {k: v for k, v in r.extra.items() if k != "decision_points"} | {
        "points": [{k: v for k, v in d.items() if k != "seconds"} for d in r.extra["decision_points"]]}


ENGINES = [dict(), dict(rows=3), dict(rows=5, decode_step="static", sync_every=4), dict(attention="copy")]


def test_rejection_rate_zero_is_bon_top_p(tiny):
    """α = 0 with decision points: BoN top-p's record for record, whatever the chunking and the
    decode step; every row kept at every point, partial scoring counted."""
    bon = BoNTopP(num_samples=7, temperature=1.0)(PROMPTS, engine(tiny), TextHash(), seed=5)
    assert {s for r in bon for s in r.sample_tokens} > {T}  # some rows end early
    for kw in ENGINES:
        sr = SpecRejection(num_samples=7, rejection_rate=0.0, decision_tokens=4, temperature=1.0)(
            PROMPTS, engine(tiny, **kw), TextHash(), seed=5)
        same_records(sr, bon)
        for r in sr:
            points = r.extra["decision_points"]
            assert [d["tokens"] for d in points] == [4, 8, 12] and all(d["kept"] == d["rows"] == 7 for d in points)
            assert r.extra["rejected_at"] == [None] * 7 and r.extra["reward_calls"] == 4
            assert r.extra["reward_tokens"] > sum(r.sample_tokens)  # partial responses were scored too


def test_rejection_keeps_bon_samples_and_spends_less(tiny):
    """α = 1/2: the rows kept to the end are BoN top-p's samples; a dropped row cost its tokens
    up to its rejection; the kept counts halve at every decision point."""
    bon = BoNTopP(num_samples=8, temperature=1.0)(PROMPTS, engine(tiny), TextHash(), seed=5)
    sr = SpecRejection(num_samples=8, rejection_rate=0.5, decision_tokens=[4, 8], temperature=1.0)
    half = sr(PROMPTS, engine(tiny, rows=5), TextHash(), seed=5)
    assert [untimed(h) for h in half] == [untimed(h) for h in sr(PROMPTS, engine(tiny), TextHash(), seed=5)]
    for h, b in zip(half, bon):
        at = h.extra["rejected_at"]
        kept = [i for i, t in enumerate(at) if t is None]
        assert [h.sample_rewards[i] for i in kept] == [b.sample_rewards[i] for i in kept]
        assert [h.sample_tokens[i] for i in kept] == [b.sample_tokens[i] for i in kept]
        assert all(h.sample_tokens[i] <= at[i] for i in range(8) if at[i] is not None)
        assert h.num_samples == 8 and h.num_tokens == sum(h.sample_tokens) < b.num_tokens
        assert h.reward == max(h.sample_rewards[i] for i in kept) <= b.reward
        points = h.extra["decision_points"]
        assert [(d["tokens"], d["rows"]) for d in points] == [(4, 8), (8, 4)][: len(points)]
        for d in points:
            assert d["kept"] == max(1, round(d["rows"] / 2)) and len(d["scores"]) == d["rows"]
            assert d["threshold"] == min(sorted(d["scores"], reverse=True)[: d["kept"]])
            dropped = [i for i in d["samples"] if at[i] == d["tokens"]]
            assert len(dropped) == d["rows"] - d["kept"]


def test_one_segment_of_particles_is_bon_top_p(tiny):
    """k >= T: no resampling, the particles are BoN top-p's samples, whatever the engine."""
    bon = BoNTopP(num_samples=5, temperature=1.0)(PROMPTS, engine(tiny), TextHash(), seed=2)
    for kw in ENGINES:
        pf = ParticleFilter(num_particles=5, segment_tokens=T, temperature=1.0)(PROMPTS, engine(tiny, **kw),
                                                                                TextHash(), seed=2)
        same_records(pf, bon)
        assert pf[0].extra["decision_points"] == [] and pf[0].extra["reward_calls"] == 1


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_particles_resample_reproducibly_whatever_the_batching(tiny, scheme):
    """Resampling every 3 tokens: the same records for both prompts together, in chunks of 4
    rows, with the static step and each prompt alone; diagnostics per boundary; the seeds
    change the result."""
    pf = ParticleFilter(num_particles=6, segment_tokens=3, resampling=scheme, reward_temperature=0.5,
                        temperature=1.0)
    both = pf(PROMPTS, engine(tiny), TextHash(), seed=4)
    for other in (pf(PROMPTS, engine(tiny, rows=4), TextHash(), seed=4),
                  pf(PROMPTS, engine(tiny, rows=5, decode_step="static"), TextHash(), seed=4)):
        same_records(both, other)
        assert [untimed(r) for r in both] == [untimed(r) for r in other]
    alone = pf(PROMPTS[1:], engine(tiny), TextHash(), seed=4)
    same_records(both[1:], alone)
    assert [untimed(r) for r in both[1:]] == [untimed(r) for r in alone]
    for r in both:
        points = r.extra["decision_points"]
        assert points and [d["tokens"] for d in points] == [3, 6, 9, 12, 15][: len(points)]
        assert all(1 <= d["ess"] <= 6 and 1 <= d["unique_ancestors"] <= 6 for d in points)
        assert r.num_samples == 6 and r.reward == max(r.sample_rewards)
        # a call per boundary, and one at the end unless every particle had finished (scored already)
        assert r.num_tokens <= 6 * T and r.extra["reward_calls"] in (len(points), len(points) + 1)
        w = r.extra["weighted_choice"]
        assert r.sample_rewards[w["particle"]] == w["reward"] and math.isfinite(w["reward"])
    other_seed = pf(PROMPTS, engine(tiny), TextHash(), seed=5)
    assert [r.sample_rewards for r in other_seed] != [r.sample_rewards for r in both]


def test_copies_of_a_particle_diverge(tiny):
    """A sharp weight (β small) copies the best particle to every row at the first boundary;
    the copies then draw their own uniforms, so they do not all end alike."""
    pf = ParticleFilter(num_particles=6, segment_tokens=[4], reward_temperature=1e-6, temperature=1.0, top_p=1.0)
    r = pf(PROMPTS[:1], engine(tiny), TextHash(), seed=1)[0]
    assert r.extra["decision_points"][0]["unique_ancestors"] == 1
    assert len(set(r.sample_rewards)) > 1


def test_a_resampled_particle_is_a_fresh_decode_of_its_ancestors_prefix(tiny):
    """The seeding rule end to end: after the boundary at 5 tokens, particle i is a fresh decode
    whose uniforms are its ancestor a's before the boundary (BoN top-p's sample a) and its own,
    seeded by (seed, prompt, segment 1, i), after it, for some ancestor a."""
    from aisp_bench.seeding import uniform_rows

    N, seed = 6, 3
    r = ParticleFilter(num_particles=N, segment_tokens=[5], temperature=1.0)(PROMPTS[:1], engine(tiny), TextHash(),
                                                                             seed=seed)[0]
    u0 = uniform_rows(seed, PROMPTS[0].id, "bon_topp", range(N), T)
    u1 = uniform_rows(seed, PROMPTS[0].id, "particle_filter", range(N), T, 1)
    eng = engine(tiny)
    u = torch.stack([torch.cat([u0[a, :5], u1[i, 5:]]) for i in range(N) for a in range(N)])
    fresh = eng.decode(eng.prefill(PROMPTS[:1]), [0] * N * N, uniforms=u, temperature=1.0, top_p=0.9)
    scores = TextHash().score(PROMPTS[:1] * N * N, [x.text for x in fresh]).view(N, N).tolist()
    assert all(r.sample_rewards[i] in scores[i] for i in range(N))


# ---------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_on_smollm2_rejection_rate_zero_and_one_segment_are_bon_top_p(smollm2):
    """The two exactness targets on the real offline policy, one prompt."""
    bon = BoNTopP(num_samples=4)(PROMPTS[:1], make_engine(smollm2), WordCount(), seed=5)
    sr = SpecRejection(num_samples=4, rejection_rate=0.0, decision_tokens=4)(PROMPTS[:1], make_engine(smollm2, 3),
                                                                             WordCount(), seed=5)
    pf = ParticleFilter(num_particles=4, segment_tokens=12)(PROMPTS[:1], make_engine(smollm2), WordCount(), seed=5)
    same_records(sr, bon)
    same_records(pf, bon)
