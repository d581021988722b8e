"""Timing and peak-memory helpers shared by the benchmarks.

Machines are noisy, so variants are timed in interleaved rounds (A B C A B C ...) and compared
by the median of per-round ratios, never by runs taken at different times.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from adaplex.util.progress import report

Step = Callable[[], object]
T = TypeVar("T")


def device_name(device: torch.device) -> str:
    """ "cpu", or the CUDA device's name, as benchmark results record it."""
    return str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_seconds(step: Step, calls: int, device: torch.device) -> float:
    """Seconds per call over ``calls`` back-to-back calls of ``step``, from a synchronised start to the
    device's end of the last."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    sync(device)
    return (time.perf_counter() - start) / calls


def interleaved_times(
    steps: dict[str, Step], rounds: int, device: torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each step, one call of every step per round, after ``warmup`` rounds."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + rounds):
        done = round_index - warmup + 1
        report(
            f"warm-up round of {len(steps)} variants" if done < 1 else f"round {done}/{rounds} of {len(steps)} variants"
        )
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of time[numerator] / time[denominator] (paired, so drift cancels)."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator], strict=True))


def available_host_bytes() -> int | None:
    """The host memory available to new allocations (/proc/meminfo's MemAvailable); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(step: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """Peak memory a call of ``step`` adds above what was held before it, in MiB, and its result.

    CUDA: torch's allocator peak. CPU: the process's peak resident set (VmHWM), reset through
    /proc/self/clear_refs before the call, after malloc_trim has returned freed heap to the OS
    (otherwise memory freed by earlier calls hides this call's peak).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
        result = step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - held) / 2**20, result
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    held = _vm_kib("VmRSS")
    result = step()
    return (_vm_kib("VmHWM") - held) / 1024, result
