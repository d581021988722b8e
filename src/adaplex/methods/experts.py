"""A bank of per-key LoRA/MoSLoRA experts at one site, applied per sample in one pass.

For sample b routed to key k(b):  Δ_b(x) = w · s_k · B_k M_k A_k x_b   (M_k = I for LoRA experts).
The bank holds A: (K, r, in), B: (K, out, r) (and M: (K, r, r)); experts of smaller rank r_k are
zero-padded to r and masked, so they stay exactly rank r_k. A forward gathers the batch's experts
(``gather``: A and B with M folded in) and applies them with the per-sample functional LoRA
(``lora.per_sample_lora``): no Python loop over samples or keys. A sample routed to no key
(index -1) gets no expert delta. A paged bank (``page``) keeps its experts in host memory and a few
of them in device slots; ``adaplex.core.paging`` decides which.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from adaplex.methods.base import Factors, MethodConfig, Selection
from adaplex.methods.lora import ALL_LINEAR, PerSampleLoRA, init_mixer, lora_scaling

KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a key names a directory of its bundle


class ExpertsConfig(MethodConfig):
    method: Literal["experts"] = "experts"
    keys: tuple[str, ...] = Field(min_length=1, description="routing keys, one expert each")
    r: int = Field(16, gt=0, description="rank of every expert unless key_ranks says otherwise")
    alpha: float = Field(32.0, gt=0)
    rslora: bool = False
    key_ranks: dict[str, int] = Field(default_factory=dict, description="key -> rank of that expert")
    key_alphas: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="key -> alpha of that expert"
    )
    mixer_init: Literal["identity", "kaiming", "orthogonal"] | None = Field(None, description="MoSLoRA experts")
    targets: tuple[str, ...] = ALL_LINEAR

    @model_validator(mode="after")
    def _known_keys(self) -> ExpertsConfig:
        for field in ("key_ranks", "key_alphas"):
            unknown = set(getattr(self, field)) - set(self.keys)
            if unknown:
                raise ValueError(f"{field} names keys that are not in keys: {sorted(unknown)}")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError("keys repeat")
        odd = [k for k in self.keys if not KEY_PATTERN.fullmatch(k)]
        if odd:
            raise ValueError(f"key {odd[0]!r} may hold only letters, digits, '.', '_' and '-' (not first)")
        return self

    def rank(self, key: str) -> int:
        return self.key_ranks.get(key, self.r)

    def alpha_of(self, key: str) -> float:
        return self.key_alphas.get(key, self.alpha)

    def scaling(self, key: str) -> float:
        return lora_scaling(self.alpha_of(key), self.rank(key), self.rslora)


class ExpertBank(PerSampleLoRA):
    """K experts at one site; its weight is a route (``adaplex.core.weights.Routed``), which resolves
    into each sample's gathered expert through ``gather``."""

    needs = "an expert bank needs per-sample keys: run the batch inside handle.route(keys)"

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
        self.register_buffer("ranks", torch.tensor(ranks), persistent=False)  # (K,) each expert's rank
        with torch.no_grad():
            self.A.mul_(self.rank_mask.unsqueeze(-1))
        self.mixer: nn.Parameter | None = None
        if config.mixer_init is not None:
            self.mixer = nn.Parameter(torch.empty(count, r, r))
            for m in self.mixer:
                init_mixer(m, config.mixer_init)
        self.host: dict[str, torch.Tensor] | None = None  # paged: every expert's tensors, in host memory
        self.register_buffer("slot_of", None, persistent=False)  # paged: (K,) each key's slot, -1: not there

    def _tensors(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "B": self.B} | ({"mixer": self.mixer} if self.mixer is not None else {})

    @torch.no_grad()
    def page(self, slots: int) -> None:
        """Keep every expert in host memory (pinned where the bank is on CUDA, so copies overlap) and room
        for ``slots`` of them on the bank's device: A, B (and M) become (slots, ...), filled by ``load_slot``."""
        device = self.A.device
        self.host = {}
        for name, tensor in self._tensors().items():
            host = tensor.detach().to("cpu", copy=True)
            self.host[name] = host.pin_memory() if device.type == "cuda" else host
            resident = torch.zeros(slots, *tensor.shape[1:], dtype=tensor.dtype, device=device)
            setattr(self, name, nn.Parameter(resident, requires_grad=False))
        self.slot_of = torch.full((len(self.scale),), -1, dtype=torch.long, device=device)

    @torch.no_grad()
    def load_slot(self, slot: int, k: int) -> None:
        """Copy expert k from host memory into device slot ``slot`` (``slot_of`` is set by the pager)."""
        for name, tensor in self._tensors().items():
            tensor[slot].copy_(self.host[name][k], non_blocking=True)

    def gather(
        self, index: torch.Tensor, weight: float | torch.Tensor, dtype: torch.dtype, selection: Selection | None = None
    ) -> Factors:
        """The experts of a batch as ``Factors`` in ``dtype``: A_k (r, in) and (s_k·B_k M_k)ᵀ (r, out), rank-masked.

        ``index`` (B,) holds each sample's expert (-1: none, a zero update); ``weight`` is a float or one
        value per sample (B,). With ``selection`` (the distinct experts and each sample's row among them)
        each expert is gathered once and the sample's s_k·w becomes its gain (what the fused kernel
        reads); without, each sample gets its own row with the gain folded into up (what autograd and
        the batched matmuls take: no host-side unique, no per-forward indexing)."""
        known = index.clamp(min=0)  # (B,)
        experts, rows = selection if selection is not None else (known, None)
        held = experts if self.slot_of is None else self.slot_of[experts]  # where each expert is held
        mask = self.rank_mask[experts]  # (N, r)
        down = self.A[held] * mask.unsqueeze(-1)  # (N, r, in)
        up = self.B[held] * mask.unsqueeze(1)  # (N, out, r)
        if self.mixer is not None:
            up = torch.bmm(up, self.mixer[held] * mask.unsqueeze(1) * mask.unsqueeze(-1))  # (N, out, r)
        gain = (index >= 0).to(self.scale.dtype) * self.scale[known] * weight  # (B,)
        if rows is None:
            return Factors(down.to(dtype), (up * gain.view(-1, 1, 1)).transpose(1, 2).to(dtype))
        ranks = (self.ranks[known] * (index >= 0)).to(torch.int32)  # (B,) 0: no expert, nothing to read
        return Factors(down.to(dtype), up.transpose(1, 2).to(dtype), rows, gain.float(), ranks)

    def expert_state(self, k: int, rank: int) -> dict[str, torch.Tensor]:
        """Expert k as a plain LoRA/MoSLoRA state dict of rank ``rank`` (keys A, B, mixer)."""
        every = self.host if self.host is not None else self._tensors()
        state = {"A": every["A"][k, :rank], "B": every["B"][k, :, :rank]}
        if self.mixer is not None:
            state["mixer"] = every["mixer"][k, :rank, :rank]
        return {n: t.detach().clone() for n, t in state.items()}

    @torch.no_grad()
    def load_expert(self, k: int, state: dict[str, torch.Tensor]) -> None:
        if self.host is not None:
            raise RuntimeError("a paged bank's experts are fixed: load them before paging it")
        rank = state["A"].shape[0]
        self.A[k].zero_()
        self.B[k].zero_()
        self.A[k, :rank] = state["A"]
        self.B[k, :, :rank] = state["B"]
        if self.mixer is not None:
            self.mixer[k].zero_()
            self.mixer[k, :rank, :rank] = state["mixer"]
