"""The three methods, one signature: ``method(prompts, engine, reward, seed) -> list[Result]``."""

from aisp_bench.methods.aisp import AISP, aisp_update, aisp_weights
from aisp_bench.methods.base import Method
from aisp_bench.methods.bon import BoNGaussian, BoNTopP

__all__ = ["AISP", "BoNGaussian", "BoNTopP", "Method", "aisp_update", "aisp_weights"]
