"""UniPELT: LoRA, prefix tuning and a bottleneck adapter in every layer, each under a learned gate.

``add_unipelt(handle, name, config)`` adds up to three ordinary adapters (``<name>-lora``,
``<name>-prefix``, ``<name>-bottleneck``) and one gate adapter (``<name>-gate``) whose per-layer gates
become the three adapters' weights (``adaplex.methods.gate``, ``adaplex.core.gating``). This module
only produces and observes those weights: ``forcing`` sets gates to constants for a block, ``reading``
collects their values (mean, spread and histogram per layer and submodule), ``regularising`` collects
the live values of one forward for the L1 and entropy penalties.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adaplex.core.adapted import Adapted
from adaplex.errors import AdaplexError, AdapterNameError, ConfigError
from adaplex.methods import BottleneckConfig, GateConfig, LayerGate, LoRAConfig, MoSLoRAConfig, PrefixConfig
from adaplex.methods.gate import Submodule
from adaplex.util.yamlconfig import validation_message

UNIPELT = "unipelt"
HISTOGRAM_BINS = 20  # over [0, 1]


class GateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Literal["sigmoid", "softmax"] = "sigmoid"
    temperature: float = Field(1.0, gt=0)
    l1: float = Field(0.0, ge=0, description="weight of the L1 sparsity penalty mean(g)")
    entropy: float = Field(0.0, ge=0, description="weight of the gates' entropy penalty")
    frozen: bool = Field(False, description="keep the gates at their initial values")
    forced: dict[Submodule, float] = Field(default_factory=dict, description="submodule -> constant gate")


class UniPELTConfig(BaseModel):
    """The submodules of a UniPELT adapter (null: left out) and its gates; the defaults follow the paper:
    LoRA r = 8 on q and v, prefix length 10, bottleneck reduction 16, sigmoid gates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["unipelt"] = UNIPELT
    lora: LoRAConfig | MoSLoRAConfig | None = LoRAConfig(r=8, alpha=16, targets=("q", "v"))
    prefix: PrefixConfig | None = PrefixConfig(length=10)
    bottleneck: BottleneckConfig | None = BottleneckConfig(reduction_factor=16)
    gate: GateOptions = GateOptions()

    @model_validator(mode="after")
    def _a_submodule(self) -> UniPELTConfig:
        if not self.parts():
            raise ValueError("every submodule is null; enable at least one of lora, prefix, bottleneck")
        return self

    def parts(self) -> dict[str, LoRAConfig | PrefixConfig | BottleneckConfig]:
        """Enabled submodule -> its method config."""
        found = {"lora": self.lora, "prefix": self.prefix, "bottleneck": self.bottleneck}
        return {k: v for k, v in found.items() if v is not None}


def unipelt_config(fields: dict[str, Any], source: str = "config") -> UniPELTConfig:
    try:
        return UniPELTConfig.model_validate(fields)
    except ValidationError as err:
        raise ConfigError(validation_message(err, source)) from None


def add_unipelt(handle: Adapted, name: str, config: UniPELTConfig, trainable: bool = True) -> list[str]:
    """Add the submodules and their gate; returns the names added (the gate last). All or nothing."""
    parts = {submodule: f"{name}-{submodule}" for submodule in config.parts()}
    options = config.gate
    try:
        gate = GateConfig(
            gated=parts,
            variant=options.variant,
            temperature=options.temperature,
            forced=options.forced,
            l1=options.l1,
            entropy=options.entropy,
        )
    except ValidationError as err:
        raise ConfigError(validation_message(err, f"adapter {name!r}: gate")) from None
    added: list[str] = []
    try:
        for submodule, adapter in parts.items():
            handle.add(adapter, config.parts()[submodule], trainable=trainable)
            added.append(adapter)
        handle.add(f"{name}-gate", gate, trainable=trainable and not options.frozen)
        added.append(f"{name}-gate")
    except AdaplexError:
        for adapter in reversed(added):
            handle.remove(adapter)
        raise
    return added


def gates(handle: Adapted) -> dict[str, GateConfig]:
    """The gate adapters of a model by name."""
    return {n: c for n, c in handle.configs.items() if isinstance(c, GateConfig)}


def layer_gates(handle: Adapted, name: str | None = None) -> list[LayerGate]:
    """Every LayerGate of gate adapter ``name`` (default: of every gate adapter)."""
    names = [name] if name else list(gates(handle))
    return [g for n in names for g in handle.adapters(n).values() if isinstance(g, LayerGate)]


