"""The Triton source of ``checked_attention`` (imported on first use: importing Triton is slow)."""

import triton
import triton.language as tl

FP32_EPS = tl.constexpr(2.0**-23)  # float32's eps: the accumulators' rounding


@triton.jit
def _row_stats(x, weights, WEIGHTED: tl.constexpr):
    """[norm, Σ w·x] (Σ x unless WEIGHTED) per row of x (BLOCK, D) float32."""
    if WEIGHTED:
        total = tl.sum(x * weights, 1)
    else:
        total = tl.sum(x, 1)
    return tl.sqrt(tl.sum(x * x, 1)), total


@triton.jit
def _loaded_stats(base, rows, stride, dims, row_ok, dim_ok, weights, WEIGHTED: tl.constexpr, MASK_DIMS: tl.constexpr):
    """``_row_stats`` of the rows (BLOCK, D_PAD) of a (rows, D) matrix, loaded in its dtype, summed in float32."""
    x = _load_rows(base, rows, stride, dims, row_ok, dim_ok, True, MASK_DIMS)
    return _row_stats(x.to(tl.float32), weights, WEIGHTED)


@triton.jit
def _stats_excess(norm, total, ref_norm, ref_sum, slack_norm, slack_sum, NREF: tl.constexpr):
    """Per row, how far the received [norm, sum] stray from the recorded ones beyond the slack times the
    recorded norm; NREF 1 compares norms only."""
    excess = tl.abs(norm - ref_norm) - slack_norm * ref_norm
    if NREF == 2:
        excess = tl.maximum(excess, tl.abs(total - ref_sum) - slack_sum * ref_norm)
    return excess


