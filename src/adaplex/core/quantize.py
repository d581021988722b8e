"""4-bit and 8-bit bases through bitsandbytes (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

``quantize_linears`` replaces every ``nn.Linear`` of a model except its output layer by bitsandbytes'
``Linear4bit`` (NF4 with double quantization, computing in ``compute_dtype``) or ``Linear8bitLt``
(LLM.int8()), quantized on ``device``. Adapters then wrap those layers like any linear layer: the
base is frozen, so only its forward and its input gradient are needed. The model keeps the
fingerprint of its 16-bit weights, so an adapter trained on the quantized base loads on the 16-bit
one (to merge there: a quantized weight cannot take a merge).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adaplex.core.fingerprint import RECORDED, fingerprint
from adaplex.errors import ConfigError

Quantization = Literal["none", "4bit", "8bit"]


def is_quantized(layer: nn.Module) -> bool:
    """Whether a base layer holds bitsandbytes-quantized weights (checked by type, without importing it)."""
    return type(layer).__module__.startswith("bitsandbytes")


def quantized_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_quantized(m)]


def _bitsandbytes():
    """bitsandbytes' nn module (imported only when a base is quantized: it is slow to import)."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            "quantize needs bitsandbytes, which is not installed: pip install bitsandbytes==0.50.2"
        ) from None
    return bitsandbytes.nn


def _quantized(layer: nn.Linear, bits: int, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    bnb = _bitsandbytes()
    bias = layer.bias is not None
    if bits == 4:
        new = bnb.Linear4bit(
            layer.in_features, layer.out_features, bias, compute_dtype, compress_statistics=True, quant_type="nf4"
        )
    else:
        new = bnb.Linear8bitLt(layer.in_features, layer.out_features, bias, has_fp16_weights=False, threshold=6.0)
    new.load_state_dict(layer.state_dict())
    new.requires_grad_(False)
    return new.to(device)  # bitsandbytes quantizes the weight as it moves it


def quantize_linears(
    model: nn.Module, quantization: Quantization, compute_dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """The model with its linear layers (not the output layer) quantized on ``device``, in place."""
    if quantization not in ("none", "4bit", "8bit"):
        raise ConfigError(f"quantize {quantization!r}: choose none, 4bit or 8bit")
    if quantization == "none":
        return model
    bits = 4 if quantization == "4bit" else 8
    if any(isinstance(m, Conv1D) for m in model.modules()):
        raise ConfigError(
            f"quantize {quantization}: {type(model).__name__} uses Conv1D layers, which bitsandbytes "
            "cannot quantize; use a model with nn.Linear layers (Llama, Qwen, Mistral) or quantize: none"
        )
    recorded = fingerprint(model)
    head = model.get_output_embeddings()
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    try:
        for name, layer in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _quantized(layer, bits, compute_dtype, device))
    except (RuntimeError, NotImplementedError) as err:  # no backend for this device in bitsandbytes
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"quantize {quantization}: bitsandbytes cannot quantize on {device} here ({reason}); "
            "train on a CUDA machine or with quantize: none"
        ) from None
    setattr(model, RECORDED, recorded)
    return model.to(device)
