"""One chunk of a decode: its rows decoded together, step by step.

A decode (``engine.decoding.Decoding``) cuts its rows into chunks of at most
``max_batch_rows``. A chunk has B **rows** (one response each; ``prompt_of_row`` says
whose prompt). They run in a batch of n **lanes**: lane i decodes row ``row_of_lane[i]``,
or nothing (B: a padding lane of a static bucket). At first lane i holds row i; when rows
finish, the decode step (``engine.steps``) drops them and the live lanes move to the
front. Everything the loop keeps per row or per lane is on the ``Chunk``.

A step: noise v_t (``t < τ``) is added to each lane's pre-logit z, the token is the
argmax of ``lm_head(z)`` (or a top-p draw with the lane's uniform), it is written to its
row, and the decode step runs the backbone on it for the next z. Every ``sync_every``
steps, and at the end of a segment (``Chunk.run`` decodes steps t0..t1-1), the host reads
the new tokens (``StopRules.collect``), finishes the rows that ended and drops them from
the lanes. After a segment every live row has exactly t1 tokens, in its lane's KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from aisp_bench.engine.sampling import sample_top_p
from aisp_bench.engine.steps import step_for

if TYPE_CHECKING:
    from aisp_bench.engine.core import Engine, Prefix


@dataclass
class Chunk:
    """The decode state of one chunk (B rows, T = max_new_tokens steps, n lanes).

    =============  ==========  ======  =================================================
    field          shape       where   meaning
    =============  ==========  ======  =================================================
    step           n lanes             the decode step (``engine.steps``): runs the
                                       backbone for the lanes and holds their KV (None:
                                       no live row)
    prompt_of_row  (B,)        host    each row's prompt (index into the prefix)
    row_of_lane    (n,)        host    the row each lane decodes (B: padding)
    write, read    (n,)        device  the same, to write tokens (row B: the padding
                                       lanes' scratch row) and to read a row's noise or
                                       uniforms (padding lanes read row B - 1)
    z              (n, d)      device  each lane's pre-logit of its next token
    pos            (n,)        device  each lane's position id of its next token
    tokens         (B + 1, T)  device  the generated ids, by row
    tokens_host    (B, T)      host    the steps already synced
    alive          (B,)        host    the rows not finished
    samples        B                   each finished row's ``Sample``
    synced                             steps already on the host
    =============  ==========  ======  =================================================
    """

    step: object
    prompt_of_row: torch.Tensor
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
    def start(cls, engine: Engine, prefix: Prefix, prompt_of_row: torch.Tensor, slot: int = 0) -> Chunk:
        """Rows ``prompt_of_row`` of ``prefix`` before their first token, lane i holding row i."""
        dev, T, B = engine.device, engine.max_new_tokens, int(prompt_of_row.numel())
        rows_d = prompt_of_row.to(dev)
        chunk = cls(step=step_for(engine, prefix, prompt_of_row, slot), prompt_of_row=prompt_of_row,
                    z=prefix.last_hidden.index_select(0, rows_d), pos=prefix.next_pos.index_select(0, rows_d),
                    tokens=torch.zeros((B + 1, T), dtype=torch.long, device=dev),
                    tokens_host=torch.zeros((B, T), dtype=torch.long), alive=torch.ones(B, dtype=torch.bool),
                    samples=[None] * B)
        chunk.place(torch.arange(B))
        return chunk

    @classmethod
    def resume(cls, engine: Engine, prefix: Prefix, rows: dict, lanes: tuple, filled: int, old_step, slot: int) -> Chunk:
        """A chunk of rows paused after ``filled`` steps (``Decoding.select``): ``rows`` holds
        their ``prompt_of_row``, ``tokens_host``, ``alive``, ``samples``; ``lanes`` the live
        rows' (z, pos, step state) in row order. A static ``old_step`` is reused if they fit."""
        T, dev, B = engine.max_new_tokens, engine.device, int(rows["prompt_of_row"].numel())
        tokens = torch.zeros((B + 1, T), dtype=torch.long, device=dev)
        tokens[:B] = rows["tokens_host"].to(dev)
        chunk = cls(step=None, z=lanes[0], pos=lanes[1], tokens=tokens, synced=filled, **rows)
        live = chunk.alive.nonzero().squeeze(1)
        m = int(live.numel())
        if m:
            prompts = chunk.prompt_of_row[live]
            if engine.decode_step == "eager":
                chunk.step = step_for(engine, prefix, prompts)
            else:
                reuse = old_step is not None and old_step.fits(prompts)
                chunk.step = old_step if reuse else step_for(engine, prefix, chunk.prompt_of_row, slot)
            pad = chunk.step.load(prompts, lanes[2], filled) - m
            chunk.z = torch.cat([chunk.z, chunk.z.new_zeros((pad, chunk.z.shape[1]))])
            chunk.pos = torch.cat([chunk.pos, chunk.pos.new_zeros(pad)])
            live = torch.cat([live, torch.full((pad,), B)])
        chunk.place(live)
        return chunk

    def place(self, row_of_lane: torch.Tensor) -> None:
        """Lane i now decodes row ``row_of_lane[i]`` (B: padding)."""
        B, dev = self.alive.numel(), self.z.device
        self.row_of_lane = row_of_lane
        self.write, self.read = row_of_lane.to(dev), row_of_lane.clamp(max=B - 1).to(dev)

    def live_lanes(self) -> torch.Tensor:
        """(B,) the lane of each live row (-1: finished)."""
        B = self.alive.numel()
        lane = torch.full((B,), -1, dtype=torch.long)
        rows = self.row_of_lane
        ok = (rows < B) & self.alive[rows.clamp(max=B - 1)]
        lane[rows[ok]] = ok.nonzero().squeeze(1)
        return lane

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
    def run(self, engine: Engine, t0: int, t1: int, noise: torch.Tensor | None, uniforms: torch.Tensor | None,
            temperature: float, top_p: float) -> torch.Tensor:
        """Decode steps t0..t1-1 of the live rows (the module docstring); ``noise`` (B, τ, d) and
        ``uniforms`` (B, >= t1) on ``engine.device``, by row. Returns (B,) the tokens each row
        generated in these steps."""
        T = engine.max_new_tokens
        tau = 0 if noise is None else min(int(noise.shape[1]), T)
        before = self.alive.clone()
        for t in range(t0, t1 if before.any() else t0):
            z = self.z if t >= tau else (self.z + noise[:, t].index_select(0, self.read)).to(self.z.dtype)
            logits = engine.lm_head(z)
            if uniforms is not None:
                tok = sample_top_p(logits, temperature, top_p, uniforms[:, t].index_select(0, self.read))
            else:
                tok = logits.argmax(dim=-1)
            self.tokens[:, t].index_copy_(0, self.write, tok)
            if t + 1 in (T, t1) or t + 1 - self.synced >= engine.sync_every:
                finished = engine.stops.collect(self.tokens, self.tokens_host, self.alive, self.synced, t,
                                                last=t + 1 == T)
                self.synced = t + 1
                for row, sample in finished:
                    self.samples[row] = sample
                if not self.alive.any():
                    break
                if finished:
                    tok = self.drop_finished(tok, t, engine.pad_token_id)
            self.advance(tok, t)
        ends = torch.tensor([s.num_tokens if s is not None else t1 for s in self.samples], dtype=torch.long)
        generated = torch.where(before, ends - t0, 0)
        engine.stats["generated_tokens"] += int(generated.sum())
        return generated
