"""Checks on the fused attention kernel itself, without materialising the attention matrix.

SDPA runs once on V' = [V | V·1 | 1 | 0…] (two extra value columns, zero-padded to a multiple of 8
so that SDPA keeps its flash / memory-efficient kernels), so the kernel computes
O' = P V' = [O | P(V·1) | P·1 | 0…]:
- abft_output: O·1 must equal P(V·1), the kernel's own checksum of the P·V product;
- softmax:     P·1 must equal 1 for every row that sees a key;
- output_bound: O must lie within the min/max of V over the sequence's keys (a looser hull than
  over each row's visible keys, but it needs only V and O).
The padded columns cost 8/head_dim of the P·V work. Faults in the scores or weights need
the step-by-step path (eager.py), where they can be injected and located.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from adaplex.faults import qkv
from adaplex.faults.detect import Finding, _report
from adaplex.faults.hook import FaultHook

PAD = 8  # the two checksum columns, padded to keep head_dim + PAD a multiple of 8


def fused_checked_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool,
    hook: FaultHook,
    **kwargs,
) -> torch.Tensor:
    """SDPA output (B, T, H, D) with the fused checks run; detections go to the hook."""
    dim = value.shape[-1]
    padded = value.new_zeros(*value.shape[:-1], dim + PAD)  # (B, H_kv, S, D + 8)
    padded[..., :dim] = value
    padded[..., dim] = value.sum(-1)
    padded[..., dim + 1] = 1
    out = sdpa_attention_forward(module, query, key, padded, mask, scaling=scaling, is_causal=is_causal, **kwargs)[
        0
    ]  # (B, T, H, D + 8)
    o, checksum, rowsum = out[..., :dim], out[..., dim], out[..., dim + 1]
    eps = torch.finfo(value.dtype).eps
    keys = value.shape[2]
    vmax = value.float().abs().amax()
    found: list[Finding] = qkv.check(hook, {"q": query, "k": key, "v": value}) if hook.detectors.qkv else []
    if hook.detectors.abft:
        tol = 4 * (keys + dim) * eps * dim * vmax
        excess = (o.float().sum(-1) - checksum.float()).abs() - tol
        found.append(partial(_report, hook.layer, "abft_output", excess.transpose(1, 2)))
    if hook.detectors.softmax:
        tol = 4 * keys * eps
        seen = rowsum.float() > 0.5  # rows with no visible key have P·1 = 0
        excess = torch.where(seen, (rowsum.float() - 1).abs() - tol, torch.zeros_like(rowsum, dtype=torch.float))
        found.append(partial(_report, hook.layer, "softmax", excess.transpose(1, 2)))
    if hook.detectors.output_bound:
        groups = query.shape[1] // value.shape[1]
        low = value.float().amin(2).repeat_interleave(groups, 1).unsqueeze(1)  # (B, 1, H, D)
        high = value.float().amax(2).repeat_interleave(groups, 1).unsqueeze(1)
        tol = 4 * keys * eps * vmax
        excess = torch.maximum(low - o.float(), o.float() - high).amax(-1) - tol  # (B, T, H)
        found.append(partial(_report, hook.layer, "output_bound", excess.transpose(1, 2)))
    hook.findings += found
    return o.contiguous()
