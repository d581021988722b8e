"""Checksums that carry q, k and v from their projections into the attention function.

A flip in q, k or v happens before the attention products, so the products' own checksums agree
with it. Instead, forward hooks on the projections record, per (batch, head, token), the squared
norm of each head's vector (unchanged by the rotary embedding, which rotates pairs of features)
and, for v, also its sum; the attention function compares them with the q, k, v it receives.
Cost: O(T·H·D) per tensor. A flip of a sign bit in q or k keeps the norm and is not caught.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from adaplex.faults.detect import Finding, _report
from adaplex.faults.hook import FaultHook

Stats = dict[str, torch.Tensor]  # "norm" (and for v "sum"), each (B, H, T)


def stats(heads: torch.Tensor, with_sum: bool) -> Stats:
    """Per-head statistics of a (B, H, T, D) tensor, in float32."""
    x = heads.float()
    out = {"norm": x.pow(2).sum(-1)}
    if with_sum:
        out["sum"] = x.sum(-1)
    return out


def sources(attention: nn.Module) -> dict[str, tuple[nn.Module, int | None]]:
    """Where q, k, v come from in one attention layer: (module, part of a fused q|k|v output or None)."""
    children = dict(attention.named_children())
    if "c_attn" in children:  # GPT-2: one fused projection
        return {loc: (children["c_attn"], i) for i, loc in enumerate("qkv")}
    if "query" in children:  # BERT
        return {"q": (children["query"], None), "k": (children["key"], None), "v": (children["value"], None)}
    q_src = children.get("q_norm", children["q_proj"])  # Qwen3 normalises each head after the projection
    k_src = children.get("k_norm", children["k_proj"])
    return {"q": (q_src, None), "k": (k_src, None), "v": (children["v_proj"], None)}


def recorder(hook: FaultHook, location: str, part: int | None, head_dim: int) -> Callable:
    """A forward hook storing the stats of ``location`` computed by a projection into ``hook``."""

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        out = output if part is None else output.chunk(3, dim=-1)[part]
        batch, tokens = out.shape[0], out.shape[1]
        heads = out.reshape(batch, tokens, -1, head_dim).transpose(1, 2)  # (B, H, T, D)
        hook.reference[location] = stats(heads, location == "v")

    return record


def check(hook: FaultHook, received: dict[str, torch.Tensor]) -> list[Finding]:
    """Compare the stats of the received q, k, v (their newest T tokens) with the recorded ones."""
    findings = []
    for location, tensor in received.items():
        reference = hook.reference.pop(location, None)
        if reference is None:
            continue
        tokens = reference["norm"].shape[-1]
        got = stats(tensor[:, :, -tokens:], location == "v")  # cached or prefix positions come first
        eps = torch.finfo(tensor.dtype).eps
        scale = 8 * tensor.shape[-1] * eps
        excess = (got["norm"] - reference["norm"]).abs() - scale * reference["norm"] - 1e-30
        if "sum" in reference:
            magnitude = reference["norm"].sqrt() * tensor.shape[-1] ** 0.5
            excess = torch.maximum(excess, (got["sum"] - reference["sum"]).abs() - scale * magnitude - 1e-30)
        findings.append(partial(_report, hook.layer, f"qkv_{location}", excess))
    return findings
