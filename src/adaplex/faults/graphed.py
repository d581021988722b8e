"""A monitored forward captured as a CUDA graph: the host launches the forward's kernels, its q/k/v
recorders and its checks once, at capture, and each call replays them, as engines run fixed-shape
steps. The checks then cost only their GPU time, which is what a host-bound eager forward hides."""

from __future__ import annotations

import torch
from torch import nn

from adaplex.core.graphs import capture
from adaplex.faults.detect import Detection, failed
from adaplex.faults.hook import FaultHook, detections_of


def logits_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of a causal LM (an encoder: its last hidden states) for ``inputs``, without autograd."""
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class GraphedForward:
    """``logits_of(model, inputs)`` captured. With ``hooks`` (the model armed for the fused checks,
    no injection), each call returns the detections of that replay; a clean replay costs one sync.
    To run other inputs of the same shape, copy them into ``inputs``' tensors first."""

    def __init__(self, model: nn.Module, inputs: dict[str, torch.Tensor], hooks: list[FaultHook] | None = None):
        self.hooks = hooks or []
        result: dict[str, torch.Tensor] = {}

        def forward() -> None:
            result["logits"] = logits_of(model, inputs)
            result["failed"] = failed(f for hook in self.hooks for f in hook.findings)  # in the graph too

        self.graph = capture(forward, reset=lambda: detections_of(self.hooks))  # warm-up findings dropped
        self.logits, self.failed = result["logits"], result["failed"]  # rewritten by every replay
        self.findings = [f for hook in self.hooks for f in hook.findings]  # their excess tensors: rewritten too
        for hook in self.hooks:
            hook.findings = []

    def __call__(self) -> list[Detection]:
        """One replay; its detections, read back with one sync when it is clean."""
        self.graph.replay()
        if self.failed is None or not bool(self.failed):
            return []
        return [d for f in self.findings for d in f.resolve()]
