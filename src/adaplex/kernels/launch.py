"""Launching a Triton kernel with less host work than ``kernel[grid](...)``.

On each call Triton's JIT binds every argument, derives the kernel's specialization from them and
builds a cache key from that and the options before it launches. In a host-bound forward on an H100
host that comes to 50–90 µs a launch, and the checked attention launches two kernels a layer.
``Launcher`` remembers which compiled kernel the JIT launched for a call and launches it directly
when a later call has the same arguments, up to what Triton reads of a tensor (its dtype and whether
it is 16-byte aligned: python/src/specialize.cc): the same integers and floats, constants (constexprs
and options) and device. Only calls whose tensors are all 16-byte aligned are remembered, which keeps
the key to one flag; any other call goes through the JIT, as without the launcher (which compiles the
kernel or finds it compiled), so a specialization is never guessed. A direct launch passes the tensors'
addresses, which spares Triton's launcher a ``data_ptr`` call and a CUDA driver query per tensor; the
key holds each tensor's dtype and whether it is on CUDA, as checked by the JIT's first launch. The
layers of a forward have the same shapes, so all but the first of them launch directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import reduce
from operator import attrgetter, or_
from typing import Any, NamedTuple

import torch

from adaplex.kernels import INTERPRETED

CACHED_CALLS = 256  # distinct calls remembered (a generation loop's shapes change every step)
Constants = tuple[tuple[str, Any], ...]  # (name, value) of every constexpr and option, in a fixed order

_dtype = attrgetter("dtype")
_is_cuda = attrgetter("is_cuda")
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

    def __call__(
        self, grid: tuple[int, ...], tensors: Sequence[torch.Tensor], scalars: tuple, constants: Constants
    ) -> Direct | None:
        """Launch; return the direct launch of this call's compiled kernel (None for a call through the JIT
        that is not remembered: interpreted, or a tensor off 16-byte alignment)."""
        pointers = _aligned_addresses(tensors)
        if INTERPRETED or pointers is None:
            self.kernel[grid](*tensors, *scalars, **dict(constants))
            return None
        key = (
            torch.cuda.current_device(),
            constants,
            tuple(map(_dtype, tensors)),
            tuple(map(_is_cuda, tensors)),
            scalars,
            tuple(map(type, scalars)),
        )
        cached = self.compiled.get(key)
        launched = cached is None
        if launched:  # the JIT compiles (or finds compiled) and launches
            if len(self.compiled) >= CACHED_CALLS:
                self.compiled.clear()
            named = dict(constants)
            compiled = self.kernel[grid](*tensors, *scalars, **named)
            cached = self.compiled[key] = (compiled, tuple(named[name] for name in self.constexprs))
        compiled, constexprs = cached
        direct = Direct(compiled[(*grid, 1, 1)[:3]], key[0], (*scalars, *constexprs))  # it reads three sizes
        if not launched:
            direct.run(*pointers, *direct.trailing)
        return direct


class Direct(NamedTuple):
    """A compiled kernel bound to its grid, device and trailing arguments: ``run(*pointers, *trailing)``."""

    run: Callable[..., None]
    device: int
    trailing: tuple


class BoundLaunch:
    """One launch of ``launcher`` with a fixed grid, scalars and constants, called again and again with
    tensors of the same dtypes on the same device (the caller's promise: only their addresses change).
    After the first call, each launches the compiled kernel directly, checking only that every tensor
    is 16-byte aligned and that the current device is the first call's."""

    def __init__(self, launcher: Launcher, grid: tuple[int, ...], scalars: tuple, constants: Constants) -> None:
        self.launcher, self.grid, self.scalars, self.constants = launcher, grid, scalars, constants
        self.direct: Direct | None = None

    def __call__(self, tensors: Sequence[torch.Tensor]) -> None:
        direct = self.direct
        if direct is not None:
            pointers = _aligned_addresses(tensors)
            if pointers is not None and torch.cuda.current_device() == direct.device:
                direct.run(*pointers, *direct.trailing)
                return
        self.direct = self.launcher(self.grid, tensors, self.scalars, self.constants)


def _aligned_addresses(tensors: Sequence[torch.Tensor]) -> tuple[int, ...] | None:
    """The tensors' addresses, or None where one is not 16-byte aligned (then only the JIT may launch)."""
    pointers = tuple(map(_data_ptr, tensors))
    return None if reduce(or_, pointers, 0) & 15 else pointers
