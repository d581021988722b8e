"""A bank of per-key LoRA/MoSLoRA experts at one site, applied per sample in one pass.

For sample b routed to key k(b):  Δ_b(x) = w · s_k · B_k M_k A_k x_b   (M_k = I for LoRA experts).
The bank holds A: (K, r, in), B: (K, out, r) (and M: (K, r, r)); experts of smaller rank r_k are
zero-padded to r and masked, so they stay exactly rank r_k. A forward gathers each sample's
A and its B (with M, scale and weight folded in) and runs two batched matmuls: no Python loop over
samples or keys. A sample routed to no key (index -1) gets no expert delta.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from adaplex.errors import AdapterNameError
from adaplex.kernels import gathered_lora
from adaplex.methods.base import MethodConfig, SiteAdapter
from adaplex.methods.lora import ALL_LINEAR, init_mixer


class ExpertsConfig(MethodConfig):
    method: Literal["experts"] = "experts"
    keys: tuple[str, ...] = Field(min_length=1, description="routing keys, one expert each")
    r: int = Field(16, gt=0, description="rank of every expert unless key_ranks says otherwise")
    alpha: float = Field(32.0, gt=0)
    rslora: bool = False
    key_ranks: dict[str, int] = Field(default_factory=dict, description="key -> rank of that expert")
    mixer_init: Literal["identity", "kaiming", "orthogonal"] | None = Field(None, description="MoSLoRA experts")
    targets: tuple[str, ...] = ALL_LINEAR

    @model_validator(mode="after")
    def _known_keys(self) -> ExpertsConfig:
        unknown = set(self.key_ranks) - set(self.keys)
        if unknown:
            raise ValueError(f"key_ranks names keys that are not in keys: {sorted(unknown)}")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("keys repeat")
        return self

    def rank(self, key: str) -> int:
        return self.key_ranks.get(key, self.r)

    def scaling(self, key: str) -> float:
        r = self.rank(key)
        return self.alpha / (r**0.5 if self.rslora else r)


@dataclass(frozen=True)
class Route:
    """Per-sample routing of one bank: expert index per sample (-1: none) and the bank's weight.

    Without autograd (inference, generation), each site's gathered per-sample weights are computed
    once per route and reused for every forward inside it, e.g. every decode step of generate().
    """

    index: torch.Tensor  # (B,) long
    weight: float = 1.0
    gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, compare=False)


class ExpertBank(SiteAdapter):
    """K experts at one site; forward takes a Route as its weight."""

    def __init__(self, in_features: int, out_features: int, config: ExpertsConfig) -> None:
        super().__init__()
        ranks = [config.rank(k) for k in config.keys]
        r, count = max(ranks), len(ranks)
        self.A = nn.Parameter(torch.empty(count, r, in_features))
        self.B = nn.Parameter(torch.zeros(count, out_features, r))
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=5**0.5)
        mask = torch.arange(r).unsqueeze(0) < torch.tensor(ranks).unsqueeze(1)  # (K, r)
        self.register_buffer("rank_mask", mask.float(), persistent=False)
        self.register_buffer("scale", torch.tensor([config.scaling(k) for k in config.keys]), persistent=False)
        with torch.no_grad():
            self.A.mul_(self.rank_mask.unsqueeze(-1))
        self.mixer: nn.Parameter | None = None
        if config.mixer_init is not None:
            self.mixer = nn.Parameter(torch.empty(count, r, r))
            for m in self.mixer:
                init_mixer(m, config.mixer_init)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, weight: Route) -> torch.Tensor:  # type: ignore[override]
        return self.add_to(torch.zeros_like(base_out), x, base_out, weight)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, weight: object) -> torch.Tensor:
        """out + Δ(x): with autograd two batched matmuls (the addition fused into the second); without,
        the route's cached gathered weights, in one fused kernel where Triton runs (CUDA)."""
        if not isinstance(weight, Route):
            raise AdapterNameError("an expert bank needs per-sample keys: run the batch inside handle.route(keys)")
        if torch.is_grad_enabled():
            down, up = self.gather(weight, x.dtype)
        else:
            down, up = self.gathered(weight, x.dtype)
            if gathered_lora.available(x):
                return gathered_lora.gathered_lora_add(out, x, down, up)
        return torch.baddbmm(out, torch.bmm(x, down), up)  # (B, T, r) -> (B, T, out)

    def gathered(self, route: Route, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``gather`` made contiguous, computed once per route (for use without autograd)."""
        cached = route.gathered.get(id(self))
        if cached is None:
            down, up = self.gather(route, dtype)
            cached = route.gathered[id(self)] = (down.contiguous(), up.contiguous())
        return cached

    def gather(self, route: Route, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's (A_k^T, (w·s_k·B_k M_k)^T), rank-masked, in ``dtype``: (B, in, r) and (B, r, out)."""
        index = route.index.clamp(min=0)  # (B,)
        mask = self.rank_mask[index]  # (B, r)
        gate = (route.index >= 0).to(self.scale.dtype) * self.scale[index] * route.weight  # (B,)
        down = self.A[index] * mask.unsqueeze(-1)  # (B, r, in)
        up = self.B[index] * mask.unsqueeze(1)  # (B, out, r)
        if self.mixer is not None:
            up = torch.bmm(up, self.mixer[index] * mask.unsqueeze(1) * mask.unsqueeze(-1))  # (B, out, r)
        return down.transpose(1, 2).to(dtype), (up * gate.view(-1, 1, 1)).transpose(1, 2).to(dtype)

    def expert_state(self, k: int, rank: int) -> dict[str, torch.Tensor]:
        """Expert k as a plain LoRA/MoSLoRA state dict of rank ``rank`` (keys A, B, mixer)."""
        state = {"A": self.A[k, :rank], "B": self.B[k, :, :rank]}
        if self.mixer is not None:
            state["mixer"] = self.mixer[k, :rank, :rank]
        return {n: t.detach().clone() for n, t in state.items()}

    @torch.no_grad()
    def load_expert(self, k: int, state: dict[str, torch.Tensor]) -> None:
        rank = state["A"].shape[0]
        self.A[k].zero_()
        self.B[k].zero_()
        self.A[k, :rank] = state["A"]
        self.B[k, :, :rank] = state["B"]
        if self.mixer is not None:
            self.mixer[k].zero_()
            self.mixer[k, :rank, :rank] = state["mixer"]
