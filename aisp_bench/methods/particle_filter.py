r"""Particle filtering (Puri et al. 2025, "A Probabilistic Inference Approach to Inference-Time
Scaling of LLMs using Particle-Based Monte Carlo Methods", Algorithm 1): N partial
responses (particles) are reweighted by the reward of their partial text and resampled,
step after step.

As published (r̂ a process reward model, its score used as a log-weight)::

    x_1^i ~ p(· | c),  i = 1..N                     (each particle's first step)
    for t = 1, 2, ... while a particle is unfinished:
        w_t = softmax_i( r̂(c, x_{1:t}^i) )
        a_t^i ~ Categorical(w_t),  i = 1..N          (multinomial resampling)
        x_{1:t}^i ← x_{1:t}^{a_t^i}
        x_{t+1}^i ~ p(· | c, x_{1:t}^i)              (a finished particle stays finished)
    return the particle with the highest weight

Here, per prompt c::

    decode N rows to k tokens, row i with BoN top-p's uniforms for sample i
    for each boundary t = k, 2k, ... < T (while a particle is live; then they stay as they are):
        r^i: the reward of row i's response so far (a finished row's once)
        w = softmax(r / β),  ESS = 1 / Σ_i (w^i)²
        a = resample(w): multinomial (the paper) or systematic; N ancestors, sorted
        rows ← rows[a]  (``select``: a row's KV, tokens and finished state are copied)
        decode on to the next boundary, row i with uniforms seeded by (seed, c, s, i)
    return the finished particle with the highest reward; record beside it the particle
    drawn from softmax(r / β) of the final rewards (``weighted_choice``)

=====================  ==========  =====================================================
symbol                 shape       meaning
=====================  ==========  =====================================================
N (num_particles)      int         particles per prompt
k (segment_tokens)     int / list  a resampling boundary every k tokens (or these token
                                   counts), 0 < t < T
T                      int         ``max_new_tokens``
β (reward_temperature) > 0         temperature of the weights
r                      (N,)        rewards of the particles' responses so far
w                      (N,)        normalised weights softmax(r / β) (float64; a
                                   non-finite reward gets weight 0; none finite: uniform)
ESS                    scalar      effective sample size 1 / Σ w², in [1, N]
a                      (N,)        ancestors: particle i continues particle a^i
=====================  ==========  =====================================================

Where this differs from the published algorithm, and why:

* **Steps are token segments** (``segment_tokens``): the paper splits reasoning steps at a
  delimiter ("\n\n"); free-form answers have none, so a step is k tokens.
* **The weights**: softmax(r / β). With β = 1 and a reward that is a log-odds, as the
  offline judge's log P(Yes) − log P(No), these are the paper's weights (the logit of the
  PRM's probability); β rescales other rewards (UltraRM's scores span about ±10).
* **Resampling**: multinomial as published, or systematic (``resampling``: one uniform, N
  evenly spaced points; the same expected copies with less noise). Ancestors are sorted,
  so copies of one particle are adjacent; finished particles take part with their final
  reward (as the authors' its_hub implementation) and stay finished.
* **Randomness**: the first segment draws BoN top-p's uniforms (row i: sample i, the same
  temperature and top-p), so with one segment (k ≥ T) the particles are BoN top-p's N
  samples and the record is BoN top-p's. After the s-th resampling, particle i draws
  uniforms seeded by (seed, prompt, ``particle_filter``, s, i): copies of one ancestor
  diverge. The ancestors use uniforms seeded by (seed, prompt,
  ``particle_filter/resample``, s), the final draw (seed, prompt, ``particle_filter/choice``).

Budget checkpoints: one, at N (the particle returned): N particles are not a prefix of
a larger run, so there are no checkpoints below N.

Record fields (beside the common ones): ``sample_rewards`` and ``sample_tokens`` are the N
final particles' rewards and response lengths (copies repeat); ``num_tokens`` counts
every token decoded, a copied prefix once and a dropped particle's tokens too, so it is
not Σ ``sample_tokens``; ``decision_points`` per resampling: tokens, live particles, ESS,
distinct ancestors, mean and max reward, seconds; ``weighted_choice``: the drawn
particle's index and reward (and its response when it is not the returned one);
``reward_calls``, ``reward_tokens`` (``methods.guided``); ``decode_passes`` 1 (one decode
of T steps, paused at each boundary: ``reward_calls`` counts the pauses).

Budget: at most N·T generated tokens (N·T when no particle ends early), so
``num_particles`` = BoN's N spends BoN's generated tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from aisp_bench.methods.base import Method, Tracker
from aisp_bench.methods.guided import Ledger, decision_points, reward_stats, score_rows
from aisp_bench.seeding import uniform_rows
from aisp_bench.types import Prompt, Result, Sample

SCHEMES = ("multinomial", "systematic")


def resampling_weights(rewards: torch.Tensor, temperature: float) -> torch.Tensor:
    """w = softmax(r / β) in float64, the max subtracted; a non-finite r gets weight 0, and
    with no finite r the weights are uniform."""
    r = rewards.double().reshape(-1)
    ok = torch.isfinite(r)
    if not ok.any():
        return torch.full_like(r, 1.0 / r.numel())
    s = torch.where(ok, r / temperature, -math.inf)
    w = torch.exp(s - s.max())
    return w / w.sum()


def effective_sample_size(w: torch.Tensor) -> float:
    """ESS = 1 / Σ w² of normalised weights."""
    return float(1.0 / (w.double() ** 2).sum())


def resample(w: torch.Tensor, u: torch.Tensor, scheme: str) -> torch.Tensor:
    """Ancestors (sorted) for normalised weights w (N,) by inverse CDF: ``multinomial``, one
    at each uniform of ``u``; ``systematic``, N at (u[0] + i) / N for i = 0..N-1."""
    n = w.numel()
    if scheme == "multinomial":
        points = torch.sort(u.double().reshape(-1)).values
    elif scheme == "systematic":
        points = (float(u.reshape(-1)[0]) + torch.arange(n, dtype=torch.float64)) / n
    else:
        raise ValueError(f"resampling must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    cdf = torch.cumsum(w.double(), 0)
    return torch.searchsorted(cdf, points * cdf[-1], right=True).clamp_(max=n - 1)


class ParticleFilter(Method):
    """Particle filtering (the module docstring). Args, the YAML keys of
    ``conf/method/particle_filter.yaml``: ``name``, ``num_particles`` (N), ``segment_tokens``
    (k, or a list of token counts), ``reward_temperature`` (β), ``resampling``
    (multinomial or systematic), ``temperature`` and ``top_p`` (the sampling, as BoN top-p)."""

    stream = "particle_filter"  # the later segments' seeds; the first segment's are BoN top-p's
    first_stream = "bon_topp"

    def __init__(self, name: str = "particle_filter", num_particles: int = 1024,
                 segment_tokens: int | Sequence[int] = 16, reward_temperature: float = 1.0,
                 resampling: str = "multinomial", temperature: float = 0.6, top_p: float = 0.9) -> None:
        if resampling not in SCHEMES:
            raise ValueError(f"resampling must be one of {', '.join(SCHEMES)}, got {resampling!r}")
        self.name = name
        self.num_particles = self.rows_per_prompt = int(num_particles)
        self.segment_tokens = segment_tokens if isinstance(segment_tokens, int) else [int(t) for t in segment_tokens]
        self.reward_temperature, self.resampling = float(reward_temperature), resampling
        self.temperature, self.top_p = float(temperature), float(top_p)

    def schedule(self, max_new_tokens: int) -> list[tuple[int, int]]:
        """(t, N) at each boundary, then (T, N) (``guided.upper_bounds`` makes them a budget)."""
        points = decision_points(self.segment_tokens, max_new_tokens)
        return [(t, self.num_particles) for t in [*points, max_new_tokens]]

    def uniforms(self, prompts: Sequence[Prompt], seed: int, s: int, T: int) -> torch.Tensor:
        """(P·N, T) the particles' uniforms after the s-th resampling (s = 0: BoN top-p's)."""
        N = self.num_particles
        if s == 0:
            return torch.cat([uniform_rows(seed, p.id, self.first_stream, range(N), T) for p in prompts])
        return torch.cat([uniform_rows(seed, p.id, self.stream, range(N), T, s) for p in prompts])

    def __call__(self, prompts: Sequence[Prompt], engine, reward, seed: int) -> list[Result]:
        P, N, T = len(prompts), self.num_particles, engine.max_new_tokens
        prefix = engine.prefill(prompts)
        dec = engine.start(prefix, torch.arange(P).repeat_interleave(N))
        ledgers = [Ledger(prefix.prompt_tokens[p]) for p in range(P)]
        final = torch.zeros(P * N, dtype=torch.bool)  # the row's score is its finished response's
        score = torch.full((P * N,), math.nan)
        s = 0
        for t in [*decision_points(self.segment_tokens, T), T]:
            t0 = time.perf_counter()
            gen = dec.run(t, uniforms=self.uniforms(prompts, seed, s, T), temperature=self.temperature,
                          top_p=self.top_p)
            for p in range(P):
                ledgers[p].generated += int(gen[p * N : (p + 1) * N].sum())
            need = (~final).nonzero().squeeze(1)
            score[need] = score_rows(reward, prompts, dec.prompt_of_row, dec.responses(), need, ledgers)
            final |= dec.finished
            if t == T or dec.done:
                break
            s += 1
            idx = self._resample(prompts, seed, s, t, score, dec.finished, ledgers, time.perf_counter() - t0)
            dec.select(idx)
            score, final = score[idx], final[idx]
        responses = dec.responses()
        return [self._result(prompts[p].id, seed, responses[p * N : (p + 1) * N], score[p * N : (p + 1) * N],
                             ledgers[p]) for p in range(P)]

    def _resample(self, prompts: Sequence[Prompt], seed: int, s: int, t: int, score: torch.Tensor,
                  finished: torch.Tensor, ledgers: list[Ledger], seconds: float) -> torch.Tensor:
        """The ancestors of every prompt's particles at the s-th resampling (global row indices);
        each prompt's diagnostics appended."""
        N, out = self.num_particles, []
        for p, prompt in enumerate(prompts):
            r = score[p * N : (p + 1) * N]
            if finished[p * N : (p + 1) * N].all():  # this prompt is done (as if decoded alone): no resampling
                out.append(torch.arange(p * N, (p + 1) * N))
                continue
            w = resampling_weights(r, self.reward_temperature)
            u = uniform_rows(seed, prompt.id, f"{self.stream}/resample", [0], N, s)[0]
            a = resample(w, u, self.resampling)
            out.append(a + p * N)
            ledgers[p].points.append({
                "tokens": t, "live": int((~finished[p * N : (p + 1) * N]).sum()), "ess": effective_sample_size(w),
                "unique_ancestors": int(torch.unique(a).numel()), **reward_stats(r), "seconds": seconds / len(prompts)})
        return torch.cat(out)

    def _result(self, prompt_id: str, seed: int, particles: list[Sample], r: torch.Tensor, ledger: Ledger) -> Result:
        """The best finished particle, and beside it the one drawn from softmax(r / β)."""
        best = Tracker(prompt_id, frozenset({len(particles)}))  # in order: ties keep the lower index; checkpoint at N
        best.add(particles, r)
        w = resampling_weights(r, self.reward_temperature)
        j = int(resample(w, uniform_rows(seed, prompt_id, f"{self.stream}/choice", [0], 1)[0], "multinomial")[0])
        drawn = {"particle": j, "reward": float(r[j])}
        if particles[j] is not best.best:
            drawn["response"] = particles[j].text
        res = best.result(decode_passes=1, weighted_choice=drawn, **ledger.extra())
        res.num_tokens = ledger.generated
        return res
