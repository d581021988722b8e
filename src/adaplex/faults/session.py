"""Arming a model with fault hooks for the duration of a block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from weakref import WeakKeyDictionary

import torch
from torch import nn

from adaplex import attention
from adaplex.adapted import _HANDLES, Adapted, prefix_shape
from adaplex.faults import qkv
from adaplex.faults.bits import check_bit
from adaplex.faults.hook import DetectorConfig, FaultHook, FaultPlan, plan_layers
from adaplex.inject import family_of, select_attention

_LAYERS: WeakKeyDictionary[nn.Module, list[str]] = WeakKeyDictionary()


def attention_layers(model: nn.Module) -> list[str]:
    """Paths of the model's attention layers, in layer order (found once per model: adapters wrap
    linear layers and add children, never move attention layers)."""
    if model not in _LAYERS:
        _LAYERS[model] = select_attention(model, family_of(model), ("attention",))
    return _LAYERS[model]


@contextmanager
def armed(model: nn.Module, plan: FaultPlan | None, detectors: DetectorConfig) -> Iterator[list[FaultHook]]:
    """Inside the block every attention layer runs through its fault hook: step by step with the
    detectors (the plan's layers also get its bit flips), or, with ``detectors.fused`` and no plan,
    the fused kernel with its checksum columns. Yields one hook per layer; ``hook.detections`` holds
    what was found. k and v are flipped after prefix keys/values are prepended, so an element whose
    key index is below the prefix length hits the prefix path; q, k and v include any LoRA deltas."""
    layers = attention_layers(model)
    targets = set(plan_layers(plan, len(layers))) if plan else set()
    if plan is not None:
        check_bit(plan.bit, next(model.parameters()).dtype)
    fresh = model not in _HANDLES
    handle = Adapted.of(model)
    hooks = [FaultHook(i, plan if i in targets else None, detectors) for i in range(len(layers))]
    children = [attention.attention_child(model.get_submodule(path), handle.stack) for path in layers]
    head_dim = prefix_shape(model)[1]
    undo = []  # of the q/k/v recorders
    rotary_module = qkv.rotary_module(model) if detectors.qkv else None
    rotary: dict[str, torch.Tensor] | None = None
    try:
        if rotary_module is not None:
            rotary = {}
            undo.append(qkv.on_output(rotary_module, lambda out: rotary.update(weights=qkv.rotated_sum_weights(*out))))
        for path, child, hook in zip(layers, children, hooks, strict=True):
            child.fault_hook = hook
            if detectors.qkv:
                undo += [
                    qkv.on_output(module, qkv.recorder(hook, location, part, head_dim, rotary))
                    for location, (module, part) in qkv.sources(model.get_submodule(path)).items()
                ]
        yield hooks
    finally:
        for step in reversed(undo):
            step()
        for child in children:
            child.fault_hook = None
        if fresh:
            handle.detach()
