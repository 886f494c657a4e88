"""Best-of-N baselines: N samples per prompt (``num_samples``), the highest reward wins.

* ``BoNTopP``: temperature + nucleus sampling (the paper: T = 0.6, p = 0.9).
* ``BoNGaussian``: greedy decoding on pre-logits with noise v_t ~ N(0, σ²I) for t <= τ
  (the paper: σ² = 0.5, i.e. a standard deviation of about 0.707).

Budget checkpoints: the best of the first 1, 2, 4, ... samples and of all N (``Tracker``).

Row i of a prompt draws its randomness from a generator seeded by (run seed, prompt id,
i), so the rows can be decoded in any chunking and the first n·k samples of an N-sample
run are exactly an (n·k)-sample run (which Figure 2 relies on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from aisp_bench.methods.base import Method, Tracker, powers_of_two
from aisp_bench.seeding import gaussian_rows, uniform_rows
from aisp_bench.types import Prompt, Result


class _BestOfN(Method):
    stream: str  # names the seeds (``name`` is the run folder's, which a user may change)

    def __init__(self, name: str, num_samples: int) -> None:
        self.name = name
        self.num_samples = self.rows_per_prompt = num_samples

    def _draws(self, engine, prefix, rows: list[tuple[int, int]], seed: int) -> dict:
        """``engine.decode``'s randomness for rows (prompt, i): noise or uniforms."""
        raise NotImplementedError

    def __call__(self, prompts: Sequence[Prompt], engine, reward, seed: int) -> list[Result]:
        prefix = engine.prefill(prompts)
        trackers = [Tracker(p.id, powers_of_two(self.num_samples)) for p in prompts]
        rows = [(p, i) for p in range(len(prompts)) for i in range(self.num_samples)]
        chunk = engine.max_batch_rows
        for s in range(0, len(rows), chunk):
            part = rows[s : s + chunk]
            samples = engine.decode(prefix, [p for p, _ in part], **self._draws(engine, prefix, part, seed))
            rewards = reward.score([prompts[p] for p, _ in part], [x.text for x in samples])
            for j, (p, _) in enumerate(part):  # in row order: ties keep the earlier sample
                trackers[p].add([samples[j]], rewards[j : j + 1])
        return [t.result(decode_passes=1) for t in trackers]  # the N rows depend on nothing: one pass


class BoNTopP(_BestOfN):
    """Best-of-N with temperature T and nucleus mass p (``top_p=1.0``: no filter)."""

    stream = "bon_topp"

    def __init__(self, name: str = "bon_topp", num_samples: int = 1024, temperature: float = 0.6,
                 top_p: float = 0.9) -> None:
        super().__init__(name, num_samples)
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def _draws(self, engine, prefix, rows, seed):
        u = [uniform_rows(seed, prefix.prompts[p].id, self.stream, [i], engine.max_new_tokens) for p, i in rows]
        return dict(uniforms=torch.cat(u), temperature=self.temperature, top_p=self.top_p)


class BoNGaussian(_BestOfN):
    """Best-of-N, greedy on pre-logits with noise N(0, σ²I) on the first τ steps (Eq. 3 with
    U = 0); ``sigma2`` is σ², the VARIANCE."""

    stream = "bon_gaussian"

    def __init__(self, name: str = "bon_gaussian", num_samples: int = 1024, sigma2: float = 0.5,
                 tau: int = 128) -> None:
        super().__init__(name, num_samples)
        self.sigma2 = float(sigma2)
        self.tau = tau

    def _draws(self, engine, prefix, rows, seed):
        shape = (min(self.tau, engine.max_new_tokens), engine.hidden_size)
        v = [gaussian_rows(seed, prefix.prompts[p].id, self.stream, [i], shape, engine.device) for p, i in rows]
        return dict(noise=torch.cat(v).mul_(math.sqrt(self.sigma2)))
