"""Checksums that carry q, k and v from their projections into the attention function.

A flip in q, k or v happens before the attention products, so the products' own checksums agree
with it. Instead, forward hooks on the projections record, per (batch, head, token), the
norm and the sum of each head's vector; the attention function compares them with the q, k, v it
receives. The rotary embedding keeps norms but not sums, so for q and k of rotary models the sum is
the one the rotated vector x·cos + rotate_half(x)·sin will have, a weighted sum of x whose weights
come from the model's own (cos, sin), captured from its rotary module by another hook. Cost: two
reductions over O(T·H·D) per tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import nn

from adaplex.faults.detect import Finding
from adaplex.faults.hook import FaultHook
from adaplex.kernels import checked_attention as checked_kernel


def stats(heads: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, T, 2): per head the norm and the sum of a (B, H, T, D) tensor, in float32. With ``weights``
    (B, T, D), the sum is the weighted one, Σ_d w_td x_d: the sum the tensor will have after the rotary
    embedding."""
    x = heads.float()
    total = x.sum(-1) if weights is None else (x * weights.unsqueeze(1)).sum(-1)
    return torch.stack([torch.linalg.vector_norm(x, dim=-1), total], dim=-1)


def rotated_sum_weights(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """w with Σ_d (x·cos + rotate_half(x)·sin)_d = Σ_d w_d x_d, where rotate_half(x) = [-x₂, x₁]:
    w = cos + [sin₂, -sin₁] (halves of the feature dimension). Shape (B, T, D), float32."""
    cos, sin = cos.float(), sin.float()
    half = sin.shape[-1] // 2
    return cos + torch.cat([sin[..., half:], -sin[..., :half]], dim=-1)


def rotary_module(model: nn.Module) -> nn.Module | None:
    """The model's shared rotary-embedding module, if it has one (Llama-style families)."""
    return next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)


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


def projection_stats(out: torch.Tensor, head_dim: int, weights: torch.Tensor | None) -> torch.Tensor:
    """``stats`` of a projection's output (B, T, H·D) or (B, T, H, D), per head: (B, H, T, 2); one
    kernel where Triton runs."""
    flat = out.flatten(2)  # (B, T, H·D)
    if checked_kernel.available(flat) and flat.stride(-1) == 1:
        return checked_kernel.head_stats(flat, head_dim, weights)
    batch, tokens = out.shape[0], out.shape[1]
    return stats(flat.reshape(batch, tokens, -1, head_dim).transpose(1, 2), weights)


def recorder(
    hook: FaultHook, location: str, part: int | None, head_dim: int, rotary: dict[str, torch.Tensor] | None
) -> Callable:
    """A forward hook storing the stats of ``location`` computed by a projection into ``hook``.

    ``rotary`` is None for models without a rotary embedding, else a dict whose "weights" holds the
    current forward's rotated-sum weights; the sum of q or k is kept only when it can be compared.
    """

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        out = output if part is None else output.chunk(3, dim=-1)[part]  # (B, T, H·D)
        weights, norm_only = None, False
        if location != "v" and rotary is not None:
            weights = rotary.get("weights")
            if weights is None or weights.shape[-1] != head_dim:  # partial rotary or no (cos, sin) seen
                weights, norm_only = None, True
        found = projection_stats(out, head_dim, weights)
        hook.reference[location] = found[..., :1] if norm_only else found

    return record


def check(hook: FaultHook, received: dict[str, torch.Tensor]) -> list[Finding]:
    """Compare the stats of the received q, k, v (their newest T tokens) with the recorded ones.

    Tolerance: 8·D·eps of the dtype times the norm for the norm, times √D · norm (≥ Σ|x_d|) for the sum.
    """
    findings = []
    for location, tensor in received.items():
        reference = hook.reference.pop(location, None)
        if reference is None:
            continue
        newest = tensor[:, :, -reference.shape[-2] :]  # cached or prefix positions come first
        slack = _slack(tensor.shape[-1], tensor.dtype, reference.device)[: reference.shape[-1]]
        findings.append(Finding(hook.layer, f"qkv_{location}", excess_over(newest, reference, slack)))
    return findings


def excess_over(received: torch.Tensor, reference: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """(B, H, T): how far the stats of ``received`` (B, H, T, D) stray from ``reference`` beyond
    ``slack`` times the recorded norm."""
    got = stats(received)[..., : reference.shape[-1]]
    return torch.addcmul((got - reference).abs(), reference[..., :1], slack, value=-1).amax(-1)


@cache
def _slack(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allowed |got - recorded| per unit of norm, for [norm, sum]: 8·D·eps · [1, √D]."""
    return 8 * dim * torch.finfo(dtype).eps * torch.tensor([1.0, dim**0.5], device=device)
