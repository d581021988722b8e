"""What every adapter method shares: a validated config and a marker base class.

Adapters are found by type (``isinstance(m, Adapter)``), never by parameter names, so
freezing, state dicts, merging and reports work on any model they are attached to.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


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
    """An adapter applied beside a base linear layer: y = base(x) + forward(x, base(x), w)."""

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_to(self, out: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, weight: object) -> torch.Tensor:
        """out + forward(x, base_out, weight); methods that can fuse the addition override this."""
        return out + self(x, base_out, weight)
