"""Fused kernels for per-sample low-rank updates: y_b = base_b + g_b · (x_b · D_nᵀ) · U_n,  n = rows[b].

x: (B, T, in), base: (B, T, out); D: (N, r, in) and U: (N, r, out) are a table of the batch's
distinct updates (``adaplex.methods.Factors`` describes them: a route's experts, each once however
many samples share it), g_b a per-sample gain and r_b a per-sample rank: rows of D and U past r_b
are zero and never read, so mixed ranks cost the bytes of their own ranks, not of the largest. The
batched-matmul path needs three kernels per layer (shrink, expand, add); in a launch-bound decode
step each costs more than its arithmetic. Here one launch (two for one-token steps on long inputs)
does all three, in float32 (h is rounded to the weights' dtype before the expand, as the matmul
path does), for up to three updates that read the same x (q/k/v, or gate/up, of a layer:
``grouped_lora_add``); the grid's last axis runs over the output tiles of every part.

Two forms, picked by the sizes' type:

- ``TileSizes``: a program computes a (BLOCK_M tokens × BLOCK_N outputs) tile of one sample with
  tensor-core dots, accumulating the shrink over the input, then the expand for its tile. Each
  program recomputes its sample's shrink (r·in multiply-adds per token, small beside the base
  layer's in·out); short inputs unroll it, so that all its loads are issued at once, and the
  expand's and the base's loads are issued before it.
- ``SplitSizes`` (one token per sample, long inputs): two launches. The shrink splits the input
  into BLOCK_K chunks, one program per (sample, part, chunk), each writing its partial h (r,)
  in float32; the expand sums a sample's partials and adds g·h·U over CHUNKS·BLOCK_N columns per
  program. Every byte of D and U is read once, by enough programs to fill the GPU, where one
  program per sample re-reading D for each column block left an 8B layer's launches at ~10x
  their bytes.

The built-in sizes come from a sweep on an H200 (benchmarks/kernel_check.py). Launches go through
``Launcher``, which skips most of Triton's per-call host work.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache, lru_cache
from typing import NamedTuple

import torch

from adaplex.kernels import INTERPRETED, dot_size
from adaplex.kernels.launch import BoundLaunch, Launcher

MAX_PARTS = 3
_enabled = True

# (base output (B, T, out), down (N, r, in), up (N, r, out), gain (B,) float32 or None, ranks (B,) int32 or None)
Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
UNROLLED = 32  # the most shrink chunks a program unrolls


class TileSizes(NamedTuple):
    """The tensor-core kernel's tiles: tokens x outputs per program, the input chunk, warps."""

    block_m: int
    block_n: int
    block_k: int
    warps: int


class SplitSizes(NamedTuple):
    """The two-launch form's sizes: the shrink's input chunk, the expand's columns per chunk and
    chunks per program, warps."""

    block_k: int
    block_n: int
    chunks: int
    warps: int


Sizes = TileSizes | SplitSizes
DECODE = TileSizes(16, 512, 128, 2)  # a decode step (T <= 16 per sample) on a short input: one 16-row tile
PREFILL = TileSizes(64, 64, 64, 4)
ONE_TOKEN_LONG = SplitSizes(512, 1024, 1, 4)
LONG_INPUT = 2048  # from here a one-token step takes the two-launch form
PARTIAL_SHRINKS = 1024  # the two-launch form doubles its input chunk (up to 4x) until it has at most these


def built_in_sizes(batch: int, tokens: int, n_in: int, parts: int) -> Sizes:
    """The form and its sizes for ``batch`` samples of ``tokens`` each, an input of ``n_in`` and ``parts``
    updates of that input. The two-launch form's chunk grows while batch x parts x chunks exceeds
    PARTIAL_SHRINKS, a rule fitted to an H200 sweep at batch 64 (benchmarks/kernel_check.py): chunks of
    1,024 take 2 µs off an 8B layer's q/k/v and down launches (1,536 and 1,792 partial shrinks at 512),
    while its o and gate/up launches (512 and 1,024) are 0.7-2 µs faster at 512."""
    if tokens == 1 and n_in >= LONG_INPUT:
        block_k = ONE_TOKEN_LONG.block_k
        while batch * parts * split_blocks(n_in, block_k)[0] > PARTIAL_SHRINKS and block_k < 4 * ONE_TOKEN_LONG.block_k:
            block_k *= 2
        return ONE_TOKEN_LONG._replace(block_k=block_k)
    return DECODE if tokens <= 16 else PREFILL


