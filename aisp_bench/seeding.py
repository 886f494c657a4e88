"""Seeds derived from (run seed, prompt id, stream, index).

Every random draw in a run comes from a generator seeded by what it is for, never from a
global stream, so a prompt's samples do not depend on which prompts shared its batch,
the batch size, or whether the run was resumed. Draws on CUDA and on the CPU differ
(different generator algorithms); draws on one device type are reproducible.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(run_seed: int, prompt_id: str, stream: str, *index: int) -> int:
    """A 63-bit seed that is a pure function of its arguments."""
    key = "\x1f".join([str(int(run_seed)), str(prompt_id), stream, *(str(int(i)) for i in index)])
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def gaussian_rows(run_seed: int, prompt_id: str, stream: str, rows: range | list[int], shape: tuple[int, ...],
                  device: torch.device | str, *index: int) -> torch.Tensor:
    """Standard normal draws, one generator per row: shape (len(rows), *shape), float32.

    Row ``i`` depends only on (run_seed, prompt_id, stream, *index, i), so any chunking of
    a prompt's rows into batches reproduces the same noise.
    """
    gens = [torch.Generator(device).manual_seed(derive_seed(run_seed, prompt_id, stream, *index, i)) for i in rows]
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=torch.float32) for g in gens])


def uniform_rows(run_seed: int, prompt_id: str, stream: str, rows: range | list[int], length: int,
                 *index: int) -> torch.Tensor:
    """Uniform [0, 1) draws on the CPU, one generator per row: shape (len(rows), length), float64."""
    gens = [torch.Generator().manual_seed(derive_seed(run_seed, prompt_id, stream, *index, i)) for i in rows]
    return torch.stack([torch.rand(length, generator=g, dtype=torch.float64) for g in gens])
