"""Checksums that carry q, k and v from their projections into the attention function.

A flip in q, k or v happens before the attention products, so the products' own checksums agree
with it. Instead, forward hooks on the projections record, per (batch, head, token), the squared
norm and the sum of each head's vector; the attention function compares them with the q, k, v it
receives. The rotary embedding keeps norms but not sums, so for q and k of rotary models the sum is
the one the rotated vector x·cos + rotate_half(x)·sin will have, a weighted sum of x whose weights
come from the model's own (cos, sin), captured from its rotary module by another hook. Cost: two
reductions over O(T·H·D) per tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from adaplex.faults.detect import Finding, _report
from adaplex.faults.hook import FaultHook

Stats = dict[str, torch.Tensor]  # "norm" (and for v "sum"), each (B, H, T)


def stats(heads: torch.Tensor, weights: torch.Tensor | None = None) -> Stats:
    """Per-head squared norm and sum of a (B, H, T, D) tensor, in float32. With ``weights`` (B, T, D),
    the sum is the weighted one, Σ_d w_td x_d: the sum the tensor will have after the rotary embedding."""
    x = heads.float()
    total = x.sum(-1) if weights is None else torch.einsum("bhtd,btd->bht", x, weights)
    return {"norm": x.pow(2).sum(-1), "sum": total}


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


def recorder(
    hook: FaultHook, location: str, part: int | None, head_dim: int, rotary: dict[str, torch.Tensor] | None
) -> Callable:
    """A forward hook storing the stats of ``location`` computed by a projection into ``hook``.

    ``rotary`` is None for models without a rotary embedding, else a dict whose "weights" holds the
    current forward's rotated-sum weights; the sum of q or k is kept only when it can be compared.
    """

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        out = output if part is None else output.chunk(3, dim=-1)[part]
        batch, tokens = out.shape[0], out.shape[1]
        heads = out.reshape(batch, tokens, -1, head_dim).transpose(1, 2)  # (B, H, T, D)
        if location == "v" or rotary is None:
            hook.reference[location] = stats(heads)
            return
        weights = rotary.get("weights")
        if weights is not None and weights.shape[-1] == head_dim:
            hook.reference[location] = stats(heads, weights)
        else:  # partial rotary or no (cos, sin) seen: the norm alone
            hook.reference[location] = {"norm": stats(heads)["norm"]}

    return record


def check(hook: FaultHook, received: dict[str, torch.Tensor]) -> list[Finding]:
    """Compare the stats of the received q, k, v (their newest T tokens) with the recorded ones."""
    findings = []
    for location, tensor in received.items():
        reference = hook.reference.pop(location, None)
        if reference is None:
            continue
        tokens = reference["norm"].shape[-1]
        got = stats(tensor[:, :, -tokens:])  # cached or prefix positions come first
        eps = torch.finfo(tensor.dtype).eps
        scale = 8 * tensor.shape[-1] * eps
        excess = (got["norm"] - reference["norm"]).abs() - scale * reference["norm"] - 1e-30
        if "sum" in reference:
            magnitude = reference["norm"].sqrt() * tensor.shape[-1] ** 0.5
            excess = torch.maximum(excess, (got["sum"] - reference["sum"]).abs() - scale * magnitude - 1e-30)
        findings.append(partial(_report, hook.layer, f"qkv_{location}", excess))
    return findings
