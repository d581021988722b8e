"""Checksums that carry q, k and v from their projections into the attention function.

A flip in q, k or v happens before the attention products, so the products' own checksums agree
with it. Instead, the projections pass their outputs on as they return them (``on_output``), and the
attention function compares, per (batch, head, token), the norm and the sum of each head's vector
there with those of the q, k, v it receives (on CUDA, the checked-attention kernel compares q as it
loads it). The rotary embedding keeps norms but not sums, so for q and k of rotary models the sum is
the one the rotated vector x·cos + rotate_half(x)·sin will have, a weighted sum of x whose weights
come from the model's own (cos, sin), which its rotary module passes on the same way. Cost: two
reductions over O(T·H·D) per tensor and side.

What it covers: any change between the projection's output and what attention receives (the rotary
embedding, a cache or prefix concatenation, copies, an injected flip). Where the received tensor is a
view of the projection's own output (v in Llama-style models; q, k and v in GPT-2 and BERT), both
sides read the same memory, so a fault in that memory after the projection is not caught; stats
taken as the projections return would catch it, at one more pass over q, k and v per layer. On CUDA
the attention kernel compares the q rows it loads, so a fault in those loads is caught too; k and v
are compared in the pass before it (or, folded, by the kernel in loads of their own), from memory, so
a fault in the key loop's loads of k or v is not.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any, NamedTuple

import torch
from torch import nn

from adaplex.faults.detect import Finding
from adaplex.faults.hook import FaultHook


def stats(heads: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, T, 2): per head the norm and the sum of a (B, H, T, D) tensor, in float32. With ``weights``
    (B, T, D), the sum is the weighted one, Σ_d w_td x_d: the sum the tensor will have after the rotary
    embedding."""
    x = heads.float()
    total = x.sum(-1) if weights is None else (x * weights.unsqueeze(1)).sum(-1)
    return torch.stack([torch.linalg.vector_norm(x, dim=-1), total], dim=-1)


def rotated_sum_weights(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """w with Σ_d (x·cos + rotate_half(x)·sin)_d = Σ_d w_d x_d, where rotate_half(x) = [-x₂, x₁]:
    w = cos + [sin₂, -sin₁] (halves of the feature dimension). Shape (B, T, D), in cos's dtype (the
    model's: a bfloat16 model's weights cost half the reads, well within the bfloat16 slack)."""
    half = sin.shape[-1] // 2
    return (cos.float() + torch.cat([sin[..., half:], -sin[..., :half]], dim=-1).float()).to(cos.dtype)


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


class Recorded(NamedTuple):
    """A projection's output as it returned it, (B, T, H·D); the weights (B, T, D) of the sum its
    rows will have after the rotary embedding (None: the plain sum); and how many stats can be
    compared: 2 (norm and sum) or 1 (the norm only: a partial rotary, or no (cos, sin) seen)."""

    out: torch.Tensor
    weights: torch.Tensor | None
    columns: int

    def stats(self, head_dim: int) -> torch.Tensor:
        """(B, H, T, columns): ``stats`` of each head's rows."""
        batch, tokens = self.out.shape[:2]
        heads = self.out.reshape(batch, tokens, -1, head_dim).transpose(1, 2)
        return stats(heads, self.weights)[..., : self.columns]


def on_output(module: nn.Module, record: Callable[[Any], None]) -> Callable[[], None]:
    """Make ``module`` pass each output to ``record`` before returning it, as a forward hook would,
    and return the undo (undo in the reverse order of wrapping). Not a hook: a module with hooks takes
    nn.Module's slow call path, about 20 µs a call on an H100 host, three calls a layer here."""
    inner = module.forward
    own = "forward" in module.__dict__  # wrapped already

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        record(out)
        return out

    module.forward = forward

    def undo() -> None:
        if own:
            module.forward = inner
        else:
            del module.forward

    return undo


def recorder(
    hook: FaultHook, location: str, part: int | None, head_dim: int, rotary: dict[str, torch.Tensor] | None
) -> Callable[[torch.Tensor], None]:
    """Keeps the output a projection computed for ``location`` (see ``on_output``) in
    ``hook.reference``; the attention function computes and compares its stats (in the kernel where
    it runs).

    ``rotary`` is None for models without a rotary embedding, else a dict whose "weights" holds the
    current forward's rotated-sum weights; the sum of q or k is kept only when it can be compared.
    """

    def record(output: torch.Tensor) -> None:
        out = output if part is None else output.chunk(3, dim=-1)[part]  # (B, T, H·D) or Qwen3's (B, T, H, D)
        weights, columns = None, 2
        if location != "v" and rotary is not None:
            weights = rotary.get("weights")  # (B or 1, T, D)
            if weights is None or weights.shape[-1] != head_dim or weights.shape[-2] != out.shape[1]:
                weights, columns = None, 1  # partial rotary, or no (cos, sin) seen for these tokens
        hook.reference[location] = Recorded(out if out.dim() == 3 else out.flatten(2), weights, columns)

    return record


def check(hook: FaultHook, received: dict[str, torch.Tensor]) -> list[Finding]:
    """Compare the stats of the received q, k, v (their newest T tokens) with the recorded ones.

    Tolerance: 8·D·eps of the dtype times the norm for the norm, times √D · norm (≥ Σ|x_d|) for the sum.
    """
    findings = []
    for location, tensor in received.items():
        recorded = hook.reference.pop(location, None)
        if recorded is None:
            continue
        reference = recorded.stats(tensor.shape[-1])
        newest = tensor[:, :, -reference.shape[-2] :]  # cached or prefix positions come first
        slack = _slack(tensor.shape[-1], tensor.dtype, reference.device)[: reference.shape[-1]]
        findings.append(Finding(hook.layer, f"qkv_{location}", excess_over(newest, reference, slack)))
    return findings


def excess_over(received: torch.Tensor, reference: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """(B, H, T): how far the stats of ``received`` (B, H, T, D) stray from ``reference`` beyond
    ``slack`` times the recorded norm."""
    got = stats(received)[..., : reference.shape[-1]]
    return torch.addcmul((got - reference).abs(), reference[..., :1], slack, value=-1).amax(-1)


def slack(dim: int, dtype: torch.dtype) -> tuple[float, float]:
    """Allowed |got - recorded| per unit of norm, for [norm, sum]: 8·D·eps · [1, √D] (the checked-attention
    kernel's too)."""
    unit = 8 * dim * torch.finfo(dtype).eps
    return unit, unit * dim**0.5


@cache
def _slack(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``slack`` as a tensor on ``device``."""
    return torch.tensor(slack(dim, dtype), device=device)
