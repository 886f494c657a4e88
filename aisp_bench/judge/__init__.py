"""Pairwise win rates (the paper's GPT-4 evaluation, Tables 2-3): :mod:`~aisp_bench.judge.prompts`
(the judge prompt, the verdict parser), :mod:`~aisp_bench.judge.base` (requests, replies, cache, budget,
dry run), :mod:`~aisp_bench.judge.client` (``PairwiseJudge``: any OpenAI-compatible model),
:mod:`~aisp_bench.judge.reward_judge` (``RewardModelJudge``: a reward model, offline),
:mod:`~aisp_bench.judge.winrate` (comparisons, sampling, both orders, tallies, the win-rate files) and
the command ``python -m aisp_bench.judge``.
"""
