"""Reward models r(x, y), one interface: ``reward.score(prompts, responses) -> tensor``.

Built from ``conf/reward/*.yaml`` (constructor arguments = YAML keys) and loaded lazily:

* ``RegressionHeadReward``: UltraRM-13b (Llama) and Eurus-RM-7b (Mistral), a decoder
  plus a linear regression head (``conf/reward/ultrarm.yaml``, ``eurus.yaml``).
* ``HFClassifierReward``: any one-output ``AutoModelForSequenceClassification``.
* ``LMJudgeReward``: a small instruct LM answering Yes/No (the offline default,
  SmolLM2-135M-Instruct).
* ``EmbeddingSimilarityReward``: MiniLM prompt/response cosine (fast, offline).

What each measures and its limits: docs/models.md.
"""

from aisp_bench.rewards.base import DecoderReward, RewardModel, TextPairReward
from aisp_bench.rewards.classifier import HFClassifierReward
from aisp_bench.rewards.lm_judge import LMJudgeReward
from aisp_bench.rewards.regression_head import RegressionHeadModel, RegressionHeadReward
from aisp_bench.rewards.similarity import EmbeddingSimilarityReward

__all__ = [
    "RewardModel",
    "DecoderReward",
    "TextPairReward",
    "RegressionHeadModel",
    "RegressionHeadReward",
    "HFClassifierReward",
    "LMJudgeReward",
    "EmbeddingSimilarityReward",
]
