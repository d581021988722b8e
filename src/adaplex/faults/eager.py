"""Attention computed step by step, so that faults can be injected and checked at each step.

O = softmax(mask(s·Q Kᵀ)) V over (B, H, T, D) queries and (B, H_kv, S, D) keys/values (GQA heads
repeated), with the hook's flips applied to q, k, v, the raw scores, the weights and the output.
"""

from __future__ import annotations

import torch

from adaplex.core.attention import visible_mask
from adaplex.faults import qkv
from adaplex.faults.detect import Tensors
from adaplex.faults.hook import FaultHook


def _attend(q, k, v, visible, scaling, inject) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scores = inject("scores", (q @ k.transpose(-1, -2)) * scaling)  # (B, H, T, S), before the mask
    masked = scores.float().masked_fill(~visible, float("-inf"))
    weights = inject("weights", torch.nan_to_num(masked.softmax(-1), nan=0.0).to(q.dtype))  # fully masked rows: 0
    return scores, weights, inject("output", weights @ v)  # (B, H, T, D)


def checked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool,
    hook: FaultHook,
) -> torch.Tensor:
    """Attention output (B, T, H, D) with the hook's faults injected and its detectors run."""
    groups = query.shape[1] // key.shape[1]
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    visible = visible_mask(mask, query.shape[2], key.shape[2], is_causal, query.device)
    q, k, v = hook.inject("q", query), hook.inject("k", key), hook.inject("v", value)
    if hook.detectors.qkv:
        hook.findings += qkv.check(hook.layer, hook.reference, {"q": q, "k": k, "v": v})
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, D)
    scores, weights, out = _attend(q, k, v, visible, scaling, hook.inject)
    before = len(hook.detections) if hook.detectors.correct else 0
    hook.detect(Tensors(q, k, v, scores, weights, out, visible, scaling))
    if hook.detectors.correct and len(hook.detections) > before:  # recompute from the clean inputs
        clean_k, clean_v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        out = _attend(query, clean_k, clean_v, visible, scaling, lambda _, t: t)[2]
        hook.corrected = True
    return out.transpose(1, 2).contiguous()
