"""Checks on the fused attention kernel itself, without materialising the attention matrix.

SDPA runs once on V' = [V | V·1 | 1 | 0…] (two extra value columns, zero-padded by 8 so that the
head dim stays a multiple of 8), with Q and K zero-padded to the same width (their products are
unchanged) so that SDPA keeps its flash kernels, which need equal head dims. The kernel computes
O' = P V' = [O | P(V·1) | P·1 | 0…]:
- abft_output: O·1 must equal P(V·1), the kernel's own checksum of the P·V product;
- softmax:     P·1 must equal 1 for every row that sees a key;
- output_bound: O must lie within the min/max of V over the sequence's keys (a looser hull than
  over each row's visible keys, but it needs only V and O).
The padding costs 8/head_dim of the attention work. Where Triton runs (CUDA) and the mask is causal
or absent, a flash-attention kernel computes the same checks in registers instead, without padding,
after a pass that checks the k/v rows, or folding that pass in where the call is small
(kernels/checked_attention.py; the kernel checks the q rows it loads). A layer reuses its last call's
buffers once that call's findings are resolved (``FaultHook.kernel_checks``). Faults in the scores
or weights need the step-by-step path (eager.py), where they can be injected and located.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from adaplex.faults import qkv
from adaplex.faults.detect import Detection, Finding
from adaplex.faults.hook import FaultHook
from adaplex.kernels import checked_attention as checked_kernel

PAD = 8  # the two checksum columns, padded to keep head_dim + PAD a multiple of 8


def _ones_then_zeros(value: torch.Tensor) -> torch.Tensor:
    """(B, H_kv, S, PAD - 1) columns [1, 0, …, 0] beside V·1 (a broadcast view of one small tensor)."""
    return _unit_row(value.dtype, value.device).expand(*value.shape[:-1], PAD - 1)


@cache
def _unit_row(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    row = torch.zeros(PAD - 1, dtype=dtype, device=device)
    row[0] = 1
    return row


def padded_inputs(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q and K zero-padded by PAD columns; V' = [V | V·1 | 1 | 0…]: (B, H, T|S, D + PAD) each."""
    padded = torch.cat([value, value.sum(-1, keepdim=True), _ones_then_zeros(value)], dim=-1)
    return F.pad(query, (0, PAD)), F.pad(key, (0, PAD)), padded


def column_excess(
    out: torch.Tensor, value: torch.Tensor, abft: bool, softmax: bool, output_bound: bool
) -> dict[str, torch.Tensor]:
    """Each chosen check's excess over its tolerance, (B, T, H), from O' = P V' (B, T, H, D + PAD) and V."""
    dim, keys = value.shape[-1], value.shape[2]
    o, sums = out[..., :dim], out[..., dim : dim + 2].float()  # sums: (B, T, H, 2) = [P(V·1), P·1]
    eps = torch.finfo(value.dtype).eps
    vmax = value.abs().amax().float()
    excess = {}
    if abft:
        checksum_error = (o.sum(-1, dtype=torch.float32) - sums[..., 0]).abs()
        excess["abft_output"] = checksum_error - 4 * (keys + dim) * eps * dim * vmax
    if softmax:  # rows with no visible key have P·1 = 0
        rowsum = sums[..., 1]
        excess["softmax"] = torch.minimum((rowsum - 1).abs(), rowsum.abs()) - 4 * keys * eps
    if output_bound:
        batch, tokens, heads, _ = o.shape
        grouped = o.view(batch, tokens, value.shape[1], heads // value.shape[1], dim)  # (B, T, H_kv, G, D)
        low, high = value.amin(2)[:, None, :, None], value.amax(2)[:, None, :, None]  # (B, 1, H_kv, 1, D)
        outside = (grouped - grouped.clamp(low, high)).abs().amax(-1).flatten(2)  # (B, T, H)
        excess["output_bound"] = outside - 4 * keys * eps * vmax
    return excess


class KernelFindings(NamedTuple):
    """The findings of one checked-attention kernel call, made from its ``Checks`` only when resolved."""

    layer: int
    checks: checked_kernel.Checks

    def peak(self) -> torch.Tensor:
        return self.checks.peak()

    def resolve(self) -> list[Detection]:
        return [d for name, e in self.checks.excess().items() for d in Finding(self.layer, name, e).resolve()]


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
    scaling = dim**-0.5 if scaling is None else scaling
    checks = (hook.detectors.abft, hook.detectors.softmax, hook.detectors.output_bound)
    tokens = query.shape[2]
    recorded = dict(hook.reference) if hook.detectors.qkv else {}
    if (
        mask is None
        and checked_kernel.available(query)
        and dim <= checked_kernel.MAX_HEAD_DIM
        and all(r.out.shape[1] == tokens for r in recorded.values())
    ):
        hook.reference.clear()  # taken: the kernel compares them (the padded path's qkv.check pops them)
        spare = None if hook.findings else hook.kernel_checks  # unresolved findings may still read its buffers
        out, found = checked_kernel.checked_attention(
            query, key, value, scaling, is_causal and tokens > 1, checks, recorded, reuse=spare
        )
        hook.kernel_checks = found
        if found.names:  # (a call with no check has nothing to report)
            hook.findings.append(KernelFindings(hook.layer, found))
        return out
    padded_q, padded_k, padded_v = padded_inputs(query, key, value)
    out = sdpa_attention_forward(
        module, padded_q, padded_k, padded_v, mask, scaling=scaling, is_causal=is_causal, **kwargs
    )[0]  # (B, T, H, D + 8)
    o = out[..., :dim]
    found: list[Finding] = (
        qkv.check(hook.layer, hook.reference, {"q": query, "k": key, "v": value}) if hook.detectors.qkv else []
    )
    if any(checks):
        excess = column_excess(out, value, *checks)
        found += [Finding(hook.layer, name, e.transpose(1, 2)) for name, e in excess.items()]
    hook.findings += found
    return o.contiguous()
