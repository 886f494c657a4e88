"""The generation engine: every line that runs the policy model's decode loop.

It decodes many rows at once on any ``transformers`` causal LM whose logits are
``lm_head(z_t)``, z_t being the final hidden state after the last norm (the paper's
pre-logit, Eq. 2). Per row it applies one of three rules:

* greedy on ``lm_head(z_t + v_t)`` with caller-given noise v_t for generated steps
  t = 1..τ and no noise after τ (Eq. 3; AISP and BoN with Gaussian pre-logit noise);
* temperature + top-p (nucleus) sampling, with the filter of ``transformers``'
  ``TopPLogitsWarper`` and one caller-given uniform per step (BoN top-p);
* plain greedy (no noise, no sampling).

The modules, in the order a decode runs through them:

* ``core``: ``Engine``: ``prefill`` runs each prompt once (several prompts left-padded in
  one batch, ``padding.pad``) and keeps its KV cache and its last pre-logit (``Prefix``);
  ``decode`` can be called many times on one prefix (all of AISP's κ iterations reuse one
  prefill) and cuts its rows into chunks of ``max_batch_rows``;
* ``decoding``: a decode that pauses (``Engine.start``): decode a segment, hand back the
  partial responses, keep, drop or duplicate rows with their KV (``select``), continue
  (Speculative Rejection, particle filtering); ``decode`` is one segment from start to end;
* ``chunk``: one chunk's step loop and its state (``Chunk``: rows, lanes, tokens): noise,
  ``lm_head``, argmax or a top-p draw (``sampling``), and every ``sync_every`` steps the
  host reads the new tokens, finishes rows at EOS, a stop string or ``max_new_tokens``
  (``stopping``) and drops them from the batch, so finished rows cost nothing more;
* ``steps``: how a step runs the backbone: the prompt KV copied per row (``CopyStep``),
  or read in place by all its rows (``SharedStep``), on fixed shapes that a CUDA graph
  captures (``StaticStep``);
* ``attention``: shared-prefix attention (one copy of a prompt's KV for all its rows),
  also what ``aisp_bench.prefix_scoring`` scores given responses with;
* ``tuning``: the ``auto`` choices of attention, decode step, sync interval and batch
  rows, from the model and the device.

Randomness never comes from here: callers pass noise and uniforms drawn from generators
seeded per (run seed, prompt id, iteration or segment, row), so results do not depend on
batching.
"""

from aisp_bench.engine.core import Engine, Prefix, PromptTooLongError
from aisp_bench.engine.decoding import Decoding
from aisp_bench.engine.padding import pad
from aisp_bench.engine.sampling import sample_top_p, top_p_filter
from aisp_bench.engine.steps import SPAN, StaticStep
from aisp_bench.engine.stopping import stop_candidates

__all__ = [
    "SPAN", "Decoding", "Engine", "Prefix", "PromptTooLongError", "StaticStep", "pad", "sample_top_p", "stop_candidates",
    "top_p_filter",
]  # fmt: skip
