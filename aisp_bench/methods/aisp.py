r"""AISP: adaptive importance sampling on the pre-logit space (Algorithm 1 of the paper).

The policy's pre-logit z_t (input of ``lm_head``) gets noise v_t ~ N(u_t, σ²I) for the
first τ generated tokens, and tokens are decoded greedily (Eq. 3). AISP adapts the noise
mean U by importance sampling towards q*(V) ∝ exp(r(x, y(V)) / λ) p(V) (Eq. 7):

    Û = 0, r_best = -inf
    for k = 1..κ:
        V^i ~ N(Û, σ²I),  i = 1..n                 (n rows decoded in parallel)
        r_i = r(x, y(V^i)); keep the best y so far
        w̄^i = softmax_i( r_i/λ − (1−α)/σ² Σ_t û_tᵀ v_t^i )          (Eq. 12)
        Û ← Σ_i w̄^i V^i
    decode y(U*) with V = U* = Û as a last candidate; keep it if better

Symbols and shapes (d: hidden size of the policy):

=========  ==============  ==========================================================
symbol     shape           meaning
=========  ==============  ==========================================================
U, Û       (τ, d)          mean of the pre-logit noise (one row per noisy step)
V          (n, τ, d)       the n noise sequences of one iteration, V^i ~ N(Û, σ²I)
r          (n,)            rewards r(x, y(V^i))
w̄          (n,)            normalised importance weights (Eq. 12), sum to 1
λ (lam)    scalar > 0      temperature of the weights; the paper tunes it so that
                           std(r/λ) is about one digit
α (alpha)  (0, 1]          MPPI relaxation of the prior mean to αÛ; α = 1 gives Eq. 11
σ (sigma)  scalar > 0      noise standard deviation (0.5 in the paper)
n          int             samples per iteration
κ (kappa)  int             iterations
τ (tau)    int             noisy steps (clipped to max_new_tokens: later steps never
                           reach the model)
=========  ==============  ==========================================================

Non-finite rewards (NaN, ±inf: a failed reward call) get weight 0 (r_i = −inf inside the
softmax); an iteration with no finite reward leaves Û as it was (the weights, 0/0, are NaN
and so is that iteration's ESS). They never become y_best unless all are non-finite
(``Tracker``), and the per-iteration mean, max and std(r/λ) are over the finite rewards.

Budget: n·κ samples, plus the y(U*) candidate (``num_samples = n·κ + 1``) unless
``final_candidate`` is off, which gives a budget strictly equal to BoN's N = n·κ.
Budget checkpoints (``Tracker``): y_best after each iteration k (n·k samples), and after
the y(U*) candidate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from aisp_bench.methods.base import Method, Tracker
from aisp_bench.seeding import gaussian_rows
from aisp_bench.types import Prompt, Result


def aisp_weights(U: torch.Tensor, V: torch.Tensor, rewards: torch.Tensor, lam: float, alpha: float,
                 sigma: float) -> torch.Tensor:
    """w̄ of Eq. 12 for one prompt, float64, via a stable softmax (max subtracted).

    s_i = r_i/λ − (1−α)/σ² Σ_t û_tᵀ v_t^i;   w̄ = exp(s − max s) / Σ exp(s − max s)

    A non-finite r_i counts as −inf (w̄^i = 0); with no finite r_i, w̄ is all NaN.
    """
    r = rewards.to(torch.float64).reshape(-1)
    r = torch.where(torch.isfinite(r), r, -torch.inf)
    if not torch.isfinite(r).any():
        return torch.full_like(r, torch.nan)
    coupling = torch.einsum("td,itd->i", U.to(torch.float64), V.to(torch.float64))
    s = r / lam - (1.0 - alpha) / sigma**2 * coupling.to(r.device)
    s = s - s.max()
    w = torch.exp(s)
    return w / w.sum()


def aisp_update(U: torch.Tensor, V: torch.Tensor, rewards: torch.Tensor, lam: float, alpha: float,
                sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One adaptive importance sampling step: (Û_new, w̄) with Û_new = Σ_i w̄^i V^i.

    U: (τ, d); V: (n, τ, d); rewards: (n,). Returns Û_new with U's dtype and device and
    the float64 weights (n,). With no finite reward, Û_new = Û (nothing to weight by).
    """
    if V.dim() != 3 or U.shape != V.shape[1:] or rewards.numel() != V.shape[0]:
        raise ValueError(f"shapes U {tuple(U.shape)}, V {tuple(V.shape)}, rewards {tuple(rewards.shape)} "
                         "do not fit (tau, d), (n, tau, d), (n,)")
    w = aisp_weights(U, V, rewards, lam, alpha, sigma)
    if not torch.isfinite(rewards).any():  # no finite reward at this iteration: Û stays for the next one
        return U, w
    U_new = torch.einsum("i,itd->td", w.to(device=V.device, dtype=torch.float64), V.to(torch.float64))
    return U_new.to(dtype=U.dtype, device=U.device), w


