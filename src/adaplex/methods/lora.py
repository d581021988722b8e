"""LoRA (Hu et al. 2021, arXiv:2106.09685), MoSLoRA (Wu et al. 2024, arXiv:2406.11909), and the one
functional per-sample LoRA that expert banks and given (generated) adapters share.

LoRA:    Δ(x) = s · B A x,      A: (r, in), B: (out, r), s = α/r (rsLoRA: α/√r, Kalajdzievski 2023).
MoSLoRA: Δ(x) = s · B M A x,    with a learnable r×r mixer M between the two projections.
B starts at zero, so a fresh adapter changes nothing.
Per sample: y_b = out_b + (x_b @ down_b) @ up_b, down: (B, in, r), up: (B, r, out) (``per_sample_lora``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from adaplex.errors import AdapterNameError
from adaplex.kernels import gathered_lora
from adaplex.methods.base import Factors, MethodConfig, SiteAdapter, SiteWeight, add_product, scale_of
from adaplex.util.names import name_matches

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
        return lora_scaling(self.alpha, self.r, self.rslora)


def lora_scaling(alpha: float, r: int, rslora: bool) -> float:
    """s = α/r, or α/√r with rank-stabilised scaling."""
    return alpha / (math.sqrt(r) if rslora else r)


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

    def add_to(
        self, out: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, weight: SiteWeight, inplace: bool = False
    ) -> torch.Tensor:
        """out + w · s · B (M) A x; a per-sample or per-token w scales the rank-r side, r/out times fewer
        products than scaling the output."""
        h = F.linear(self.dropout(x), self.A)  # (..., r)
        if self.mixer is not None:
            h = F.linear(h, self.mixer)  # (..., r)
        scale = scale_of(weight, "LoRA")
        if isinstance(scale, torch.Tensor):
            h, scale = h * scale, 1.0  # (B, T, r) * (B, T|1, 1)
        return add_product(out, h, self.B, self.scaling * scale, inplace)  # (..., out)

    def folded_B(self) -> torch.Tensor:
        """B with the mixer folded in (B·M), so that Δ = s · folded_B · A is plain LoRA."""
        return self.B if self.mixer is None else self.B @ self.mixer

    def delta_weight(self) -> torch.Tensor:
        return (self.folded_B() @ self.A) * self.scaling  # (out, in)


def per_sample_lora(out: torch.Tensor, x: torch.Tensor, factors: Factors) -> torch.Tensor:
    """out + g · (x @ downᵀ) @ up for every sample with its own factors (``Factors``): (B, T, out), (B, T, in).
    One fused kernel where it runs (CUDA, no autograd), else two batched matmuls with the addition
    fused into the second; never a loop over samples."""
    if not torch.is_grad_enabled() and gathered_lora.available(x):
        return gathered_lora.gathered_lora_add(out, x, *factors)
    down, up = factors.down, factors.up
    if factors.rows is not None:
        down, up = down[factors.rows], up[factors.rows]  # (B, r, in), (B, r, out)
    h = torch.bmm(x, down.transpose(1, 2))  # (B, T, r)
    if factors.gain is not None:
        h = h * factors.gain.to(h.dtype).view(-1, 1, 1)
    return torch.baddbmm(out, h, up)  # (B, T, out)


class PerSampleLoRA(SiteAdapter):
    """An adapter whose weight at a site resolves to per-sample factors (an expert bank's gathered
    experts, or a given adapter's A and B), applied by ``per_sample_lora``."""

    needs: str  # what to do when the weight is not per-sample factors

    def add_to(
        self, out: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, weight: SiteWeight, inplace: bool = False
    ) -> torch.Tensor:
        if not isinstance(weight, Factors):
            raise AdapterNameError(self.needs)
        return per_sample_lora(out, x, weight)


class GivenLoRAConfig(MethodConfig):
    """LoRA sites whose A and B are given per sample at forward time (a hypernetwork's output)."""

    method: Literal["given-lora"] = "given-lora"
    r: int = Field(8, gt=0, description="rank of the given A and B")
    alpha: float = Field(16.0, gt=0, description="scale numerator: s = alpha / r (or / sqrt(r))")
    rslora: bool = False
    targets: tuple[str, ...] = ALL_LINEAR

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.rslora)


class GivenLoRA(PerSampleLoRA):
    """A LoRA site without parameters: sample b's A_b (r, in) and B_b (out, r) come with the batch
    (``adaplex.core.weights.Given``): Δ_b(x) = w · s · B_b A_b x_b."""

    needs = "a given-lora adapter needs each sample's A and B: run the batch inside handle.given(name, weights)"

    def __init__(self, in_features: int, out_features: int, config: GivenLoRAConfig) -> None:
        super().__init__()
        self.shape = (config.r, in_features, out_features)
        self.scaling = config.scaling

    def factors(self, site: str, A: torch.Tensor, B: torch.Tensor, weight: float, dtype: torch.dtype) -> Factors:
        """(A_b, (w·s·B_b)ᵀ) for A: (B, r, in), B: (B, out, r), checked against this site's shape."""
        r, n_in, n_out = self.shape
        if A.dim() != 3 or B.dim() != 3 or A.shape[1:] != (r, n_in) or B.shape[1:] != (n_out, r):
            raise AdapterNameError(
                f"given weights for {site} have shapes {tuple(A.shape)} and {tuple(B.shape)}; "
                f"expected (batch, {r}, {n_in}) and (batch, {n_out}, {r})"
            )
        return Factors(A.to(dtype), (B * (self.scaling * weight)).transpose(1, 2).to(dtype))
