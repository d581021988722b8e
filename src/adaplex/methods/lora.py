"""LoRA (Hu et al. 2021, arXiv:2106.09685) and MoSLoRA (Wu et al. 2024, arXiv:2406.11909).

LoRA:    Δ(x) = s · B A x,      A: (r, in), B: (out, r), s = α/r (rsLoRA: α/√r, Kalajdzievski 2023).
MoSLoRA: Δ(x) = s · B M A x,    with a learnable r×r mixer M between the two projections.
B starts at zero, so a fresh adapter changes nothing.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from adaplex.methods.base import MethodConfig, SiteAdapter
from adaplex.names import name_matches

ALL_LINEAR = ("all-linear",)


class LoRAConfig(MethodConfig):
    method: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale numerator: s = alpha / r (or / sqrt(r))")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    targets: tuple[str, ...] = ALL_LINEAR
    rank_pattern: dict[str, int] = Field(default_factory=dict, description="site pattern -> rank there")
    alpha_pattern: dict[str, float] = Field(default_factory=dict, description="site pattern -> alpha there")

    def at_site(self, site: str) -> LoRAConfig:
        """This config with r and alpha taken from the first rank/alpha pattern that matches ``site``."""
        update: dict[str, float] = {}
        for field, pattern in (("r", self.rank_pattern), ("alpha", self.alpha_pattern)):
            key = next((k for k in pattern if name_matches(k, site)), None)
            if key is not None:
                update[field] = pattern[key]
        return self.model_copy(update=update) if update else self

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class MoSLoRAConfig(LoRAConfig):
    method: Literal["moslora"] = "moslora"  # type: ignore[assignment]
    mixer_init: Literal["identity", "kaiming", "orthogonal"] = "kaiming"


def init_mixer(mixer: torch.Tensor, how: str) -> None:
    """Initialise the r×r MoSLoRA mixer in place."""
    with torch.no_grad():
        if how == "identity":
            mixer.copy_(torch.eye(mixer.shape[0], dtype=mixer.dtype))
        elif how == "kaiming":
            nn.init.kaiming_uniform_(mixer, a=math.sqrt(5))
        else:
            nn.init.orthogonal_(mixer)


class LoRA(SiteAdapter):
    """Low-rank update beside a linear layer; MoSLoRA when the config carries a mixer."""

    mergeable = True

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig) -> None:
        super().__init__()
        self.scaling = config.scaling
        self.A = nn.Parameter(torch.empty(config.r, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, config.r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as PEFT and loralib do
        self.mixer: nn.Parameter | None = None
        if isinstance(config, MoSLoRAConfig):
            self.mixer = nn.Parameter(torch.empty(config.r, config.r))
            init_mixer(self.mixer, config.mixer_init)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), self.A)  # (..., r)
        if self.mixer is not None:
            h = F.linear(h, self.mixer)  # (..., r)
        return F.linear(h, self.B) * (self.scaling * weight)  # (..., out)

    def folded_B(self) -> torch.Tensor:
        """B with the mixer folded in (B·M), so that Δ = s · folded_B · A is plain LoRA."""
        return self.B if self.mixer is None else self.B @ self.mixer

    def delta_weight(self) -> torch.Tensor:
        return (self.folded_B() @ self.A) * self.scaling  # (out, in)
