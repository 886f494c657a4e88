"""The AISP update (Eq. 12) against a hand-written version, and AISP on a toy model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aisp_bench.methods.aisp import AISP, aisp_update, aisp_weights
from aisp_bench.methods.bon import BoNGaussian
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
