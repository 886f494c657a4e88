"""Policy language models: what to load and how to talk to it.

A ``Policy`` is built from ``conf/model/*.yaml`` (constructor arguments = YAML keys) and
loads nothing until ``load()`` is called, so every config can be instantiated offline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aisp_bench.models.loading import (
    gguf_safetensors_cache, package_file, resolve_device, resolve_dtype, weight_bars_follow_logging,
)
from aisp_bench.models.templates import ChatTemplateFormat, TranscriptFormat
from aisp_bench.types import Prompt

log = logging.getLogger(__name__)


@dataclass(kw_only=True, eq=False)
class Policy:
    """A ``transformers`` causal LM from the hub or a local folder.

    Args:
        name: short name used in run folder names (e.g. ``llama3_8b``).
        name_or_path: hub id or local folder.
        prompt_format: how a conversation is rendered for this model.
        stop_strings: text that ends a response (the next turn marker of its format).
        eos_tokens: extra tokens (as text) that end a response, beside the model's EOS.
        add_special_tokens: let the tokenizer add BOS etc. to the rendered prompt.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bfloat16``, ``float16``, ``float32``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``; ``device_map`` overrides for
            multi-GPU placement (``auto`` uses accelerate).
        revision: hub revision to pin.
        max_context: context length; default from the model config.
        attn_implementation: passed to ``from_pretrained`` (e.g. ``sdpa``).
    """

    name: str
    name_or_path: str
    prompt_format: TranscriptFormat | ChatTemplateFormat
    stop_strings: Sequence[str] = ()
    eos_tokens: Sequence[str] = ()
    add_special_tokens: bool = True
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    revision: str | None = None
    max_context: int | None = None
    attn_implementation: str | None = None
    model: Any = field(default=None, init=False, repr=False)
    tokenizer: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_strings, self.eos_tokens = list(self.stop_strings), list(self.eos_tokens)

    # where the weights come from; subclasses override
    def _source(self) -> tuple[str, dict]:
        return self.name_or_path, {"revision": self.revision} if self.revision else {}

    def load_tokenizer(self):
        """Load (once) and return the tokenizer alone: enough to render and count prompts."""
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            src, kw = self._source()
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(src, **kw)
            except OSError as e:
                raise RuntimeError(f"cannot load the tokenizer of {src!r}: {str(e).splitlines()[0]}") from None
        return self.tokenizer

    def load(self):
        """Load (once) and return (model, tokenizer)."""
        if self.model is not None:
            return self.model, self.tokenizer
        from transformers import AutoModelForCausalLM

        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        tok = self.load_tokenizer()
        src, kw = self._source()
        log.info("loading policy %s from %s (%s on %s)", self.name, src, dtype, device)
        weight_bars_follow_logging()
        try:
            extra = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
            if self.device_map:
                extra["device_map"] = self.device_map
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw, **extra)
        except OSError as e:
            raise RuntimeError(f"cannot load model {src!r}: {str(e).splitlines()[0]}") from None
        if not self.device_map:
            model = model.to(device)
        model.eval()
        self.model, self.tokenizer = model, tok
        return model, tok

    def render(self, prompt: Prompt) -> str:
        return self.prompt_format.render(prompt.messages, tokenizer=self.tokenizer)

    def eos_token_ids(self) -> list[int]:
        ids = []
        for t in self.eos_tokens:
            i = self.tokenizer.convert_tokens_to_ids(t)
            if i is None or i == self.tokenizer.unk_token_id:
                raise ValueError(f"eos token {t!r} is not in the vocabulary of {self.name_or_path}")
            ids.append(int(i))
        return ids


@dataclass(kw_only=True, eq=False)
class GGUFPackagePolicy(Policy):
    """A GGUF checkpoint shipped inside a pip package (the offline default, SmolLM2).

    Converted once to a safetensors cache folder (see ``gguf_safetensors_cache``).

    Args:
        package: the installed package holding the file (found without importing it).
        gguf_file: the file's name inside the package.
        (the rest as ``Policy``; ``name_or_path`` is informational: package/gguf_file)
    """

    package: str
    gguf_file: str
    name_or_path: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.name_or_path = self.name_or_path or f"{self.package}/{self.gguf_file}"

    def _source(self) -> tuple[str, dict]:
        return str(gguf_safetensors_cache(package_file(self.package, self.gguf_file))), {}


def build_engine(policy: Policy, *, max_new_tokens: int, batch_rows: int | str, prompt_overflow: str = "truncate_left",
                 **engine_options):
    """A new ``Engine`` on the loaded policy: the one place that decides generation settings.

    Context length: ``model.max_context``, else the model config's
    ``max_position_embeddings``; prompts longer than it minus ``max_new_tokens`` are
    truncated from the left (``prompt_overflow="truncate_left"``) or refused
    (``"skip"``: the engine raises, the run skips them beforehand). Engines are cheap:
    build one per job from a policy loaded once. ``engine_options``: the ``Engine``'s
    ``decode_step``, ``attention`` and ``sync_every`` (the tuning block, ``engine.*``).
    """
    from aisp_bench.engine import Engine

    model, tok = policy.load()
    return Engine(
        model,
        tok,
        policy.render,
        max_new_tokens=max_new_tokens,
        max_batch_rows=batch_rows,
        stop_strings=policy.stop_strings,
        eos_token_ids=policy.eos_token_ids(),
        add_special_tokens=policy.add_special_tokens,
        context_length=int(policy.max_context) if policy.max_context else None,  # None: the model's own
        overflow={"skip": "error", "truncate_left": "truncate_left"}[prompt_overflow],
        **engine_options,
    )


__all__ = ["Policy", "GGUFPackagePolicy", "build_engine"]
