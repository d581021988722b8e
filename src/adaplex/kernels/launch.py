"""Launching a Triton kernel with less host work than ``kernel[grid](...)``.

On each call Triton's JIT binds every argument, derives the kernel's specialization from them and
builds a cache key from that and the options before it launches. In a host-bound forward on an H100
host that comes to 50–90 µs a launch, and the checked attention launches two kernels a layer.
``Launcher`` remembers which compiled kernel the JIT launched for a call and launches it directly
when a later call has the same arguments, up to what Triton reads of a tensor (its dtype and whether
it is 16-byte aligned: python/src/specialize.cc): the same integers and floats, constexprs, options
and device. Any other call goes through the JIT, as without the launcher (which compiles the kernel
or finds it compiled), so a specialization is never guessed. The layers of a forward have the same
shapes, so all but the first of them launch directly.
"""

from __future__ import annotations

from typing import Any

import torch

from adaplex.kernels import INTERPRETED

CACHED_CALLS = 256  # distinct calls remembered (a generation loop's shapes change every step)


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
        key = (
            torch.cuda.current_device(),
            *named.items(),
            *[(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (type(a), a) for a in args],
        )
        compiled = self.compiled.get(key)
        if compiled is None:
            if len(self.compiled) >= CACHED_CALLS:
                self.compiled.clear()
            self.compiled[key] = self.kernel[grid](*args, **named)
            return
        compiled[(*grid, 1, 1)[:3]](*args, *[named[name] for name in self.constexprs])  # it reads three sizes
