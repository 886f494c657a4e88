"""Launchers for sweeps on many GPUs: ``hydra/launcher=slurm`` (a Slurm job array) and
``hydra/launcher=ray`` (Ray tasks, one GPU each, on one machine or a Ray cluster).

Hydra finds them as plugins (``hydra_plugins/aisp_bench_launchers``, a thin shell); their
work is here. ``jobs``: what both share (a job's outcome in its task, the GPU a sweep needs,
the one-line report of failed jobs); ``slurm``: the partition check, the submission and the
watch that ends when every task has; ``ray``: jobs as Ray tasks.
"""
