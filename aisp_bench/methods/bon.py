"""Best-of-N baselines: N samples per prompt, the highest reward wins.

* ``BoNTopP``: temperature + nucleus sampling (the paper: T = 0.6, p = 0.9).
* ``BoNGaussian``: greedy decoding on pre-logits with noise v_t ~ N(0, σ²I) for t <= τ
  (the paper: σ² = 0.5, i.e. a standard deviation of about 0.707).

Row i of a prompt draws its randomness from a generator seeded by (run seed, prompt id,
i), so the rows can be decoded in any chunking and the first n·k samples of an N-sample
run are exactly an (n·k)-sample run (which Figure 2 relies on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from aisp_bench.methods.base import METHODS, Method, Tracker, check_positive
from aisp_bench.seeding import gaussian_rows, uniform_rows
from aisp_bench.types import Prompt, Result, Sample


class _BestOfN(Method):
    stream: str

    def __init__(self, name: str, num_samples: int) -> None:
        check_positive("num_samples", num_samples, integer=True)
        self.name = name
        self.num_samples = num_samples

    @property
    def rows_per_prompt(self) -> int:
        return self.num_samples

    def _decode(self, engine, prefix, rows: list[tuple[int, int]], seed: int) -> list[Sample]:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[Prompt], engine, reward, seed: int) -> list[Result]:
        prefix = engine.prefill(prompts)
        trackers = [Tracker(p.id) for p in prompts]
        rows = [(p, i) for p in range(len(prompts)) for i in range(self.num_samples)]
        chunk = engine.max_batch_rows
        for s in range(0, len(rows), chunk):
            part = rows[s : s + chunk]
            samples = self._decode(engine, prefix, part, seed)
            rewards = reward.score([prompts[p] for p, _ in part], [x.text for x in samples])
            for p in range(len(prompts)):
                idx = [j for j, (q, _) in enumerate(part) if q == p]
                if idx:
                    trackers[p].add([samples[j] for j in idx], rewards[idx])
        return [t.result() for t in trackers]


@METHODS.register("bon_topp")
class BoNTopP(_BestOfN):
    """Best-of-N with temperature + top-p sampling.

    Args:
        name: run-folder name of the method.
        num_samples: N, samples per prompt.
        temperature: softmax temperature T.
        top_p: nucleus mass p (1.0 disables the filter).
    """

    stream = "bon_topp"

    def __init__(self, name: str = "bon_topp", num_samples: int = 1024, temperature: float = 0.6,
                 top_p: float = 0.9) -> None:
        super().__init__(name, num_samples)
        check_positive("temperature", temperature)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"method.top_p must be in (0, 1], got {top_p!r}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def _decode(self, engine, prefix, rows, seed):
        u = torch.cat(
            [uniform_rows(seed, prefix.prompts[p].id, self.stream, [i], engine.max_new_tokens) for p, i in rows]
        )
        slots = [p for p, _ in rows]
        return engine.decode(prefix, slots, uniforms=u, temperature=self.temperature, top_p=self.top_p)


@METHODS.register("bon_gaussian")
class BoNGaussian(_BestOfN):
    """Best-of-N with Gaussian pre-logit noise and greedy decoding (Eq. 3 with U = 0).

    Args:
        name: run-folder name of the method.
        num_samples: N, samples per prompt.
        sigma2: σ², the noise VARIANCE (the paper sets σ² = 0.5 for this baseline).
        tau: τ, the number of generated steps that get noise.
    """

    stream = "bon_gaussian"

    def __init__(self, name: str = "bon_gaussian", num_samples: int = 1024, sigma2: float = 0.5,
                 tau: int = 128) -> None:
        super().__init__(name, num_samples)
        check_positive("sigma2", sigma2)
        check_positive("tau", tau, integer=True)
        self.sigma2 = float(sigma2)
        self.tau = tau

    def _decode(self, engine, prefix, rows, seed):
        tau = min(self.tau, engine.max_new_tokens)
        sigma = math.sqrt(self.sigma2)
        v = torch.cat(
            [
                gaussian_rows(seed, prefix.prompts[p].id, self.stream, [i], (tau, engine.hidden_size), engine.device)
                for p, i in rows
            ]
        ).mul_(sigma)
        return engine.decode(prefix, [p for p, _ in rows], noise=v)
