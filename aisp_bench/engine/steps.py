"""The three ways one decode step runs the backbone for a chunk's lanes (``engine.chunk``).

Each holds the KV of the lanes it decodes and has ``forward(tok, pos, t) -> z`` (one step:
the new tokens in, the pre-logits of the next ones out), ``keep(lanes, filled)`` (only
these lanes stay, moved to the front; returns the new batch size, or None when the
layout is kept), and for a paused decode (``engine.decoding``) ``lanes(filled)`` (the
lanes' own state: per-lane tensors, batch first) and ``load(prompt_of_lane, state,
filled)`` (lanes 0..m-1 now hold that state; returns the batch size). ``step_for`` picks
one from the engine's ``attention`` and ``decode_step`` (``engine.tuning``):

* ``CopyStep`` (``attention="copy"``): the prompt KV copied to each lane, the model's own
  attention;
* ``SharedStep`` (eager, shared-prefix): each prompt's KV read in place by its lanes
  (``engine.attention``), their own KV in preallocated buffers;
* ``StaticStep`` (``static``, ``cuda_graph``): the same attention on fixed shapes, the
  step captured in CUDA graphs (``graphs``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from aisp_bench.engine.attention import AttentionState, RowKV, active, group_rows, padding_bias, prompt_kv

if TYPE_CHECKING:
    from aisp_bench.engine.core import Engine, Prefix

# batch sizes of the static decode step: finished rows leave when the live ones fit a smaller one
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
SPAN = 32  # and it attends to the generated positions in spans of this many


def step_for(engine: Engine, prefix: Prefix, prompt_of_row: torch.Tensor, slot: int = 0):
    """The decode step of a chunk of rows of ``prefix`` (their prompts: ``prompt_of_row``);
    ``slot``: the chunk's place in a decode (chunks decoded at the same time never share a
    static step; a decode's chunks one after another do)."""
    if engine.decode_step == "eager":
        return (CopyStep if engine.attention == "copy" else SharedStep)(engine, prefix, prompt_of_row)
    key = (engine.decode_step, engine.max_new_tokens, tuple(prompt_of_row.tolist()), slot)
    step = prefix.static_steps.get(key)
    if step is None:  # kept on the prefix: AISP's next iterations reuse buffers and graphs
        step = prefix.static_steps[key] = StaticStep(engine, prefix, prompt_of_row,
                                                     graphs=engine.decode_step == "cuda_graph")
    step.reset()
    return step


