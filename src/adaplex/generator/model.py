"""The hyper-convolutional generator: conditioning embeddings -> a (T, D) grid of adapter tokens.

    cond (B, P, E) --input projection--> c (B, H)
    sequence expander: a learned latent grid (C, L, t, W), scaled and shifted by c per channel and
        layer (FiLM), so that every sample starts from its own copy of the grid
    hyper-convolutional blocks: residual convolutions along the width (1, 1, k), the height, i.e. the
        tokens of a layer (1, k, 1), and the layer axis (k, 1, 1) of the grid
    output projection: channels -> 1, then width W -> D by one projection per token position within a
        layer, plus a learned (T, D) bias

The output projection starts at zero, so an untrained generator emits the bias alone: with grids
normalised per position (the zoo's mean removed), that is the zoo's mean adapter.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class GeneratorShape(BaseModel):
    """Sizes of the network; ``layers``/``tokens_per_layer``/``width`` come from the layout."""

    model_config = ConfigDict(extra="forbid")

    channels: int = Field(16, gt=0)
    latent_width: int = Field(64, gt=0, description="width W of the latent grid (the output is D wide)")
    hidden: int = Field(256, gt=0, description="size of the pooled condition")
    blocks: int = Field(2, ge=0)
    kernel: int = Field(3, gt=0, description="odd kernel size of every convolution")


class HyperConvBlock(nn.Module):
    """x + conv_width(act(norm(x))), then the same along the height and the layer axes: (B, C, L, t, W)."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        pad = kernel // 2
        shapes = [((1, 1, kernel), (0, 0, pad)), ((1, kernel, 1), (0, pad, 0)), ((kernel, 1, 1), (pad, 0, 0))]
        self.norms = nn.ModuleList(nn.GroupNorm(1, channels) for _ in shapes)
        self.convs = nn.ModuleList(nn.Conv3d(channels, channels, k, padding=p) for k, p in shapes)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, conv in zip(self.norms, self.convs, strict=True):
            x = x + conv(self.act(norm(x)))
        return x


class HyperConvGenerator(nn.Module):
    def __init__(
        self, shape: GeneratorShape, lines: int, embed: int, layers: int, tokens_per_layer: int, width: int
    ) -> None:
        super().__init__()
        C, L, t, W, H = shape.channels, layers, tokens_per_layer, shape.latent_width, shape.hidden
        self.grid = (C, L, t, W)
        self.project = nn.Sequential(
            nn.LayerNorm(embed), nn.Linear(embed, H), nn.GELU(), nn.Flatten(), nn.Linear(lines * H, H), nn.GELU()
        )
        self.latent = nn.Parameter(torch.randn(C, L, t, W) * 0.02)
        self.scale = nn.Linear(H, C * L)
        self.shift_layer = nn.Linear(H, C * L)
        self.shift_width = nn.Linear(H, C * W)
        self.blocks = nn.Sequential(*(HyperConvBlock(C, shape.kernel) for _ in range(shape.blocks)))
        self.to_one = nn.Conv3d(C, 1, 1)
        self.out_weight = nn.Parameter(torch.zeros(t, W, width))  # one W -> D projection per token position
        self.bias = nn.Parameter(torch.zeros(L * t, width))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, P, E) -> (B, T, D)."""
        C, L, t, W = self.grid
        B = cond.shape[0]
        c = self.project(cond)  # (B, H)
        scale = self.scale(c).view(B, C, L, 1, 1)
        shift = self.shift_layer(c).view(B, C, L, 1, 1) + self.shift_width(c).view(B, C, 1, 1, W)
        x = self.latent * (1 + scale) + shift  # (B, C, L, t, W)
        x = self.to_one(self.blocks(x)).squeeze(1)  # (B, L, t, W)
        out = torch.einsum("bltw,twd->bltd", x, self.out_weight)  # (B, L, t, D)
        return out.reshape(B, L * t, -1) + self.bias  # (B, T, D)
