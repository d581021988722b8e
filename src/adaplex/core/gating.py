"""Gate adapters as weight kinds: each gated adapter's weight is ``Gated`` by its layer's ``LayerGate``.

A site belongs to the attention layer whose path shares the most leading components with its own, the
block index among them ("model.layers.3.mlp.down_proj" -> "model.layers.3.self_attn").
Hook points (``adaplex.core.weights``): LoRA and prefix gates read the site's input (the attention
input), the bottleneck gate the FFN output (the base output at the bottleneck's site).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adaplex.core.weights import Gated
from adaplex.errors import AdapterNameError
from adaplex.methods.gate import GateConfig, LayerGate


def _shared_components(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        n += 1
    return n


def _block_depth(layer: str) -> int:
    """Components up to the layer's block index: 3 for "model.layers.3.self_attn"."""
    parts = layer.split(".")
    return max((i + 1 for i, part in enumerate(parts) if part.isdigit()), default=len(parts))


@dataclass
class LayerGates:
    """The gate function of one submodule: (site, hidden (B, T, d)) -> the gate of the site's layer (B, T, 1)."""

    submodule: str
    layers: dict[str, LayerGate]  # attention layer path -> its gate
    _by_site: dict[str, LayerGate] = field(default_factory=dict, repr=False)

    def layer_of(self, site: str) -> LayerGate:
        gate = self._by_site.get(site)
        if gate is None:
            best = max(self.layers, key=lambda path: _shared_components(path, site))
            if _shared_components(best, site) < _block_depth(best):  # the same block, not just the root
                raise AdapterNameError(f"site {site} is in no gated layer; gate the layers its adapter targets")
            gate = self._by_site[site] = self.layers[best]
        return gate

    def __call__(self, site: str, hidden: torch.Tensor) -> torch.Tensor:
        return self.layer_of(site).value(self.submodule, hidden)


def gate_kinds(config: GateConfig, layers: dict[str, LayerGate], sites: dict[str, list[str]]) -> dict[str, Gated]:
    """The ``Gated`` kind of each gated adapter, checked to cover ``sites`` (adapter name -> its sites)."""
    kinds = {}
    for submodule, adapter in config.gated.items():
        function = LayerGates(submodule, layers)
        for site in sites[adapter]:
            function.layer_of(site)
        kinds[adapter] = Gated(function, source="output" if submodule == "bottleneck" else "input")
    return kinds
