"""Benchmark prompts (SHP, HH-RLHF, local files, the demo set)."""

from aisp_bench.data.datasets import PARSERS, DatasetError, PromptDataset, read_rows

__all__ = ["PARSERS", "DatasetError", "PromptDataset", "read_rows"]
