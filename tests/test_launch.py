"""The launcher's cache reuses a compiled kernel exactly where Triton's JIT would reuse it: the same
dtypes, 16-byte alignments, integers' specializations (1, multiples of 16, 32-bit range), scalar
types, constexprs and options. A fake kernel stands in for Triton's (no GPU here); on CUDA the
benchmarks compare the launched kernels' outputs with SDPA's (benchmarks/faults_kernel_check.py)."""

from __future__ import annotations

import pytest
import torch

from adaplex.kernels import launch
from adaplex.kernels.launch import Launcher


class FakeKernel:
    """A JIT function's interface: ``kernel[grid](*args, **named)`` compiles (here: counts) and returns
    the compiled kernel, which ``compiled[grid](*args, *constexprs)`` launches."""

    arg_names = ["x", "n", "scale", "D", "FLAG"]
    constexprs = [3, 4]

    def __init__(self) -> None:
        self.compiles: list[tuple] = []
        self.launches: list[tuple] = []

    def __getitem__(self, grid):
        def run(*args, **named):
            self.compiles.append((grid, args, named))
            self.launches.append((grid, args, tuple(named.values())))
            return Compiled(self)

        return run


class Compiled:
    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args: self.kernel.launches.append((grid, args[:3], args[3:]))


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(launch, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return FakeKernel()


def test_a_repeated_specialization_launches_the_compiled_kernel_with_its_constexprs_in_order(kernel):
    launcher = Launcher(kernel)
    x = torch.zeros(64)
    for n in (64, 48):  # both multiples of 16, neither 1: one specialization
        launcher((2, 3), x, n, 0.5, FLAG=True, D=64, num_warps=4)
    assert len(kernel.compiles) == 1
    assert kernel.launches[1] == ((2, 3, 1), (x, 48, 0.5), (64, True))  # D, FLAG: the kernel's order


@pytest.mark.parametrize(
    "change",
    [
        {"x": torch.zeros(65)[1:]},  # 4 bytes off 16-byte alignment
        {"x": torch.zeros(64, dtype=torch.float16)},
        {"n": 1},  # Triton makes a 1 a constant
        {"n": 65},  # not a multiple of 16
        {"n": 2**40},  # 64-bit
        {"scale": 2},  # an int where a float was
        {"D": 32},
        {"num_warps": 8},
    ],
)
def test_any_change_triton_specializes_on_compiles_anew(kernel, change):
    launcher = Launcher(kernel)
    call = {"x": torch.zeros(64), "n": 64, "scale": 0.5, "D": 64, "num_warps": 4}
    for arguments in (call, {**call, **change}):
        launcher((1,), arguments["x"], arguments["n"], arguments["scale"], D=arguments["D"], FLAG=False,
                 num_warps=arguments["num_warps"])  # fmt: skip
    assert len(kernel.compiles) == 2
