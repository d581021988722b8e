"""The Triton kernels compile for an H100 (sm_90) with Triton's NVIDIA backend and its bundled ptxas,
no GPU needed. The interpreter tests run the kernels' Python; only the compiler sees what it rejects
(a constexpr that became a runtime value, an unsupported layout) and whether the tiles fit the SM."""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from adaplex.kernels import checked_attention_triton as attention
from adaplex.kernels import dot_size
from adaplex.kernels import gathered_lora_triton as gathered
from adaplex.kernels.checked_attention import CHECKED_TILES_MAX_DIM, PASS_TILES, built_in_tiles
from adaplex.kernels.gathered_lora import (
    DECODE,
    GRAPH_LINEAR_LONG,
    GRAPH_LINEAR_SHORT,
    LINEAR_DECODE,
    ONE_TOKEN,
    PREFILL,
    UNROLLED,
    built_in_sizes,
    split_blocks,
)

H100 = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
SHARED_MEMORY = 227 * 1024  # bytes one H100 block may use


def compile_for_h100(fn, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict, **options):
    """``fn`` compiled to a cubin; arguments named in ``pointers`` point to that dtype, ``floats`` are
    fp32 scalars, every other non-constexpr argument is an int32. Every pointer and integer is marked
    a multiple of 16, as Triton's launcher finds them at the benchmarks' shapes: that lets it pipeline
    the loads with async copies, so that registers and shared memory are those of the device's build."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i32"
    aligned = {
        (i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if signature[n] not in ("constexpr", "fp32")
    }
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(source, target=H100, options=options)


def resources(kernel) -> dict[str, int]:
    """Registers per thread (REG) and spill stack bytes (STACK) of a compiled kernel, from its cubin
    (Triton's bundled cuobjdump)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
    return {key: int(re.search(rf"{key}:(\d+)", usage.stdout).group(1)) for key in ("REG", "STACK")}


def _pointers(fn, dtype: str, data: tuple[str, ...]) -> dict[str, str]:
    """Every pointer argument of ``fn`` (named *_ptr or *_rec): ``dtype`` for ``data``, else fp32."""
    pointers = {name: "fp32" for name in fn.arg_names if name.endswith(("_ptr", "_rec"))}
    pointers.update(dict.fromkeys(data, dtype))
    return pointers


def assert_relaxed_atomics(ptx: str) -> None:
    """The atomics are relaxed: an acq_rel one fences, making each program wait for its earlier stores
    (measured on an H100: ~20 µs per call of the attention kernel at 32 x 1024)."""
    assert "acq_rel" not in ptx and "membar" not in ptx


FLOATS = ("scaling", "eps", "slack_norm", "slack_sum")


@pytest.mark.parametrize(
    "dtype, dim, causal, enabled, q_stats, folded",
    [
        ("bf16", 64, True, 7, 2, False),  # SmolLM2: every check
        ("bf16", 64, True, 7, 2, True),  # and folded: no row pass
        ("fp16", 128, True, 7, 1, False),  # the widest head the kernel takes; q's norm only (a partial rotary)
        ("fp16", 128, False, 7, 1, True),
        ("fp32", 48, False, 0, 0, False),  # a padded head dim, no checks
    ],
)
def test_checked_attention_compiles_for_h100(dtype, dim, causal, enabled, q_stats, folded):
    checked = (enabled or q_stats) and dim <= CHECKED_TILES_MAX_DIM
    block_m, block_n, warps, stages, max_registers = built_in_tiles(dim, checked, folded)
    constexprs = dict(
        HEADS=9, GROUP=3, D=dim, D_PAD=dot_size(dim), BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
        ENABLED=enabled, NQ=q_stats, WEIGHTED=q_stats == 2, PRECISION="ieee" if dtype == "fp32" else "tf32",
        FOLDED=folded, NK=q_stats if folded else 0, NV=q_stats if folded else 0, WEIGHTED_K=folded and q_stats == 2,
    )  # fmt: skip
    fn = attention.checked_attention_kernel
    data = ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "aux_ptr", "q_rec", "weights_ptr", "k_rec", "v_rec", "k_weights_ptr")
    pointers = _pointers(fn, dtype, data)
    capped = {"maxnreg": max_registers} if max_registers else {}
    kernel = compile_for_h100(fn, pointers, FLOATS, constexprs, num_warps=warps, num_stages=stages, **capped)
    assert kernel.metadata.shared <= SHARED_MEMORY
    if dtype != "fp32":
        assert "wgmma" in kernel.asm["ptx"]  # Hopper's tensor-core instructions
    assert "async_copy" in kernel.asm["ttgir"]  # the key loop's loads are pipelined
    usage = resources(kernel)
    if dtype != "fp32":  # nothing spills (float32 tiles, twice as large, do: the GPU path is tuned for 16 bits)
        assert usage["STACK"] == 0
    if max_registers:  # the cap holds
        assert usage["REG"] <= max_registers
    assert_relaxed_atomics(kernel.asm["ptx"])
    assert ("atom" in kernel.asm["ptx"]) != folded  # a folded call writes each program's worst: no atomics


