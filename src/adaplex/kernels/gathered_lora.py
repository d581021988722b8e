"""Fused kernels for per-sample low-rank updates: y_b = base_b + g_b · (x_b · D_nᵀ) · U_n,  n = rows[b].

x: (B, T, in), base: (B, T, out); D: (N, r, in) and U: (N, r, out) are a table of the batch's
distinct updates (``adaplex.methods.Factors`` describes them: a route's experts, each once however
many samples share it), g_b a per-sample gain and r_b a per-sample rank: rows of D and U past r_b
are zero and never read, so mixed ranks cost the bytes of their own ranks, not of the largest. The
batched-matmul path needs three kernels per layer (shrink, expand, add); in a launch-bound decode
step each costs more than its arithmetic. Here one launch (two for one-token steps)
does all three, in float32 (h is rounded to the weights' dtype before the expand, as the matmul
path does), for up to three updates that read the same x (q/k/v, or gate/up, of a layer:
``grouped_lora_add``); the grid's last axis runs over the output tiles of every part.

Three forms, picked by the sizes' type:

- ``TileSizes``: a program computes a (BLOCK_M tokens × BLOCK_N outputs) tile of one sample with
  tensor-core dots, accumulating the shrink over the input, then the expand for its tile. Each
  program recomputes its sample's shrink (r·in multiply-adds per token, small beside the base
  layer's in·out); short inputs unroll it, so that all its loads are issued at once, and the
  expand's and the base's loads are issued before it.
- ``SplitSizes`` (one token per sample): two launches. The shrink splits the input
  into BLOCK_K chunks, one program per (sample, part, chunk), each writing its partial h (r,)
  in float32; the expand sums a sample's partials and adds g·h·U over CHUNKS·BLOCK_N columns per
  program. Every byte of D and U is read once, by enough programs to fill the GPU, where one
  program per sample re-reading D for each column block left an 8B layer's launches at ~10x
  their bytes. From compute capability 9.0 both are programmatic dependent launches where the caller
  allows (``GroupedLoRAAdd``'s ``dependent``): the expand loads U while the shrink still runs.
- ``LinearSizes`` (one token per sample, short inputs; ``GroupedLinearLoRA``): the base linears
  too, base_p = x·W_pᵀ, in one launch per group of parts, for eager steps whose host launching kernels
  sets the pace. A program takes BLOCK_M samples: their shrinks on CUDA cores (each sample its own D),
  then per column chunk the base's tensor-core dot and the expand.
- ``SplitLinearSizes`` (one token per sample; ``GroupedLinearLoRA`` under CUDA graphs, ``graph_kernels``,
  and eagerly on inputs from LONG_INPUT): two launches. The first's programs compute either a (BLOCK_M
  samples × BLOCK_N outputs) tile of the base linears with tensor-core dots or one partial shrink as in
  ``SplitSizes``; the second is that form's expand, a dependent launch that loads U while the first
  runs. The base linears' and the updates' bytes stream through one launch's programs at once, where
  cuBLAS's launches and the update's left the GPU part-idle between them.

The built-in sizes come from sweeps on an H200 (benchmarks/kernel_check.py, dependent_sweep.py). Launches go through
``Launcher``, which skips most of Triton's per-call host work.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import cache, lru_cache
from typing import NamedTuple

import torch

from adaplex.kernels import INTERPRETED, dot_size
from adaplex.kernels.launch import BoundLaunch, Launcher

MAX_PARTS = 3
_enabled = True
_for_graphs = False
_dependent = True

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


class LinearSizes(NamedTuple):
    """The base-and-update kernel's sizes: samples per program, outputs per column chunk, chunks per
    program, the base dot's input chunk, the shrink's input chunk, warps."""

    block_m: int
    block_n: int
    chunks: int
    block_k: int
    shrink_k: int
    warps: int


class SplitLinearSizes(NamedTuple):
    """The base linears' launch (which computes the partial shrinks too) and the expand after it: the
    linears' tile (samples x outputs per program, the input chunk of their dot), its warps and pipeline
    stages, and the update's ``SplitSizes`` (the shrink's input chunk, the expand's columns and warps)."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    update: SplitSizes


