"""The base model's identity, recorded beside every adapter and bundle and checked on load."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from adaplex.core.attention import AttentionAdapters
from adaplex.core.inject import base_linears, wrappers
from adaplex.core.layers import AdaptedLinear
from adaplex.methods import Adapter


def base_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The base model's parameters under their own names, in ``named_parameters`` order (each once),
    found by structure: wrappers are looked through and adapters skipped."""
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield prefix + name, p
        for name, child in module._modules.items():
            if isinstance(child, AdaptedLinear):
                yield from walk(child.base, f"{prefix}{name}.")
            elif child is not None and not isinstance(child, (Adapter, AttentionAdapters)):
                yield from walk(child, f"{prefix}{name}.")

    yield from walk(model, "")


RECORDED = "_adaplex_fingerprint"  # attribute of a quantized model: the fingerprint of its weights before


def fingerprint(model: nn.Module) -> str:
    """Cheap identity of a base model: its type, every parameter's name and shape, and a hash of
    a fixed sample (up to 4096 evenly spaced values, rounded to bfloat16 so that float32 and
    bfloat16 copies agree) of each base linear weight. Adapters attached to it do not count, and a
    merged layer counts with its base weight. A model quantized by ``adaplex.core.quantize`` has the
    fingerprint of the 16-bit model it was quantized from (an adapter trained on either fits both)."""
    recorded = getattr(model, RECORDED, None)
    if recorded is not None:
        return recorded
    digest = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    for name, p in base_parameters(model):
        digest.update(f"{name}:{tuple(p.shape)};".encode())
    wrapped = wrappers(model)
    for path, layer in base_linears(model).items():
        weight = wrapped[path].unmerged_weight if path in wrapped else layer.weight  # merged: the base, not the sum
        flat = weight.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096]
        digest.update(sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
