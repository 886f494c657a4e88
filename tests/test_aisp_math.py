"""The AISP update (Eq. 12) against a hand-written version, and AISP on a toy model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aisp_bench.methods.aisp import AISP, aisp_update, aisp_weights
from aisp_bench.methods.base import Tracker
from aisp_bench.methods.bon import BoNGaussian
from aisp_bench.report.bestof import expected_best
from aisp_bench.report.curves import compute_curve
from aisp_bench.rewards.base import RewardModel
from aisp_bench.types import Prompt, Sample


def eq12_by_hand(U, V, r, lam, alpha, sigma):
    """Eq. 12 written out with plain loops in numpy float64."""
    U, V, r = np.asarray(U, np.float64), np.asarray(V, np.float64), np.asarray(r, np.float64)
    n, tau, _ = V.shape
    s = []
    for i in range(n):
        coupling = sum(float(U[t] @ V[i, t]) for t in range(tau))
        s.append(r[i] / lam - (1 - alpha) / sigma**2 * coupling)
    s = np.array(s)
    w = np.exp(s - s.max())
    w = w / w.sum()
    U_new = sum(w[i] * V[i] for i in range(n))
    return U_new, w


@pytest.mark.parametrize("alpha", [0.9999, 0.5, 1.0])
def test_update_matches_eq12_by_hand(alpha):
    g = torch.Generator().manual_seed(0)
    U = torch.randn(5, 7, generator=g)
    V = U + 0.5 * torch.randn(6, 5, 7, generator=g)
    r = torch.randn(6, generator=g) * 3
    U_new, w = aisp_update(U, V, r, lam=0.7, alpha=alpha, sigma=0.5)
    U_ref, w_ref = eq12_by_hand(U, V, r, 0.7, alpha, 0.5)
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-12)
    np.testing.assert_allclose(U_new.numpy(), U_ref, rtol=1e-5, atol=1e-6)
    assert w.dtype == torch.float64 and U_new.dtype == U.dtype and U_new.shape == U.shape
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)


def test_alpha_term_matters():
    """With U != 0 and alpha < 1 the coupling term changes the weights."""
    g = torch.Generator().manual_seed(1)
    U = torch.randn(3, 4, generator=g)
    V = U + torch.randn(5, 3, 4, generator=g)
    r = torch.zeros(5)
    w_half = aisp_weights(U, V, r, lam=1.0, alpha=0.5, sigma=1.0)
    w_one = aisp_weights(U, V, r, lam=1.0, alpha=1.0, sigma=1.0)
    np.testing.assert_allclose(w_one.numpy(), np.full(5, 0.2))
    assert not np.allclose(w_half.numpy(), 0.2)
    # larger coupling u.v -> smaller weight
    coupling = torch.einsum("td,itd->i", U.double(), V.double())
    assert int(w_half.argmax()) == int(coupling.argmin())


def test_uniform_when_lambda_large_and_alpha_one():
    g = torch.Generator().manual_seed(2)
    U = torch.randn(4, 3, generator=g)
    V = torch.randn(8, 4, 3, generator=g)
    r = torch.randn(8, generator=g)
    U_new, w = aisp_update(U, V, r, lam=1e12, alpha=1.0, sigma=0.5)
    np.testing.assert_allclose(w.numpy(), np.full(8, 1 / 8), rtol=1e-9)
    np.testing.assert_allclose(U_new.numpy(), V.double().mean(0).numpy(), rtol=1e-5, atol=1e-6)


def test_argmax_when_lambda_small():
    g = torch.Generator().manual_seed(3)
    U = torch.zeros(4, 3)
    V = torch.randn(8, 4, 3, generator=g)
    r = torch.tensor([0.1, 0.5, -1.0, 0.49, 0.2, 0.0, 0.3, 0.4])
    U_new, w = aisp_update(U, V, r, lam=1e-6, alpha=0.9999, sigma=0.5)
    expected = torch.zeros(8, dtype=torch.float64)
    expected[1] = 1
    np.testing.assert_allclose(w.numpy(), expected.numpy(), atol=1e-12)
    np.testing.assert_allclose(U_new.numpy(), V[1].numpy(), rtol=1e-6)


def test_stable_with_huge_rewards():
    V = torch.randn(4, 2, 3)
    r = torch.tensor([1e6, 1e6 + 1, -1e6, 0.0])
    U_new, w = aisp_update(torch.zeros(2, 3), V, r, lam=1.0, alpha=0.9999, sigma=0.5)
    assert torch.isfinite(w).all() and torch.isfinite(U_new).all()
    assert int(w.argmax()) == 1 and math.isclose(float(w.sum()), 1.0)


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="do not fit"):
        aisp_update(torch.zeros(2, 3), torch.zeros(4, 3, 3), torch.zeros(4), 1.0, 0.9, 0.5)


# ---------------------------------------------------------------------------- toy model
class ToyEngine:
    """A linear 'lm_head' over a fixed pre-logit: y_t = argmax W (z0 + v_t).

    Implements the engine interface the methods use (prefill/decode), no LLM involved.
    """

    def __init__(self, d=6, vocab=5, T=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(vocab, d, generator=g)
        # base pre-logit: token 0 is the greedy choice by a margin
        self.z0 = self.W[0] * 0.6
        self.hidden_size, self.max_new_tokens, self.max_batch_rows = d, T, 64
        self.device = torch.device("cpu")

    def prefill(self, prompts):
        class P(list):
            prompts = None

        p = P()
        p.prompts = list(prompts)
        return p

    def decode(self, prefix, slots, *, noise=None, uniforms=None, **_):
        B = len(slots)
        z = self.z0.expand(B, self.max_new_tokens, -1).clone()
        if noise is not None:
            z[:, : noise.shape[1]] += noise
        toks = (z @ self.W.T).argmax(-1)
        return [Sample(token_ids=row.tolist(), text=" ".join(map(str, row.tolist())), finish_reason="length")
                for row in toks]


class CountToken(RewardModel):
    """Reward: the fraction of tokens equal to a target token."""

    def __init__(self, target="3"):
        self.target = target

    def _score_batch(self, prompts, responses):
        return torch.tensor([r.split().count(self.target) / len(r.split()) for r in responses])


def test_toy_aisp_improves_and_beats_random_search():
    prompts = [Prompt.single(f"p{i}", "x") for i in range(4)]
    eng, rm = ToyEngine(), CountToken()
    n, kappa = 16, 12
    aisp = AISP(n=n, kappa=kappa, tau=8, lam=0.02, alpha=0.9999, sigma=0.5, final_candidate=False)
    bon = BoNGaussian(num_samples=n * kappa, sigma2=0.25, tau=8)  # same σ = 0.5: random search
    a_res, b_res = aisp(prompts, eng, rm, seed=0), bon(prompts, eng, rm, seed=0)
    for a, b in zip(a_res, b_res):
        assert a.num_samples == b.num_samples == n * kappa
        means = [it["mean"] for it in a.iterations]
        assert np.mean(means[-3:]) > means[0] + 0.2, means  # the distribution moves
        assert a.iterations[-1]["u_norm"] > 0 and a.iterations[-1]["ess"] >= 1
    a_mean = np.mean([r.reward for r in a_res])
    b_mean = np.mean([r.reward for r in b_res])
    assert a_mean > b_mean, (a_mean, b_mean)
    # samples after the first iterations are far better than random search's average
    a_late = np.mean([np.mean(r.sample_rewards[-n:]) for r in a_res])
    b_avg = np.mean([np.mean(r.sample_rewards) for r in b_res])
    assert a_late > b_avg + 0.3


def test_toy_best_so_far_and_final_candidate():
    prompts = [Prompt.single("p", "x")]
    eng, rm = ToyEngine(), CountToken()
    res = AISP(n=8, kappa=5, tau=8, lam=0.05, sigma=0.5)(prompts, eng, rm, seed=1)[0]
    assert res.num_samples == 8 * 5 + 1 and len(res.sample_rewards) == 41 and len(res.iterations) == 5
    best = [it["best_so_far"] for it in res.iterations]
    assert best == sorted(best)
    for k, it in enumerate(res.iterations):
        chunk = res.sample_rewards[k * 8 : (k + 1) * 8]
        assert it["max"] == max(chunk) and math.isclose(it["mean"], float(np.mean(chunk)), rel_tol=1e-6)
        assert it["best_so_far"] == max(res.sample_rewards[: (k + 1) * 8])
        assert math.isclose(it["kl"], it["u_norm"] ** 2 / (2 * 0.5**2))
    assert res.reward == max(res.sample_rewards)
    assert res.extra["final_candidate_reward"] == res.sample_rewards[-1]


def test_weights_are_the_gaussian_likelihood_ratio():
    """Eq. 12 from the densities: w̄ ∝ exp(r/λ) N(V | αÛ, σ²I) / N(V | Û, σ²I) (the prior
    relaxed to mean αÛ over the proposal Q_Û), with log N from torch.distributions."""
    g = torch.Generator().manual_seed(4)
    U = torch.randn(3, 5, generator=g, dtype=torch.float64)
    V = U + 0.5 * torch.randn(7, 3, 5, generator=g, dtype=torch.float64)
    r = torch.randn(7, generator=g, dtype=torch.float64)
    for alpha in (0.5, 0.9, 0.9999):
        def log_n(mean):
            return torch.distributions.Normal(mean, 0.5).log_prob(V).sum(dim=(1, 2))

        log_w = r / 0.7 + log_n(alpha * U) - log_n(U)
        expected = torch.softmax(log_w, dim=0)
        np.testing.assert_allclose(aisp_weights(U, V, r, lam=0.7, alpha=alpha, sigma=0.5).numpy(), expected.numpy(),
                                   rtol=1e-9)


# ---------------------------------------------------------------------------- what the engine is given
class RecordingEngine(ToyEngine):
    """ToyEngine that keeps a copy of the noise of every ``decode`` call."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.noise: list[torch.Tensor] = []

    def decode(self, prefix, slots, *, noise=None, **kw):
        self.noise.append(None if noise is None else noise.clone())
        return super().decode(prefix, slots, noise=noise, **kw)


