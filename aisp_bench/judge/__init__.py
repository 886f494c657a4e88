"""Pairwise win rates (the paper's GPT-4 evaluation, Tables 2-3).

* :mod:`aisp_bench.judge.prompts` - the judge prompt and the verdict-line parser;
* :mod:`aisp_bench.judge.base` - the judge interface: requests, replies, disk cache,
  budget, dry run;
* :mod:`aisp_bench.judge.client` - :class:`PairwiseJudge`: any OpenAI-compatible model
  (retries, concurrency);
* :mod:`aisp_bench.judge.reward_judge` - :class:`RewardModelJudge`: a reward model, in
  process (offline);
* :mod:`aisp_bench.judge.winrate` - comparisons, seeded prompt sampling, both-order
  judging, win / draw / loss / invalid tallies, the win-rate files;
* ``python -m aisp_bench.judge`` - the command (see :mod:`aisp_bench.judge.__main__`).
"""
