"""The launcher reuses a compiled kernel only for a call with the same arguments, up to what Triton
reads of a tensor (its dtype and 16-byte alignment), and the same constants; a call with a tensor
off 16-byte alignment always goes through the JIT. A direct launch passes tensors' addresses; a bound
launch goes direct from its second call. A fake kernel stands in for Triton's (no GPU here); on CUDA
the benchmarks compare the launched kernels' outputs with SDPA's and a cached launch's with the first
(benchmarks/faults_kernel_check.py, benchmarks/kernel_check.py)."""

from __future__ import annotations

import pytest
import torch

from adaplex.kernels import launch
from adaplex.kernels.launch import BoundLaunch, Launcher


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


def test_a_repeated_call_launches_the_compiled_kernel_with_its_constexprs_in_order(kernel):
    launcher = Launcher(kernel)
    constants = (("FLAG", True), ("D", 64), ("num_warps", 4))
    for x in (torch.zeros(64), torch.ones(64)):  # other data, same dtype and alignment
        launcher((2, 3), (x,), (64, 0.5), constants)
    assert len(kernel.compiles) == 1
    assert kernel.compiles[0][2] == {"FLAG": True, "D": 64, "num_warps": 4}
    # the tensor's address, then D, FLAG in the kernel's order
    assert kernel.launches[1] == ((2, 3, 1), (x.data_ptr(), 64, 0.5), (64, True))


@pytest.mark.parametrize(
    "change",
    [
        {"x": torch.zeros(64, dtype=torch.float16)},
        {"n": 48},
        {"n": 1.0},  # equal to 1 in Python, but Triton would see a float
        {"scale": 1},  # and here an int, which Triton makes a constant
        {"D": 32},
        {"num_warps": 8},
    ],
)
def test_any_other_call_goes_through_the_jit(kernel, change):
    launcher = Launcher(kernel)
    call = {"x": torch.zeros(64), "n": 1, "scale": 1.0, "D": 64, "num_warps": 4}
    for arguments in (call, {**call, **change}):
        constants = (("D", arguments["D"]), ("FLAG", False), ("num_warps", arguments["num_warps"]))
        launcher((1,), (arguments["x"],), (arguments["n"], arguments["scale"]), constants)
    assert len(kernel.compiles) == 2


def test_a_call_with_an_unaligned_tensor_always_goes_through_the_jit(kernel):
    launcher = Launcher(kernel)
    unaligned = torch.zeros(65)[1:]  # 4 bytes off 16-byte alignment
    for _ in range(2):
        launcher((1,), (torch.zeros(4), unaligned), (1, 0.5), (("D", 4), ("FLAG", False)))
    assert len(kernel.compiles) == 2
    assert not launcher.compiled


def test_the_cache_is_bounded(kernel):
    launcher = Launcher(kernel)
    for n in range(launch.CACHED_CALLS + 10):  # a generation loop: the key count grows every step
        launcher((1,), (torch.zeros(4),), (n, 0.5), (("D", 4), ("FLAG", False)))
    assert len(launcher.compiled) <= launch.CACHED_CALLS


def test_a_bound_launch_goes_direct_after_its_first_call_unless_unaligned_or_on_another_device(kernel, monkeypatch):
    bound = BoundLaunch(Launcher(kernel), (2,), (64, 0.5), (("FLAG", True), ("D", 64), ("num_warps", 4)))
    tensors = [torch.zeros(64), torch.ones(64)]
    bound(tensors)
    bound([torch.ones(64), torch.zeros(64)])  # other tensors of the same kind: direct, their addresses
    assert len(kernel.compiles) == 1
    assert kernel.launches[-1][1][0] != tensors[0].data_ptr() and isinstance(kernel.launches[-1][1][0], int)
    bound([torch.zeros(65)[1:], torch.ones(64)])  # unaligned: through the JIT
    assert len(kernel.compiles) == 2
    bound(tensors)  # aligned again: the launcher's remembered kernel, no compile
    assert len(kernel.compiles) == 2
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # another device: through the launcher's key
    bound(tensors)
    assert len(kernel.compiles) == 3