class Scripted(RewardModel):
    """CountToken's reward, with NaN (or another value) put on given rows of given ``score`` calls."""

    def __init__(self, script=None):
        self.inner, self.script, self.calls = CountToken(), script or {}, 0

    def _score_batch(self, prompts, responses):
        return self.inner._score_batch(prompts, responses)

    def score(self, prompts, responses):
        r = super().score(prompts, responses)
        for row, value in self.script.get(self.calls, {}).items():
            r[row] = value
        self.calls += 1
        return r


def hand_means(V_calls, sample_rewards, n, lam, alpha, sigma):
    """Û_1 = 0, Û_{k+1} from Eq. 12 by hand over iteration k's finite rewards (Û kept if none)."""
    U = [np.zeros(V_calls[0].shape[1:])]
    for k, V in enumerate(V_calls):
        r = np.asarray(sample_rewards[k * n : (k + 1) * n])
        ok = np.isfinite(r)
        U.append(eq12_by_hand(U[-1], V.numpy()[ok], r[ok], lam, alpha, sigma)[0] if ok.any() else U[-1])
    return U


def test_aisp_noise_is_sigma_eps_with_fresh_eps_per_k_and_final_is_U_star():
    """Algorithm 1 through the engine interface: V_k = Û_k + σ ε_k with ε_k ~ N(0, I) new at
    every k, and the y(U*) candidate decoded with noise U* = Û_{κ+1}."""
    eng, n, kappa, sigma, lam = RecordingEngine(d=16, T=8), 64, 3, 0.5, 0.05
    res = AISP(n=n, kappa=kappa, tau=8, lam=lam, alpha=0.9, sigma=sigma)([Prompt.single("p", "x")], eng,
                                                                          CountToken(), seed=0)[0]
    assert len(eng.noise) == kappa + 1 and eng.noise[0].shape == (n, 8, 16)
    U = hand_means(eng.noise[:kappa], res.sample_rewards, n, lam, 0.9, sigma)
    eps = [(V.double().numpy() - U[k]) / sigma for k, V in enumerate(eng.noise[:kappa])]
    for e in eps:  # n·τ·d = 8192 draws each: std within ~1.6% (2 s.e.) of 1
        assert abs(e.std() - 1) < 0.03 and abs(e.mean()) < 0.03, (e.std(), e.mean())
    for a, b in zip(eps, eps[1:]):
        assert not np.allclose(a, b, atol=0.1)
    assert np.abs(U[kappa]).max() > 0.01  # Û moved, so the next assert is not 0 == 0
    np.testing.assert_allclose(eng.noise[-1][0].numpy(), U[kappa], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sigma2", [0.5, 2.0])
def test_bon_gaussian_noise_has_variance_sigma2(sigma2):
    eng = RecordingEngine(d=16, T=8)
    BoNGaussian(num_samples=64, sigma2=sigma2, tau=8)([Prompt.single("p", "x")], eng, CountToken(), seed=0)
    v = torch.cat(eng.noise).double()
    assert v.shape == (64, 8, 16)
    assert abs(float(v.std()) / math.sqrt(sigma2) - 1) < 0.03 and abs(float(v.mean())) < 0.03 * math.sqrt(sigma2)


# ---------------------------------------------------------------------------- best-of and non-finite rewards
def samples(k):
    return [Sample(token_ids=[0] * (i + 1), text=f"s{i}", finish_reason="length") for i in range(k)]


def tracked(rewards):
    t = Tracker("p")
    t.add(samples(len(rewards)), torch.tensor(rewards))
    return t.result()


def test_tie_keeps_the_earlier_sample():
    res = tracked([1.0, 2.0, 0.5, 2.0, 2.0])
    assert res.response == "s1" and res.reward == 2.0 and res.response_tokens == 2
    assert "nonfinite_rewards" not in res.extra  # all finite: the record is as before


def test_nonfinite_reward_never_wins_unless_all_are():
    nan, inf = math.nan, math.inf
    res = tracked([nan, 0.3, inf, -inf, 0.7, nan, 0.7])
    assert (res.response, res.reward, res.extra["nonfinite_rewards"]) == ("s4", pytest.approx(0.7), 4)
    assert res.num_samples == 7 and len(res.sample_rewards) == 7 and np.isnan(res.sample_rewards[0])
    res = tracked([nan, -inf, inf])  # no finite reward: the first sample, reward NaN, still a record
    assert res.response == "s0" and math.isnan(res.reward) and res.extra["nonfinite_rewards"] == 3
    # the report's curves take the same best-of
    for r in ([nan, 0.3, inf, -inf, 0.7, nan], [nan, -inf, inf]):
        best = tracked(r).reward
        assert np.allclose(expected_best(r, [len(r)])[-1], best, equal_nan=True)
        assert np.allclose(compute_curve({"sample_rewards": r, "seconds": 1.0})["best"][-1], best, equal_nan=True)


def test_nonfinite_rewards_get_weight_zero():
    g = torch.Generator().manual_seed(5)
    U = torch.randn(3, 4, generator=g)
    V = U + 0.5 * torch.randn(6, 3, 4, generator=g)
    r = torch.tensor([0.2, math.nan, 0.9, math.inf, -math.inf, 0.4])
    U_new, w = aisp_update(U, V, r, lam=0.5, alpha=0.9, sigma=0.5)
    ok = torch.isfinite(r)
    U_ref, w_ref = eq12_by_hand(U, V[ok], r[ok], 0.5, 0.9, 0.5)
    np.testing.assert_allclose(w[ok].numpy(), w_ref, rtol=1e-12)
    assert (w[~ok] == 0).all()
    np.testing.assert_allclose(U_new.numpy(), U_ref, rtol=1e-5, atol=1e-6)
    # no finite reward: no weights (NaN), Û unchanged
    U_same, w = aisp_update(U, V, torch.full((6,), math.nan), lam=0.5, alpha=0.9, sigma=0.5)
    assert torch.equal(U_same, U) and torch.isnan(w).all()


def test_aisp_run_with_nonfinite_rewards():
    """NaN on rows 0, 3 at k=1, every row at k=2, +inf on row 5 at k=3: Û follows Eq. 12 over
    the finite rewards and stays at k=2, the best and the diagnostics ignore them, the
    record counts them."""
    n, lam, sigma = 8, 0.05, 0.5
    eng = RecordingEngine()
    rm = Scripted({0: {0: math.nan, 3: math.nan}, 1: {i: math.nan for i in range(n)}, 2: {5: math.inf}})
    aisp = AISP(n=n, kappa=4, tau=8, lam=lam, alpha=0.9, sigma=sigma)
    res = aisp([Prompt.single("p", "x")], eng, rm, seed=2)[0]
    assert all(torch.isfinite(v).all() for v in eng.noise)
    # Û_k from the noise the engine got: V_k − σ ε_k
    U = [(V - aisp.draw_V(torch.zeros(8, 6), 2, "p", k + 1))[0] for k, V in enumerate(eng.noise[:4])]
    U_hand = hand_means(eng.noise[:4], res.sample_rewards, n, lam, 0.9, sigma)
    for k in range(4):
        np.testing.assert_allclose(U[k].numpy(), U_hand[k], rtol=1e-4, atol=1e-5)
    assert torch.allclose(U[2], U[1], atol=1e-6) and U[1].abs().max() > 0.01  # no finite reward at k=2: Û stays
    np.testing.assert_allclose(eng.noise[4][0].numpy(), U_hand[4], rtol=1e-4, atol=1e-5)
    r = np.array(res.sample_rewards)
    finite = np.where(np.isfinite(r), r, np.nan)
    assert res.reward == np.nanmax(finite) and res.extra["nonfinite_rewards"] == 2 + n + 1
    it = res.iterations
    assert it[0]["mean"] == pytest.approx(np.nanmean(finite[:n])) and it[0]["max"] == np.nanmax(finite[:n])
    assert math.isnan(it[1]["mean"]) and math.isnan(it[1]["max"]) and math.isnan(it[1]["ess"])
    assert it[1]["best_so_far"] == it[0]["best_so_far"] == np.nanmax(finite[:n])
    assert it[2]["max"] == np.nanmax(finite[2 * n : 3 * n]) and math.isfinite(it[2]["ess"])
