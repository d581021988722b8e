"""What the CUDA check scripts share: GPU time by kernel; write the result as JSON, print it, exit 1
unless it is ok."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile


def kernel_us(step, repeats: int = 10) -> dict[str, float]:
    """GPU µs per call of ``step`` by kernel name, largest first (torch.profiler; the host's launch
    time is not in it, so small kernels are timed as the GPU runs them)."""
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.self_device_time_total > 0:
            totals[event.key[:90]] += event.self_device_time_total / repeats
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def gpu_us(step, repeats: int = 10) -> float:
    """GPU µs per call of ``step``, all its kernels."""
    return sum(kernel_us(step, repeats).values())


def report(result: dict, out: str) -> None:
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)
