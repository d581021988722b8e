"""Bottleneck adapter after the feed-forward block (Houlsby et al. 2019, arXiv:1902.00751).

Δ(h) = U σ(D h), applied to the FFN output h with a residual: h' = h + w · Δ(h).
D: (width, hidden), U: (hidden, width) starts at zero, so a fresh adapter changes nothing.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from adaplex.methods.base import MethodConfig, SiteAdapter, SiteWeight, scale_of

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckConfig(MethodConfig):
    method: Literal["bottleneck"] = "bottleneck"
    reduction_factor: int | None = Field(16, gt=0, description="width = hidden // reduction_factor")
    width: int | None = Field(None, gt=0, description="explicit bottleneck width; overrides reduction_factor")
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    targets: tuple[str, ...] = ("ffn-out",)

    @model_validator(mode="after")
    def _one_size(self) -> BottleneckConfig:
        if self.width is None and self.reduction_factor is None:
            raise ValueError("give width or reduction_factor")
        return self

    def width_for(self, hidden: int) -> int:
        return self.width or max(1, hidden // self.reduction_factor)  # type: ignore[operator]


class Bottleneck(SiteAdapter):
    """Down-projection, activation, zero-initialised up-projection, on the base layer's output."""

    def __init__(self, in_features: int, out_features: int, config: BottleneckConfig) -> None:
        super().__init__()
        width = config.width_for(out_features)
        self.down = nn.Linear(out_features, width)
        self.act = ACTIVATIONS[config.activation]()
        self.up = nn.Linear(width, out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def add_to(
        self, out: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, weight: SiteWeight, inplace: bool = False
    ) -> torch.Tensor:
        """out + w · U σ(D h), the scaling fused into the addition."""
        delta = self.up(self.act(self.down(base_out)))  # (..., hidden)
        scale = scale_of(weight, "bottleneck")
        if isinstance(scale, torch.Tensor):  # (B, T|1, 1)
            return out.addcmul_(delta, scale) if inplace else torch.addcmul(out, delta, scale)
        return out.add_(delta, alpha=scale) if inplace else torch.add(out, delta, alpha=scale)