@triton.jit
def _load_rows(base, rows, stride, dims, row_ok, dim_ok, MASK_ROWS: tl.constexpr, MASK_DIMS: tl.constexpr):
    """Rows (BLOCK, D_PAD) of a (rows, D) matrix; masks only where they can exclude something."""
    pointers = base + rows[:, None] * stride + dims[None, :]
    if MASK_ROWS & MASK_DIMS:
        return tl.load(pointers, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if MASK_ROWS:
        return tl.load(pointers, mask=row_ok[:, None], other=0.0)
    if MASK_DIMS:
        return tl.load(pointers, mask=dim_ok[None, :], other=0.0)
    return tl.load(pointers)


@triton.jit
def _attend_block(
    acc,
    sums,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    aux_base,
    hull_low,
    hull_high,
    start,
    rows,
    dims,
    dim_ok,
    keys,
    offset,
    stride_ks,
    stride_vs,
    scale2,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_DIMS: tl.constexpr,
    ENABLED: tl.constexpr,
    PRECISION: tl.constexpr,
    FOLDED: tl.constexpr,
):
    """One key block of the online softmax: acc += P V, sums += P [1 | V·1 (two parts) | 0…] (both
    rescaled). FOLDED: the summary rows come from the V block just loaded, and the hull (hull_low: -min,
    hull_high: max, (D_PAD,)) of V over the blocks seen is raised by this one (else the row pass's aux
    is loaded)."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < keys
    k = _load_rows(k_base, cols, stride_ks, dims, col_ok, dim_ok, MASKED, MASK_DIMS)
    v = _load_rows(v_base, cols, stride_vs, dims, col_ok, dim_ok, MASKED, MASK_DIMS)
    # scaled before the max: s·scale - max(s·scale) as one FMA would turn the rounding of a huge (corrupted)
    # score into exp2(±huge) and the row into NaN, where softmax gives a finite one-hot row
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2  # (BLOCK_M, BLOCK_N)
    if MASKED:
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + offset)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p_low = p.to(v.dtype)
    acc = tl.dot(p_low, v, acc * alpha[:, None], input_precision=PRECISION)
    if ENABLED & 3:  # one small product on the tensor cores: P aux (BLOCK_M, 16)
        if FOLDED:
            aux = _summary(v.to(tl.float32), v.dtype).to(v.dtype)
        else:
            aux = _load_rows(aux_base, cols, 16, tl.arange(0, 16), col_ok, dim_ok, MASKED, False)
        sums = tl.dot(p_low, aux, sums * alpha[:, None], input_precision=PRECISION)
    if FOLDED and (ENABLED & 5):  # the hull that abft_output's slack and output_bound read
        neg_low, high = _block_hull(v.to(tl.float32), col_ok[:, None], MASKED)
        hull_low, hull_high = tl.maximum(hull_low, neg_low), tl.maximum(hull_high, high)
    return acc, sums, m_new, l_i, hull_low, hull_high


@triton.jit
def _summary(v, dtype):
    """The summary rows [1, hi, lo, 0…] (BLOCK, 16), float32, of value rows v (BLOCK, D) float32:
    hi + lo = V·1, hi being V·1 rounded to ``dtype`` (the pair holds V·1 to about eps² of it)."""
    cols = tl.arange(0, 16)[None, :]
    v_sum = tl.sum(v, 1)[:, None]  # (BLOCK, 1)
    high = v_sum.to(dtype).to(tl.float32)
    aux = tl.where(cols == 0, 1.0, 0.0)
    return tl.where(cols == 1, high, tl.where(cols == 2, v_sum - high, aux))


@triton.jit
def _block_hull(v, ok, MASKED: tl.constexpr):
    """-min and max (D,) of value rows v (BLOCK, D) float32 over its ok rows (all unless MASKED); zero
    padding columns give 0, as they are in O."""
    if MASKED:
        return tl.max(tl.where(ok, -v, float("-inf")), 0), tl.max(tl.where(ok, v, float("-inf")), 0)
    return tl.max(-v, 0), tl.max(v, 0)


@triton.jit
def checked_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    aux_ptr,
    state_ptr,  # float32: [hull | peak | rows (B, H, T, 4) | kv rows | worst] (checked_attention.Layout)
    q_rec,
    weights_ptr,
    k_rec,  # FOLDED: k's and v's recorded projection outputs and k's rotated-sum weights
    v_rec,
    k_weights_ptr,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_rqb,
    stride_rqt,
    stride_wb,
    stride_wt,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_rkb,
    stride_rkt,
    stride_rvb,
    stride_rvt,
    stride_wkb,
    stride_wkt,
    rows_at,
    peak_at,
    kv_rows_at,
    worst_at,
    tokens,
    keys,
    scaling,
    eps,
    slack_norm,
    slack_sum,
    HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    ENABLED: tl.constexpr,  # bits: abft_output, softmax, output_bound
    NQ: tl.constexpr,  # stats compared per q row with the recorded q's: 0 (none recorded), 1 (norm) or 2 (and sum)
    WEIGHTED: tl.constexpr,  # the recorded q's sum is weighted (the rotary embedding's rotated sum)
    PRECISION: tl.constexpr,
    FOLDED: tl.constexpr,  # no row pass: V's summary and hull come from the V blocks loaded, k, v are checked here
    NK: tl.constexpr,  # FOLDED: as NQ, for the newest k and v rows
    NV: tl.constexpr,
    WEIGHTED_K: tl.constexpr,
):
    """Flash attention with the checks (module docstring of checked_attention). Each program writes its
    rows' excess and either raises the call's peak (after a row pass, which raises it too) or, FOLDED,
    writes its largest excess to its own slot of ``worst``: no atomics, nothing to fill before."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest causal rows first: a shorter tail
    bh = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    kv_head = (b * (HEADS // GROUP) + h // GROUP).to(tl.int64)  # flat (sample, K/V head)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_PAD)
    row_ok = rows < tokens
    dim_ok = dims < D
    offset = keys - tokens  # query i sees keys j <= i + offset (cached or prefix keys come first)
    MASK_DIMS: tl.constexpr = D != D_PAD  # annotated: a plain local would become a runtime value
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + (h // GROUP) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + (h // GROUP) * stride_vh
    q = _load_rows(q_base, rows, stride_qt, dims, row_ok, dim_ok, True, MASK_DIMS)
    check_base = state_ptr + rows_at + (bh * tokens + rows) * 4  # (B, H, T, 4)
    none = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    q_worst = float("-inf")  # q's largest excess: a scalar, all that the key loop carries of the q check
    if NQ > 0:  # the q rows as this kernel loaded them, against the rows their projection computed (all loads first)
        weights = _rotary_weights(weights_ptr + b.to(tl.int64) * stride_wb, rows, stride_wt, dims, row_ok, dim_ok,
                                  WEIGHTED, MASK_DIMS)  # fmt: skip
        recorded = _load_rows(q_rec + b.to(tl.int64) * stride_rqb + h * D, rows, stride_rqt, dims, row_ok, dim_ok,
                              True, MASK_DIMS)  # fmt: skip
        norm, total = _row_stats(q.to(tl.float32), 0.0, False)
        ref_norm, ref_sum = _row_stats(recorded.to(tl.float32), weights, WEIGHTED)
        q_excess = _stats_excess(norm, total, ref_norm, ref_sum, slack_norm, slack_sum, NQ)
        tl.store(check_base + 3, q_excess, mask=row_ok)
        q_worst = _worst(q_excess, row_ok)

    if FOLDED:  # the first head of each group checks the newest k and v rows of its tokens (masked off in the rest)
        q_worst = tl.maximum(q_worst, _check_kv(
            k_base, v_base, stride_ks, stride_vs, rows + offset,
            k_rec + b.to(tl.int64) * stride_rkb + (h // GROUP) * D,
            v_rec + b.to(tl.int64) * stride_rvb + (h // GROUP) * D, stride_rkt, stride_rvt,
            k_weights_ptr + b.to(tl.int64) * stride_wkb, stride_wkt, rows, row_ok & (h % GROUP == 0), dims, dim_ok,
            state_ptr + kv_rows_at, kv_head, tl.num_programs(1) // GROUP, tokens, slack_norm, slack_sum,
            NK, NV, WEIGHTED_K, MASK_DIMS,
        ))  # fmt: skip

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    hull_low = tl.full((D_PAD,), float("-inf"), tl.float32)  # FOLDED: -min and max of V over the keys seen
    hull_high = tl.full((D_PAD,), float("-inf"), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    sums = tl.zeros((BLOCK_M, 16), tl.float32)  # [P·1, P(V·1) in two parts, 0…]: row sums of the rounded weights
    aux_base = aux_ptr + kv_head * keys * 16
    scale2 = scaling * 1.4426950408889634  # exp(x) = exp2(x·log2 e)
    if CAUSAL:  # keys below lo are visible to every row of the block: no mask there
        end = tl.minimum(keys, (pid_m + 1) * BLOCK_M + offset)
        lo = tl.minimum(pid_m * BLOCK_M + offset + 1, keys) // BLOCK_N * BLOCK_N
    else:
        end = keys
        lo = keys // BLOCK_N * BLOCK_N
    for phase in tl.static_range(2):  # keys below lo first, without a mask; then lo to end, masked
        if phase == 0:
            begin, stop = 0, lo
        else:
            begin, stop = lo, end
        for start in tl.range(begin, stop, BLOCK_N):
            acc, sums, m_i, l_i, hull_low, hull_high = _attend_block(
                acc, sums, m_i, l_i, q, k_base, v_base, aux_base, hull_low, hull_high, start, rows, dims, dim_ok,
                keys, offset, stride_ks, stride_vs, scale2, BLOCK_N, phase == 1, CAUSAL, MASK_DIMS, ENABLED,
                PRECISION, FOLDED,
            )  # fmt: skip

    o = acc / l_i[:, None]  # (BLOCK_M, D_PAD) float32: the checks read it before its rounding for the store
    o_offsets = ((b.to(tl.int64) * tokens + rows[:, None]) * HEADS + h) * D + dims[None, :]
    tl.store(o_ptr + o_offsets, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])

    aux_cols = tl.arange(0, 16)
    hull_ok = dim_ok & ((ENABLED & 5) != 0)  # without abft_output and output_bound there is no hull to read
    if FOLDED:  # the hull of the keys this program saw: it holds every row's visible keys
        v_low = tl.where(hull_ok, -hull_low, 0.0)
        v_high = tl.where(hull_ok, hull_high, 0.0)
    else:
        bounds = state_ptr + kv_head * 2 * D  # [-min; max] of V over the keys, from the row pass
        v_low = -tl.load(bounds + dims, mask=hull_ok, other=0.0)
        v_high = tl.load(bounds + D + dims, mask=hull_ok, other=0.0)
    v_abs = tl.max(tl.maximum(tl.abs(v_low), tl.abs(v_high)), 0)
    rounding = eps + 4 * keys * FP32_EPS  # of P·1 / l: P's rounding to the input dtype, float32 sums
    abft = none
    if ENABLED & 1:
        checksum = tl.sum(tl.where((aux_cols[None, :] == 1) | (aux_cols[None, :] == 2), sums, 0.0), 1)  # P(V·1)
        abft = tl.abs(tl.sum(o, 1) - checksum / l_i) - (eps * eps + 4 * (keys + D) * FP32_EPS) * D * v_abs
    softmax = none
    if ENABLED & 2:
        weight_sum = tl.sum(tl.where(aux_cols[None, :] == 0, sums, 0.0), 1) / l_i
        softmax = tl.minimum(tl.abs(weight_sum - 1), tl.abs(weight_sum)) - rounding
    bound = none
    if ENABLED & 4:
        outside = tl.maximum(o - v_high[None, :], v_low[None, :] - o)
        bound = tl.max(tl.maximum(outside, 0.0), 1) - rounding * v_abs  # padded dims: 0 in O and the hull
    tl.store(check_base, abft, mask=row_ok)
    tl.store(check_base + 1, softmax, mask=row_ok)
    tl.store(check_base + 2, bound, mask=row_ok)
    worst = tl.maximum(_worst(tl.maximum(tl.maximum(abft, softmax), bound), row_ok), q_worst)
    if FOLDED:
        tl.store(state_ptr + worst_at + bh * tl.num_programs(0) + pid_m, worst)
    else:
        # relaxed: no fence makes the program wait for its earlier stores (the peak is read after the
        # kernel, which orders them)
        tl.atomic_max(state_ptr + peak_at, worst, sem="relaxed")


@triton.jit
def _worst(excess, ok):
    """The largest excess of the ok rows; NaN counts as failed (+inf)."""
    excess = tl.where(excess != excess, float("inf"), excess)
    return tl.max(tl.where(ok, excess, float("-inf")), 0)


@triton.jit
def row_pass_kernel(
    k_ptr,
    v_ptr,
    aux_ptr,
    state_ptr,  # float32: [hull (B, H_kv, 2, D) | peak | rows | kv rows (2, B, H_kv, T)] (checked_attention.Checks)
    k_rec,
    v_rec,
    weights_ptr,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_rkb,
    stride_rkt,
    stride_rvb,
    stride_rvt,
    stride_wb,
    stride_wt,
    kv_rows_at,
    peak_at,
    keys,
    tokens,
    slack_norm,
    slack_sum,
    KV_HEADS: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SUMMARY: tl.constexpr,
    NK: tl.constexpr,  # stats compared per recorded k, v row: 0 (none recorded), 1 (norm) or 2 (and sum)
    NV: tl.constexpr,
    WEIGHTED: tl.constexpr,  # k's sum is weighted (the rotary embedding's rotated sum)
):
    """One block of BLOCK_S keys of one (sample, K/V head) of k, v (B, H_kv, S, D), the newest T of
    which came from the recorded projection outputs (B, T, H_kv·D), in one of two roles (more, smaller
    programs in flight for this memory-bound pass):
    - 0: SUMMARY: aux rows [1, hi, lo, 0…] (B, H_kv, S, 16) in V's dtype, hi + lo = V·1 (V·1 rounded to
      the dtype and the rest: the pair holds it to about eps² of it), and [-min; max] of V over the
      keys into the state's hull (B, H_kv, 2, D) by atomic max (it starts at -inf, like the peak);
      NV: the excess of the newest v rows over their recorded stats into its kv rows (2, B, H_kv, T);
    - 1: NK: the same for the newest k rows.
    Both raise the peak."""
    pid = tl.program_id(0).to(tl.int64)  # flat (sample, K/V head)
    b = pid // KV_HEADS
    kv_head = pid % KV_HEADS
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    dims = tl.arange(0, D_PAD)
    row_ok = rows < keys
    dim_ok = dims < D
    MASK_DIMS: tl.constexpr = D != D_PAD  # annotated: a plain local would become a runtime value
    new = rows - (keys - tokens)  # the index among the newest tokens (cached or prefix keys come first)
    new_ok = row_ok & (new >= 0)
    kv_rows = state_ptr + kv_rows_at  # (2, B, H_kv, T): k's, then v's excess per newest token
    peak = state_ptr + peak_at
    if tl.program_id(2) == 0:
        v_base = v_ptr + b * stride_vb + kv_head * stride_vh
        if SUMMARY:
            v = _load_rows(v_base, rows, stride_vs, dims, row_ok, dim_ok, True, MASK_DIMS).to(tl.float32)
            aux_cols = tl.arange(0, 16)
            aux = _summary(v, aux_ptr.dtype.element_ty)
            aux_offsets = (pid * keys + rows[:, None]) * 16 + aux_cols[None, :]
            tl.store(aux_ptr + aux_offsets, aux.to(aux_ptr.dtype.element_ty), mask=row_ok[:, None])
            neg_low, high = _block_hull(v, row_ok[:, None], True)
            bounds = state_ptr + pid * 2 * D + dims
            tl.atomic_max(bounds, neg_low, mask=dim_ok, sem="relaxed")
            tl.atomic_max(bounds + D, high, mask=dim_ok, sem="relaxed")
        if NV > 0:  # (its v rows were just read: an L2 hit)
            worst = _check_rows(v_base, stride_vs, rows, v_rec + b * stride_rvb + kv_head * D, stride_rvt, new, new_ok,
                                dims, dim_ok, 0.0, kv_rows + (tl.num_programs(0) + pid) * tokens, slack_norm,
                                slack_sum, NV, False, MASK_DIMS)  # fmt: skip
            tl.atomic_max(peak, worst, sem="relaxed")  # relaxed: as the attention kernel's
    elif NK > 0:
        weights = _rotary_weights(
            weights_ptr + b * stride_wb, new, stride_wt, dims, new_ok, dim_ok, WEIGHTED, MASK_DIMS
        )
        worst = _check_rows(k_ptr + b * stride_kb + kv_head * stride_kh, stride_ks, rows,
                            k_rec + b * stride_rkb + kv_head * D, stride_rkt, new, new_ok, dims, dim_ok, weights,
                            kv_rows + pid * tokens, slack_norm, slack_sum, NK, WEIGHTED, MASK_DIMS)  # fmt: skip
        tl.atomic_max(peak, worst, sem="relaxed")


@triton.jit
def _rotary_weights(base, rows, stride, dims, row_ok, dim_ok, WEIGHTED: tl.constexpr, MASK_DIMS: tl.constexpr):
    """The rotated-sum weights' rows (BLOCK, D_PAD) where WEIGHTED, else 0.0 (never read)."""
    if WEIGHTED:
        weights = _load_rows(base, rows, stride, dims, row_ok, dim_ok, True, MASK_DIMS)
    else:
        weights = 0.0
    return weights


@triton.jit
def _check_rows(
    received, stride_received, received_rows, recorded, stride_recorded, new, new_ok, dims, dim_ok, weights,
    out, slack_norm, slack_sum,
    NREF: tl.constexpr, WEIGHTED: tl.constexpr, MASK_DIMS: tl.constexpr,
):  # fmt: skip
    """out[new] = the excess of the received rows' [norm, sum] over the recorded rows'
    [norm, Σ w·x] (Σ x unless WEIGHTED), for the newest tokens' rows ``new`` (received as
    ``received_rows``); returns the largest (``_worst``)."""
    ref_norm, ref_sum = _loaded_stats(
        recorded, new, stride_recorded, dims, new_ok, dim_ok, weights, WEIGHTED, MASK_DIMS
    )
    norm, total = _loaded_stats(received, received_rows, stride_received, dims, new_ok, dim_ok, 0.0, False, MASK_DIMS)
    excess = _stats_excess(norm, total, ref_norm, ref_sum, slack_norm, slack_sum, NREF)
    tl.store(out + new, excess, mask=new_ok)
    return _worst(excess, new_ok)


@triton.jit
def _check_kv(
    k_base, v_base, stride_ks, stride_vs, key_rows, k_rec, v_rec, stride_rkt, stride_rvt, k_weights, stride_wkt,
    new, new_ok, dims, dim_ok, kv_rows, kv_head, kv_pairs, tokens, slack_norm, slack_sum,
    NK: tl.constexpr, NV: tl.constexpr, WEIGHTED_K: tl.constexpr, MASK_DIMS: tl.constexpr,
):  # fmt: skip
    """``_check_rows`` of the newest tokens ``new`` of one (sample, K/V head) of k and v (at
    ``key_rows``) into their kv rows (2, B, H_kv, T) at ``kv_head`` (of ``kv_pairs``); the largest excess."""
    worst = float("-inf")
    if NK > 0:
        weights = _rotary_weights(k_weights, new, stride_wkt, dims, new_ok, dim_ok, WEIGHTED_K, MASK_DIMS)
        worst = _check_rows(k_base, stride_ks, key_rows, k_rec, stride_rkt, new, new_ok, dims, dim_ok, weights,
                            kv_rows + kv_head * tokens, slack_norm, slack_sum, NK, WEIGHTED_K, MASK_DIMS)  # fmt: skip
    if NV > 0:
        worst = tl.maximum(worst, _check_rows(
            v_base, stride_vs, key_rows, v_rec, stride_rvt, new, new_ok, dims, dim_ok, 0.0,
            kv_rows + (kv_pairs + kv_head) * tokens, slack_norm, slack_sum, NV, False, MASK_DIMS,
        ))  # fmt: skip
    return worst
