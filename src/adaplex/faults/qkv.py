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
from adaplex.kernels.checked_attention import qkv_slack as slack


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
    reference: dict[str, Recorded],
    location: str,
    part: int | None,
    head_dim: int,
    rotary: dict[str, torch.Tensor] | None,
) -> Callable[[torch.Tensor], None]:
    """Keeps the output a projection computed for ``location`` (see ``on_output``) in ``reference``
    (a fault hook's); the attention function computes and compares its stats (in the kernel where
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
        reference[location] = Recorded(out if out.dim() == 3 else out.flatten(2), weights, columns)

    return record


def check(layer: int, reference: dict[str, Recorded], received: dict[str, torch.Tensor]) -> list[Finding]:
    """Compare the stats of the received q, k, v (their newest T tokens) with the ones recorded in
    ``reference`` (taken from it).

    Tolerance: 8·D·eps of the dtype times the norm for the norm, times √D · norm (≥ Σ|x_d|) for the sum.
    """
    findings = []
    for location, tensor in received.items():
        recorded = reference.pop(location, None)
        if recorded is None:
            continue
        then = recorded.stats(tensor.shape[-1])
        newest = tensor[:, :, -then.shape[-2] :]  # cached or prefix positions come first
        tolerance = _slack(tensor.shape[-1], tensor.dtype, then.device)[: then.shape[-1]]
        findings.append(Finding(layer, f"qkv_{location}", excess_over(newest, then, tolerance)))
    return findings


def excess_over(received: torch.Tensor, reference: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """(B, H, T): how far the stats of ``received`` (B, H, T, D) stray from ``reference`` beyond
    ``slack`` times the recorded norm."""
    got = stats(received)[..., : reference.shape[-1]]
    return torch.addcmul((got - reference).abs(), reference[..., :1], slack, value=-1).amax(-1)


@cache
def _slack(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``slack`` as a tensor on ``device``."""
    return torch.tensor(slack(dim, dtype), device=device)