def split_blocks(n_in: int, block_k: int) -> tuple[int, int]:
    """The two-launch form's number of partial shrinks over an input of ``n_in``, and the power of
    two the expand loads them in."""
    splits = -(-n_in // block_k)
    return splits, 1 << (splits - 1).bit_length()


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x``'s device: CUDA (or any device under the interpreter) with
    Triton installed, as PyTorch's CUDA wheels install it."""
    return _enabled and (x.is_cuda or INTERPRETED) and _kernels() is not None


@contextmanager
def disabled() -> Iterator[None]:
    """Inside the block routed layers use the batched-matmul path (to compare, or to rule the kernel out)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


@cache
def _kernels() -> tuple[Launcher, Launcher, Launcher] | None:
    """Launchers of the (tile, shrink, expand) kernels, compiled on first use; None without Triton."""
    try:
        from adaplex.kernels import gathered_lora_triton as source
    except ImportError:
        return None
    return Launcher(source.tile_kernel), Launcher(source.shrink_kernel), Launcher(source.expand_kernel)


def gathered_lora_add(
    base: torch.Tensor,
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    rows: torch.Tensor | None = None,
    gain: torch.Tensor | None = None,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """base + g · (x @ down[rows]ᵀ) @ up[rows] per sample in one kernel; base (B, T, out), x (B, T, in),
    down (N, r, in), up (N, r, out); ``rows`` None: row b is sample b's; ``gain`` None: 1."""
    return grouped_lora_add(x, [(base, down, up, gain, ranks)], rows)[0]


def grouped_lora_add(
    x: torch.Tensor, parts: Sequence[Part], rows: torch.Tensor | None = None, sizes: Sizes | None = None
) -> list[torch.Tensor]:
    """[base_p + g_p · (x @ down_p[rows]ᵀ) @ up_p[rows] for each part] in one launch: up to three parts of
    one rank that read the same x (B, T, in) and the same rows of their tables; each part's out size
    may differ, all give a gain or none do, and ranks likewise. ``sizes`` overrides the built-in
    choice (and with it the kernel), for tuning."""
    tables = [(down, up, gain, ranks) for _, down, up, gain, ranks in parts]
    return GroupedLoRAAdd(x, tables, rows, sizes)(x, [base for base, *_ in parts])


Table = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # down, up, gain, ranks


class GroupedLoRAAdd:
    """``grouped_lora_add`` with its tables bound, for a route's forwards: ``add(x, bases)`` gives the
    parts' outputs for inputs of ``x_like``'s shape, dtype and device (a decode step's, step after
    step). The launches' sizes are worked out once, and after the first call each launch goes
    straight to the compiled kernel (``BoundLaunch``)."""

    def __init__(
        self, x_like: torch.Tensor, tables: Sequence[Table], rows: torch.Tensor | None, sizes: Sizes | None = None
    ) -> None:
        forms = tuple((down.shape, up.shape, gain is None, ranks is None) for down, up, gain, ranks in tables)
        self.plan = _plan(x_like.shape, x_like.dtype, forms, rows is None, sizes)
        self.shape, self.dtype = x_like.shape, x_like.dtype
        self.tables = [(down.contiguous(), up.contiguous(), gain, ranks) for down, up, gain, ranks in tables]
        self.rows = rows
        self.launches: list[BoundLaunch] = []
        self.base_dtypes: list[torch.dtype] = []

    def __call__(self, x: torch.Tensor, bases: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if x.shape != self.shape or x.dtype != self.dtype:
            raise ValueError(f"bound for inputs {tuple(self.shape)} {self.dtype}, given {tuple(x.shape)} {x.dtype}")
        x = x.contiguous()
        bases = [base.contiguous() for base in bases]
        outs = [torch.empty_like(base) for base in bases]
        dtypes = [base.dtype for base in bases]
        if dtypes != self.base_dtypes:  # first call, or bases of another dtype (autocast): launch afresh
            self.launches = [BoundLaunch(*launch) for launch in self.plan.launches]
            self.base_dtypes = dtypes
        tensors = [x, _or(self.rows, x)]
        for (down, up, gain, ranks), base, out in zip(self.tables, bases, outs, strict=True):
            tensors += (down, up, base, out, _or(gain, x), _or(ranks, x))
        tensors += tensors[2:8] * (MAX_PARTS - len(bases))  # unused slots: no program reaches them
        if self.plan.partials is not None:
            tensors.append(x.new_empty(self.plan.partials, dtype=torch.float32))
        for launch in self.launches:
            launch(tensors)
        return outs


class _Plan(NamedTuple):
    """A call's launches (launcher, grid, scalars, constants) and the shape of the two-launch form's
    partial shrinks (parts, B, splits, RANK), None for the tile kernel's one launch."""

    launches: tuple[tuple[Launcher, tuple[int, ...], tuple[int, ...], tuple], ...]
    partials: tuple[int, ...] | None


PartForm = tuple[torch.Size, torch.Size, bool, bool]  # down's shape, up's shape, no gain, no ranks


@lru_cache(maxsize=256)
def _plan(
    shape: torch.Size, dtype: torch.dtype, forms: tuple[PartForm, ...], no_rows: bool, sizes: Sizes | None
) -> _Plan:
    """What a call of these shapes launches, worked out once per shape (a decode step's layers share it)."""
    if (
        not 1 <= len(forms) <= MAX_PARTS
        or len({down[1] for down, *_ in forms}) != 1
        or len({(no_gain, no_ranks) for *_, no_gain, no_ranks in forms}) != 1
    ):
        raise ValueError(f"grouped_lora_add takes 1 to {MAX_PARTS} parts of one rank, all with gains and ranks or none")
    batch, tokens, n_in = shape
    sizes = sizes or built_in_sizes(batch, tokens, n_in, len(forms))
    split = isinstance(sizes, SplitSizes)
    if split and tokens != 1:
        raise ValueError(f"the two-launch form takes one token per sample, not {tokens}")
    columns = sizes.block_n * sizes.chunks if split else sizes.block_n  # per program
    n_outs = [up[2] for _, up, _, _ in forms] + [0] * (MAX_PARTS - len(forms))
    part_tiles = [-(-n // columns) for n in n_outs]
    rank, no_gain, no_ranks = forms[0][0][1], forms[0][2], forms[0][3]
    scalars = (*n_outs, part_tiles[0], part_tiles[0] + part_tiles[1], rank)
    flags = (
        ("RANK", dot_size(rank)),
        ("HAS_ROWS", not no_rows),
        ("HAS_RANKS", not no_ranks),
        ("num_warps", sizes.warps),
    )
    has_gain = ("HAS_GAIN", not no_gain)
    tile_kernel, shrink_kernel, expand_kernel = _kernels()
    if split:
        splits, split_block = split_blocks(n_in, sizes.block_k)
        shrink = (batch, len(forms), splits), scalars, (("N_IN", n_in), ("BLOCK_K", sizes.block_k), *flags)
        sums = ("SPLITS", splits), ("SPLIT_BLOCK", split_block)
        blocks = ("BLOCK_N", sizes.block_n), ("CHUNKS", sizes.chunks)
        expand = (batch, sum(part_tiles)), scalars, (*sums, *blocks, has_gain, *flags)
        return _Plan(((shrink_kernel, *shrink), (expand_kernel, *expand)), (len(forms), batch, splits, dot_size(rank)))
    precision = "ieee" if dtype == torch.float32 else "tf32"
    blocks = ("BLOCK_M", sizes.block_m), ("BLOCK_N", sizes.block_n), ("BLOCK_K", sizes.block_k)
    shrink = ("N_IN", n_in), ("UNROLL", n_in <= UNROLLED * sizes.block_k), ("PRECISION", precision)
    grid = (batch, -(-tokens // sizes.block_m), sum(part_tiles))
    return _Plan(((tile_kernel, grid, (*scalars, tokens), (*blocks, *shrink, has_gain, *flags)),), None)


def _or(tensor: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a pointer the kernel is told not to read (its flag is off)."""
    return stand_in if tensor is None else tensor
