"""The three methods on SmolLM2: sample counts, budgets, reproducibility under batching."""

from __future__ import annotations

import pytest
import torch

from aisp_bench.engine import Engine
from aisp_bench.methods import AISP, BoNGaussian, BoNTopP
from aisp_bench.rewards.base import RewardModel
from aisp_bench.types import Prompt

PROMPTS = [
    Prompt.single("q1", "Name a fruit that is yellow."),
    Prompt.single("q2", "Give one tip for sleeping better at night."),
]


class WordCount(RewardModel):
    """A deterministic stand-in reward for method tests: number of distinct words."""

    batch_size = 3

    def _score_batch(self, prompts, responses):
        return torch.tensor([float(len(set(r.lower().split()))) for r in responses])


def make_engine(policy, rows=64):
    return Engine(policy.model, policy.tokenizer, policy.render, max_new_tokens=12, max_batch_rows=rows,
                  add_special_tokens=False, check_prelogit=False)


METHOD_CASES = [
    (lambda: BoNTopP(num_samples=4), 4),
    (lambda: BoNGaussian(num_samples=4, sigma2=0.5, tau=12), 4),
    (lambda: AISP(n=2, kappa=2, tau=12, lam=0.5), 5),
    (lambda: AISP(n=2, kappa=2, tau=12, lam=0.5, final_candidate=False), 4),
]


@pytest.mark.slow
@pytest.mark.parametrize("make, expected", METHOD_CASES)
def test_counts_and_reproducibility(smollm2, make, expected):
    eng = make_engine(smollm2)
    res = make()(PROMPTS, eng, WordCount(), seed=7)
    for r, p in zip(res, PROMPTS):
        assert r.prompt_id == p.id
        assert r.num_samples == expected == len(r.sample_rewards) == len(r.sample_tokens)
        assert r.reward == max(r.sample_rewards)
        assert r.num_tokens == sum(r.sample_tokens) and all(1 <= t <= 12 for t in r.sample_tokens)
        assert r.response_tokens in r.sample_tokens
    # same seed -> same results, whatever the batch composition and chunk size
    again = make()(PROMPTS, eng, WordCount(), seed=7)
    alone = make()([PROMPTS[1]], make_engine(smollm2, rows=1), WordCount(), seed=7)
    assert [r.sample_rewards for r in again] == [r.sample_rewards for r in res]
    assert [r.response for r in again] == [r.response for r in res]
    assert alone[0].sample_rewards == res[1].sample_rewards and alone[0].response == res[1].response
    if hasattr(res[0], "iterations") and res[0].iterations:
        assert [it["u_norm"] for it in alone[0].iterations] == pytest.approx(
            [it["u_norm"] for it in res[1].iterations], rel=1e-5)


@pytest.mark.slow
def test_seed_changes_samples(smollm2):
    eng = make_engine(smollm2)
    a = BoNTopP(num_samples=4)(PROMPTS[:1], eng, WordCount(), seed=0)[0]
    b = BoNTopP(num_samples=4)(PROMPTS[:1], eng, WordCount(), seed=1)[0]
    assert a.sample_rewards != b.sample_rewards or a.sample_tokens != b.sample_tokens


@pytest.mark.slow
def test_bon_prefix_is_a_smaller_run(smollm2):
    """Row i depends only on (seed, prompt, i): the first k samples of N are a k-sample run."""
    eng = make_engine(smollm2)
    big = BoNGaussian(num_samples=6, tau=12)(PROMPTS[:1], eng, WordCount(), seed=3)[0]
    small = BoNGaussian(num_samples=3, tau=12)(PROMPTS[:1], eng, WordCount(), seed=3)[0]
    assert big.sample_rewards[:3] == small.sample_rewards


def test_the_method_group_builds_the_three_classes(compose):
    """``method=NAME`` builds the class through Hydra's ``_target_`` (the one way objects are
    built), its YAML keys the constructor's arguments, the budget shared by all three."""
    from hydra.utils import instantiate

    built = {name: instantiate(compose([f"method={name}"]).method) for name in ("aisp", "bon_topp", "bon_gaussian")}
    assert {k: type(v) for k, v in built.items()} == {"aisp": AISP, "bon_topp": BoNTopP, "bon_gaussian": BoNGaussian}
    aisp = built["aisp"]
    assert (aisp.n, aisp.kappa, aisp.tau) == (32, 32, 128)
    assert built["bon_topp"].num_samples == built["bon_gaussian"].num_samples == 32 * 32
