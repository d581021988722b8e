"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190).

Each attention layer gets L learned key/value vectors per key-value head, prepended to the
keys and values of every sequence: attention(q, [P_k; K], [P_v; V]). With the optional
reparameterisation, P = MLP(E) for a learned embedding E: (L, hidden), as in the paper §4.3.
The prefix is scaled by its weight: P_k, P_v -> w·P_k, w·P_v, with w one value per sample where the
weight varies (a per-token gate becomes its mean over the tokens, as UniPELT's prefix gate is); where
w = 0 the attention function masks the prefix out, so that a weight of 0 is the prefix absent.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from adaplex.methods.base import Adapter, MethodConfig, SiteWeight, per_sample, scale_of


class PrefixConfig(MethodConfig):
    method: Literal["prefix"] = "prefix"
    length: int = Field(16, gt=0, description="number of prefix positions L")
    reparam_hidden: int | None = Field(None, gt=0, description="hidden width of the reparameterisation MLP")
    init_std: float = Field(0.02, gt=0, description="std of the initial prefix (or embedding)")
    targets: tuple[str, ...] = ("attention",)


class Prefix(Adapter):
    """Learned keys and values for one attention layer."""

    def __init__(self, num_kv_heads: int, head_dim: int, hidden: int, config: PrefixConfig) -> None:
        super().__init__()
        self.shape = (num_kv_heads, config.length, head_dim)
        if config.reparam_hidden is None:
            self.kv = nn.Parameter(torch.randn(2, *self.shape) * config.init_std)
            self.mlp: nn.Sequential | None = None
        else:
            self.kv = nn.Parameter(torch.randn(config.length, hidden) * config.init_std)
            self.mlp = nn.Sequential(
                nn.Linear(hidden, config.reparam_hidden),
                nn.Tanh(),
                nn.Linear(config.reparam_hidden, 2 * num_kv_heads * head_dim),
            )

    def forward(self, weight: SiteWeight) -> tuple[torch.Tensor, torch.Tensor]:
        """Return w·P_k, w·P_v: each (H_kv, L, D) for a float weight, (B, H_kv, L, D) for one per sample."""
        if self.mlp is None:
            kv = self.kv  # (2, H_kv, L, D)
        else:
            heads, length, dim = self.shape
            kv = self.mlp(self.kv).view(length, 2, heads, dim).permute(1, 2, 0, 3)  # (2, H_kv, L, D)
        kv = kv * per_sample(scale_of(weight, "prefix"), dims=5)  # (2, H_kv, L, D), per sample (B, 2, H_kv, L, D)
        return kv.unbind(-4)
