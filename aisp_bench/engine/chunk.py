"""One chunk of a decode call: its rows decoded together, step by step.

``Engine.decode`` cuts its rows into chunks of at most ``max_batch_rows`` and hands each
to ``decode_chunk``. A chunk has B **rows** (one response each; ``prompt_of_row`` says
whose prompt). They run in a batch of n **lanes**: lane i decodes row ``row_of_lane[i]``,
or nothing (B: a padding lane of a static bucket). At first lane i holds row i; when rows
finish, the decode step (``engine.steps``) drops them and the live lanes move to the
front. Everything the loop keeps per row or per lane is on the ``Chunk``.

A step: noise v_t (``t < τ``) is added to each lane's pre-logit z, the token is the
argmax of ``lm_head(z)`` (or a top-p draw with the lane's uniform), it is written to its
row, and the decode step runs the backbone on it for the next z. Every ``sync_every``
steps (``engine.tuning``) the host reads the new tokens (``StopRules.collect``), finishes
the rows that ended and drops them from the lanes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from aisp_bench.engine.sampling import sample_top_p
from aisp_bench.engine.steps import step_for
from aisp_bench.types import Sample

if TYPE_CHECKING:
    from aisp_bench.engine.core import Engine, Prefix


@dataclass
class Chunk:
    """The decode state of one chunk (B rows, T = max_new_tokens steps, n lanes).

    ============  ==========  ======  =================================================
    field         shape       where   meaning
    ============  ==========  ======  =================================================
    step          n lanes             the decode step (``engine.steps``): runs the
                                      backbone for the lanes and holds their KV
    row_of_lane   (n,)        host    the row each lane decodes (B: padding)
    write, read   (n,)        device  the same, to write tokens (row B: the padding
                                      lanes' scratch row) and to read a row's noise or
                                      uniforms (padding lanes read row B - 1)
    z             (n, d)      device  each lane's pre-logit of its next token
    pos           (n,)        device  each lane's position id of its next token
    tokens        (B + 1, T)  device  the generated ids, by row
    tokens_host   (B, T)      host    the steps already synced
    alive         (B,)        host    the rows not finished
    samples       B                   each finished row's ``Sample``
    synced                            steps already on the host
    ============  ==========  ======  =================================================
    """

    step: object
    z: torch.Tensor
    pos: torch.Tensor
    tokens: torch.Tensor
    tokens_host: torch.Tensor
    alive: torch.Tensor
    samples: list = field(repr=False)
    synced: int = 0
    row_of_lane: torch.Tensor = field(init=False)
    write: torch.Tensor = field(init=False)
    read: torch.Tensor = field(init=False)

    @classmethod
    def start(cls, engine: Engine, prefix: Prefix, prompt_of_row: torch.Tensor) -> Chunk:
        """Rows ``prompt_of_row`` of ``prefix`` before their first token, lane i holding row i."""
        dev, T, B = engine.device, engine.max_new_tokens, int(prompt_of_row.numel())
        rows_d = prompt_of_row.to(dev)
        chunk = cls(step=step_for(engine, prefix, prompt_of_row), z=prefix.last_hidden.index_select(0, rows_d),
                    pos=prefix.next_pos.index_select(0, rows_d),
                    tokens=torch.zeros((B + 1, T), dtype=torch.long, device=dev),
                    tokens_host=torch.zeros((B, T), dtype=torch.long), alive=torch.ones(B, dtype=torch.bool),
                    samples=[None] * B)
        chunk.place(torch.arange(B))
        return chunk

    def place(self, row_of_lane: torch.Tensor) -> None:
        """Lane i now decodes row ``row_of_lane[i]`` (B: padding)."""
        B, dev = self.alive.numel(), self.z.device
        self.row_of_lane = row_of_lane
        self.write, self.read = row_of_lane.to(dev), row_of_lane.clamp(max=B - 1).to(dev)

    def advance(self, tok: torch.Tensor, t: int) -> None:
        """Run step t's tokens ``tok`` (one per lane) through the backbone: z and pos of step t + 1."""
        self.z = self.step.forward(tok, self.pos, t)
        self.pos = self.pos + 1

    def drop_finished(self, tok: torch.Tensor, t: int, pad_token_id: int) -> torch.Tensor:
        """Let the decode step drop the lanes of finished rows (steps 0..t-1 are in its KV);
        returns ``tok`` for the new lanes (padding lanes at the end)."""
        B = self.alive.numel()
        rows = self.row_of_lane
        live = ((rows < B) & self.alive[rows.clamp(max=B - 1)]).nonzero().squeeze(1)
        n = self.step.keep(live, t)
        if n is None:  # the layout stays (a static bucket)
            return tok
        pad, live_d = n - live.numel(), live.to(tok.device)
        self.pos = torch.cat([self.pos.index_select(0, live_d), self.pos.new_zeros(pad)])
        self.place(torch.cat([rows[live], torch.full((pad,), B)]))
        return torch.cat([tok.index_select(0, live_d), tok.new_full((pad,), pad_token_id)])


@torch.inference_mode()
def decode_chunk(engine: Engine, prefix: Prefix, prompt_of_row: torch.Tensor, noise: torch.Tensor | None,
                 uniforms: torch.Tensor | None, temperature: float, top_p: float) -> list[Sample]:
    """Decode the rows ``prompt_of_row`` of ``prefix`` together (the module docstring);
    ``noise`` (B, τ, d) and ``uniforms`` (B, T) on ``engine.device``, by row."""
    T = engine.max_new_tokens
    tau = 0 if noise is None else min(int(noise.shape[1]), T)
    chunk = Chunk.start(engine, prefix, prompt_of_row)
    for t in range(T):
        z = chunk.z if t >= tau else (chunk.z + noise[:, t].index_select(0, chunk.read)).to(chunk.z.dtype)
        logits = engine.lm_head(z)
        if uniforms is not None:
            tok = sample_top_p(logits, temperature, top_p, uniforms[:, t].index_select(0, chunk.read))
        else:
            tok = logits.argmax(dim=-1)
        chunk.tokens[:, t].index_copy_(0, chunk.write, tok)
        if t + 1 == T or t + 1 - chunk.synced >= engine.sync_every:
            finished = engine.stops.collect(chunk.tokens, chunk.tokens_host, chunk.alive, chunk.synced, t,
                                            last=t + 1 == T)
            chunk.synced = t + 1
            for row, sample in finished:
                chunk.samples[row] = sample
                engine.stats["generated_tokens"] += sample.num_tokens
            if not chunk.alive.any():
                break
            if finished:
                tok = chunk.drop_finished(tok, t, engine.pad_token_id)
        chunk.advance(tok, t)
    return chunk.samples
