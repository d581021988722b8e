"""The Triton source of the fused per-sample LoRA kernels (``gathered_lora``; imported on first use:
importing Triton is slow)."""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _part(tile, tiles0, tiles01):
    """The part that output tile ``tile`` belongs to (0, 1 or 2) and the tile within it."""
    part = (tile >= tiles0).to(tl.int32) + (tile >= tiles01).to(tl.int32)
    return part, tile - tl.where(part == 2, tiles01, tl.where(part == 1, tiles0, 0))


@triton.jit
def _pointers(part, n_out0, n_out1, n_out2, d0, u0, b0, o0, g0, r0, d1, u1, b1, o1, g1, r1,
              d2, u2, b2, o2, g2, r2):  # fmt: skip
    """Part ``part``'s pointers (down, up, base, out, gain, ranks) and out size."""
    d, u, b, o, g, r, n = d0, u0, b0, o0, g0, r0, n_out0
    if part == 2:
        d, u, b, o, g, r, n = d2, u2, b2, o2, g2, r2, n_out2
    elif part == 1:
        d, u, b, o, g, r, n = d1, u1, b1, o1, g1, r1, n_out1
    return d, u, b, o, g, r, n


@triton.jit
def _row_and_ranks(b, rows_ptr, ranks_ptr, r_max, RANK: tl.constexpr, HAS_ROWS: tl.constexpr,
                   HAS_RANKS: tl.constexpr):  # fmt: skip
    """Sample b's row of the table, the rank indices and which of them it has."""
    row = b
    if HAS_ROWS:
        row = tl.load(rows_ptr + b).to(tl.int64)
    rank = r_max
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + b)
    ranks = tl.arange(0, RANK)
    return row, ranks, ranks < rank


