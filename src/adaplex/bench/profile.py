"""Where a step's time goes (torch.profiler): per step, the wall time, the time the device's kernels
ran, how many kernels were launched, and the kernels (CUDA) or operators (CPU) that took the most.

A step whose wall time far exceeds its kernel time, with many short kernels, is bound by the host
launching them; one whose kernel time comes close to its wall time is bound by the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from adaplex.util.measure import mean_seconds, sync

TOP = 12


def profile_steps(step: Callable[[], object], steps: int, device: torch.device) -> dict:
    """Profile ``steps`` calls of ``step`` (after one untimed call) and summarise them per step."""
    step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = mean_seconds(step, steps, device)
    events = prof.key_averages()
    if device.type == "cuda":
        kernels = [e for e in events if e.self_device_time_total > 0]
        busy = [(e.key, e.self_device_time_total, e.count) for e in kernels]
    else:  # the CPU runs the operators itself: their self time is the device's time
        kernels = [e for e in events if e.self_cpu_time_total > 0]
        busy = [(e.key, e.self_cpu_time_total, e.count) for e in kernels]
    busy.sort(key=lambda row: -row[1])
    return {
        "wall_ms": wall * 1e3,
        "busy_ms": sum(us for _, us, _ in busy) / steps / 1e3,
        "launches": sum(n for _, _, n in busy) // steps if device.type == "cuda" else None,
        "top": [{"name": name[:80], "ms": us / steps / 1e3, "calls": count // steps} for name, us, count in busy[:TOP]],
    }