def diagnostics(k: int, r: torch.Tensor, w: torch.Tensor, U: torch.Tensor, lam: float, sigma: float,
                best_so_far: float) -> dict[str, float]:
    """What one iteration did: rewards at k (the finite ones; NaN if none), effective sample
    size, size of Û, KL(Q_Û‖P)."""
    u_norm = float(U.double().norm())
    r = r[torch.isfinite(r)]
    some = r.numel() > 0
    return {
        "k": k,
        "mean": float(r.mean()) if some else math.nan,
        "max": float(r.max()) if some else math.nan,
        "best_so_far": best_so_far,
        "std_r_over_lam": float((r.double() / lam).std(unbiased=False)) if some else math.nan,
        "ess": float(1.0 / (w.double() ** 2).sum()),
        "u_norm": u_norm,
        "kl": u_norm**2 / (2.0 * sigma**2),
    }


class AISP(Method):
    """Adaptive importance sampling of the pre-logit noise mean (Algorithm 1).

    Args, the YAML keys of ``conf/method/aisp.yaml``: ``name`` (of the run folder), the
    symbols of the table above (n, kappa, tau, lam, alpha, sigma) and ``final_candidate``
    (decode y(U*) after the last iteration).
    """

    def __init__(self, name: str = "aisp", n: int = 32, kappa: int = 32, tau: int = 128, lam: float = 0.7,
                 alpha: float = 0.9999, sigma: float = 0.5, final_candidate: bool = True) -> None:
        self.name = name
        self.n, self.kappa, self.tau = n, kappa, tau
        self.rows_per_prompt = n
        self.lam, self.alpha, self.sigma = float(lam), float(alpha), float(sigma)
        self.final_candidate = bool(final_candidate)

    def draw_V(self, U: torch.Tensor, seed: int, prompt_id: str, k: int) -> torch.Tensor:
        """V^i ~ N(Û, σ²I) for i = 1..n, row i seeded by (seed, prompt, k, i): (n, τ, d)."""
        eps = gaussian_rows(seed, prompt_id, "aisp", range(self.n), tuple(U.shape), U.device, k)
        return U.unsqueeze(0) + self.sigma * eps

    def __call__(self, prompts: Sequence[Prompt], engine, reward, seed: int) -> list[Result]:
        P, n = len(prompts), self.n
        tau = min(self.tau, engine.max_new_tokens)
        prefix = engine.prefill(prompts)
        U = [torch.zeros(tau, engine.hidden_size, device=engine.device) for _ in prompts]
        budgets = frozenset([n * k for k in range(1, self.kappa + 1)]  # checkpoints: y_best after each k, y(U*)
                            + ([n * self.kappa + 1] if self.final_candidate else []))
        trackers = [Tracker(p.id, budgets) for p in prompts]
        iterations: list[list[dict]] = [[] for _ in prompts]
        prompt_of_row = torch.arange(P).repeat_interleave(n)
        rm_prompts = [p for p in prompts for _ in range(n)]
        for k in range(1, self.kappa + 1):
            t0 = time.perf_counter()
            V = [self.draw_V(U[p], seed, prompts[p].id, k) for p in range(P)]
            samples = engine.decode(prefix, prompt_of_row, noise=torch.cat(V))
            r = reward.score(rm_prompts, [s.text for s in samples]).view(P, n)
            seconds = (time.perf_counter() - t0) / P
            for p in range(P):
                rows = samples[p * n : (p + 1) * n]
                trackers[p].add(rows, r[p])
                U[p], w = aisp_update(U[p], V[p], r[p], self.lam, self.alpha, self.sigma)
                it = diagnostics(k, r[p], w, U[p], self.lam, self.sigma, trackers[p].best_reward)
                it.update(tokens=sum(s.num_tokens for s in rows), seconds=seconds)
                iterations[p].append(it)
        extra: list[dict] = [{} for _ in prompts]
        if self.final_candidate:
            t0 = time.perf_counter()
            finals = engine.decode(prefix, torch.arange(P), noise=torch.stack(U))
            r = reward.score(list(prompts), [s.text for s in finals])
            for p in range(P):
                trackers[p].add([finals[p]], r[p : p + 1])
                extra[p] = {"final_candidate_reward": float(r[p]),
                            "final_candidate_seconds": (time.perf_counter() - t0) / P}
        passes = self.kappa + int(self.final_candidate)  # each iteration's decode needs the Û of the one before
        return [t.result(iterations[p], passes, tau=tau, **extra[p]) for p, t in enumerate(trackers)]
