"""One fault experiment: a baseline forward and an injected forward on the same inputs.

Per run: which detectors fired, the largest logit deviation, how many positions changed their
top-1 token (silent data corruption when nothing detected it), and whether correction restored
the output. A performance monitor times the baseline (fused SDPA), the step-by-step forward
without and with detectors and the injected one, and estimates the attention FLOPs.
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import nn

from adaplex.core.adapted import Adapted
from adaplex.errors import ConfigError
from adaplex.faults.graphed import GraphedForward, logits_of
from adaplex.faults.hook import DetectorConfig, FaultHook, FaultPlan, detections_of
from adaplex.faults.session import armed
from adaplex.util.measure import interleaved_times, median_ratio, peak_memory_mib


@dataclass
class RunResult:
    plan: dict | None
    injected: list[list[int]]
    detections: list[dict]
    detected: dict[str, bool]
    max_logit_diff: float
    top1_changes: int
    significant: bool  # the fault changed a top-1 token or moved a logit beyond the tolerance
    corrected: bool
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def logit_tolerance(dtype: torch.dtype) -> float:
    """Deviation below which a fault is harmless: well above run-to-run noise of the dtype."""
    return 1e-3 if dtype == torch.float32 else 5e-2


def run_once(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    plan: FaultPlan | None,
    detectors: DetectorConfig,
    baseline: torch.Tensor | None = None,
) -> RunResult:
    start = time.perf_counter()
    baseline = logits_of(model, inputs) if baseline is None else baseline
    t_base = time.perf_counter() - start
    start = time.perf_counter()
    with armed(model, plan, detectors) as hooks:
        faulty = logits_of(model, inputs)
        detections = detections_of(hooks)
    t_run = time.perf_counter() - start
    diff = (faulty.float() - baseline.float()).abs()
    diff = torch.nan_to_num(diff, nan=float("inf"))
    top1 = int((faulty.argmax(-1) != baseline.argmax(-1)).sum())
    max_diff = float(diff.max())
    return RunResult(
        plan=plan.model_dump() if plan else None,
        injected=[list(i) for h in hooks for i in h.injected],
        detections=[asdict(d) for d in detections],
        detected={name: any(d.detector.startswith(name) for d in detections) for name in detectors.enabled()},
        max_logit_diff=max_diff,
        top1_changes=top1,
        significant=top1 > 0 or max_diff > logit_tolerance(baseline.dtype),
        corrected=any(h.corrected for h in hooks),
        timings={"baseline_s": t_base, "armed_s": t_run},
    )


def aggregate(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.pstdev(values),
        "min": min(values),
        "max": max(values),
        "median": statistics.median(values),
        "n": len(values),
    }


def attention_flops(model: nn.Module, batch: int, seq: int) -> int:
    """2·(QKᵀ) + 2·(PV) multiply-adds over all layers: 4·B·H·T·S·D."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 4 * batch * cfg.num_attention_heads * seq * seq * head_dim * cfg.num_hidden_layers


def monitor(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    plan: FaultPlan,
    detectors: DetectorConfig,
    repeats: int = 3,
    graphed: bool = False,
) -> dict:
    """Interleaved timings of one forward and its detections' resolution: the fused baseline; fused
    kernel with its checks, without the q/k/v checksums, and with no checks; step-by-step without
    detectors, with every detector, and injected. Each armed phase has its own copy of the model,
    armed once (as a monitored model runs), so that every timed call is a forward and its check.
    ``graphed`` (CUDA) captures the baseline and the fused phases as CUDA graphs and times their
    replays (the step-by-step phases are left out): the checks' GPU cost without the host's."""
    off = DetectorConfig(**{name: False for name in DetectorConfig.model_fields})
    fused = detectors.model_copy(update={"fused": True})
    armings = {
        "fused_detection": (None, fused),
        "fused_without_qkv": (None, fused.model_copy(update={"qkv": False})),
        "fused_columns_only": (None, off.model_copy(update={"fused": True})),
        "stepwise": (None, off),
        "detection": (None, detectors),
        "injected": (plan, detectors),
    }
    device = next(model.parameters()).device
    if graphed:
        if device.type != "cuda":
            raise ConfigError("graphed timing captures CUDA graphs: run it with the model on CUDA (--device cuda)")
        armings = {name: arming for name, arming in armings.items() if name.startswith("fused")}
    copies = {name: deepcopy(model) for name in armings}
    fresh = Adapted.find(model) is None
    handle = Adapted.of(model)  # the baseline runs through the same attention function, unarmed
    phases = {"baseline": GraphedForward(model, inputs) if graphed else partial(logits_of, model, inputs)}
    try:
        with ExitStack() as stack:
            for name, (phase_plan, phase_detectors) in armings.items():
                copy = copies[name]
                hooks = stack.enter_context(armed(copy, phase_plan, phase_detectors))
                phases[name] = (
                    GraphedForward(copy, inputs, hooks) if graphed else partial(_checked_forward, copy, inputs, hooks)
                )
            times = interleaved_times(phases, repeats, device)
            memory = (
                {p: peak_memory_mib(phase, torch.device("cpu"))[0] for p, phase in phases.items()}
                if device.type == "cpu"
                else {}
            )
    finally:
        if fresh:
            handle.detach()
    batch, seq = inputs["input_ids"].shape
    result = {
        "graphed": graphed,
        "seconds": {p: aggregate(t) for p, t in times.items()},
        "overhead_percent": {p: 100 * (median_ratio(times, p, "baseline") - 1) for p in phases if p != "baseline"},
        "peak_memory_mib": memory,
        "attention_gflops": attention_flops(model, batch, seq) / 1e9,
    }
    if not graphed:
        result["bounds_and_detection_percent"] = 100 * (median_ratio(times, "detection", "stepwise") - 1)
    return result


def _checked_forward(model: nn.Module, inputs: dict[str, torch.Tensor], hooks: list[FaultHook]) -> torch.Tensor:
    logits = logits_of(model, inputs)
    detections_of(hooks)
    return logits
