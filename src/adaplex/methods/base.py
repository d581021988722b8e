"""What every adapter method shares: a validated config, a marker base class, and the form in
which a method receives its weight at a site.

Adapters are found by type (``isinstance(m, Adapter)``), never by parameter names, so
freezing, state dicts, merging and reports work on any model they are attached to.

At a site each active adapter's weight (one of the kinds in ``adaplex.core.weights``) is resolved,
with the site's input at hand, into a ``SiteWeight``:

- a ``Scale``: a float, or a tensor in the input's dtype that broadcasts against the site's
  (B, T, features) output: (B, 1, 1) per sample, (B, T, 1) per token;
- ``Factors``: per-sample low-rank factors, rows of a table of downs (N, r, in) and ups (N, r, out)
  with a per-sample gain and rank, for the one functional LoRA ``out + g · (x @ downᵀ) @ up``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from adaplex.errors import AdapterNameError

Scale = float | torch.Tensor


class Factors(NamedTuple):
    """Each sample's own low-rank update: Δ_b(x) = g_b · (x_b @ down[n]ᵀ) @ up[n], n = rows[b].

    The table holds each distinct update once (a route's experts, however many samples share one).
    ``rows`` None: row b is sample b's (N = B); ``gain`` None: 1 (every scale folded into up).
    ``ranks`` (B,) is each sample's own rank: the table's rows past it are zero, and the fused kernel
    does not read them (mixed ranks cost their own ranks' bytes); None: all r."""

    down: torch.Tensor  # (N, r, in)
    up: torch.Tensor  # (N, r, out)
    rows: torch.Tensor | None = None  # (B,) long
    gain: torch.Tensor | None = None  # (B,) float32
    ranks: torch.Tensor | None = None  # (B,) int32

    @property
    def rank(self) -> int:
        return self.down.shape[1]

    def contiguous(self) -> Factors:
        return self._replace(down=self.down.contiguous(), up=self.up.contiguous())


SiteWeight = Scale | Factors
Selection = tuple[torch.Tensor, torch.Tensor]  # a batch's distinct experts (N,) and each sample's row (B,)


def per_sample(scale: Scale, dims: int) -> Scale:
    """A token-shaped scale ((B, T|1, 1) or a float) as one value per sample, shaped (B, 1, ...) with
    ``dims`` dimensions: the mean over tokens (what a per-token gate means for a per-layer prefix)."""
    if isinstance(scale, float):
        return scale
    return scale.mean(dim=1).reshape(scale.shape[0], *([1] * (dims - 1)))


def add_product(
    out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, scale: float = 1.0, inplace: bool = False
) -> torch.Tensor:
    """out + scale · (h @ weightᵀ) for (..., n) out, (..., r) h and an (n, r) weight, in ONE addmm over the
    flattened tokens: no separate passes over the (..., n) output to scale the product and add it (and,
    ``inplace``, none to copy ``out`` first). Autocast does not reach the in-place form, so there h and
    the weight take out's dtype, as autocast gives them in the other."""
    h2 = h.reshape(-1, h.shape[-1])
    if inplace and out.is_contiguous():
        out.view(-1, out.shape[-1]).addmm_(h2.to(out.dtype), weight.t().to(out.dtype), alpha=scale)
        return out
    return torch.addmm(out.reshape(-1, out.shape[-1]), h2, weight.t(), alpha=scale).view(out.shape)


def scale_of(weight: SiteWeight, method: str) -> Scale:
    """``weight`` as a Scale; per-sample factors are for methods that take them (banks, given LoRAs)."""
    if isinstance(weight, Factors):
        raise AdapterNameError(f"a {method} adapter takes a scale as its weight, not per-sample factors")
    return weight


class MethodConfig(BaseModel):
    """Hyper-parameters of one adapter method; unknown fields are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    targets: tuple[str, ...]

    def at_site(self, site: str) -> MethodConfig:
        """The config that applies at one site (methods with per-site patterns override this)."""
        return self


class Adapter(nn.Module):
    """A module holding one adapter's parameters at one site of the base model."""

    mergeable: bool = False

    def delta_weight(self) -> torch.Tensor:
        """ΔW with the base Linear's (out, in) layout, for adapters whose delta is linear in x."""
        raise NotImplementedError(f"{type(self).__name__} has no weight delta to merge")


class SiteAdapter(Adapter):
    """An adapter applied beside a base linear layer: y = base(x) + w · Δ(x, base(x)).

    A method implements ``forward`` (the delta alone) or, where it can fuse the addition, ``add_to``;
    each defaults to the other. ``weight`` is already resolved at the site. With ``inplace`` the method
    may write the sum into ``out`` (after reading everything it reads): the layer says so when nothing
    reads ``out`` afterwards, which saves a pass over the output."""

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, weight: SiteWeight = 1.0) -> torch.Tensor:
        """w · Δ(x, base_out) alone."""
        return self.add_to(torch.zeros_like(base_out), x, base_out, weight, inplace=True)

    def add_to(
        self, out: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, weight: SiteWeight, inplace: bool = False
    ) -> torch.Tensor:
        """out + w · Δ(x, base_out)."""
        delta = self(x, base_out, weight)
        return out.add_(delta) if inplace else out + delta