class CopyStep:
    """The prompt KV copied to each lane (a ``DynamicCache``) and the model's own attention;
    finished lanes are dropped at once."""

    def __init__(self, engine: Engine, prefix: Prefix, prompt_of_row: torch.Tensor) -> None:
        rows_d = prompt_of_row.to(engine.device)
        self.engine = engine
        self.cache = copy.deepcopy(prefix.cache)
        self.cache.batch_select_indices(rows_d)
        self.mask = prefix.mask.index_select(0, rows_d)

    def forward(self, tok: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self.engine.backbone_forward(tok.unsqueeze(-1), self.mask, pos.unsqueeze(-1), self.cache)[:, -1]

    def keep(self, lanes: torch.Tensor, filled: int) -> int:
        lanes_d = lanes.to(self.mask.device)
        self.cache.batch_select_indices(lanes_d)
        self.mask = self.mask.index_select(0, lanes_d)
        return int(lanes.numel())

    def lanes(self, filled: int) -> list[torch.Tensor]:
        """Each layer's keys and values (prompt and generated), then the mask."""
        return [x for lay in self.cache.layers for x in (lay.keys, lay.values)] + [self.mask]

    def load(self, prompt_of_lane: torch.Tensor, state: list[torch.Tensor], filled: int) -> int:
        for i, lay in enumerate(self.cache.layers):
            lay.keys, lay.values = state[2 * i], state[2 * i + 1]
        self.mask = state[-1]
        return int(self.mask.shape[0])


class _SharedPrompts:
    """Shared-prefix setup: ``prompt_of_lane``, each lane's index among the P prompts present;
    their KV, (H_kv, P, L, D) per layer, and padding bias, laid out once per prefix for all
    decodes of these prompts (``Prefix.prompt_kv``)."""

    def __init__(self, engine: Engine, prefix: Prefix, prompt_of_row: torch.Tensor) -> None:
        present, self.prompt_of_lane = torch.unique(prompt_of_row, return_inverse=True)
        self.engine, self.P, self.present = engine, int(present.numel()), present
        key = tuple(present.tolist())
        if prefix.prompt_kv is None or prefix.prompt_kv[0] != key:
            present_d = present.to(engine.device)
            k, v = prompt_kv(prefix.cache, present_d)
            prefix.prompt_kv = key, k, v, padding_bias(prefix.mask.index_select(0, present_d), engine.dtype)
        _, self.k, self.v, self.bias = prefix.prompt_kv


class SharedStep(_SharedPrompts):
    """Shared-prefix attention, eager: each lane's generated KV in a preallocated buffer;
    finished lanes are dropped at once."""

    def __init__(self, engine: Engine, prefix: Prefix, prompt_of_row: torch.Tensor) -> None:
        super().__init__(engine, prefix, prompt_of_row)
        self.cache = RowKV(len(self.k), engine.max_new_tokens)
        self._layout()

    def _layout(self) -> None:
        row_of_cell, cell_of_row, R = group_rows(self.prompt_of_lane, self.P)
        dev = self.engine.device
        self.state = AttentionState(self.k, self.v, row_of_cell.to(dev), cell_of_row.to(dev), R)
        bias_rows = self.bias.index_select(0, self.prompt_of_lane.to(dev))  # then zeros for the generated tokens
        zeros = bias_rows.new_zeros(bias_rows.shape[:3] + (self.engine.max_new_tokens,))
        self.bias_rows = torch.cat([bias_rows, zeros], dim=-1)

    def forward(self, tok: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        self.state.row_bias = self.bias_rows[..., : self.bias.shape[-1] + t + 1]  # a view: nothing allocated per step
        with active(self.engine.model.config, self.state):
            return self.engine.backbone_forward(tok.unsqueeze(-1), None, pos.unsqueeze(-1), self.cache)[:, -1]

    def keep(self, lanes: torch.Tensor, filled: int) -> int:
        self.cache.keep(lanes.to(self.engine.device), filled)
        self.prompt_of_lane = self.prompt_of_lane[lanes]
        self._layout()
        return int(lanes.numel())

    def lanes(self, filled: int) -> list[torch.Tensor]:
        return self.cache.lanes(len(self.prompt_of_lane), filled)

    def load(self, prompt_of_lane: torch.Tensor, state: list[torch.Tensor], filled: int) -> int:
        """Built for these lanes' prompts (``step_for``): only their generated KV to copy."""
        self.cache.load(state, filled)
        return int(self.prompt_of_lane.numel())


class StaticStep(_SharedPrompts):
    """Shared-prefix attention on static shapes, for CUDA graphs.

    All inputs of a step live in buffers allocated once per chunk layout (tokens,
    positions, the step index, the row layout, the per-lane KV for all T steps). The
    batch has a bucket size n: the chunk's row count at first, then, once enough rows
    finished, the next smaller size of ``BUCKETS`` that holds the live lanes (moved to
    the front; the lanes behind them are padding that decodes garbage, never read). The
    generated keys are read in spans of ``SPAN`` positions (the unwritten ones masked).
    One step per (bucket, span) is what a CUDA graph captures (``graphs``); replays only
    need the buffers refilled. The object is kept on the prefix, so later decode calls of the
    same rows (AISP's iterations, BoN's chunks) reuse buffers and graphs.
    """

    def __init__(self, engine: Engine, prefix: Prefix, prompt_of_row: torch.Tensor, graphs: bool) -> None:
        super().__init__(engine, prefix, prompt_of_row)
        dev, T = engine.device, engine.max_new_tokens
        self.graphs, self.prompt_of_row, self.B0 = graphs, self.prompt_of_lane, int(prompt_of_row.numel())
        self.R = group_rows(self.prompt_of_row, self.P)[2]
        self.t = torch.zeros(1, dtype=torch.long, device=dev)  # the step being decoded
        self.tok = torch.full((self.B0,), engine.pad_token_id, dtype=torch.long, device=dev)
        self.pos = torch.zeros(self.B0, dtype=torch.long, device=dev)
        self.row_of_cell = torch.zeros(self.P * self.R, dtype=torch.long, device=dev)
        self.cell_of_lane = torch.zeros(self.B0, dtype=torch.long, device=dev)
        self.bias_rows = self.bias.index_select(0, self.prompt_of_row.to(dev))
        self.own_positions = torch.arange(T, device=dev)
        self.suffix_zeros = torch.zeros(T, dtype=engine.dtype, device=dev)
        self.cache = RowKV(len(self.k), T, t=self.t, rows=self.B0)
        self.captured: dict[tuple[int, int], tuple] = {}
        self.reset()

    def reset(self) -> None:
        """Back to all of the chunk's rows (start of a decode call)."""
        self.n = self.B0
        self._layout(self.prompt_of_row)

    def _layout(self, prompt_of_lane: torch.Tensor) -> None:
        row_of_cell, cell_of_lane, _ = group_rows(prompt_of_lane, self.P, self.R)
        m = int(prompt_of_lane.numel())
        self.row_of_cell.copy_(row_of_cell)
        self.cell_of_lane.zero_()
        self.cell_of_lane[:m] = cell_of_lane.to(self.cell_of_lane.device)
        self.bias_rows[:m] = self.bias.index_select(0, prompt_of_lane.to(self.bias.device))
        self.prompt_of_lane = prompt_of_lane

    def _run(self, n: int, span: int) -> torch.Tensor:
        """One decode step of the first n lanes from the buffers, attending to the first
        ``span`` generated positions (those after ``t`` masked): z (n, d)."""
        suffix = self.suffix_zeros[:span].masked_fill(self.own_positions[:span] > self.t, float("-inf"))
        state = AttentionState(self.k, self.v, self.row_of_cell, self.cell_of_lane[:n], self.R)
        state.row_bias = torch.cat([self.bias_rows[:n], suffix.expand(n, 1, 1, -1)], dim=-1)
        self.cache.span = span
        with active(self.engine.model.config, state):
            return self.engine.backbone_forward(self.tok[:n, None], None, self.pos[:n, None], self.cache)[:, -1]

    def _capture(self, n: int, span: int) -> tuple:
        dev = self.engine.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: the KV buffers and library handles exist before capture
            for _ in range(2):
                self._run(n, span)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._run(n, span)
        self.engine.stats["graph_captures"] += 1
        self.captured[n, span] = (graph, out)
        return self.captured[n, span]

    def forward(self, tok: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        n, span = self.n, min(self.engine.max_new_tokens, (t // SPAN + 1) * SPAN)
        self.tok[:n].copy_(tok)
        self.pos[:n].copy_(pos)
        self.t.fill_(t)
        if not self.graphs:
            return self._run(n, span)
        graph, out = self.captured.get((n, span)) or self._capture(n, span)
        graph.replay()
        self.engine.stats["forward_calls"] += 1
        return out

    def keep(self, lanes: torch.Tensor, filled: int) -> int | None:
        """Move the live lanes to the front of the smallest bucket that holds them, if
        that is smaller than the current one; else keep the layout (returns None)."""
        m = int(lanes.numel())
        smaller = [b for b in BUCKETS if m <= b < self.n]
        if not smaller:
            return None
        self.cache.keep(lanes.to(self.t.device), filled)
        self._layout(self.prompt_of_lane[lanes])
        self.n = min(smaller)
        return self.n

    def lanes(self, filled: int) -> list[torch.Tensor]:
        return self.cache.lanes(self.n, filled)

    def fits(self, prompt_of_lane: torch.Tensor) -> bool:
        """Whether lanes of these prompts (indices into the prefix) fit this step's buffers: its
        prompts only, at most its rows in all and per prompt."""
        if prompt_of_lane.numel() > self.B0 or not torch.isin(prompt_of_lane, self.present).all():
            return False
        counts = torch.bincount(torch.searchsorted(self.present, prompt_of_lane), minlength=self.P)
        return int(counts.max()) <= self.R

    def load(self, prompt_of_lane: torch.Tensor, state: list[torch.Tensor], filled: int) -> int:
        """Lanes 0..m-1 take ``state`` and these prompts (``fits``); the batch is the smallest bucket
        that holds them (at most the step's rows)."""
        m = int(prompt_of_lane.numel())
        self.cache.load(state, filled)
        self._layout(torch.searchsorted(self.present, prompt_of_lane))
        self.n = min(next((b for b in BUCKETS if b >= m), self.B0), self.B0)
        return self.n
