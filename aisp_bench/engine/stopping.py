"""How decoded rows end (an EOS id, a stop string, the last step) and become ``Sample``s.

Generated tokens stay on the device; every few steps ``StopRules.collect`` brings the
new ones to the host, finds EOS ids in one vectorised pass and searches stop strings
only in rows whose new token can complete one (``stop_candidates``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch

from aisp_bench.types import Sample


def _decode_rows(tokenizer, rows: list[list[int]]) -> list[str]:
    """The texts of token-id rows, special tokens skipped (stand-in tokenizers may lack ``batch_decode``)."""
    if hasattr(tokenizer, "batch_decode"):
        return tokenizer.batch_decode(rows, skip_special_tokens=True)
    return [tokenizer.decode(r, skip_special_tokens=True) for r in rows]


def stop_candidates(tokenizer, stop_strings: Sequence[str], vocab_size: int) -> torch.Tensor | None:
    """(V,) bool: the tokens whose arrival can complete a stop string (None: no stop strings).

    A stop string that newly appears when token x is appended ends inside x's text, so
    that text holds the stop string's last character. Tokens whose text alone is not
    plain (partial UTF-8 bytes decode to U+FFFD) are candidates too, and a stop string
    that ends in whitespace makes every token one (decoders may strip it). Only rows
    whose new token is a candidate get their text decoded and searched.
    """
    if not stop_strings:
        return None
    lasts = {s[-1] for s in stop_strings}
    mask = torch.ones(vocab_size, dtype=torch.bool)
    if any(c.isspace() for c in lasts):
        return mask
    n = min(vocab_size, len(tokenizer))
    texts = _decode_rows(tokenizer, [[i] for i in range(n)])
    mask[:n] = torch.tensor([("\ufffd" in x) or any(c in x for c in lasts) for x in texts], dtype=torch.bool)
    return mask


class StopRules:
    """The end-of-row rules of one engine: EOS ids (kept in the row's tokens) and stop
    strings (the text is cut before them)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], eos_token_ids: Sequence[int], vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.eos = torch.tensor(sorted(set(int(i) for i in eos_token_ids)))
        self.vocab_size = int(vocab_size)
        # stop strings are searched in the text of the last few tokens only
        self.window = max((len(s) for s in self.stop_strings), default=0) + 2

    @cached_property
    def candidates(self) -> torch.Tensor:
        """(V,) bool, built on first use: the tokens after which a row's text is searched."""
        return stop_candidates(self.tokenizer, self.stop_strings, self.vocab_size)

    def collect(self, gen: torch.Tensor, gen_host: torch.Tensor, alive: torch.Tensor, start: int, t: int,
                last: bool) -> list[tuple[int, Sample]]:
        """Bring steps ``start..t`` of the live rows to the host (``gen`` -> ``gen_host``) and
        finish the rows that ended there: at an EOS id, when a stop string appears, or at
        the last step (``last``). Returns (row, sample) of each finished row, marked dead in
        ``alive``."""
        live = alive.nonzero().squeeze(1)
        block = gen[:, start : t + 1].index_select(0, live.to(gen.device)).cpu()  # (m, k)
        gen_host[live, start : t + 1] = block
        k = block.shape[1]
        is_eos = torch.isin(block, self.eos)
        end = torch.where(is_eos.any(1), is_eos.int().argmax(1), k).tolist()  # first EOS (k: none)
        reason = ["eos" if e < k else "length" for e in end]
        if self.stop_strings:
            cand = self.candidates[block] & (torch.arange(k) < torch.tensor(end)[:, None])
            for i, j in cand.nonzero().tolist():  # row by row, steps in order
                if reason[i] != "stop_string" and j < end[i]:
                    row, s = int(live[i]), start + j
                    tail = self.tokenizer.decode(gen_host[row, max(0, s + 1 - self.window) : s + 1].tolist(),
                                                 skip_special_tokens=True)
                    if any(x in tail for x in self.stop_strings):
                        end[i], reason[i] = j, "stop_string"
        done = [i for i in range(len(end)) if end[i] < k or last]
        ids = [gen_host[int(live[i]), : start + min(end[i], k - 1) + 1].tolist() for i in done]
        finished = list(zip([int(live[i]) for i in done], self.finish(ids, [reason[i] for i in done])))
        for row, _ in finished:
            alive[row] = False
        return finished

    def finish(self, rows: list[list[int]], reasons: list[str]) -> list[Sample]:
        """Samples of finished rows: the text decoded, cut before a stop string, stripped."""
        if not rows:
            return []
        texts = _decode_rows(self.tokenizer, rows)
        out = []
        for ids, text, reason in zip(rows, texts, reasons):
            if self.stop_strings:
                cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
            out.append(Sample(token_ids=ids, text=text.strip(), finish_reason=reason))  # type: ignore[arg-type]
        return out
