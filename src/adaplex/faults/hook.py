"""Fault plans and the per-layer hook the attention function calls.

A ``FaultPlan`` says what to flip (location, bit, elements) and where (layers); a ``FaultHook`` on an
attention layer injects the plan's flips into that layer's q, k, v, scores, weights or output,
runs the enabled detectors, records what they find, and optionally corrects the layer by
recomputing its attention without the fault.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field

from adaplex.errors import ConfigError
from adaplex.faults.bits import flip_bit
from adaplex.faults.detect import DETECTORS, Detection, Resolvable, Tensors, any_failed
from adaplex.faults.qkv import Recorded
from adaplex.kernels.checked_attention import Checks

Location = Literal["q", "k", "v", "scores", "weights", "output"]
LOCATIONS: tuple[str, ...] = get_args(Location)


class FaultPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    location: Location
    bit: int = Field(ge=0)
    elements: list[list[int]] | None = Field(None, description="explicit indices into the (B, H, T, D|S) tensor")
    count: int = Field(1, gt=0, description="random elements to flip when no explicit ones are given")
    seed: int = 0
    layers: Literal["first", "all", "random"] | list[int] = "first"


class DetectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    softmax: bool = True
    output_bound: bool = True
    score_bound: bool = True
    abft: bool = True
    kv_tied: bool = False
    qkv: bool = Field(True, description="checksums carrying q, k, v from their projections into attention")
    correct: bool = False
    fused: bool = Field(False, description="check the fused kernel (no injection): abft_output, softmax, output_bound")

    def enabled(self) -> list[str]:
        return [name for name in (*DETECTORS, "qkv") if getattr(self, name)]


@dataclass
class FaultHook:
    """State of one attention layer for one forward: its fault (if any), detectors and findings."""

    layer: int
    plan: FaultPlan | None
    detectors: DetectorConfig
    findings: list[Resolvable] = field(default_factory=list)
    injected: list[tuple[int, ...]] = field(default_factory=list)
    corrected: bool = False
    reference: dict[str, Recorded] = field(default_factory=dict)  # q/k/v as their projections computed them
    kernel_checks: Checks | None = None  # the buffers of the layer's last checked-attention call, for the next
    _resolved: list[Detection] = field(default_factory=list)

    @property
    def detections(self) -> list[Detection]:
        """Everything detected so far (resolving the findings syncs with the device once)."""
        while self.findings:
            self._resolved.extend(self.findings.pop(0).resolve())
        return self._resolved

    def inject(self, location: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.plan is None or self.plan.location != location:
            return tensor
        if self.plan.elements is not None:
            index = torch.tensor([_flat(tensor.shape, e) for e in self.plan.elements])
        else:
            rng = random.Random(self.plan.seed * 1000 + self.layer)
            index = torch.tensor(rng.sample(range(tensor.numel()), min(self.plan.count, tensor.numel())))
        self.injected = [tuple(int(i) for i in torch.unravel_index(j, tensor.shape)) for j in index]
        return flip_bit(tensor, index.to(tensor.device), self.plan.bit)

    def detect(self, tensors: Tensors) -> None:
        self.findings += [
            f for name in self.detectors.enabled() if name in DETECTORS for f in DETECTORS[name](self.layer, tensors)
        ]


def detections_of(hooks: list[FaultHook]) -> list[Detection]:
    """What the hooks detected since the last call, layer by layer, taken from them, so that a model
    armed once can be checked forward after forward; a clean forward costs one device sync."""
    if not any_failed(f for h in hooks for f in h.findings):
        for hook in hooks:
            hook.findings.clear()
    found = [d for h in hooks for d in h.detections]
    for hook in hooks:
        hook._resolved.clear()
    return found


def _flat(shape: torch.Size, element: list[int]) -> int:
    if len(element) != len(shape) or any(not 0 <= i < n for i, n in zip(element, shape, strict=True)):
        raise ConfigError(f"element {element} is outside the tensor of shape {tuple(shape)}")
    flat = 0
    for i, n in zip(element, shape, strict=True):
        flat = flat * n + i
    return flat


def plan_layers(plan: FaultPlan, num_layers: int) -> list[int]:
    """The layers a plan injects into (mode first / all / random / an explicit list)."""
    if plan.layers == "first":
        return [0]
    if plan.layers == "all":
        return list(range(num_layers))
    if plan.layers == "random":
        return [random.Random(plan.seed).randrange(num_layers)]
    bad = [i for i in plan.layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"layer {bad[0]} does not exist; this model has layers 0-{num_layers - 1}")
    return list(plan.layers)
