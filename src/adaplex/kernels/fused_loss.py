"""Cross-entropy fused with the output projection: Liger's fused linear cross-entropy, which computes
the (tokens × vocab) logits chunk by chunk and consumes each chunk at once (loss and input gradient),
so the whole logits tensor and its float32 copy are never held.

loss = mean over targets ≠ ignore_index of  logsumexp(h W^T) - (h W^T)[target]
"""

from __future__ import annotations

from functools import cache

import torch

from adaplex.kernels import INTERPRETED


@cache
def _liger_loss():
    """Liger's autograd function, or None without liger-kernel and Triton (imported only here: slow to import)."""
    try:
        from liger_kernel.ops import LigerFusedLinearCrossEntropyFunction
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyFunction


def unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the fused loss cannot run on ``x``'s device (None: it can): it needs liger-kernel with
    Triton, and CUDA (or Triton's interpreter)."""
    if not (x.is_cuda or INTERPRETED):
        return f"the fused loss runs on CUDA, and this batch is on {x.device.type}"
    if _liger_loss() is None:
        return "liger-kernel (with triton) is not installed"
    return None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Mean cross-entropy of logits hidden @ weightᵀ against targets: (N, H), (V, H), (N,). Under autocast
    both operands are cast to its dtype first, as the unfused projection would be."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(kind, enabled=False):
        loss, *_ = _liger_loss().apply(hidden, weight, targets, None, None, ignore_index)
    return loss
