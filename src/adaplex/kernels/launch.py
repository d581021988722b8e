"""Launching a Triton kernel with less host work than ``kernel[grid](...)``.

On each call Triton's JIT binds every argument, derives the kernel's specialization from them and
builds a cache key from that and the options before it launches. In a host-bound forward on an H100
host that comes to about 80 µs a launch, and the checked attention launches two kernels a layer.
``Launcher`` keys its own cache by what that specialization depends on, following Triton's rules
(python/src/specialize.cc): each tensor's dtype and 16-byte alignment, each integer's value 1,
divisibility by 16 and 32-bit range, each scalar's type, the constexprs and options, and the
device. It launches the compiled kernel it found there directly. A call with a new key goes
through the JIT, which compiles the kernel (or finds it compiled) and launches it.
"""

from __future__ import annotations

from typing import Any

import torch

from adaplex.kernels import INTERPRETED

INT32 = range(-(2**31), 2**31)


def _specialization(arg: Any) -> object:
    """What Triton specializes a runtime argument on."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or not isinstance(arg, int):
        return type(arg)
    return arg == 1, arg % 16 == 0, arg in INT32


class Launcher:
    """``Launcher(kernel)(grid, *args, **constexprs_and_options)`` launches like
    ``kernel[grid](*args, **constexprs_and_options)``, with the runtime arguments positional, in the
    kernel's order, and every constexpr and option given by name."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.compiled: dict[tuple, Any] = {}
        if not INTERPRETED:  # the compiled launcher takes the constexprs too, in order, and skips them
            self.constexprs = [kernel.arg_names[i] for i in kernel.constexprs]

    def __call__(self, grid: tuple[int, ...], *args: Any, **named: Any) -> None:
        if INTERPRETED:
            self.kernel[grid](*args, **named)
            return
        key = (torch.cuda.current_device(), tuple(named.items()), *map(_specialization, args))
        compiled = self.compiled.get(key)
        if compiled is None:
            self.compiled[key] = self.kernel[grid](*args, **named)
            return
        compiled[(*grid, 1, 1)[:3]](*args, *[named[name] for name in self.constexprs])  # it reads three sizes
