"""Learned gates over a layer's submodules (UniPELT, Mao et al. 2022, arXiv:2110.07577).

Each attention layer gets one gate per gated submodule (LoRA, prefix, bottleneck), computed from the
hidden states h that submodule sees, and scales that submodule's contribution per token:

- sigmoid (the paper): g_k = σ((W_k h_k + b_k) / τ), each from its own hook point (LoRA and prefix:
  the attention input; bottleneck: the FFN output);
- softmax over the layer's submodules: g = softmax((W h + b) / τ) from the layer's attention input,
  the one hidden state all of them have seen; the bottleneck's share is kept from the layer's first
  gate of the forward (LoRA or prefix: softmax needs two submodules, so one of them is there).

The prefix's gate scales its keys and values, averaged over tokens (``adaplex.methods.prefix``), as
UniPELT's prefix gate is. A submodule can be forced to a constant (``forced``), and every gate value
computed can be handed to a ``tap`` (read-outs, regularisation).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from adaplex.errors import AdapterNameError
from adaplex.methods.base import Adapter, MethodConfig
from adaplex.util.tensors import version

Submodule = Literal["lora", "prefix", "bottleneck"]
SUBMODULES: tuple[Submodule, ...] = ("lora", "prefix", "bottleneck")
SUBMODULE_METHODS: dict[str, tuple[str, ...]] = {
    "lora": ("lora", "moslora"),
    "prefix": ("prefix",),
    "bottleneck": ("bottleneck",),
}
GateTap = Callable[[str, str, torch.Tensor], None]  # (layer path, submodule, gate (B, T, 1))


class GateConfig(MethodConfig):
    """Gates at attention layers over the adapters named in ``gated`` (submodule -> adapter name)."""

    method: Literal["gate"] = "gate"
    targets: tuple[str, ...] = ("attention",)
    gated: dict[Submodule, str] = Field(min_length=1, description="submodule -> name of the adapter it gates")
    variant: Literal["sigmoid", "softmax"] = "sigmoid"
    temperature: float = Field(1.0, gt=0, description="τ: gates are σ(z / τ) or softmax(z / τ)")
    forced: dict[Submodule, float] = Field(default_factory=dict, description="submodule -> constant gate value")
    l1: float = Field(0.0, ge=0, description="weight of the L1 penalty mean(g) in the training loss")
    entropy: float = Field(0.0, ge=0, description="weight of the gates' mean entropy in the training loss")

    @model_validator(mode="after")
    def _consistent(self) -> GateConfig:
        if self.variant == "softmax" and len(self.gated) < 2:
            raise ValueError("a softmax gate over one submodule is always 1; gate two or more, or use sigmoid")
        if self.variant == "softmax" and set(self.gated) == {"bottleneck"}:
            raise ValueError("a softmax gate needs lora or prefix among its submodules")
        extra = sorted(set(self.forced) - set(self.gated))
        if extra:
            raise ValueError(f"forced gate for {extra[0]!r}, which is not gated; gated: {', '.join(self.gated)}")
        return self

    @property
    def submodules(self) -> tuple[str, ...]:
        """The gated submodules in a fixed order (the rows of each layer's gate projection)."""
        return tuple(s for s in SUBMODULES if s in self.gated)


class LayerGate(Adapter):
    """One attention layer's gates: a projection hidden -> one logit per gated submodule."""

    def __init__(self, hidden: int, config: GateConfig) -> None:
        super().__init__()
        self.submodules = config.submodules
        self.variant = config.variant
        self.temperature = config.temperature
        self.proj = nn.Linear(hidden, len(self.submodules))
        self.forced: dict[str, float] = dict(config.forced)  # see force()
        self.tap: GateTap | None = None
        self.site = ""  # the attention layer's path, set where it is placed
        self._shares: torch.Tensor | None = None  # softmax: this forward's shares (B, T, n)
        self._last: tuple[str, weakref.ref, int, torch.Tensor] | None = None  # the last gate and its input

    def force(self, values: dict[str, float]) -> None:
        """From now on these submodules' gates are constants (submodule -> value); the others are computed."""
        self.forced = dict(values)
        self._last = None

    def value(self, submodule: str, hidden: torch.Tensor) -> torch.Tensor:
        """The gate (B, T, 1) of ``submodule`` from the hidden states (B, T, hidden) at its hook point.
        Sites that read the same input (LoRA's q and v) get the value computed for the first of them."""
        last = self._last
        if last is not None and last[0] == submodule and last[1]() is hidden and last[2] == version(hidden):
            return last[3]
        k = self.submodules.index(submodule)
        if submodule in self.forced:
            g = hidden.new_full((*hidden.shape[:-1], 1), self.forced[submodule])
        elif self.variant == "sigmoid":
            logit = F.linear(hidden, self.proj.weight[k : k + 1], self.proj.bias[k : k + 1])  # (B, T, 1)
            g = torch.sigmoid(logit if self.temperature == 1.0 else logit / self.temperature)
        else:
            g = self._softmax_share(k, submodule, hidden)
        self._last = (submodule, weakref.ref(hidden), version(hidden), g)  # the input itself is not kept alive
        if self.tap is not None:
            self.tap(self.site, submodule, g)
        return g

    def _softmax_share(self, k: int, submodule: str, hidden: torch.Tensor) -> torch.Tensor:
        if submodule != "bottleneck":  # the attention input: compute every share of this layer
            logits = self.proj(hidden)  # (B, T, n)
            self._shares = torch.softmax(logits if self.temperature == 1.0 else logits / self.temperature, dim=-1)
        shares = self._shares
        if shares is None or shares.shape[:-1] != hidden.shape[:-1]:
            raise AdapterNameError(
                f"{self.site}: the softmax gate's shares were not computed for this input; "
                "its lora or prefix adapter must run in the same forward"
            )
        return shares[..., k : k + 1]  # (B, T, 1)
