"""Per-chunk decode states (``CopyRows``, ``SharedRows``, ``StaticRows``): how one decode
step attends to the prompt and the rows' own tokens. Each has ``forward(tok, pos, t) -> z``
(one step for the live rows) and ``keep(live, filled)`` (drop finished rows; returns the
new batch size, or None when the layout is kept).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from aisp_bench import shared_prefix

if TYPE_CHECKING:
    from aisp_bench.engine.core import Engine, Prefix

# batch sizes of the static decode step: finished rows leave when the live ones fit a smaller one
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
SPAN = 32  # and it attends to the generated positions in spans of this many


class CopyRows:
    """``attention="copy"``: the prompt cache copied to each row (a ``DynamicCache``) and
    the model's own attention; finished rows are dropped at once."""

    def __init__(self, engine: Engine, prefix: Prefix, slots: torch.Tensor) -> None:
        slots_d = slots.to(engine.device)
        self.engine = engine
        self.cache = copy.deepcopy(prefix.cache)
        self.cache.batch_select_indices(slots_d)
        self.mask = prefix.mask.index_select(0, slots_d)

    def forward(self, tok: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self.engine.backbone_forward(tok.unsqueeze(-1), self.mask, pos.unsqueeze(-1), self.cache)[:, -1]

    def keep(self, live: torch.Tensor, filled: int) -> int:
        live_d = live.to(self.mask.device)
        self.cache.batch_select_indices(live_d)
        self.mask = self.mask.index_select(0, live_d)
        return int(live.numel())


class _PromptRows:
    """Shared-prefix setup: ``local``, each row's index among the P prompts present; their KV,
    (H_kv, P, L, D) per layer, and padding bias, laid out once for all decodes of these prompts."""

    def __init__(self, engine: Engine, prefix: Prefix, slots: torch.Tensor) -> None:
        present, self.local = torch.unique(slots, return_inverse=True)
        self.engine, self.P = engine, int(present.numel())
        key = tuple(present.tolist())
        if prefix.layout is None or prefix.layout[0] != key:
            present_d = present.to(engine.device)
            k, v = shared_prefix.prompt_kv(prefix.cache, present_d)
            prefix.layout = key, k, v, shared_prefix.padding_bias(prefix.mask.index_select(0, present_d), engine.dtype)
        _, self.k, self.v, self.bias = prefix.layout


class SharedRows(_PromptRows):
    """Shared-prefix attention, eager: each row's generated KV in a preallocated buffer;
    finished rows are dropped at once."""

    def __init__(self, engine: Engine, prefix: Prefix, slots: torch.Tensor) -> None:
        super().__init__(engine, prefix, slots)
        self.cache = shared_prefix.RowKV(len(self.k), engine.max_new_tokens)
        self._layout()

    def _layout(self) -> None:
        row_of_slot, slot_of_row, R = shared_prefix.group_rows(self.local, self.P)
        dev = self.engine.device
        self.state = shared_prefix.RowState(self.k, self.v, row_of_slot.to(dev), slot_of_row.to(dev), R)
        bias_rows = self.bias.index_select(0, self.local.to(dev))  # then zeros for the generated tokens
        zeros = bias_rows.new_zeros(bias_rows.shape[:3] + (self.engine.max_new_tokens,))
        self.bias_rows = torch.cat([bias_rows, zeros], dim=-1)

    def forward(self, tok: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        self.state.row_bias = self.bias_rows[..., : self.bias.shape[-1] + t + 1]  # a view: nothing allocated per step
        with shared_prefix.active(self.engine.model.config, self.state):
            return self.engine.backbone_forward(tok.unsqueeze(-1), None, pos.unsqueeze(-1), self.cache)[:, -1]

    def keep(self, live: torch.Tensor, filled: int) -> int:
        self.cache.keep(live.to(self.engine.device), filled)
        self.local = self.local[live]
        self._layout()
        return int(live.numel())


class StaticRows(_PromptRows):
    """Shared-prefix attention on static shapes, for CUDA graphs.

    All inputs of a step live in buffers allocated once per chunk layout (tokens,
    positions, the step index, the row layout, the per-row KV for all T steps). The
    batch has a bucket size n: the chunk's row count at first, then, once enough rows
    finished, the next smaller size of ``BUCKETS`` that holds the live rows (moved to
    the front; the slots behind them are padding that decodes garbage, never read). The
    generated keys are read in spans of ``SPAN`` positions (the unwritten ones masked).
    One step per (bucket, span) is what a CUDA graph captures (``graphs``); replays only
    need the buffers refilled. The object is kept on the prefix, so later decode calls of the
    same rows (AISP's iterations, BoN's chunks) reuse buffers and graphs.
    """

    def __init__(self, engine: Engine, prefix: Prefix, slots: torch.Tensor, graphs: bool) -> None:
        super().__init__(engine, prefix, slots)
        dev, T = engine.device, engine.max_new_tokens
        self.graphs, self.local0, self.B0 = graphs, self.local, int(slots.numel())
        self.R = shared_prefix.group_rows(self.local0, self.P)[2]
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.tok = torch.full((self.B0,), engine.pad_token_id, dtype=torch.long, device=dev)
        self.pos = torch.zeros(self.B0, dtype=torch.long, device=dev)
        self.row_of_slot = torch.zeros(self.P * self.R, dtype=torch.long, device=dev)
        self.slot_of_row = torch.zeros(self.B0, dtype=torch.long, device=dev)
        self.bias_rows = self.bias.index_select(0, self.local0.to(dev))
        self.steps = torch.arange(T, device=dev)
        self.suffix_zeros = torch.zeros(T, dtype=engine.dtype, device=dev)
        self.cache = shared_prefix.RowKV(len(self.k), T, step=self.step)
        self.captured: dict[tuple[int, int], tuple] = {}
        self.reset()

    def reset(self) -> None:
        """Back to all of the chunk's rows (start of a decode call)."""
        self.n = self.B0
        self._layout(self.local0)

    def _layout(self, local: torch.Tensor) -> None:
        row_of_slot, slot_of_row, _ = shared_prefix.group_rows(local, self.P, self.R)
        m = int(local.numel())
        self.row_of_slot.copy_(row_of_slot)
        self.slot_of_row.zero_()
        self.slot_of_row[:m] = slot_of_row.to(self.slot_of_row.device)
        self.bias_rows[:m] = self.bias.index_select(0, local.to(self.bias.device))
        self.local = local

    def _step(self, n: int, span: int) -> torch.Tensor:
        """One decode step of the first n slots from the buffers, attending to the first
        ``span`` generated positions (those after ``step`` masked): z (n, d)."""
        suffix = self.suffix_zeros[:span].masked_fill(self.steps[:span] > self.step, float("-inf"))
        state = shared_prefix.RowState(self.k, self.v, self.row_of_slot, self.slot_of_row[:n], self.R)
        state.row_bias = torch.cat([self.bias_rows[:n], suffix.expand(n, 1, 1, -1)], dim=-1)
        self.cache.span = span
        with shared_prefix.active(self.engine.model.config, state):
            return self.engine.backbone_forward(self.tok[:n, None], None, self.pos[:n, None], self.cache)[:, -1]

    def _capture(self, n: int, span: int) -> tuple:
        dev = self.engine.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: the KV buffers and library handles exist before capture
            for _ in range(2):
                self._step(n, span)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._step(n, span)
        self.engine.stats["graph_captures"] += 1
        self.captured[n, span] = (graph, out)
        return self.captured[n, span]

    def forward(self, tok: torch.Tensor, pos: torch.Tensor, t: int) -> torch.Tensor:
        n, span = self.n, min(self.engine.max_new_tokens, (t // SPAN + 1) * SPAN)
        self.tok[:n].copy_(tok)
        self.pos[:n].copy_(pos)
        self.step.fill_(t)
        if not self.graphs:
            return self._step(n, span)
        graph, out = self.captured.get((n, span)) or self._capture(n, span)
        graph.replay()
        self.engine.stats["forward_calls"] += 1
        return out

    def keep(self, live: torch.Tensor, filled: int) -> int | None:
        """Move the live slots to the front of the smallest bucket that holds them, if
        that is smaller than the current one; else keep the layout (returns None)."""
        m = int(live.numel())
        smaller = [b for b in BUCKETS if m <= b < self.n]
        if not smaller:
            return None
        self.cache.keep(live.to(self.step.device), filled)
        self._layout(self.local[live])
        self.n = min(smaller)
        return self.n
