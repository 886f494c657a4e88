"""A decode that pauses: decode a segment, hand back the partial responses, select rows, continue.

``Engine.start(prefix, prompt_of_row)`` returns a ``Decoding`` of B rows before their
first token. Then, as often as the caller wants:

* ``run(until, uniforms=... | noise=...)`` decodes steps ``t..until-1`` of the live rows
  (one segment; the randomness of the current rows, given by the caller per segment);
* ``responses()`` hands back every row's response so far: a finished row's ``Sample``
  (``eos``, ``stop_string``, ``length``), a live row's text of its ``t`` tokens
  (``finish_reason="partial"``);
* ``select(indices)`` makes row i the old row ``indices[i]``: rows are kept, dropped or
  duplicated (indices may repeat, in any order, fewer or more than B). A row moves with
  everything that decides its future: its tokens (the stop-string search reads them),
  its finished state and ``Sample``, and a live row's generated KV, pre-logit and
  position. The prompt KV stays shared (one copy per prompt, ``engine.steps``).

A live row after ``select`` continues exactly as the row it copies would have: decoding
a duplicated row on is decoding its prefix on, so with the uniforms a fresh decode would
use for the later steps it gives that fresh decode's tokens. Which uniforms a row gets
is the caller's choice (seeded by lineage or segment and row, ``aisp_bench.seeding``):
duplicates given different ones diverge.

Rows beyond ``max_batch_rows``: the rows are cut into chunks of ``max_batch_rows``
(``engine.chunk``), each segment runs the chunks one after another, and ``select``
regroups the new rows into chunks in order, moving KV between chunks as needed. Unlike
``Engine.decode``, whose chunks run one after another from start to end, every chunk's
KV is held until the decode ends (a pause needs every row's state); ``select`` copies
the live rows' KV once (peak: twice the KV of the rows kept). The static step of a chunk
is reused when the new rows fit its buffers (``StaticStep.fits``: they do whenever rows
are only dropped, or copied within a prompt that keeps its row count), so its CUDA
graphs are replayed, not captured again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from aisp_bench.engine.chunk import Chunk
from aisp_bench.types import Sample

if TYPE_CHECKING:
    from aisp_bench.engine.core import Engine, Prefix


class Decoding:
    """B rows of ``prefix`` decoded in segments (the module docstring); ``t``: steps done."""

    def __init__(self, engine: Engine, prefix: Prefix, prompt_of_row) -> None:
        rows = torch.as_tensor(prompt_of_row, dtype=torch.long).cpu().reshape(-1)
        if rows.numel() == 0:
            raise ValueError("a decode needs at least one row")
        self.engine, self.prefix, self.t = engine, prefix, 0
        M = engine.max_batch_rows
        self.chunks = [Chunk.start(engine, prefix, rows[s : s + M], slot=c)
                       for c, s in enumerate(range(0, rows.numel(), M))]

    # ------------------------------------------------------------------ state
    @property
    def rows(self) -> int:
        return sum(c.alive.numel() for c in self.chunks)

    @property
    def prompt_of_row(self) -> torch.Tensor:
        """(B,) each row's prompt (index into the prefix)."""
        return torch.cat([c.prompt_of_row for c in self.chunks])

    @property
    def finished(self) -> torch.Tensor:
        """(B,) bool: the rows that ended (EOS, a stop string, ``max_new_tokens``)."""
        return ~torch.cat([c.alive for c in self.chunks])

    @property
    def done(self) -> bool:
        """Every row finished (there is nothing left to decode)."""
        return bool(self.finished.all())

    # ------------------------------------------------------------------ segments
    def run(self, until: int, *, noise: torch.Tensor | None = None, uniforms: torch.Tensor | None = None,
            temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
        """Decode steps ``t..until-1`` (``until`` is clipped to ``max_new_tokens``); returns (B,)
        the tokens each row generated in them. ``noise`` (B, τ, d) (greedy on noisy
        pre-logits, steps < τ) or ``uniforms`` (B, >= until) (top-p sampling), by current
        row, as ``Engine.decode`` takes them; neither: greedy."""
        until, B = min(int(until), self.engine.max_new_tokens), self.rows
        if until <= self.t:
            raise ValueError(f"run(until={until}): {self.t} steps are already decoded")
        if noise is not None and uniforms is not None:
            raise ValueError("give noise (greedy on noisy pre-logits) or uniforms (top-p sampling), not both")
        d = self.engine.hidden_size
        if noise is not None and (noise.dim() != 3 or noise.shape[0] != B or noise.shape[2] != d):
            raise ValueError(f"noise must have shape ({B}, tau, {d}), got {tuple(noise.shape)}")
        if uniforms is not None and (uniforms.shape[0] != B or uniforms.shape[1] < until):
            raise ValueError(f"uniforms must have shape ({B}, >= {until}), got {tuple(uniforms.shape)}")
        out, start, dev = [], 0, self.engine.device
        for c in self.chunks:
            sl = slice(start, start + c.alive.numel())
            start = sl.stop
            noise_c, uniforms_c = (None if x is None else x[sl].to(dev) for x in (noise, uniforms))
            out.append(c.run(self.engine, self.t, until, noise_c, uniforms_c, temperature, top_p))
        self.t = until
        return torch.cat(out)

    def responses(self) -> list[Sample]:
        """Every row's response so far, in row order (live rows: ``finish_reason="partial"``)."""
        out: list[Sample] = []
        for c in self.chunks:
            live = c.alive.nonzero().squeeze(1).tolist()
            partial = iter(self.engine.stops.finish([c.tokens_host[r, : self.t].tolist() for r in live],
                                                    ["partial"] * len(live)))
            out += [next(partial) if alive else s for alive, s in zip(c.alive.tolist(), c.samples)]
        return out

    @torch.inference_mode()
    def select(self, indices) -> None:
        """Row i becomes the old row ``indices[i]`` (the module docstring)."""
        idx = torch.as_tensor(indices, dtype=torch.long).cpu().reshape(-1)
        B = self.rows
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= B:
            raise ValueError(f"select needs at least one row index in 0..{B - 1}, got {idx.tolist()}")
        cat = lambda name: torch.cat([getattr(c, name) for c in self.chunks])  # noqa: E731
        state = {name: cat(name)[idx] for name in ("prompt_of_row", "tokens_host", "alive")}
        samples = [s for c in self.chunks for s in c.samples]
        source = (torch.cat([torch.full_like(c.alive, i, dtype=torch.long) for i, c in enumerate(self.chunks)]),
                  torch.cat([c.live_lanes() for c in self.chunks]))
        views = [c.step.lanes(self.t) if c.step is not None and c.alive.any() else [] for c in self.chunks]
        M, parts = self.engine.max_batch_rows, []
        for s in range(0, idx.numel(), M):  # every new chunk's state gathered before any is written
            rows = {k: v[s : s + M] for k, v in state.items()} | {"samples": [samples[i] for i in idx[s : s + M]]}
            parts.append((rows, self._gather(idx[s : s + M][rows["alive"]], source, views)))
        old = [c.step for c in self.chunks]
        self.chunks = [Chunk.resume(self.engine, self.prefix, rows, lanes, self.t, old[c] if c < len(old) else None, c)
                       for c, (rows, lanes) in enumerate(parts)]

    def _gather(self, rows: torch.Tensor, source: tuple[torch.Tensor, torch.Tensor],
                views: list[list[torch.Tensor]]) -> tuple:
        """(z, pos, step state) of the live old ``rows``, in order, copied from their chunks' lanes."""
        chunk_of, lane_of, m = source[0][rows], source[1][rows], int(rows.numel())
        out: list[torch.Tensor] = []
        for o, c in enumerate(self.chunks):
            here = (chunk_of == o).nonzero().squeeze(1)
            if not here.numel():
                continue
            lanes_d, here_d = lane_of[here].to(c.z.device), here.to(c.z.device)
            for j, x in enumerate([c.z, c.pos, *views[o]]):
                if j == len(out):
                    out.append(x.new_empty((m, *x.shape[1:])))
                out[j].index_copy_(0, here_d, x.index_select(0, lanes_d))
        if not out:  # no live row
            z = self.chunks[0].z
            return z.new_zeros((0, z.shape[1])), self.chunks[0].pos.new_zeros(0), []
        return out[0], out[1], out[2:]