@contextmanager
def forcing(handle: Adapted, name: str, **values: float) -> Iterator[None]:
    """Inside the block the gates of gate adapter ``name`` are these constants (submodule -> value)."""
    config = gates(handle).get(name)
    if config is None:
        handle.stack.check(name)
        raise AdapterNameError(f"adapter {name!r} is {handle.configs[name].method}, not a gate")
    unknown = sorted(set(values) - set(config.gated))
    if unknown:
        raise AdapterNameError(f"gate {name!r} has no {unknown[0]!r} submodule; it gates {', '.join(config.gated)}")
    layers = layer_gates(handle, name)
    saved = [dict(g.forced) for g in layers]
    try:
        for g, forced in zip(layers, saved, strict=True):
            g.force(forced | values)
        yield
    finally:
        for g, forced in zip(layers, saved, strict=True):
            g.force(forced)


@contextmanager
def _tapping(layers: list[LayerGate], tap: Any) -> Iterator[None]:
    try:
        for g in layers:
            g.tap = tap
        yield
    finally:
        for g in layers:
            g.tap = None


@dataclass
class GateStats:
    """Running statistics of one (layer, submodule) gate over tokens."""

    total: float = 0.0
    squares: float = 0.0
    count: float = 0.0
    histogram: torch.Tensor = field(default_factory=lambda: torch.zeros(HISTOGRAM_BINS, dtype=torch.float64))

    def add(self, g: torch.Tensor, mask: torch.Tensor | None) -> None:
        values = g.detach().float().flatten(0, 1).squeeze(-1)  # (B*T,)
        if mask is not None:
            values = values[mask.flatten().bool()]
        self.total += values.sum().item()
        self.squares += values.square().sum().item()
        self.count += values.numel()
        self.histogram += torch.histc(values.cpu(), bins=HISTOGRAM_BINS, min=0.0, max=1.0).double()

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def std(self) -> float:
        return math.sqrt(max(self.squares / max(self.count, 1) - self.mean**2, 0.0))


class GateReadout:
    """Gate values over many forwards: per (layer index, submodule), over the tokens ``mask`` marks."""

    def __init__(self, layers: list[str]) -> None:
        self.index = {path: i for i, path in enumerate(layers)}
        self.stats: dict[tuple[int, str], GateStats] = {}
        self.mask: torch.Tensor | None = None  # (B, T) real tokens of the current batch

    def __call__(self, layer: str, submodule: str, g: torch.Tensor) -> None:
        mask = self.mask if self.mask is not None and self.mask.shape == g.shape[:2] else None
        self.stats.setdefault((self.index[layer], submodule), GateStats()).add(g, mask)

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer and submodule: mean, std, tokens, histogram counts over [0, 1]."""
        return [
            {
                "layer": layer,
                "submodule": submodule,
                "mean": s.mean,
                "std": s.std,
                "tokens": int(s.count),
                "histogram": [int(c) for c in s.histogram.tolist()],
            }
            for (layer, submodule), s in sorted(self.stats.items())
        ]


@contextmanager
def reading(handle: Adapted) -> Iterator[GateReadout]:
    """Collect every gate value computed inside the block; set ``readout.mask`` per batch to count only
    real tokens."""
    layers = layer_gates(handle)
    readout = GateReadout([g.site for g in layers])
    with _tapping(layers, readout):
        yield readout


class GatePenalty:
    """The live values of one gate adapter's gates in the forwards inside ``regularising``; ``terms()``
    gives the L1 and entropy terms (means over positions, then over gates) and clears them."""

    def __init__(self, layers: list[LayerGate]) -> None:
        self.variants = {g.site: g.variant for g in layers}
        self.values: dict[tuple[str, str], torch.Tensor] = {}  # (layer, submodule) -> (B, T, 1), last computed

    def __call__(self, layer: str, submodule: str, g: torch.Tensor) -> None:
        self.values[(layer, submodule)] = g

    def terms(self) -> dict[str, torch.Tensor]:
        """l1: mean g. entropy: sigmoid gates' mean binary entropy; softmax gates' mean entropy per layer."""
        values, self.values = self.values, {}
        if not values:
            return {}
        eps = 1e-6
        l1 = torch.stack([g.float().mean() for g in values.values()]).mean()
        binary, layers = [], {}
        for (layer, _), g in values.items():
            p = g.float().clamp(eps, 1 - eps)
            if self.variants[layer] == "sigmoid":
                binary.append((-(p * p.log()) - (1 - p) * (1 - p).log()).mean())
            else:
                layers[layer] = layers.get(layer, 0) - p * p.log()
        entropy = torch.stack(binary + [h.mean() for h in layers.values()]).mean()
        return {"l1": l1, "entropy": entropy}


@contextmanager
def regularising(handle: Adapted, name: str) -> Iterator[GatePenalty]:
    """Collect the live gate values of gate adapter ``name`` in the forwards inside the block."""
    layers = layer_gates(handle, name)
    penalty = GatePenalty(layers)
    with _tapping(layers, penalty):
        yield penalty