@pytest.mark.parametrize("dim, summary, recorded, weighted", [(64, True, 2, True), (48, False, 1, False)])
def test_row_pass_compiles_for_h100(dim, summary, recorded, weighted):
    fn = attention.row_pass_kernel
    pointers = _pointers(fn, "bf16", ("k_ptr", "v_ptr", "aux_ptr", "k_rec", "v_rec", "weights_ptr"))
    constexprs = dict(
        KV_HEADS=3, D=dim, D_PAD=dot_size(dim), BLOCK_S=PASS_TILES[0], SUMMARY=summary,
        NK=recorded, NV=recorded, WEIGHTED=weighted,
    )  # fmt: skip
    kernel = compile_for_h100(fn, pointers, FLOATS, constexprs, num_warps=PASS_TILES[1])
    assert ("atom" in kernel.asm["ptx"]) == (summary or recorded > 0)  # the hull's and the peak's atomic maxima
    assert_relaxed_atomics(kernel.asm["ptx"])


def _lora_pointers(fn) -> dict[str, str]:
    """bf16 activations and tables, fp32 gains, int32 ranks, int64 rows."""
    kinds = {"g": "fp32", "r": "i32"}
    pointers = {name: kinds.get(name[0], "bf16") for name in fn.arg_names if re.fullmatch(r"[dubogrw][012]", name)}
    return pointers | {"x_ptr": "bf16", "rows_ptr": "i64"}


def assert_dependent(ptx: str, dependent: bool, *instructions: str) -> None:
    """A dependent launch's kernel holds each of ``instructions`` (griddepcontrol's) once; another, none."""
    for instruction in instructions:
        assert ptx.count(f"griddepcontrol.{instruction};") == (1 if dependent else 0), instruction


@pytest.mark.parametrize("n_in, dependent", [(576, True), (1536, False), (4096, False), (4096, True), (14336, True)])
def test_gathered_lora_split_kernels_compile_for_h100_without_spills(n_in, dependent):
    sizes = ONE_TOKEN
    flags = dict(RANK=16, HAS_ROWS=True, HAS_RANKS=True, DEPENDENT=dependent)
    splits, split_block = split_blocks(n_in, sizes.block_k)
    shrink = dict(N_IN=n_in, BLOCK_K=sizes.block_k, **flags)
    expand = dict(SPLITS=splits, SPLIT_BLOCK=split_block, BLOCK_N=sizes.block_n,
                  CHUNKS=sizes.chunks, HAS_GAIN=True, **flags)  # fmt: skip
    for fn, constexprs, gdc in (
        (gathered.shrink_kernel, shrink, ("launch_dependents", "wait")),
        (gathered.expand_kernel, expand, ("wait",)),
    ):
        pointers = _lora_pointers(fn) | {"h_ptr": "fp32"}
        kernel = compile_for_h100(fn, pointers, (), constexprs, num_warps=sizes.warps, launch_pdl=dependent)
        assert kernel.metadata.shared <= SHARED_MEMORY
        assert resources(kernel)["STACK"] == 0
        assert_dependent(kernel.asm["ptx"], dependent, *gdc)


