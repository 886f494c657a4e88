r"""Speculative Rejection (Sun et al., NeurIPS 2024, "Fast Best-of-N Decoding via Speculative
Rejection", Algorithm 1): a large Best-of-N batch whose low-scoring partial responses are
dropped early.

As published::

    I ← b empty responses                                (b: the initial batch size)
    while some Y ∈ I is unfinished:
        decode the unfinished Y ∈ I on to the decision token (the GPU memory is full)
        s(X, Y) for every Y ∈ I                           (partial responses scored)
        I ← {Y ∈ I : s(X, Y) ≥ r_α}                       (r_α: the α-quantile: drop the lowest α)
    return argmax_{Y ∈ I} s(X, Y)

Here, per prompt X::

    I ← rows 0..N−1, row i drawing the uniforms u_i of BoN top-p's sample i
    for t = t_1 < t_2 < ... < t_D, then T:
        decode the live rows of I to t tokens (``engine.start``: one decode, paused)
        score each row of I not scored with its current response yet (a live row: its
        partial text; a finished row: its response, once)
        stop if t = T or every row of I finished (then I stays as it is)
        keep the round((1−α)·|I|) rows of I (at least 1) with the highest scores
        (ties: the lower sample index), drop the others with their KV
    return the finished row of I with the highest reward

=================  =========  ===========================================================
symbol             shape      meaning
=================  =========  ===========================================================
N (num_samples)    int        rows started per prompt (the paper's initial batch size b)
α (rejection_rate) [0, 1)     fraction of I dropped at each decision point
t_j                D ints     decision points (``decision_tokens``: every k tokens, or a
                              list), 0 < t_j < T
T                  int        ``max_new_tokens``
I                  |I| rows   the rows still in the race (live or finished)
s                  (|I|,)     their scores at a decision point: r(x, partial y) for live
                              rows, r(x, y) for finished ones
u                  (N, T)     row i's uniforms: BoN top-p's sample i (stream ``bon_topp``)
=================  =========  ===========================================================

Where this differs from the published algorithm, and why:

* **Decision points by token count**, not by memory: the paper pauses when the batch's
  KV cache fills the GPU (its first decision token), which makes results depend on the
  card; a fixed schedule (``decision_tokens``) is part of the config and gives the same
  run on any device (the authors' later code also takes a fixed ``decision_token``).
* **The count kept**: round((1−α)·|I|) (Python's rounding, as the authors' code), at least
  one row, so some response always finishes; ties in score keep the lower sample index.
* **Finished rows stay in I** with their final reward, ranked with the partial scores
  (as the authors' code ranks finished trajectories); they are never decoded again.
* **Randomness**: row i draws exactly BoN top-p's uniforms for sample i (temperature and
  top-p as BoN top-p), so a row that is never dropped is BoN top-p's sample i, and
  ``rejection_rate=0`` gives BoN top-p's record for every prompt (the same samples,
  rewards, tokens and chosen response; partial scoring still runs and is counted).

Budget checkpoints: one, at N (the response returned). Stopping earlier is not a smaller
run of this method (the schedule of decision points depends on T, not on N), so there are
no checkpoints below N, unlike BoN's prefixes.

Record fields (beside the common ones): ``sample_rewards`` and ``sample_tokens`` list
every started row in sample order (a dropped row: its last partial score and the tokens
it generated, so ``num_tokens`` is every token decoded); ``rejected_at`` gives each row's
decision point of rejection (null: it finished in I); ``decision_points`` per point: its
tokens, rows in I, live rows, rows kept, the lowest kept score (``threshold``), mean and
max score, seconds, and every row's score (``scores``, by ``samples``: sample indices);
``reward_calls``, ``reward_tokens`` (``methods.guided``). ``decode_passes`` is 1: the
segments are one decode of T steps, paused for scoring (``reward_calls`` counts the
pauses).

Budget: about Σ_j |I_j|·(t_j − t_{j−1}) generated tokens per prompt (less when rows end
early). ``conf/method/spec_rejection.yaml`` matches BoN's N·T: N_SR = 2N, α = 1/2 and a
decision point every T/4 tokens spend (2 + 1 + 1/2 + 1/4)/4 = 15/16 of it.
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


def keep_top(scores: torch.Tensor, rejection_rate: float) -> torch.Tensor:
    """The rows kept at a decision point: the round((1−α)·m) (at least 1) highest scores, ties
    to the lower index, non-finite scores last; returned in ascending row order."""
    m = int(scores.numel())
    k = max(1, round((1.0 - rejection_rate) * m))
    s = torch.where(torch.isfinite(scores), scores.double(), -math.inf).tolist()
    order = sorted(range(m), key=lambda j: (-s[j], j))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


class SpecRejection(Method):
    """Speculative Rejection (the module docstring). Args, the YAML keys of
    ``conf/method/spec_rejection.yaml``: ``name``, ``num_samples`` (N), ``rejection_rate``
    (α), ``decision_tokens`` (every k tokens, or a list of token counts), ``temperature``
    and ``top_p`` (the sampling, as BoN top-p)."""

    stream = "bon_topp"  # a row's uniforms are BoN top-p's: rejection_rate 0 is BoN top-p

    def __init__(self, name: str = "spec_rejection", num_samples: int = 2048, rejection_rate: float = 0.5,
                 decision_tokens: int | Sequence[int] = 32, temperature: float = 0.6, top_p: float = 0.9) -> None:
        self.name = name
        self.num_samples = self.rows_per_prompt = int(num_samples)
        self.rejection_rate = float(rejection_rate)
        self.decision_tokens = decision_tokens if isinstance(decision_tokens, int) else [int(t) for t in decision_tokens]
        self.temperature, self.top_p = float(temperature), float(top_p)

    def schedule(self, max_new_tokens: int) -> list[tuple[int, int]]:
        """(t_j, |I_j|) at each decision point, then (T, |I|): the rows decoded to t_j when none
        ends early (``guided.upper_bounds`` makes them a budget)."""
        out, rows = [], self.num_samples
        for t in [*decision_points(self.decision_tokens, max_new_tokens), max_new_tokens]:
            out.append((t, rows))
            rows = max(1, round((1.0 - self.rejection_rate) * rows))
        return out

    def __call__(self, prompts: Sequence[Prompt], engine, reward, seed: int) -> list[Result]:
        P, N, T = len(prompts), self.num_samples, engine.max_new_tokens
        prefix = engine.prefill(prompts)
        sample = torch.arange(N).repeat(P)  # each current row's sample index i (its prompt: prompt_of_row)
        u = torch.cat([uniform_rows(seed, p.id, self.stream, range(N), T) for p in prompts])
        dec = engine.start(prefix, torch.arange(P).repeat_interleave(N))
        ledgers = [Ledger(prefix.prompt_tokens[p]) for p in range(P)]
        final = torch.zeros(P * N, dtype=torch.bool)  # the row's score is its finished response's
        score = torch.full((P * N,), math.nan)
        rows = [{"score": [math.nan] * N, "tokens": [0] * N, "rejected_at": [None] * N} for _ in prompts]
        for t in [*decision_points(self.decision_tokens, T), T]:
            t0 = time.perf_counter()
            gen = dec.run(t, uniforms=u, temperature=self.temperature, top_p=self.top_p)
            responses, owner = dec.responses(), dec.prompt_of_row
            need = (~final).nonzero().squeeze(1)
            score[need] = score_rows(reward, prompts, owner, responses, need, ledgers)
            final |= dec.finished
            for j, (p, i) in enumerate(zip(owner.tolist(), sample.tolist())):
                ledgers[p].generated += int(gen[j])
                rows[p]["tokens"][i] += int(gen[j])
                rows[p]["score"][i] = float(score[j])
            if t == T or dec.done:
                break
            keep = self._reject(t, owner, sample, score, dec.finished, rows, ledgers, time.perf_counter() - t0)
            if keep.numel() < owner.numel():
                dec.select(keep)
                u, sample, score, final = u[keep], sample[keep], score[keep], final[keep]
        responses = dec.responses()
        return [self._result(prompts[p].id, (dec.prompt_of_row == p).nonzero().squeeze(1), sample, responses, score,
                             rows[p], ledgers[p]) for p in range(P)]

    def _reject(self, t: int, owner: torch.Tensor, sample: torch.Tensor, score: torch.Tensor, finished: torch.Tensor,
                rows: list[dict], ledgers: list[Ledger], seconds: float) -> torch.Tensor:
        """The rows kept at decision point t (all prompts, in row order); each prompt's dropped
        rows marked and its diagnostics appended."""
        keep = []
        for p in range(len(ledgers)):
            mine = (owner == p).nonzero().squeeze(1)
            if finished[mine].all():  # this prompt is done (as if decoded alone): nothing to decide
                keep.append(mine)
                continue
            kept = mine[keep_top(score[mine], self.rejection_rate)]
            keep.append(kept)
            for i in sample[mine[~torch.isin(mine, kept)]].tolist():
                rows[p]["rejected_at"][i] = t
            ledgers[p].points.append({
                "tokens": t, "rows": int(mine.numel()), "live": int((~finished[mine]).sum()), "kept": int(kept.numel()),
                "threshold": float(score[kept].min()), **reward_stats(score[mine]),
                "seconds": seconds / len(ledgers), "samples": sample[mine].tolist(), "scores": score[mine].tolist()})
        return torch.cat(keep)

    def _result(self, prompt_id: str, mine: torch.Tensor, sample: torch.Tensor, responses: list[Sample],
                score: torch.Tensor, rows: dict, ledger: Ledger) -> Result:
        """A prompt's result from its rows of I (``mine``, finished; ``sample``: every row's sample
        index): the best of them; every started row in ``sample_*``; one budget checkpoint, at N."""
        best = Tracker(prompt_id)  # rows in sample order: ties keep the lower index, as BoN's
        best.add([responses[j] for j in mine.tolist()], score[mine])
        res = best.result(decode_passes=1, rejected_at=rows["rejected_at"], **ledger.extra())
        res.sample_rewards, res.sample_tokens = rows["score"], rows["tokens"]
        res.num_samples, res.num_tokens = self.num_samples, ledger.generated
        res.checkpoints = [{"samples": self.num_samples, "sample": int(sample[mine[best.best_index]]),
                            "reward": best.best_reward}]
        nonfinite = sum(not math.isfinite(r) for r in rows["score"])
        res.extra.pop("nonfinite_rewards", None)
        res.extra.update({"nonfinite_rewards": nonfinite} if nonfinite else {})
        return res
