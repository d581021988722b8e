"""The Triton source of ``checked_attention`` (imported on first use: importing Triton is slow)."""

import triton
import triton.language as tl


@triton.jit
def _stats_excess(rows, ref_ptr, ref_offsets, ok, slack_norm, slack_sum, NREF: tl.constexpr):
    """Excess of the rows' [norm, sum] (BLOCK, D) over the reference (NREF columns: norm[, sum])."""
    norm = tl.sqrt(tl.sum(rows * rows, 1))
    ref_norm = tl.load(ref_ptr + ref_offsets * NREF, mask=ok, other=0.0)
    excess = tl.abs(norm - ref_norm) - slack_norm * ref_norm
    if NREF == 2:
        ref_sum = tl.load(ref_ptr + ref_offsets * NREF + 1, mask=ok, other=0.0)
        excess = tl.maximum(excess, tl.abs(tl.sum(rows, 1) - ref_sum) - slack_sum * ref_norm)
    return excess


@triton.jit
def _attend_block(
    acc,
    sums,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    value_sums,
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
    ENABLED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One key block of the online softmax: acc += P V, sums += P [1 | V·1 | 0…] (both rescaled)."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < keys
    if MASKED:
        kv_ok = col_ok[:, None] & dim_ok[None, :]
    else:
        kv_ok = dim_ok[None, :]
    k = tl.load(k_base + cols[:, None] * stride_ks + dims[None, :], mask=kv_ok, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vs + dims[None, :], mask=kv_ok, other=0.0)
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
    acc = acc * alpha[:, None] + tl.dot(p_low, v, input_precision=PRECISION)
    if ENABLED & 3:  # one small product on the tensor cores: P [1 | V·1 | 0…] (BLOCK_M, 16)
        aux_cols = tl.arange(0, 16)
        v_sums = tl.load(value_sums + cols, mask=col_ok, other=0.0)
        aux = tl.where(aux_cols[None, :] == 0, 1.0, tl.where(aux_cols[None, :] == 1, v_sums[:, None], 0.0))
        sums = sums * alpha[:, None] + tl.dot(p_low, aux.to(v.dtype), input_precision=PRECISION)
    return acc, sums, m_new, l_i


@triton.jit
def checked_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    value_sums_ptr,
    hull_ptr,
    checks_ptr,
    k_checks_ptr,
    v_checks_ptr,
    peak_ptr,
    q_ref,
    k_ref,
    v_ref,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
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
    NQ: tl.constexpr,  # reference columns per tensor (0: no reference)
    NK: tl.constexpr,
    NV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    kv_head = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_PAD)
    row_ok = rows < tokens
    dim_ok = dims < D
    offset = keys - tokens  # query i sees keys j <= i + offset (cached or prefix keys come first)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kv_head * stride_vh
    q = tl.load(q_base + rows[:, None] * stride_qt + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    sums = tl.zeros((BLOCK_M, 16), tl.float32)  # [P·1, P(V·1), 0…]: the rounded weights' row sums and checksums
    value_sums = value_sums_ptr + (b.to(tl.int64) * (HEADS // GROUP) + kv_head) * keys
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
            acc, sums, m_i, l_i = _attend_block(
                acc, sums, m_i, l_i, q, k_base, v_base, value_sums, start, rows, dims, dim_ok, keys, offset,
                stride_ks, stride_vs, scale2, BLOCK_N, phase == 1, CAUSAL, ENABLED, PRECISION,
            )  # fmt: skip

    out = (acc / l_i[:, None]).to(o_ptr.dtype.element_ty)
    o_offsets = ((b.to(tl.int64) * tokens + rows[:, None]) * HEADS + h) * D + dims[None, :]
    tl.store(o_ptr + o_offsets, out, mask=row_ok[:, None] & dim_ok[None, :])

    o32 = out.to(tl.float32)
    aux_cols = tl.arange(0, 16)
    hull = hull_ptr + (b.to(tl.int64) * (HEADS // GROUP) + kv_head) * 2 * D
    hull_ok = dim_ok & ((ENABLED & 5) != 0)  # without abft_output and output_bound there is no hull to read
    v_low = tl.load(hull + dims, mask=hull_ok, other=0.0)
    v_high = tl.load(hull + D + dims, mask=hull_ok, other=0.0)
    v_abs = tl.max(tl.maximum(tl.abs(v_low), tl.abs(v_high)), 0)
    none = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    abft = none
    if ENABLED & 1:
        checksum = tl.sum(tl.where(aux_cols[None, :] == 1, sums, 0.0), 1)
        abft = tl.abs(tl.sum(o32, 1) - checksum / l_i) - 4 * (keys + D) * eps * D * v_abs
    softmax = none
    if ENABLED & 2:
        weight_sum = tl.sum(tl.where(aux_cols[None, :] == 0, sums, 0.0), 1) / l_i
        softmax = tl.minimum(tl.abs(weight_sum - 1), tl.abs(weight_sum)) - 4 * keys * eps
    bound = none
    if ENABLED & 4:
        outside = tl.maximum(o32 - v_high[None, :], v_low[None, :] - o32)
        bound = tl.max(tl.where(dim_ok[None, :], tl.maximum(outside, 0.0), 0.0), 1) - 4 * keys * eps * v_abs
    stats_offsets = bh * tokens + rows  # (B, H, T) row-major
    q_excess = none
    if NQ > 0:
        q_excess = _stats_excess(q.to(tl.float32), q_ref, stats_offsets, row_ok, slack_norm, slack_sum, NQ)
    check_base = checks_ptr + stats_offsets * 4
    tl.store(check_base, abft, mask=row_ok)
    tl.store(check_base + 1, softmax, mask=row_ok)
    tl.store(check_base + 2, bound, mask=row_ok)
    tl.store(check_base + 3, q_excess, mask=row_ok)
    worst = tl.maximum(tl.maximum(abft, softmax), tl.maximum(bound, q_excess))

    kv_rows = rows + offset
    kv_mask = row_ok[:, None] & dim_ok[None, :]
    kv_offsets = (b * (HEADS // GROUP) + kv_head) * tokens + rows  # (B, H_kv, T) row-major
    if NK > 0:
        if h % GROUP == 0:  # the newest tokens' k, once per K/V head
            k_new = tl.load(k_base + kv_rows[:, None] * stride_ks + dims[None, :], mask=kv_mask, other=0.0)
            k_excess = _stats_excess(k_new.to(tl.float32), k_ref, kv_offsets, row_ok, slack_norm, slack_sum, NK)
            tl.store(k_checks_ptr + kv_offsets, k_excess, mask=row_ok)
            worst = tl.maximum(worst, k_excess)
    if NV > 0:
        if h % GROUP == 0:
            v_new = tl.load(v_base + kv_rows[:, None] * stride_vs + dims[None, :], mask=kv_mask, other=0.0)
            v_excess = _stats_excess(v_new.to(tl.float32), v_ref, kv_offsets, row_ok, slack_norm, slack_sum, NV)
            tl.store(v_checks_ptr + kv_offsets, v_excess, mask=row_ok)
            worst = tl.maximum(worst, v_excess)
    worst = tl.where(worst != worst, float("inf"), worst)  # NaN fails
    tl.atomic_max(peak_ptr, tl.max(tl.where(row_ok, worst, float("-inf")), 0))


@triton.jit
def value_summary_kernel(
    v_ptr,
    sums_ptr,
    hull_ptr,
    stride_b,
    stride_h,
    stride_s,
    keys,
    KV_HEADS: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Per (sample, K/V head) of v (B, H_kv, S, D): the row sums V·1 (S,) and the hull [min; max] (2, D)."""
    pid = tl.program_id(0)
    v_base = v_ptr + (pid // KV_HEADS).to(tl.int64) * stride_b + (pid % KV_HEADS) * stride_h
    dims = tl.arange(0, D_PAD)
    low = tl.full((D_PAD,), float("inf"), tl.float32)
    high = tl.full((D_PAD,), float("-inf"), tl.float32)
    for start in tl.range(0, keys, BLOCK_S):
        rows = start + tl.arange(0, BLOCK_S)
        ok = (rows < keys)[:, None] & (dims < D)[None, :]
        v = tl.load(v_base + rows[:, None] * stride_s + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(sums_ptr + pid.to(tl.int64) * keys + rows, tl.sum(v, 1), mask=rows < keys)
        low = tl.minimum(low, tl.min(tl.where(ok, v, float("inf")), 0))
        high = tl.maximum(high, tl.max(tl.where(ok, v, float("-inf")), 0))
    tl.store(hull_ptr + pid * 2 * D + dims, low, mask=dims < D)
    tl.store(hull_ptr + pid * 2 * D + D + dims, high, mask=dims < D)


@triton.jit
def head_stats_kernel(
    x_ptr,
    weights_ptr,
    out_ptr,
    stride_b,
    stride_t,
    stride_wb,
    stride_wt,
    tokens,
    HEADS: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    WEIGHTED: tl.constexpr,
):
    """out[b, h, t] = [‖x_bth‖, Σ_d w_btd x_bthd] (w = 1 unless WEIGHTED) of x (B, T, H·D); one program
    per BLOCK_T tokens of one sample, all heads (the weights are read once)."""
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, D_PAD)
    row_ok = rows < tokens
    ok = row_ok[:, None] & (dims < D)[None, :]
    if WEIGHTED:
        w = tl.load(weights_ptr + b * stride_wb + rows[:, None] * stride_wt + dims[None, :], mask=ok, other=0.0)
    for h in tl.static_range(HEADS):
        x = tl.load(x_ptr + b * stride_b + rows[:, None] * stride_t + h * D + dims[None, :], mask=ok, other=0.0)
        x = x.to(tl.float32)
        if WEIGHTED:
            total = tl.sum(x * w, 1)
        else:
            total = tl.sum(x, 1)
        out = out_ptr + ((b * HEADS + h) * tokens + rows) * 2
        tl.store(out, tl.sqrt(tl.sum(x * x, 1)), mask=row_ok)
        tl.store(out + 1, total, mask=row_ok)