@triton.jit
def _tile_shrink(x_ptr, down, toks, tok_ok, ranks, rank_ok, start, N_IN: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):  # fmt: skip
    """A token tile's x·Dᵀ over inputs [start, start + BLOCK_K): (BLOCK_M, RANK) in float32, a tensor-core dot."""
    ks = start + tl.arange(0, BLOCK_K)
    k_ok = ks < N_IN
    x = tl.load(x_ptr + toks[:, None] * N_IN + ks[None, :], mask=tok_ok[:, None] & k_ok[None, :], other=0.0)
    d = tl.load(down + ranks[None, :] * N_IN + ks[:, None], mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
    return tl.dot(x.to(d.dtype), d, input_precision=PRECISION)  # x may be autocast's bf16 beside fp32 tables


@triton.jit
def tile_kernel(
    x_ptr, rows_ptr, d0, u0, b0, o0, g0, r0, d1, u1, b1, o1, g1, r1, d2, u2, b2, o2, g2, r2,
    n_out0, n_out1, n_out2, tiles0, tiles01, r_max, tokens,
    N_IN: tl.constexpr, RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UNROLL: tl.constexpr, HAS_ROWS: tl.constexpr,
    HAS_GAIN: tl.constexpr, HAS_RANKS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)  # sample offsets b·T·in can pass 2^31 on large models
    part, tile = _part(tl.program_id(2), tiles0, tiles01)
    down, up, base, out, gain, ranks_ptr, n_out = _pointers(
        part, n_out0, n_out1, n_out2, d0, u0, b0, o0, g0, r0, d1, u1, b1, o1, g1, r1, d2, u2, b2, o2, g2, r2
    )  # fmt: skip
    toks = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_ok = toks < tokens
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    tile_at = b * tokens * n_out + toks[:, None] * n_out + cols[None, :]
    tile_ok = tok_ok[:, None] & col_ok[None, :]
    before = tl.load(base + tile_at, mask=tile_ok, other=0.0)  # issued first: no load below waits on it
    row, ranks, rank_ok = _row_and_ranks(b, rows_ptr, ranks_ptr, r_max, RANK, HAS_ROWS, HAS_RANKS)
    u = tl.load(
        up + row * r_max * n_out + ranks[:, None] * n_out + cols[None, :],
        mask=rank_ok[:, None] & col_ok[None, :],
        other=0.0,
    )  # in flight with the shrink's loads
    x_ptr += b * tokens * N_IN
    down += row * r_max * N_IN
    h = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
    if UNROLL:  # a short input: every chunk's loads issued at once
        for start in tl.static_range(0, N_IN, BLOCK_K):
            h += _tile_shrink(x_ptr, down, toks, tok_ok, ranks, rank_ok, start, N_IN, BLOCK_K, PRECISION)
    else:
        for start in tl.range(0, N_IN, BLOCK_K):
            h += _tile_shrink(x_ptr, down, toks, tok_ok, ranks, rank_ok, start, N_IN, BLOCK_K, PRECISION)
    if HAS_GAIN:
        h *= tl.load(gain + b)
    y = tl.dot(h.to(u.dtype), u, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
    tl.store(out + tile_at, (before.to(tl.float32) + y).to(before.dtype), mask=tile_ok)


@triton.jit
def _partial_shrink(x_ptr, rows_ptr, down, ranks_ptr, h_ptr, b, part, split, batch, splits, r_max,
                    N_IN: tl.constexpr, RANK: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ROWS: tl.constexpr,
                    HAS_RANKS: tl.constexpr):  # fmt: skip
    """Sample b's partial h = D_n x_b over inputs [split·BLOCK_K, (split + 1)·BLOCK_K) of part ``part``, on
    CUDA cores, into h[part, b, split] (RANK,) in float32."""
    ks = split * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < N_IN
    x = tl.load(x_ptr + b * N_IN + ks, mask=k_ok, other=0.0).to(tl.float32)  # (BLOCK_K,)
    row, ranks, rank_ok = _row_and_ranks(b, rows_ptr, ranks_ptr, r_max, RANK, HAS_ROWS, HAS_RANKS)
    d = tl.load(
        down + row * r_max * N_IN + ranks[:, None] * N_IN + ks[None, :],
        mask=rank_ok[:, None] & k_ok[None, :],
        other=0.0,
    )  # (RANK, BLOCK_K)
    h = tl.sum(d.to(tl.float32) * x[None, :], axis=1)
    tl.store(h_ptr + ((part * batch + b) * splits + split) * RANK + ranks, h)


@triton.jit
def shrink_kernel(
    x_ptr, rows_ptr, d0, u0, b0, o0, g0, r0, d1, u1, b1, o1, g1, r1, d2, u2, b2, o2, g2, r2, h_ptr,
    n_out0, n_out1, n_out2, tiles0, tiles01, r_max,
    N_IN: tl.constexpr, RANK: tl.constexpr, BLOCK_K: tl.constexpr, HAS_ROWS: tl.constexpr,
    HAS_RANKS: tl.constexpr, DEPENDENT: tl.constexpr,
):  # fmt: skip
    """The partial shrinks (``_partial_shrink``); grid (B, parts, splits). DEPENDENT (launched dependent on
    the base linear, the expand dependent on it): it reads only x and its tables, lets the expand start at
    once, and ends only once the base linear has, so that the expand's wait covers the base output too."""
    if DEPENDENT:
        gdc_launch_dependents()
    part = tl.program_id(1)
    down, _, _, _, _, ranks_ptr, _ = _pointers(
        part, n_out0, n_out1, n_out2, d0, u0, b0, o0, g0, r0, d1, u1, b1, o1, g1, r1, d2, u2, b2, o2, g2, r2
    )  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    _partial_shrink(x_ptr, rows_ptr, down, ranks_ptr, h_ptr, b, part, tl.program_id(2), tl.num_programs(0),
                    tl.num_programs(2), r_max, N_IN, RANK, BLOCK_K, HAS_ROWS, HAS_RANKS)  # fmt: skip
    if DEPENDENT:
        gdc_wait()


@triton.jit
def _up_chunk(up, ranks, rank_ok, tile, chunk, n_out, CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Chunk ``chunk`` of the expand's tile: its output columns, which are in range, U there (RANK, BLOCK_N)."""
    cols = (tile * CHUNKS + chunk) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_out
    u = tl.load(up + ranks[:, None] * n_out + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    return cols, col_ok, u


@triton.jit
def expand_kernel(
    x_ptr, rows_ptr, d0, u0, b0, o0, g0, r0, d1, u1, b1, o1, g1, r1, d2, u2, b2, o2, g2, r2, h_ptr,
    n_out0, n_out1, n_out2, tiles0, tiles01, r_max,
    RANK: tl.constexpr, SPLITS: tl.constexpr, SPLIT_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKS: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_RANKS: tl.constexpr,
    DEPENDENT: tl.constexpr,
):  # fmt: skip
    """base + g·h·U over CHUNKS·BLOCK_N output columns of one token, h summed over the shrink's splits;
    grid (B, output tiles of all parts). The first chunk's U is loaded before h and the base (DEPENDENT:
    before waiting on the shrink, which is still running)."""
    b = tl.program_id(0).to(tl.int64)
    part, tile = _part(tl.program_id(1), tiles0, tiles01)
    _, up, base, out, gain, ranks_ptr, n_out = _pointers(
        part, n_out0, n_out1, n_out2, d0, u0, b0, o0, g0, r0, d1, u1, b1, o1, g1, r1, d2, u2, b2, o2, g2, r2
    )  # fmt: skip
    row, ranks, rank_ok = _row_and_ranks(b, rows_ptr, ranks_ptr, r_max, RANK, HAS_ROWS, HAS_RANKS)
    up += row * r_max * n_out
    cols, col_ok, u = _up_chunk(up, ranks, rank_ok, tile, 0, n_out, CHUNKS, BLOCK_N)
    if DEPENDENT:
        gdc_wait()
    splits = tl.arange(0, SPLIT_BLOCK)
    at = ((part * tl.num_programs(0) + b) * SPLITS + splits[:, None]) * RANK + tl.arange(0, RANK)[None, :]
    h = tl.sum(tl.load(h_ptr + at, mask=splits[:, None] < SPLITS, other=0.0), axis=0)  # (RANK,)
    if HAS_GAIN:
        h *= tl.load(gain + b)
    h = h.to(up.dtype.element_ty).to(tl.float32)  # rounded as the matmul path rounds it
    for chunk in tl.static_range(CHUNKS):
        if chunk > 0:
            cols, col_ok, u = _up_chunk(up, ranks, rank_ok, tile, chunk, n_out, CHUNKS, BLOCK_N)
        before = tl.load(base + b * n_out + cols, mask=col_ok, other=0.0)
        y = tl.sum(h[:, None] * u.to(tl.float32), axis=0)  # (BLOCK_N,)
        tl.store(out + b * n_out + cols, (before.to(tl.float32) + y).to(before.dtype), mask=col_ok)


@triton.jit
def _weight(part, w0, w1, w2):
    """Part ``part``'s base weight."""
    weight = w0
    if part == 2:
        weight = w2
    elif part == 1:
        weight = w1
    return weight


@triton.jit
def _linear_tile(x_rows, weight, m_ok, cols, col_ok, N_IN: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """x·Wᵀ for the samples whose rows of x start at ``x_rows`` (BLOCK_M, 1) and the output columns ``cols``,
    W (out, in): (BLOCK_M, BLOCK_N) in float32, a tensor-core dot over the input in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in tl.range(0, N_IN, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < N_IN
        x = tl.load(x_rows + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(weight + cols[None, :] * N_IN + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def linear_shrink_kernel(
    x_ptr, rows_ptr, d0, u0, b0, o0, g0, r0, d1, u1, b1, o1, g1, r1, d2, u2, b2, o2, g2, r2, h_ptr, w0, w1, w2,
    n_out0, n_out1, n_out2, tiles0, tiles01, r_max, batch, linear_programs,
    N_IN: tl.constexpr, RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SHRINK_K: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr,
    HAS_RANKS: tl.constexpr, DEPENDENT: tl.constexpr,
):  # fmt: skip
    """A one-token step's base linears and partial shrinks in one launch, which ``expand_kernel`` completes:
    programs below ``linear_programs`` compute base_p = x W_pᵀ over BLOCK_M samples x BLOCK_N outputs of part
    p (x (B, in), W_p (out, in)), stored in x's dtype; the others one (part, sample, split)'s partial shrink
    (``_partial_shrink``) on the SMs the linears leave free. DEPENDENT: the expand starts at once (it loads U,
    then waits for this whole launch). 1-D grid."""
    if DEPENDENT:
        gdc_launch_dependents()
    program = tl.program_id(0)
    m_blocks = tl.cdiv(batch, BLOCK_M)
    shrink = program - linear_programs  # the partial shrink's index (programs past the linears')
    linear_part, tile = _part(program // m_blocks, tiles0, tiles01)
    part = tl.where(shrink < 0, linear_part, shrink // (SPLITS * batch))
    down, _, base, _, _, ranks_ptr, n_out = _pointers(
        part, n_out0, n_out1, n_out2, d0, u0, b0, o0, g0, r0, d1, u1, b1, o1, g1, r1, d2, u2, b2, o2, g2, r2
    )  # fmt: skip
    if shrink < 0:
        ms = (program % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = ms < batch
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_out
        x_rows = x_ptr + ms.to(tl.int64)[:, None] * N_IN
        acc = _linear_tile(x_rows, _weight(part, w0, w1, w2), m_ok, cols, col_ok, N_IN, BLOCK_M, BLOCK_N, BLOCK_K,
                           PRECISION)  # fmt: skip
        at = ms.to(tl.int64)[:, None] * n_out + cols[None, :]
        tl.store(base + at, acc.to(x_ptr.dtype.element_ty), mask=m_ok[:, None] & col_ok[None, :])
    else:
        b = (shrink // SPLITS % batch).to(tl.int64)
        _partial_shrink(x_ptr, rows_ptr, down, ranks_ptr, h_ptr, b, part, shrink % SPLITS, batch, SPLITS, r_max,
                        N_IN, RANK, SHRINK_K, HAS_ROWS, HAS_RANKS)  # fmt: skip


@triton.jit
def linear_kernel(
    x_ptr, rows_ptr, d0, u0, b0, o0, g0, r0, d1, u1, b1, o1, g1, r1, d2, u2, b2, o2, g2, r2, w0, w1, w2,
    n_out0, n_out1, n_out2, tiles0, tiles01, r_max, batch,
    N_IN: tl.constexpr, RANK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
    BLOCK_K: tl.constexpr, SHRINK_K: tl.constexpr, PRECISION: tl.constexpr, HAS_ROWS: tl.constexpr,
    HAS_GAIN: tl.constexpr, HAS_RANKS: tl.constexpr,
):  # fmt: skip
    """A one-token step's base linear and per-sample update in one launch: base_p = x W_pᵀ and
    out_p = base_p + g_m · (x_m D_nᵀ) U_n (n = rows[m]) for BLOCK_M samples and CHUNKS·BLOCK_N outputs of
    part p; x (B, in), W_p (out, in). Each program computes its samples' shrinks once, on CUDA cores in
    float32 (each sample has its own D), then per column chunk the base's tensor-core dot and the expand;
    base and out are stored in the input's dtype (h rounded to it first, as the other forms round it).
    Grid (sample blocks, output tiles of all parts)."""
    part, tile = _part(tl.program_id(1), tiles0, tiles01)
    down, up, base, out, gain, ranks_ptr, n_out = _pointers(
        part, n_out0, n_out1, n_out2, d0, u0, b0, o0, g0, r0, d1, u1, b1, o1, g1, r1, d2, u2, b2, o2, g2, r2
    )  # fmt: skip
    weight = _weight(part, w0, w1, w2)
    ms = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = ms < batch
    row = ms.to(tl.int64)
    if HAS_ROWS:
        row = tl.load(rows_ptr + ms, mask=m_ok, other=0).to(tl.int64)
    ranks = tl.arange(0, RANK)
    rank_ok = m_ok[:, None] & (ranks[None, :] < r_max)  # (BLOCK_M, RANK)
    if HAS_RANKS:
        rank_ok &= ranks[None, :] < tl.load(ranks_ptr + ms, mask=m_ok, other=0)[:, None]
    x_rows = x_ptr + ms.to(tl.int64)[:, None] * N_IN  # (BLOCK_M, 1)
    d_rows = down + (row * r_max)[:, None, None] * N_IN + ranks[None, :, None] * N_IN  # (BLOCK_M, RANK, 1)
    h = tl.zeros((BLOCK_M, RANK), dtype=tl.float32)
    for start in tl.range(0, N_IN, SHRINK_K):
        ks = start + tl.arange(0, SHRINK_K)
        k_ok = ks < N_IN
        x = tl.load(x_rows + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, SHRINK_K)
        d = tl.load(d_rows + ks[None, None, :], mask=rank_ok[:, :, None] & k_ok[None, None, :], other=0.0)
        h += tl.sum(d.to(tl.float32) * x.to(tl.float32)[:, None, :], axis=2)
    if HAS_GAIN:
        h *= tl.load(gain + ms, mask=m_ok, other=0.0)[:, None]
    h = h.to(x_ptr.dtype.element_ty).to(tl.float32)[:, :, None]  # (BLOCK_M, RANK, 1)
    u_rows = up + (row * r_max)[:, None, None] * n_out + ranks[None, :, None] * n_out  # (BLOCK_M, RANK, 1)
    for chunk in tl.range(CHUNKS):
        cols = (tile * CHUNKS + chunk) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_out
        acc = _linear_tile(x_rows, weight, m_ok, cols, col_ok, N_IN, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        u = tl.load(u_rows + cols[None, None, :], mask=rank_ok[:, :, None] & col_ok[None, None, :], other=0.0)
        y = tl.sum(h * u.to(tl.float32), axis=1)  # (BLOCK_M, BLOCK_N)
        at = ms[:, None] * n_out + cols[None, :]
        ok = m_ok[:, None] & col_ok[None, :]
        before = acc.to(x_ptr.dtype.element_ty)
        tl.store(base + at, before, mask=ok)
        tl.store(out + at, (before.to(tl.float32) + y).to(before.dtype), mask=ok)
