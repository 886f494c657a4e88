"""The methods, one signature: ``method(prompts, engine, reward, seed) -> list[Result]``.

BoN (top-p, Gaussian pre-logit noise) and AISP decode whole responses; Speculative
Rejection and particle filtering pause the decode to score partial responses
(``engine.start``, ``methods.guided``).
"""

from aisp_bench.methods.aisp import AISP, aisp_update, aisp_weights
from aisp_bench.methods.base import Method
from aisp_bench.methods.bon import BoNGaussian, BoNTopP
from aisp_bench.methods.particle_filter import ParticleFilter, effective_sample_size, resample, resampling_weights
from aisp_bench.methods.spec_rejection import SpecRejection, keep_top

__all__ = ["AISP", "BoNGaussian", "BoNTopP", "Method", "ParticleFilter", "SpecRejection", "aisp_update",
           "aisp_weights", "effective_sample_size", "keep_top", "resample", "resampling_weights"]
