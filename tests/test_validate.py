"""The one table of config rules (aisp_bench/validate.py) and the front door's pre-flight."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from aisp_bench.cli import _parse_overrides, _sweep_jobs, hydra_message
from aisp_bench.validate import RULES, UserError, check, integer, problems, real, rule_for, walk

CONF = Path(__file__).resolve().parents[1] / "aisp_bench" / "conf"


def every_config():
    """(config name, overrides) for every option of every group, and the other commands' configs."""
    out = [("config", [f"{g}={p.stem}"]) for g in ("method", "model", "reward", "dataset", "experiment", "scale")
           for p in sorted((CONF / g).glob("*.yaml"))]
    out += [("evaluate", []), ("evaluate", ["reward=ultrarm"]), ("report", []), ("judge", []),
            ("judge", ["judge=reward_model", "reward=minilm_similarity"])]
    return out


def test_every_numeric_and_boolean_key_has_a_rule_and_every_shipped_config_passes(compose):
    """A new number or flag in a YAML needs its rule in validate.RULES; no shipped default is refused."""
    missing = set()
    for name, overrides in every_config():
        cfg = compose(overrides, config_name=name)
        assert problems(cfg) == [], (name, overrides)
        for path, value, _ in walk(cfg):
            if isinstance(value, (bool, int, float)) and not isinstance(value, (DictConfig, ListConfig)):
                missing |= {path} if rule_for(path) is None else set()
    assert missing == set(), f"add rules to validate.RULES for {sorted(missing)}"


@pytest.mark.parametrize(
    "rule, good, bad",
    [
        (integer(1), [1, 7], [0, -1, 1.0, 1.5, True, "2", None, math.inf]),
        (integer(0, null=True, words=("auto",)), [0, None, "auto"], ["Auto", -1, False]),
        (real(0, 1, open_low=True), [1, 0.5, 1e-9], [0, 1.01, math.nan, math.inf, "0.5", False]),
        (RULES["method.final_candidate"], [True, False], ["maybe", "true", 1, 0, None]),
        (RULES["generation.prompt_overflow"], ["skip", "truncate_left"], ["drop", None, 1]),
        (RULES["reward.empty_score"], [-1.0, 0, 3], [math.inf, -math.inf, math.nan, "x"]),
        (RULES["method.decision_tokens"], [1, 16, [4, 8], [32]], [0, [], [4, 0], [4, "x"], "4", [[4]], None]),
        (RULES["method.rejection_rate"], [0, 0.5, 0.99], [1, -0.1, math.nan, "0.5"]),
        (RULES["method.resampling"], ["multinomial", "systematic"], ["stratified", None, 1]),
    ],
)
def test_rules_accept_and_refuse(rule, good, bad):
    assert all(rule.accepts(v) for v in good) and not any(rule.accepts(v) for v in bad)


def test_messages_name_every_bad_key_at_its_source_and_cross_rules():
    cfg = OmegaConf.create({"budget": {"n": 0}, "method": {"n": "${budget.n}", "sigma": math.inf},
                            "seed": -1, "extra": {"x": math.nan}})
    # method.n is bad only through budget.n: named where it was set; a key without a rule: finite
    assert problems(cfg) == ["budget.n must be an integer >= 1, got 0", "method.sigma must be a finite number > 0, "
                             "got inf", "seed must be an integer >= 0, got -1", "extra.x must be finite, got nan"]
    with pytest.raises(UserError, match="^budget.n must .*; extra.x must be finite, got nan$"):
        check(cfg)
    shards = OmegaConf.create({"dataset": {"num_shards": 2, "shard": 2}})
    assert problems(shards) == ["dataset.shard must be < dataset.num_shards (2), got 2"]
    assert problems(OmegaConf.create({"dataset": {"num_shards": 0}})) == [
        "dataset.num_shards must be an integer >= 1, got 0"]
    assert problems(OmegaConf.create({"dataset": {"num_prompts": 3}})) == []  # no shard keys: no shard rule
    ctx = OmegaConf.create({"model": {"max_context": 128}, "generation": {"max_new_tokens": 128}})
    assert problems(ctx)[0].startswith("model.max_context (128) must be larger than generation.max_new_tokens")
    with pytest.raises(UserError, match="^method.lam: Interpolation key 'nosuch' not found$"):
        check(OmegaConf.create({"method": {"lam": "${nosuch}"}}))


def test_preflight_tries_every_value_of_every_sweep_once():
    parsed = _parse_overrides(["method=aisp,bon_topp", "seed=0,1,2", "budget.n=4"])
    assert _sweep_jobs(parsed) == [
        ["budget.n=4", "method=aisp", "seed=0"], ["budget.n=4", "method=bon_topp", "seed=0"],
        ["budget.n=4", "method=aisp", "seed=1"], ["budget.n=4", "method=aisp", "seed=2"]]
    with pytest.raises(UserError, match=r"^bad override 'method.lam=\[1': "):
        _parse_overrides(["seed=1", "method.lam=[1"])


def test_hydra_messages_in_one_line(compose):
    with pytest.raises(Exception) as e:
        compose(["method=aspi"])
    assert hydra_message(e.value) == ("In 'config': Could not find 'method/aspi'; available options in 'method': "
                                      "aisp, bon_gaussian, bon_topp, particle_filter, spec_rejection")
