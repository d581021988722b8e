"""The wrapper that applies adapters beside a base linear layer.

AdaptedLinear(x) = base(x) + Σ_{i active} w_i · Δ_i(x, base(x))

The base layer (``nn.Linear`` or GPT-2's ``Conv1D``) is held, not copied or subclassed;
``merge``/``unmerge`` are the only operations that touch its weight, and ``unmerge``
restores the exact original tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adaplex.compose import Stack
from adaplex.methods.base import SiteAdapter

if TYPE_CHECKING:
    from adaplex.shared_input import SharedInputGroup

LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (whose weight is (in, out))."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


class FusedParts(SiteAdapter):
    """Adapters on named slices of a fused projection (GPT-2's c_attn = [q | k | v]).

    Δ(x) = concat_p Δ_p(x) over the parts, with zeros for parts that have no adapter, so
    targeting q and v of c_attn equals adapting separate q and v projections.
    """

    def __init__(self, part_sizes: dict[str, int], parts: dict[str, SiteAdapter]) -> None:
        super().__init__()
        self.part_sizes = part_sizes
        self.parts = nn.ModuleDict(parts)
        self.mergeable = all(p.mergeable for p in parts.values())

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
        outs = base_out.split(list(self.part_sizes.values()), dim=-1)
        return torch.cat(
            [
                self.parts[p](x, out, weight) if p in self.parts else torch.zeros_like(out)
                for p, out in zip(self.part_sizes, outs, strict=True)
            ],
            dim=-1,
        )

    def delta_weight(self) -> torch.Tensor:
        first = next(iter(self.parts.values())).delta_weight()
        blocks = [
            self.parts[p].delta_weight() if p in self.parts else first.new_zeros(size, first.shape[1])
            for p, size in self.part_sizes.items()
        ]
        return torch.cat(blocks, dim=0)  # (out, in)


class AdaptedLinear(nn.Module):
    """A base linear layer plus named adapters, weighted by the model's shared Stack."""

    def __init__(self, base: nn.Module, stack: Stack) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.stack = stack
        self.group: SharedInputGroup | None = None  # siblings fed the same input (set by inject.link_shared_inputs)
        self._original_weight: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return linear_shape(self.base)[0]

    @property
    def out_features(self) -> int:
        return linear_shape(self.base)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.stack.active
        grouped = self.group.take(self, x, active) if self.group is not None else None
        if grouped is None:
            base_out = out = self.base(x)
            applied: tuple[str, ...] = ()
        else:
            base_out, out, applied = grouped
        for name, adapter in self.adapters.items():
            weight = active.get(name)
            if weight is not None and name not in applied:
                out = adapter.add_to(out, x, base_out, weight)
        return out

    @torch.no_grad()
    def merge(self, weights: dict[str, float]) -> None:
        """W <- W + Σ w_i ΔW_i for the named adapters this layer holds; keeps W for unmerge."""
        held = {n: w for n, w in weights.items() if n in self.adapters}
        if not held:
            return
        if self._original_weight is None:
            self._original_weight = self.base.weight.detach().clone()
        for name, weight in held.items():
            delta = self.adapters[name].delta_weight().to(self.base.weight.dtype) * weight  # (out, in)
            self.base.weight += delta.T if isinstance(self.base, Conv1D) else delta

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight saved by the first merge."""
        if self._original_weight is not None:
            self.base.weight.copy_(self._original_weight)
            self._original_weight = None
