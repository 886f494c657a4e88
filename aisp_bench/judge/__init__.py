"""Pairwise LLM-as-judge win rates (the paper's GPT-4 evaluation, Tables 2-3).

* :mod:`aisp_bench.judge.prompts` - the judge prompt and the verdict-line parser;
* :mod:`aisp_bench.judge.client` - :class:`PairwiseJudge`: the ``openai`` client, disk
  cache, budget, retries, concurrency, dry run;
* :mod:`aisp_bench.judge.winrate` - seeded prompt sampling, both-order judging, win /
  draw / loss / invalid tallies, the win-rate JSON files, :func:`winrate_dataframe`;
* :mod:`aisp_bench.judge.rm_server` - an offline judge: a reward model behind the same
  chat-completions API (``--local-reward-judge``; not imported here, so that
  ``python -m aisp_bench.judge.rm_server`` runs cleanly);
* ``python -m aisp_bench.judge`` - the command line (see :mod:`aisp_bench.judge.__main__`).
"""

from aisp_bench.judge.client import BudgetExceededError, JudgeError, JudgeReply, JudgeRequest, PairwiseJudge, Plan
from aisp_bench.judge.prompts import PROMPT_VERSION, Scores, build_messages, parse_scores
from aisp_bench.judge.winrate import run_comparison, winrate_dataframe

__all__ = [
    "PROMPT_VERSION",
    "BudgetExceededError",
    "JudgeError",
    "JudgeReply",
    "JudgeRequest",
    "PairwiseJudge",
    "Plan",
    "Scores",
    "build_messages",
    "parse_scores",
    "run_comparison",
    "winrate_dataframe",
]
