"""Arming a model with fault hooks for the duration of a block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch
from torch import nn

from adaplex.core import attention
from adaplex.core.adapted import Adapted
from adaplex.core.inject import attention_shape, family_of, qkv_sources, rotary_module, select_attention
from adaplex.faults import qkv
from adaplex.faults.bits import check_bit
from adaplex.faults.eager import checked_attention
from adaplex.faults.fused import fused_checked_attention
from adaplex.faults.hook import DetectorConfig, FaultHook, FaultPlan, plan_layers

_LAYERS: WeakKeyDictionary[nn.Module, list[str]] = WeakKeyDictionary()


def attention_layers(model: nn.Module) -> list[str]:
    """Paths of the model's attention layers, in layer order (found once per model: adapters wrap
    linear layers and add children, never move attention layers)."""
    if model not in _LAYERS:
        _LAYERS[model] = select_attention(model, family_of(model), ("attention",))
    return _LAYERS[model]


@dataclass(frozen=True)
class HookObserver:
    """One attention layer computed through its fault hook (an ``attention.AttentionObserver``): the
    fused kernel with its checks where the hook only checks, else step by step with injection."""

    hook: FaultHook

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float | None,
        is_causal: bool,
    ) -> torch.Tensor:
        hook = self.hook
        if hook.detectors.fused and hook.plan is None:
            return fused_checked_attention(module, query, key, value, mask, scaling, is_causal, hook)
        return checked_attention(query, key, value, mask, scaling, is_causal and query.shape[2] > 1, hook)


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
    fresh = Adapted.find(model) is None
    handle = Adapted.of(model)
    hooks = [FaultHook(i, plan if i in targets else None, detectors) for i in range(len(layers))]
    children = [attention.attention_child(model.get_submodule(path), handle.stack, path) for path in layers]
    head_dim = attention_shape(model)[1]
    undo = []  # of the q/k/v recorders
    rotary_source = rotary_module(model) if detectors.qkv else None
    rotary: dict[str, torch.Tensor] | None = None
    try:
        if rotary_source is not None:
            rotary = {}
            undo.append(qkv.on_output(rotary_source, lambda out: rotary.update(weights=qkv.rotated_sum_weights(*out))))
        for path, child, hook in zip(layers, children, hooks, strict=True):
            child.observer = HookObserver(hook)
            if detectors.qkv:
                undo += [
                    qkv.on_output(module, qkv.recorder(hook.reference, location, part, head_dim, rotary))
                    for location, (module, part) in qkv_sources(model.get_submodule(path)).items()
                ]
        yield hooks
    finally:
        for step in reversed(undo):
            step()
        for child in children:
            child.observer = None
        if fresh:
            handle.detach()
