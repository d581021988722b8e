"""One fused kernel for per-sample low-rank updates: y_b = base_b + (x_b · D_b) · U_b.

x: (B, T, in), D: (B, in, r), U: (B, r, out), base: (B, T, out), every sample b with its own D_b, U_b
(the gathered expert weights of a Route). The batched-matmul path needs three kernels per layer
(shrink, expand, add); in a launch-bound decode step each costs more than its arithmetic. Here one
program computes a (BLOCK_M tokens × BLOCK_N outputs) tile of one sample: it accumulates the
shrink h = x·D (BLOCK_M, r) over the input dimension, then y = base + h·U for its tile, all in
float32 (h is rounded to the weights' dtype before the expand, as the matmul path does). The
shrink is recomputed for each output tile: r·in multiply-adds per token, negligible beside
the base layer's in·out. A decode step (T <= 16 per sample) fills one 16-row tile and uses wide
output tiles (256) and two warps, so that few programs redo the shrink (chosen from a sweep on an H100,
benchmarks/kernel_check.py); longer inputs use 64 x 64 tiles. (Triton's autotune picked per shape but
its launch wrapper doubled the per-call host cost of a decode step.)

One launch can also serve up to three such updates that read the same x (q/k/v, or gate/up, of a
layer: ``grouped_lora_add``); the grid's last axis then runs over the output tiles of every part.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache

import torch

from adaplex.kernels import INTERPRETED, dot_size

MAX_PARTS = 3
_enabled = True

Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (base (B, T, out), down (B, in, r), up (B, r, out))


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can run on ``x``'s device: CUDA (or any device under the interpreter) with
    Triton installed, as PyTorch's CUDA wheels install it."""
    return _enabled and (x.is_cuda or INTERPRETED) and _kernel() is not None


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
def _kernel():
    """The compiled-on-first-use kernel, or None without Triton (imported only here: it is slow to import)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _gathered_lora_kernel(
        x_ptr,
        down0,
        up0,
        base0,
        out0,
        n_out0,
        down1,
        up1,
        base1,
        out1,
        n_out1,
        down2,
        up2,
        base2,
        out2,
        n_out2,
        tiles0,
        tiles01,
        tokens,
        rank,
        N_IN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        RANK: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)  # sample offsets b·T·in can pass 2^31 on large models
        tile_n = tl.program_id(2)
        down_ptr, up_ptr, base_ptr, out_ptr, n_out = down0, up0, base0, out0, n_out0
        if tile_n >= tiles01:  # the tile belongs to part 2
            down_ptr, up_ptr, base_ptr, out_ptr, n_out = down2, up2, base2, out2, n_out2
            tile_n -= tiles01
        elif tile_n >= tiles0:  # part 1
            down_ptr, up_ptr, base_ptr, out_ptr, n_out = down1, up1, base1, out1, n_out1
            tile_n -= tiles0
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, RANK)
        row_ok = rows < tokens
        rank_ok = ranks < rank
        x_ptr += b * tokens * N_IN
        down_ptr += b * N_IN * rank
        h = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
        for start in tl.static_range(0, N_IN, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            k_ok = ks < N_IN
            x = tl.load(x_ptr + rows[:, None] * N_IN + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            d = tl.load(
                down_ptr + ks[:, None] * rank + ranks[None, :], mask=k_ok[:, None] & rank_ok[None, :], other=0.0
            )
            h += tl.dot(x, d, input_precision=PRECISION)  # (BLOCK_M, RANK)
        col_ok = cols < n_out
        u = tl.load(
            up_ptr + b * rank * n_out + ranks[:, None] * n_out + cols[None, :],
            mask=rank_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        y = tl.dot(h.to(u.dtype), u, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        tile = b * tokens * n_out + rows[:, None] * n_out + cols[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        base = tl.load(base_ptr + tile, mask=tile_ok, other=0.0)
        tl.store(out_ptr + tile, (base.to(tl.float32) + y).to(base.dtype), mask=tile_ok)

    return _gathered_lora_kernel


def gathered_lora_add(base: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """base + bmm(bmm(x, down), up) in one kernel; shapes (B, T, out), (B, T, in), (B, in, r), (B, r, out)."""
    return grouped_lora_add(x, [(base, down, up)])[0]


def grouped_lora_add(
    x: torch.Tensor, parts: Sequence[Part], tiles: tuple[int, int, int, int] | None = None
) -> list[torch.Tensor]:
    """[base_p + bmm(bmm(x, down_p), up_p) for each part] in one launch: up to three parts of one rank
    that read the same x (B, T, in); each part's out size may differ. ``tiles`` (BLOCK_M, BLOCK_N,
    BLOCK_K, warps) overrides the built-in choice, for tuning."""
    if not 1 <= len(parts) <= MAX_PARTS or len({down.shape[2] for _, down, _ in parts}) != 1:
        raise ValueError(f"grouped_lora_add takes 1 to {MAX_PARTS} parts of one rank")
    batch, tokens, n_in = x.shape
    rank = parts[0][1].shape[2]
    decode = tokens <= 16  # few tokens per sample: wide output tiles, so fewer programs redo the shrink
    block_m, block_n, block_k, warps = tiles or ((16, 256, 128, 2) if decode else (64, 64, 64, 4))
    slots, outs, part_tiles = [], [], []
    for base, down, up in parts:
        base = base.contiguous()
        out = torch.empty_like(base)
        slots += [down.contiguous(), up.contiguous(), base, out, up.shape[2]]
        outs.append(out)
        part_tiles.append(-(-up.shape[2] // block_n))  # output tiles of this part
    slots += slots[:5] * (MAX_PARTS - len(parts))  # unused slots: no tile reaches them
    part_tiles += [0] * (MAX_PARTS - len(parts))
    grid = (batch, -(-tokens // block_m), sum(part_tiles))
    _kernel()[grid](
        x.contiguous(),
        *slots,
        part_tiles[0],
        part_tiles[0] + part_tiles[1],
        tokens,
        rank,
        N_IN=n_in,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        RANK=dot_size(rank),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=warps,
    )
    return outs