@pytest.mark.parametrize("sizes, n_in, flags", [(DECODE, 576, True), (PREFILL, 576, False), (PREFILL, 14336, True)])
def test_gathered_lora_tile_kernel_compiles_for_h100(sizes, n_in, flags):
    constexprs = dict(N_IN=n_in, RANK=16, BLOCK_M=sizes.block_m, BLOCK_N=sizes.block_n, BLOCK_K=sizes.block_k,
                      PRECISION="tf32", UNROLL=n_in <= UNROLLED * sizes.block_k, HAS_ROWS=flags, HAS_GAIN=flags,
                      HAS_RANKS=flags)  # fmt: skip
    kernel = compile_for_h100(gathered.tile_kernel, _lora_pointers(gathered.tile_kernel), (), constexprs,
                              num_warps=sizes.warps)  # fmt: skip
    assert kernel.metadata.shared <= SHARED_MEMORY
    assert resources(kernel)["STACK"] == 0


@pytest.mark.parametrize("n_in", [576, 1536])
def test_gathered_lora_linear_kernel_compiles_for_h100_without_spills(n_in):
    sizes = LINEAR_DECODE
    constexprs = dict(N_IN=n_in, RANK=16, BLOCK_M=sizes.block_m, BLOCK_N=sizes.block_n, CHUNKS=sizes.chunks,
                      BLOCK_K=sizes.block_k, SHRINK_K=sizes.shrink_k, PRECISION="tf32", HAS_ROWS=True,
                      HAS_GAIN=True, HAS_RANKS=True)  # fmt: skip
    kernel = compile_for_h100(gathered.linear_kernel, _lora_pointers(gathered.linear_kernel), (), constexprs,
                              num_warps=sizes.warps)  # fmt: skip
    assert kernel.metadata.shared <= SHARED_MEMORY
    assert resources(kernel)["STACK"] == 0


@pytest.mark.parametrize(
    "sizes, n_in, parts, dependent",
    [
        (GRAPH_LINEAR_SHORT, 576, 3, True),  # the 135M shape's q/k/v
        (GRAPH_LINEAR_SHORT, 576, 2, False),  # its gate/up, independent
        (GRAPH_LINEAR_SHORT, 1536, 1, True),  # its down
        (GRAPH_LINEAR_LONG, 4096, 3, True),  # the 8B shape's q/k/v
        (GRAPH_LINEAR_LONG, 14336, 1, True),  # its down
    ],
)
def test_gathered_lora_linear_shrink_kernel_compiles_for_h100_without_spills(sizes, n_in, parts, dependent):
    sizes = sizes._replace(update=built_in_sizes(64, 1, n_in, parts))
    splits, _ = split_blocks(n_in, sizes.update.block_k)
    constexprs = dict(N_IN=n_in, RANK=16, BLOCK_M=sizes.block_m, BLOCK_N=sizes.block_n, BLOCK_K=sizes.block_k,
                      SHRINK_K=sizes.update.block_k, SPLITS=splits, PRECISION="tf32", HAS_ROWS=True,
                      HAS_RANKS=True, DEPENDENT=dependent)  # fmt: skip
    fn = gathered.linear_shrink_kernel
    kernel = compile_for_h100(fn, _lora_pointers(fn) | {"h_ptr": "fp32"}, (), constexprs, num_warps=sizes.warps,
                              num_stages=sizes.stages)  # fmt: skip
    assert kernel.metadata.shared <= SHARED_MEMORY
    assert resources(kernel)["STACK"] == 0
    assert_dependent(kernel.asm["ptx"], dependent, "launch_dependents")
    assert_dependent(kernel.asm["ptx"], False, "wait")  # the expand waits; this launch waits on nothing