Sizes = TileSizes | SplitSizes | LinearSizes | SplitLinearSizes
DECODE = TileSizes(16, 512, 128, 2)  # a few tokens a sample (T <= 16) on a short input: one 16-row tile
PREFILL = TileSizes(64, 64, 64, 4)
LINEAR_DECODE = LinearSizes(16, 64, 1, 64, 32, 8)  # for host-bound eager steps; 1.04-1.42x the best swept GPU time
ONE_TOKEN = SplitSizes(512, 1024, 1, 4)
LONG_INPUT = 2048  # below it, eager one-token steps take the base-and-update kernel; from it, as graphs do
# graphed one-token steps' linears-and-shrinks launch on inputs under LONG_INPUT and from it (the update's
# sizes are built_in_sizes's): 1.03x and 1.11x the base graph on the 135M and 8B shapes, H100 (``linear_sizes``)
GRAPH_LINEAR_SHORT = SplitLinearSizes(64, 16, 64, 4, 4, ONE_TOKEN)
GRAPH_LINEAR_LONG = SplitLinearSizes(64, 32, 128, 4, 4, ONE_TOKEN)
PARTIAL_SHRINKS = 1024  # the two-launch form doubles its input chunk (up to 4x) until it has at most these


def built_in_sizes(batch: int, tokens: int, n_in: int, parts: int) -> Sizes:
    """The form and its sizes for ``batch`` samples of ``tokens`` each, an input of ``n_in`` and ``parts``
    updates of that input. The two-launch form's chunk grows while batch x parts x chunks exceeds
    PARTIAL_SHRINKS, a rule fitted to an H200 sweep at batch 64 (benchmarks/kernel_check.py): chunks of
    1,024 take 2 µs off an 8B layer's q/k/v and down launches (1,536 and 1,792 partial shrinks at 512),
    while its o and gate/up launches (512 and 1,024) are 0.7-2 µs faster at 512. One-token steps take the
    two-launch form on short inputs too: a graphed SmolLM2-135M step (inputs of 576 and 1,536) is 1.17x
    its base with it against 1.25x with the tile kernel (benchmarks/results/route-decode-cuda-linear.json,
    dependent-sweep-cuda-smollm2-135m.json)."""
    if tokens == 1:
        block_k = ONE_TOKEN.block_k
        while batch * parts * split_blocks(n_in, block_k)[0] > PARTIAL_SHRINKS and block_k < 4 * ONE_TOKEN.block_k:
            block_k *= 2
        return ONE_TOKEN._replace(block_k=block_k)
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


def dependent_launches(x: torch.Tensor) -> bool:
    """Whether update launches on ``x``'s device may be programmatic dependent launches (compute capability
    9.0 and up, compiled kernels): each starts before the kernel ahead of it ends and waits for it only
    where it reads what that kernel wrote (``GroupedLoRAAdd``'s ``dependent``)."""
    return _dependent and x.is_cuda and not INTERPRETED and _hopper_or_later(x.device)


@cache
def _hopper_or_later(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


@contextmanager
def _switched(flag: str, value: bool) -> Iterator[None]:
    """Inside the block this module's ``flag`` holds ``value``."""
    saved, globals()[flag] = globals()[flag], value
    try:
        yield
    finally:
        globals()[flag] = saved


def independent_launches() -> AbstractContextManager[None]:
    """Inside the block update launches wait for the kernel ahead of them to end before they start (to compare)."""
    return _switched("_dependent", False)


def disabled() -> AbstractContextManager[None]:
    """Inside the block routed layers use the batched-matmul path (to compare, or to rule the kernel out)."""
    return _switched("_enabled", False)


@cache
def _kernels() -> tuple[Launcher, Launcher, Launcher, Launcher, Launcher] | None:
    """Launchers of the (tile, shrink, expand, linear, linear-and-shrink) kernels, compiled on first use; None
    without Triton."""
    try:
        from adaplex.kernels import gathered_lora_triton as source
    except ImportError:
        return None
    kernels = (
        source.tile_kernel,
        source.shrink_kernel,
        source.expand_kernel,
        source.linear_kernel,
        source.linear_shrink_kernel,
    )
    return tuple(map(Launcher, kernels))


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


class _Bound:
    """Tables bound for a route's forwards, on inputs of ``x_like``'s shape, dtype and device (a decode
    step's, step after step): the launches' sizes are worked out once, and after the first call each
    launch goes straight to the compiled kernel (``BoundLaunch``)."""

    def __init__(self, x_like: torch.Tensor, tables: Sequence[Table], rows: torch.Tensor | None, plan: _Plan) -> None:
        self.plan = plan
        self.shape, self.dtype = x_like.shape, x_like.dtype
        self.tables = [(down.contiguous(), up.contiguous(), gain, ranks) for down, up, gain, ranks in tables]
        self.rows = rows
        self.launches: list[tuple[bool, BoundLaunch]] = []
        self.base_dtypes: list[torch.dtype] = []

    def _launch(
        self, x: torch.Tensor, bases: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], *weights: torch.Tensor
    ) -> None:
        """Launch the plan on these bases and outputs (the base linears' ``weights`` go to the launches that
        compute them, after the parts' slots and the partial shrinks)."""
        if x.shape != self.shape or x.dtype != self.dtype:
            raise ValueError(f"bound for inputs {tuple(self.shape)} {self.dtype}, given {tuple(x.shape)} {x.dtype}")
        dtypes = [base.dtype for base in bases]
        if dtypes != self.base_dtypes:  # first call, or bases of another dtype (autocast): launch afresh
            self.launches = [(weighted, BoundLaunch(*launch)) for weighted, *launch in self.plan.launches]
            self.base_dtypes = dtypes
        x = x.contiguous()
        tensors = [x, _or(self.rows, x)]
        for (down, up, gain, ranks), base, out in zip(self.tables, bases, outs, strict=True):
            tensors += (down, up, base, out, _or(gain, x), _or(ranks, x))
        tensors += tensors[2:8] * (MAX_PARTS - len(bases))  # unused slots: no program reaches them
        if self.plan.partials is not None:
            tensors.append(x.new_empty(self.plan.partials, dtype=torch.float32))
        weighted = [*tensors, *weights]
        for takes_weights, launch in self.launches:
            launch(weighted if takes_weights else tensors)


