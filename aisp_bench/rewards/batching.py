"""How the decoder rewards turn token sequences into forward passes.

One place for what the regression heads (UltraRM, Eurus-RM), decoder classifiers and the
LM judge share: their reward is read from the decoder's final hidden state at each
text's last token, and one prompt's responses share most of their text. Given each
pair's ids, exactly as full scoring reads them, and a key naming its prompt
(``SequenceScorer.score``):

1. pairs are grouped by prompt; a group of two or more shares the longest common prefix
   of its ids (each row keeps at least one token of its own, where the reward is read).
   A tokenizer merge across the prompt/response boundary, or truncation that cut a
   row's prompt, only shortens that shared part: what each row reads is unchanged;
2. a group sharing at least ``MIN_SHARED`` tokens is scored with its prefix run once:
   the prefixes of several groups are prefilled together (left padded), then the rows'
   suffixes (right padded) run against that KV without copying it
   (``prefix_scoring.forward_suffix``);
3. everything else (single pairs, groups sharing too little, models that shared-prefix
   attention does not cover or split over devices: ``engine.attention.supported``) is
   scored in full: padded on ``padding_side`` (``engine.padding.pad``), positions counted
   over real tokens;
4. forwards are packed by tokens: each holds about ``max_batch_tokens`` padded tokens
   (a prefill: prompts x longest prefix; a suffix forward: rows x longest suffix) and at
   most ``max_rows`` rows; a group is never split over two prefills (its rows may take
   several suffix forwards against one prefill).

``plan`` is the pure grouping and packing; ``SequenceScorer`` runs it on a model and
chooses how a row attends to its shared prompt (``attention``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

from aisp_bench.engine.attention import supported
from aisp_bench.engine.padding import pad
from aisp_bench.prefix_scoring import forward_suffix, prefill

MIN_SHARED = 4  # a group sharing fewer tokens is scored in full: the prefill would save almost nothing


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask = 1) token of each row, for left or right padding."""
    L = mask.shape[-1]
    return (L - 1) - mask.flip(-1).to(torch.long).argmax(-1)


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all ``seqs`` share."""
    n = min(len(s) for s in seqs)
    return next((i for i in range(n) if any(s[i] != seqs[0][i] for s in seqs)), n)


# ---------------------------------------------------------------------------- plan


@dataclass
class Pack:
    """Groups whose shared prefixes are prefilled in one forward.

    ``prefixes[p]`` is group p's shared ids; each chunk is one suffix forward, a list of
    (sequence index, p): the row reads ``seqs[i][len(prefixes[p]):]`` after that prefix.
    """

    prefixes: list[list[int]]
    chunks: list[list[tuple[int, int]]]


@dataclass
class Plan:
    """Every sequence exactly once: in a batch scored in full, or in a pack."""

    full: list[list[int]]
    packs: list[Pack]


def pack_by_tokens(items: Sequence[int], lengths: Sequence[int] | Mapping[int, int], max_tokens: int,
                   max_rows: int) -> list[list[int]]:
    """``items`` sorted by ``lengths[item]``, cut into batches of at most ``max_rows`` whose
    padded size (rows x longest) stays within ``max_tokens`` (a longer item goes alone)."""
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in sorted(items, key=lambda i: lengths[i]):
        if cur and (len(cur) >= max_rows or (len(cur) + 1) * lengths[i] > max_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + ([cur] if cur else [])


def plan(
    seqs: Sequence[Sequence[int]],
    keys: Sequence[Hashable],
    max_tokens: int,
    max_rows: int,
    share: bool = True,
) -> Plan:
    """Group ``seqs`` by ``keys`` (their prompt), choose what is shared, pack by tokens."""
    groups: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    full: list[int] = []
    shared: list[tuple[int, list[int]]] = []  # (shared length c, rows)
    for rows in groups.values():
        c = 0
        if share and len(rows) > 1:
            group = [seqs[i] for i in rows]
            c = min(common_prefix_len(group), min(len(s) for s in group) - 1)
        if c >= MIN_SHARED:
            shared.append((c, rows))
        else:
            full.extend(rows)
    lengths = [len(s) for s in seqs]

    def fits(gs: list[tuple[int, list[int]]]) -> bool:
        rows = [i for _, r in gs for i in r]
        suffix = max(lengths[i] - c for c, r in gs for i in r)
        return (len(gs) * max(c for c, _ in gs) <= max_tokens and len(rows) <= max_rows
                and len(rows) * suffix <= max_tokens)

    def make_pack(gs: list[tuple[int, list[int]]]) -> Pack:
        prompt_of = {i: p for p, (_, r) in enumerate(gs) for i in r}
        suffix = {i: lengths[i] - gs[p][0] for i, p in prompt_of.items()}
        chunks = pack_by_tokens(list(prompt_of), suffix, max_tokens, max_rows)
        return Pack([list(seqs[r[0]][:c]) for c, r in gs], [[(i, prompt_of[i]) for i in ch] for ch in chunks])

    packs: list[Pack] = []
    cur: list[tuple[int, list[int]]] = []
    for g in sorted(shared, key=lambda g: g[0]):
        if cur and not fits(cur + [g]):
            packs.append(make_pack(cur))
            cur = []
        cur.append(g)
    if cur:
        packs.append(make_pack(cur))
    return Plan(pack_by_tokens(full, lengths, max_tokens, max_rows), packs)


# ---------------------------------------------------------------------------- running


class SequenceScorer:
    """Scores token sequences with a decoder; reward = ``readout`` of the final hidden
    state at each sequence's last token.

    Args:
        backbone: the decoder stack (``LlamaModel``, ``MistralModel``, ...) returning
            ``last_hidden_state``; None for models scored only through ``forward``.
        readout: (B, d) hidden states -> (B,) rewards (a regression head, a score head,
            the judge's Yes/No margin).
        pad_id: the id padding is filled with (masked out anyway).
        device: where the inputs go.
        forward: instead of backbone + readout, (input_ids, attention_mask) -> (B,)
            rewards for models read another way (encoders); such models are always
            right padded and never share prefixes.
    """

    def __init__(self, backbone, readout: Callable[[torch.Tensor], torch.Tensor], pad_id: int,
                 device: torch.device | str, forward: Callable | None = None) -> None:
        self.backbone, self.readout, self.pad_id, self.device, self.forward = backbone, readout, pad_id, device, forward

    def score(
        self,
        seqs: Sequence[Sequence[int]],
        keys: Sequence[Hashable],
        *,
        max_batch_tokens: int,
        max_rows: int,
        padding_side: str,
        stats: dict,
        attention: str = "auto",
    ) -> torch.Tensor:
        """Rewards (len(seqs),) float32 on the CPU, in input order; ``keys[i]`` names the
        prompt of sequence i (equal keys: candidates for a shared prefix). Adds this
        call's rows, forwards, padded tokens and prefix tokens saved to ``stats``.

        ``attention``, how a row attends to the prefix its group shares: ``split`` (one
        product per prompt for all its rows' queries, no copy of the prompt KV), ``sdpa``
        (each row's prompt KV gathered next to its own, one fused call per layer:
        ``engine.attention.fused_attention``), ``full`` (no shared prefix: every sequence
        scored whole) or ``auto``: sdpa on the CPU (measured 12-13% faster there), split on
        a GPU (where sdpa is not measured yet); shared only where it is exact (point 3).
        All give the same rewards in fp32 (BENCHMARKS.md)."""
        if any(not len(s) for s in seqs):
            raise ValueError("cannot score an empty token sequence")
        out = torch.empty(len(seqs), dtype=torch.float32)
        share = (attention != "full" and self.forward is None and self.backbone is not None
                 and supported(self.backbone, max(len(s) for s in seqs)))
        todo = plan(seqs, keys, max_batch_tokens, max_rows, share=share)
        stats["rows"] += len(seqs)
        side = padding_side if self.forward is None else "right"
        fused = attention == "sdpa" or (attention == "auto" and torch.device(self.device).type != "cuda")
        for batch in todo.full:
            ids, mask, pos = pad([seqs[i] for i in batch], self.pad_id, side, self.device)
            out[torch.tensor(batch)] = self._full(ids, mask, pos).float().cpu()
            stats["forwards"] += 1
            stats["padded_tokens"] += ids.numel()
        for pack in todo.packs:
            ids, mask, pos = pad(pack.prefixes, self.pad_id, "left", self.device)
            kv = prefill(self.backbone, ids, mask, pos)  # once per pack, read by every chunk
            stats["forwards"] += 1
            stats["padded_tokens"] += ids.numel()
            rows_c = sum(len(pack.prefixes[p]) for chunk in pack.chunks for _, p in chunk)
            stats["prefix_tokens_saved"] += rows_c - sum(len(p) for p in pack.prefixes)
            for chunk in pack.chunks:
                rows = [i for i, _ in chunk]
                starts = [len(pack.prefixes[p]) for _, p in chunk]
                sids, smask, spos = pad([seqs[i][s:] for i, s in zip(rows, starts)], self.pad_id, "right",
                                        self.device)
                spos = spos + torch.tensor(starts, device=spos.device)[:, None]
                prompt_of_row = torch.tensor([p for _, p in chunk], device=mask.device)
                hidden = forward_suffix(self.backbone, kv, mask, prompt_of_row, sids, spos, smask, fused)
                out[torch.tensor(rows)] = self._read(hidden, smask).float().cpu()
                stats["forwards"] += 1
                stats["padded_tokens"] += sids.numel()
            del kv
        return out

    def _full(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.forward is not None:
            return self.forward(ids, mask).reshape(-1)
        hidden = self.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        return self._read(hidden, mask)

    def _read(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ends = last_token_index(mask).to(hidden.device)
        return self.readout(hidden[torch.arange(hidden.shape[0], device=hidden.device), ends]).reshape(-1)

