"""Launching a Triton kernel with less host work than ``kernel[grid](...)``.

On each call Triton's JIT binds every argument, derives the kernel's specialization from them and
builds a cache key from that and the options before it launches. In a host-bound forward on an H100
host that comes to 50–90 µs a launch, and the checked attention launches two kernels a layer.
``Launcher`` remembers which compiled kernel the JIT launched for a call and launches it directly
when a later call has the same arguments, up to what Triton reads of a tensor (its dtype and whether
it is 16-byte aligned: python/src/specialize.cc): the same integers and floats, constants (constexprs
and options) and device. Only calls whose tensors are all 16-byte aligned are remembered, which keeps
the key to one flag; any other call goes through the JIT, as without the launcher (which compiles the
kernel or finds it compiled), so a specialization is never guessed. The layers of a forward have the
same shapes, so all but the first of them launch directly.
"""

from __future__ import annotations

from functools import reduce
from operator import attrgetter, or_
from typing import Any

import torch

from adaplex.kernels import INTERPRETED

CACHED_CALLS = 256  # distinct calls remembered (a generation loop's shapes change every step)
Constants = tuple[tuple[str, Any], ...]  # (name, value) of every constexpr and option, in a fixed order

_dtype = attrgetter("dtype")
_data_ptr = torch.Tensor.data_ptr


class Launcher:
    """``Launcher(kernel)(grid, tensors, scalars, constants)`` launches like
    ``kernel[grid](*tensors, *scalars, **dict(constants))``: the kernel's runtime arguments are its
    tensors, then its scalars; ``constants`` is best built once per shape, as its hash is taken on
    every call."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.compiled: dict[tuple, tuple[Any, tuple]] = {}  # key: (compiled kernel, constexprs in kernel order)
        if not INTERPRETED:  # the compiled launcher takes the constexprs too, in order, and skips them
            self.constexprs = [kernel.arg_names[i] for i in kernel.constexprs]

    def __call__(self, grid: tuple[int, ...], tensors: tuple[torch.Tensor, ...], scalars: tuple, constants: Constants):
        if INTERPRETED or reduce(or_, map(_data_ptr, tensors), 0) & 15:  # or one is not 16-byte aligned
            self.kernel[grid](*tensors, *scalars, **dict(constants))
            return
        key = (torch.cuda.current_device(), constants, tuple(map(_dtype, tensors)), scalars, tuple(map(type, scalars)))
        cached = self.compiled.get(key)
        if cached is None:
            if len(self.compiled) >= CACHED_CALLS:
                self.compiled.clear()
            named = dict(constants)
            compiled = self.kernel[grid](*tensors, *scalars, **named)
            self.compiled[key] = (compiled, tuple(named[name] for name in self.constexprs))
            return
        compiled, constexprs = cached
        compiled[(*grid, 1, 1)[:3]](*tensors, *scalars, *constexprs)  # it reads three sizes
