"""The weight channel: what multiplies each active adapter's delta at each site.

    y = base(x) + Σ_{i active} w_i · Δ_i(x)

Each active adapter has one weight kind for the forward; a site resolves it with its input at hand,
``kind.at(site, adapter, x, base_out)``, into what the method takes (``adaplex.methods.base``): a
Scale (a float, or a tensor in x's dtype shaped (B, 1, 1) or (B, T, 1)) or per-sample Factors.

| kind      | sample b, token t gets                         | made by                                   |
|-----------|------------------------------------------------|-------------------------------------------|
| Constant  | c                                              | the stack's weights (stacking)            |
| PerSample | s_b · c                                        | ``unrouted="base"``, per-sample scaling    |
| Routed    | expert index_b of a bank, times c (or s_b · c) | ``route`` (a bank's gathered experts)     |
| Given     | its own A_b, B_b at each site, times c         | a hypernetwork (``handle.given``)         |
| Gated     | g(h_bt) · c from the hidden states h at a hook | gates (UniPELT)                           |

Hook points for a gate: a linear site's input ("input": the attention input at q/k/v, the FFN input
at gate/up), its base output ("output": the FFN output at the down projection), and an attention
layer's input for the prefix share of attention (a per-token gate there is averaged over tokens).
``x`` at an attention site is that layer's input hidden states (B, T, hidden).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal, Protocol

import torch
from torch import nn

from adaplex.errors import AdapterNameError
from adaplex.kernels import gathered_lora
from adaplex.methods import Factors, GivenLoRA, Selection, SiteWeight


def check_batch(per_sample: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """One value per sample of the batch, or an error that gives both numbers."""
    if per_sample.shape[0] != x.shape[0]:
        raise AdapterNameError(
            f"{per_sample.shape[0]} {what} for a batch of {x.shape[0]} samples; give one for each sample"
        )


class WeightKind(Protocol):
    """One adapter's weight for a forward; ``scaled`` multiplies it by the stack's constant weight.
    ``reusable``: ``at`` gives a site the same value for as long as the kind is active, for inputs of one
    shape, dtype and device, so a site may keep it (``Stack.memo``) instead of asking again."""

    reusable: ClassVar[bool]

    def at(self, site: str, adapter: nn.Module, x: torch.Tensor, base_out: torch.Tensor | None) -> SiteWeight: ...

    def scaled(self, weight: float) -> WeightKind: ...


@dataclass(frozen=True)
class Constant:
    """The same weight for every sample and token."""

    value: float = 1.0
    reusable: ClassVar[bool] = True

    def at(self, site: str, adapter: nn.Module, x: torch.Tensor, base_out: torch.Tensor | None) -> SiteWeight:
        return self.value

    def scaled(self, weight: float) -> Constant:
        return Constant(self.value * weight)


@dataclass(frozen=True)
class PerSample:
    """One weight per sample, ``scale`` (B,); resolved as (B, 1, 1) in the input's dtype."""

    scale: torch.Tensor  # (B,)
    reusable: ClassVar[bool] = True
    _shaped: dict[torch.dtype, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def at(self, site: str, adapter: nn.Module, x: torch.Tensor, base_out: torch.Tensor | None) -> SiteWeight:
        check_batch(self.scale, x, "weights")
        shaped = self._shaped.get(x.dtype)
        if shaped is None:
            shaped = self._shaped[x.dtype] = self.scale.to(x.dtype).view(-1, 1, 1)  # (B, 1, 1)
        return shaped

    def scaled(self, weight: float) -> PerSample:
        return PerSample(self.scale * weight)


class Gatherer(Protocol):
    """What a route resolves against: an expert bank (``adaplex.methods.ExpertBank``)."""

    def gather(
        self, index: torch.Tensor, weight: float | torch.Tensor, dtype: torch.dtype, selection: Selection | None = None
    ) -> Factors: ...


@dataclass(frozen=True)
class Routed:
    """Per-sample routing into a bank: sample b takes expert ``index[b]`` (-1: none), times ``weight``
    (a float, or one value per sample (B,)).

    Without autograd (inference, generation), each site gathers the batch's experts once and reuses
    them for every forward while the route holds, e.g. every decode step of generate(): for the fused
    kernel each distinct expert once (however many samples share it), for batched matmuls one per sample."""

    index: torch.Tensor  # (B,) long
    weight: float | torch.Tensor = 1.0
    reusable: ClassVar[bool] = True
    _gathered: dict[int, Factors] = field(default_factory=dict, compare=False, repr=False)
    _selection: list[Selection] = field(default_factory=list, compare=False, repr=False)

    def at(self, site: str, adapter: Gatherer, x: torch.Tensor, base_out: torch.Tensor | None) -> SiteWeight:
        check_batch(self.index, x, "routing keys")
        if torch.is_grad_enabled():
            return adapter.gather(self.index, self.weight, x.dtype)
        cached = self._gathered.get(id(adapter))
        if cached is None:  # the fused kernel reads a table of distinct experts; matmuls, one row per sample
            selection = self.selection() if gathered_lora.available(x) else None
            factors = adapter.gather(self.index, self.weight, x.dtype, selection)
            cached = self._gathered[id(adapter)] = factors.contiguous()
        return cached

    def selection(self) -> Selection:
        """The distinct experts of the batch (N,) and each sample's row among them (B,), found once."""
        if not self._selection:
            self._selection.append(torch.unique(self.index.clamp(min=0), return_inverse=True))
        return self._selection[0]

    def scaled(self, weight: float) -> Routed:
        return Routed(self.index, self.weight * weight)


@dataclass(frozen=True)
class Given:
    """Per-sample adapter weights given directly: site name -> (A (B, r, in), B (B, out, r)), each sample
    its own LoRA, as a hypernetwork produces them; for ``given-lora`` adapters."""

    weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    weight: float = 1.0
    reusable: ClassVar[bool] = False  # the given tensors are read at every forward

    def at(self, site: str, adapter: GivenLoRA, x: torch.Tensor, base_out: torch.Tensor | None) -> SiteWeight:
        pair = self.weights.get(site)
        if pair is None:
            raise AdapterNameError(
                f"no given weights for site {site!r}; give (A, B) for every site the adapter targets"
            )
        return adapter.factors(site, *pair, self.weight, x.dtype)

    def scaled(self, weight: float) -> Given:
        return Given(self.weights, self.weight * weight)


GateFunction = Callable[[str, torch.Tensor], torch.Tensor]  # (site, hidden (B, T, d)) -> gate (B, T, 1)


@dataclass(frozen=True)
class Gated:
    """A weight computed at the site from the hidden states there: g(site, h) (B, T, 1), times ``weight``.

    ``source`` picks the hook point: "input" (the site's input; at an attention layer, its input
    hidden states) or "output" (a linear site's base output, e.g. the FFN output)."""

    gate: GateFunction
    source: Literal["input", "output"] = "input"
    weight: float = 1.0
    reusable: ClassVar[bool] = False

    def at(self, site: str, adapter: nn.Module, x: torch.Tensor, base_out: torch.Tensor | None) -> SiteWeight:
        if self.source == "output" and base_out is None:
            raise AdapterNameError(f"{site} has no base output to gate from; gate it from its input")
        hidden = x if self.source == "input" else base_out
        g = self.gate(site, hidden).to(x.dtype)  # (B, T, 1)
        return g if self.weight == 1.0 else g * self.weight

    def scaled(self, weight: float) -> Gated:
        return replace(self, weight=self.weight * weight)
