"""The model a benchmark runs on: a base model, or random weights of any local config's shape."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from adaplex.core.models import load_base
from adaplex.errors import ConfigError


def shaped_model(config_path: Path, layers: int | None, dtype: torch.dtype) -> nn.Module:
    """A causal LM of a local config's shape (config.json or its directory), cut to ``layers`` layers if
    given, with random weights: N(0, 0.02) matrices, norms 1, other vectors 0 (from_config alone leaves
    some weights uninitialised on some installs)."""
    try:
        config = AutoConfig.from_pretrained(config_path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"--shape {config_path}: not a readable model config ({str(err).splitlines()[0]})") from None
    if layers is not None:
        config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                p.fill_(1.0 if "norm" in name.lower() else 0.0)
    model.config.name_or_path = str(config_path)
    return model.eval()


def bench_model(base_spec: str, shape: Path | None, layers: int | None, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """(model, what it is): ``shape``'s random model if given, else the base model ``base_spec``."""
    if layers is not None and shape is None:
        raise ConfigError("--layers applies to a --shape model; give --shape CONFIG too")
    if shape is not None:
        return shaped_model(shape, layers, dtype), str(shape)
    return load_base(base_spec, dtype=dtype)[0], base_spec
