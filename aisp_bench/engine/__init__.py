"""The generation engine: the only code that runs the policy model's forward pass.

It decodes many rows at once on any ``transformers`` causal LM whose logits are
``lm_head(z_t)``, z_t being the final hidden state after the last norm (the paper's
pre-logit, Eq. 2). Per row it applies one of three rules:

* greedy on ``lm_head(z_t + v_t)`` with caller-given noise v_t for generated steps
  t = 1..τ and no noise after τ (Eq. 3; AISP and BoN with Gaussian pre-logit noise);
* temperature + top-p (nucleus) sampling, with the filter of ``transformers``'
  ``TopPLogitsWarper`` and one caller-given uniform per step (BoN top-p);
* plain greedy (no noise, no sampling).

How it is fast:

* ``prefill`` runs each prompt once (several prompts left-padded in one batch) and keeps
  its KV cache and its last pre-logit; ``decode`` can be called many times on one prefix
  (all of AISP's κ iterations reuse one prefill);
* the prompt's KV cache is shared by its rows, not copied (``shared_prefix``), unless
  ``attention="copy"`` (``Engine.attention_for``); per-chunk decode states: ``engine.rows``;
* the host reads the generated tokens only every ``sync_every`` steps (``engine.stopping``);
* rows that finish (EOS, a stop string, ``max_new_tokens``) leave the batch: the cache
  and every per-row tensor are compacted, so finished rows cost nothing more;
* ``decode_step="static"`` runs on fixed shapes per batch-size bucket, which
  ``decode_step="cuda_graph"`` captures in CUDA graphs (``StaticRows``);
* rows beyond ``max_batch_rows`` are decoded in successive chunks.

``Engine.response_logprobs`` (``engine.scoring``) runs the other direction: the
log-probability of given responses under the noise-free policy (``base_logprob``).

Randomness never comes from here: callers pass noise and uniforms drawn from generators
seeded per (run seed, prompt id, iteration, row), so results do not depend on batching.
"""

from aisp_bench.engine.core import Engine, Prefix, PromptTooLongError
from aisp_bench.engine.rows import SPAN, StaticRows
from aisp_bench.engine.sampling import sample_top_p, top_p_filter
from aisp_bench.engine.scoring import ResponseLogProb
from aisp_bench.engine.sizing import auto_attention
from aisp_bench.engine.stopping import stop_candidates

__all__ = [
    "SPAN", "Engine", "Prefix", "PromptTooLongError", "ResponseLogProb", "StaticRows", "auto_attention",
    "sample_top_p", "stop_candidates", "top_p_filter",
]  # fmt: skip