class GroupedLoRAAdd(_Bound):
    """``grouped_lora_add`` with its tables bound: ``add(x, bases)`` gives the parts' outputs.

    ``dependent``: the caller's promise that each call comes right after the kernels that compute its
    bases, with x (contiguous), the tables, rows, gains and ranks all written before those kernels
    began. The two-launch form's launches are then programmatic dependent ones (where
    ``dependent_launches`` allows): the shrink starts when the base linear lets it (at the latest as its
    last blocks end) and lets the expand start at once, which loads U and waits only before it reads the
    partials and the bases. (The tile kernel's one launch stays independent: as a dependent launch after
    cuBLAS's GEMM it found nothing to overlap, H200,
    benchmarks/results/route-decode-cuda-dependent-tile-rejected.json.)"""

    def __init__(
        self,
        x_like: torch.Tensor,
        tables: Sequence[Table],
        rows: torch.Tensor | None,
        sizes: Sizes | None = None,
        dependent: bool = False,
    ) -> None:
        if isinstance(sizes, LinearSizes | SplitLinearSizes):
            raise ValueError(f"{type(sizes).__name__} size the base linears' launch: GroupedLinearLoRA takes them")
        dependent = dependent and dependent_launches(x_like)
        plan = _plan(x_like.shape, x_like.dtype, _forms(tables), rows is None, sizes, dependent)
        super().__init__(x_like, tables, rows, plan)

    def __call__(self, x: torch.Tensor, bases: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        bases = [base.contiguous() for base in bases]
        outs = [torch.empty_like(base) for base in bases]
        self._launch(x, bases, outs)
        return outs


class GroupedLinearLoRA(_Bound):
    """The parts' base linears with their per-sample updates, for one-token steps: ``(bases, outs) =
    linear(x)``, base_p = x W_pᵀ and out_p = base_p + g · (x @ down_p[rows]ᵀ) @ up_p[rows], the base as a
    bias-free ``nn.Linear`` of weight W_p (out, in) gives it (to the rounding of its dot). Where a step
    launches a kernel per linear and two per group of updates, this launches one for the group
    (``LinearSizes``) or two (``SplitLinearSizes``: the linears and the partial shrinks, then the expand,
    a programmatic dependent launch where ``dependent_launches`` allows, which loads U while the linears
    run). ``sizes`` None: ``linear_sizes``'s choice."""

    def __init__(
        self,
        x_like: torch.Tensor,
        weights: Sequence[torch.Tensor],
        tables: Sequence[Table],
        rows: torch.Tensor | None,
        sizes: LinearSizes | SplitLinearSizes | None = None,
    ) -> None:
        sizes = sizes or linear_sizes(x_like, len(tables)) or LINEAR_DECODE
        dependent = isinstance(sizes, SplitLinearSizes) and dependent_launches(x_like)
        plan = _plan(x_like.shape, x_like.dtype, _forms(tables), rows is None, sizes, dependent)
        super().__init__(x_like, tables, rows, plan)
        shapes = [w.shape for w in weights]
        if shapes != [(up.shape[2], x_like.shape[2]) for _, up, _, _ in tables]:
            raise ValueError(f"each part needs a weight of (its up table's out size, in), given {shapes}")
        self.weights = [*weights, *[weights[0]] * (MAX_PARTS - len(weights))]

    def __call__(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        bases = [x.new_empty((*x.shape[:-1], up.shape[2])) for _, up, _, _ in self.tables]
        outs = [torch.empty_like(base) for base in bases]
        self._launch(x, bases, outs, *self.weights)
        return bases, outs


def linear_sizes(x: torch.Tensor, parts: int) -> LinearSizes | SplitLinearSizes | None:
    """How routed layers compute ``parts`` base linears with their updates on inputs like ``x`` (B, T, in):
    ``GroupedLinearLoRA``'s sizes, or None where the base linears are launches of their own (more than one
    token a sample, or autocast, which computes them its own way). Eager steps on inputs under LONG_INPUT
    take the one-launch form; graphed ones (``graph_kernels``), and eager ones from LONG_INPUT, the linears
    and shrinks, then the expand, with the tile swept at batch 64, 64 rank-16 experts on all seven linears
    (benchmarks/dependent_sweep.py; H100): graphs 1.03x the base on the SmolLM2-135M shape and 1.11x on a
    Llama-3-8B layer's by GPU time, against 1.23x and 1.14x with cuBLAS's linears then the two-launch form;
    eager 8B steps 1.19x the base against 1.35x with cuBLAS's linears (half the launches a layer)."""
    if x.dim() != 3 or x.shape[1] != 1 or torch.is_autocast_enabled(x.device.type):
        return None
    batch, _, n_in = x.shape
    if n_in < LONG_INPUT and not _for_graphs:
        return LINEAR_DECODE
    graph_linear = GRAPH_LINEAR_SHORT if n_in < LONG_INPUT else GRAPH_LINEAR_LONG
    return graph_linear._replace(update=built_in_sizes(batch, 1, n_in, parts))


def graph_kernels() -> AbstractContextManager[None]:
    """Inside the block one-token steps take the kernels that serve CUDA graphs best (``core.graphs`` sets it,
    for capture and for the same steps run eagerly): the one-launch form saves launches, which is what an
    eager step waits on, while a graph has no launch cost to save and wants the GPU time the two-launch
    linears form saves (``linear_sizes``; H200, SmolLM2-135M shape, batch 64: the one-launch form's graphed
    step 1.60x the base)."""
    return _switched("_for_graphs", True)


def _forms(tables: Sequence[Table]) -> tuple[PartForm, ...]:
    return tuple((down.shape, up.shape, gain is None, ranks is None) for down, up, gain, ranks in tables)


class _Plan(NamedTuple):
    """A call's launches (whether it takes the base weights, launcher, grid, scalars, constants) and the shape
    of the partial shrinks (parts, B, splits, RANK), None for the forms of one launch."""

    launches: tuple[tuple[bool, Launcher, tuple[int, ...], tuple[int, ...], tuple], ...]
    partials: tuple[int, ...] | None


PartForm = tuple[torch.Size, torch.Size, bool, bool]  # down's shape, up's shape, no gain, no ranks


@lru_cache(maxsize=256)
def _plan(
    shape: torch.Size,
    dtype: torch.dtype,
    forms: tuple[PartForm, ...],
    no_rows: bool,
    sizes: Sizes | None,
    dependent: bool,
) -> _Plan:
    """What a call of these shapes launches, worked out once per shape (a decode step's layers share it);
    ``dependent``: the expand (and the shrink before it, in the two-launch form) is a programmatic
    dependent launch."""
    if (
        not 1 <= len(forms) <= MAX_PARTS
        or len({down[1] for down, *_ in forms}) != 1
        or len({(no_gain, no_ranks) for *_, no_gain, no_ranks in forms}) != 1
    ):
        raise ValueError(f"grouped_lora_add takes 1 to {MAX_PARTS} parts of one rank, all with gains and ranks or none")
    batch, tokens, n_in = shape
    sizes = sizes or built_in_sizes(batch, tokens, n_in, len(forms))
    if not isinstance(sizes, TileSizes) and tokens != 1:
        raise ValueError(f"{type(sizes).__name__} take one token per sample, not {tokens}")
    n_outs = [up[2] for _, up, _, _ in forms] + [0] * (MAX_PARTS - len(forms))
    rank, no_gain, no_ranks = forms[0][0][1], forms[0][2], forms[0][3]
    flags = ("RANK", dot_size(rank)), ("HAS_ROWS", not no_rows), ("HAS_RANKS", not no_ranks)
    has_gain = ("HAS_GAIN", not no_gain)
    tile_kernel, shrink_kernel, expand_kernel, linear_kernel, linear_shrink_kernel = _kernels()
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if isinstance(sizes, TileSizes):
        tiles, scalars = _tiles(n_outs, sizes.block_n, rank)
        blocks = ("BLOCK_M", sizes.block_m), ("BLOCK_N", sizes.block_n), ("BLOCK_K", sizes.block_k)
        shrink = ("N_IN", n_in), ("UNROLL", n_in <= UNROLLED * sizes.block_k), ("PRECISION", precision)
        launch = (*blocks, *shrink, has_gain, *flags, ("num_warps", sizes.warps))
        return _Plan(
            ((False, tile_kernel, (batch, -(-tokens // sizes.block_m), tiles), (*scalars, tokens), launch),), None
        )
    if isinstance(sizes, LinearSizes):
        tiles, scalars = _tiles(n_outs, sizes.block_n * sizes.chunks, rank)
        blocks = ("BLOCK_M", sizes.block_m), ("BLOCK_N", sizes.block_n), ("CHUNKS", sizes.chunks)
        inputs = ("N_IN", n_in), ("BLOCK_K", sizes.block_k), ("SHRINK_K", sizes.shrink_k), ("PRECISION", precision)
        launch = (*blocks, *inputs, has_gain, *flags, ("num_warps", sizes.warps))
        return _Plan(((True, linear_kernel, (-(-batch // sizes.block_m), tiles), (*scalars, batch), launch),), None)
    update = sizes.update if isinstance(sizes, SplitLinearSizes) else sizes
    splits, split_block = split_blocks(n_in, update.block_k)
    partials = len(forms), batch, splits, dot_size(rank)
    pdl = ("DEPENDENT", dependent), ("launch_pdl", dependent)
    tiles, scalars = _tiles(n_outs, update.block_n * update.chunks, rank)
    sums = ("SPLITS", splits), ("SPLIT_BLOCK", split_block), ("BLOCK_N", update.block_n), ("CHUNKS", update.chunks)
    expand = False, expand_kernel, (batch, tiles), scalars, (*sums, has_gain, *flags, ("num_warps", update.warps), *pdl)
    if isinstance(sizes, SplitSizes):
        inputs = ("N_IN", n_in), ("BLOCK_K", sizes.block_k)
        shrink = (
            False,
            shrink_kernel,
            (batch, len(forms), splits),
            scalars,
            (*inputs, *flags, ("num_warps", sizes.warps), *pdl),
        )
        return _Plan((shrink, expand), partials)
    tiles, scalars = _tiles(n_outs, sizes.block_n, rank)
    linears = -(-batch // sizes.block_m) * tiles  # programs; the partial shrinks' follow
    blocks = ("BLOCK_M", sizes.block_m), ("BLOCK_N", sizes.block_n), ("BLOCK_K", sizes.block_k)
    inputs = ("N_IN", n_in), ("SHRINK_K", update.block_k), ("SPLITS", splits), ("PRECISION", precision)
    options = ("num_warps", sizes.warps), ("num_stages", sizes.stages), ("DEPENDENT", dependent)
    grid = (linears + len(forms) * batch * splits,)
    first = True, linear_shrink_kernel, grid, (*scalars, batch, linears), (*blocks, *inputs, *flags, *options)
    return _Plan((first, expand), partials)


def _tiles(n_outs: list[int], columns: int, rank: int) -> tuple[int, tuple[int, ...]]:
    """The parts' output tiles of ``columns`` each, and the scalars the kernels take for them: the parts'
    out sizes, where part 0's and part 1's tiles end, the tables' rank."""
    tiles = [-(-n // columns) for n in n_outs]
    return sum(tiles), (*n_outs, tiles[0], tiles[0] + tiles[1], rank)


def _or(tensor: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """``tensor``, or a pointer the kernel is told not to read (its flag is off)."""
    return stand_in if tensor is None else tensor
