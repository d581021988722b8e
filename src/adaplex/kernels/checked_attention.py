"""Flash attention with the fault checks computed inside the kernel, beside the output (Triton).

One program handles BLOCK_M queries of one (sample, head) with an online softmax over key blocks, as
flash attention does, and accumulates in float32 registers. A parallel, memory-bound pass comes
first (``row_pass``): it writes aux = [1 | V·1 | 0…] per key (V·1 as two parts in V's dtype: the
rounded sum and the rest) and the hull [min; max] of V over the keys, and checks the norm and sum of
the newest tokens' k and v rows against those of the projection outputs they came from (qkv_k,
qkv_v). Checked in the attention kernel:
- the norm and sum of the q rows it loads against those of the rows q's projection computed, which
  it loads beside them: qkv_q;
- O·1 against P(V·1) (the value rows' sums weighted by the same rounded P: P·aux, one small MMA per
  key block whose aux tile is loaded like V's, together with P·1): abft_output;
- P·1 / l, the rounded weights' row sum over the normaliser: softmax;
- O within the hull of V: output_bound.
Tolerances follow from how the kernel computes: everything accumulates in float32 (eps₃₂), and the
only other rounding is P's to the input dtype (eps) for the MMAs, the same P on both sides of the
ABFT check. With S keys, head dim D and m = max |V|: softmax eps + 4·S·eps₃₂, output_bound that
times m, abft_output (eps² + 4·(S + D)·eps₃₂)·D·m (eps²: V·1's two parts). q/k/v: ``faults/qkv.py``.
Each check's excess (> 0: failed) is written per row, and the largest excess of the call to ``peak``
by an atomic max, so that a clean forward is confirmed with one reduction per layer.
Folded (``folds``: small 16-bit calls outside graph capture, where the host's launch of the pass costs
more than the GPU time it saves), there is no pass: the attention kernel builds each V block's aux
rows in registers and the hull over the keys each program sees, the first head of each K/V group
checks the newest k and v rows of its tokens, and each program writes its largest excess to its own
slot (no fill, no atomics). V·1 then comes from the same loaded V as the P·V product, so a fault in
that load escapes abft_output. Causal masks
(query i sees keys j <= i + S - T) and no mask are supported, for heads of up to MAX_HEAD_DIM; other
masks and larger heads use the padded SDPA path.
"""

from __future__ import annotations

from functools import cache, lru_cache
from typing import NamedTuple, Protocol

import torch

from adaplex.kernels import INTERPRETED, dot_size
from adaplex.kernels.launch import Constants, Launcher


class Recorded(Protocol):
    """A projection's output as it returned it (``adaplex.faults.qkv.Recorded``): out (B, T, H·D), the
    weights (B, T, D) of the sum its rows have after the rotary embedding (None: the plain sum), and
    how many stats can be compared (2: norm and sum; 1: the norm only)."""

    out: torch.Tensor
    weights: torch.Tensor | None
    columns: int


def qkv_slack(dim: int, dtype: torch.dtype) -> tuple[float, float]:
    """Allowed |got - recorded| per unit of norm, for [norm, sum]: 8·D·eps · [1, √D] (the checked-attention
    kernel's too)."""
    unit = 8 * dim * torch.finfo(dtype).eps
    return unit, unit * dim**0.5


MAX_HEAD_DIM = 128  # larger heads exceed the tiles' registers and shared memory: the padded SDPA path
# BLOCK_M, BLOCK_N, warps, pipeline stages, register cap (None: the compiler's choice), without and with checks
# (from the sweeps in faults_kernel_check.py and faults_profile.py, head dim 64). With checks, 3 stages fit 3
# programs per H100 SM (63 KB, 168 registers); 2 stages and a cap of 128 fit 4. Wider heads keep TILES: their
# tiles fit fewer programs whatever the cap, which would only spill.
TILES = (64, 64, 4, 3, None)
CHECKED_TILES = (64, 64, 4, 2, 128)
CHECKED_TILES_MAX_DIM = 64
# A folded call's, up to CHECKED_TILES_MAX_DIM and wider (V's summary and hull in registers too; no spills on
# an H100; the fastest without spills in the sweep of scratch runs at 8x512 and 2x1024: 51 and 50 µs a call).
FOLDED_TILES = (64, 64, 4, 2, None)
FOLDED_WIDE_TILES = (64, 64, 8, 2, None)
FOLD_WORK = 2**31  # B·H·T·S·D up to which a call folds its row pass into the attention kernel (``folds``)
PASS_TILES = (32, 2)  # BLOCK_S, warps of the pass over the keys (from the sweep in faults_profile.py)
CHECKS = ("abft_output", "softmax", "output_bound", "qkv_q")  # the columns of ``checks``


def available(x: torch.Tensor) -> bool:
    return (x.is_cuda or INTERPRETED) and _kernels() is not None


class _Kernels(NamedTuple):
    attention: Launcher
    row_pass: Launcher


@cache
def _kernels() -> _Kernels | None:
    """Launchers of the Triton kernels (they compile on first use), or None without Triton."""
    try:
        from adaplex.kernels import checked_attention_triton as source
    except ImportError:
        return None
    return _Kernels(Launcher(source.checked_attention_kernel), Launcher(source.row_pass_kernel))


class Layout(NamedTuple):
    """Where a call's results lie in its float32 state: [hull (B, H_kv, 2, D): [-min; max] of V | peak
    (1,) | 15 unused | rows (B, H, T, 4): the CHECKS' excess per query row | kv rows (2, B, H_kv, T):
    qkv_k's and qkv_v's per newest token | worst (programs,): a folded call's largest excess per
    program, in place of the hull and the peak], and the shape of its aux (B, H_kv, S, 16), in V's
    dtype (None: no row pass writes one)."""

    batch: int
    heads: int
    kv_heads: int
    tokens: int
    dim: int
    names: tuple[str, ...]  # the checks that run: CHECKS' names, then qkv_k and qkv_v
    aux: tuple[tuple[int, ...], torch.dtype] | None
    programs: int  # of a folded call's attention kernel; 0: the call has a row pass

    @property
    def peak_at(self) -> int:
        return self.batch * self.kv_heads * 2 * self.dim

    @property
    def rows_at(self) -> int:
        return self.peak_at + 16  # after the peak and 15 unused floats, which keep the rows 64-byte aligned

    @property
    def kv_rows_at(self) -> int:
        return self.rows_at + self.batch * self.heads * self.tokens * 4

    @property
    def worst_at(self) -> int:
        return self.kv_rows_at + 2 * self.batch * self.kv_heads * self.tokens

    @property
    def size(self) -> int:
        return self.worst_at + self.programs


class Checks(NamedTuple):
    """A call's buffers: what it checked (``state``, laid out as ``layout`` says) and the row pass's aux
    for the attention kernel (the state where there is none). ``start``, the hull and the peak, where
    atomic maxima start, is filled with -inf by each call with a row pass; the kernels write every row
    that is read, and a folded call's every worst slot.
    The views of the results are made only when asked for: each costs host time, which a host-bound
    forward pays in full. A later call of the same layout may reuse the buffers (``checked_attention``'s
    ``reuse``) once these results are no longer needed."""

    state: torch.Tensor
    aux: torch.Tensor
    start: torch.Tensor
    peaks: torch.Tensor  # the peak, or a folded call's worst slots: made once, as every forward reads them
    layout: Layout

    @classmethod
    def allocate(cls, layout: Layout, device: torch.device) -> Checks:
        state = torch.empty(layout.size, device=device)
        aux = state if layout.aux is None else torch.empty(layout.aux[0], dtype=layout.aux[1], device=device)
        peaks = state[layout.worst_at :] if layout.programs else state[layout.peak_at : layout.peak_at + 1]
        return cls(state, aux, state[: layout.peak_at + 1], peaks, layout)

    @property
    def names(self) -> tuple[str, ...]:
        return self.layout.names

    def peak(self) -> torch.Tensor:
        """(1,), or one per program of a folded call: the largest excess of the call's checks (> 0, or
        NaN: one failed)."""
        return self.peaks

    def hull(self) -> torch.Tensor:
        batch, _, kv_heads, _, dim, *_ = self.layout
        return self.start[:-1].view(batch, kv_heads, 2, dim)

    def excess(self) -> dict[str, torch.Tensor]:
        """Each check's excess over its tolerance: (B, H, T) for the CHECKS, (B, H_kv, T) for qkv_k, qkv_v."""
        batch, heads, kv_heads, tokens, _, names, *_ = self.layout
        rows = self.state[self.layout.rows_at : self.layout.kv_rows_at].view(batch, heads, tokens, len(CHECKS))
        kv_rows = self.state[self.layout.kv_rows_at : self.layout.worst_at].view(2, batch, kv_heads, tokens)
        found = {name: rows[..., i] for i, name in enumerate(CHECKS) if name in names}
        found.update({name: kv_rows[i] for i, name in enumerate(("qkv_k", "qkv_v")) if name in names})
        return found


class _Launch(NamedTuple):
    """What a kernel's launch takes that follows from the call's shapes and options alone."""

    grid: tuple[int, ...]
    scalars: tuple  # the kernel's last runtime arguments
    constants: Constants


class _Plan(NamedTuple):
    layout: Layout
    row_pass: _Launch | None  # None: nothing for the pass to do
    attention: _Launch


def row_pass(
    key: torch.Tensor, value: torch.Tensor, checks: Checks, launch: _Launch, recorded: dict[str, Recorded]
) -> torch.Tensor:
    """One parallel, memory-bound pass over k, v (B, H_kv, S, D) and the recorded projection outputs
    of their newest T tokens, before the attention kernel. Where a check reads V's summary, raises the
    hull in ``checks`` to [-min; max] of V over the keys and returns its aux (B, H_kv, S, 16) = [1, V·1
    (two parts), 0…] per key in V's dtype (otherwise its state, never read). Writes the newest k's and
    v's excess over their recorded stats into the kv rows of ``checks`` and raises its peak."""
    state = checks.state
    sources, source_strides = _kv_sources(recorded, state)
    _kernels().row_pass(
        launch.grid,
        (key, value, checks.aux, state, *sources),
        (*key.stride()[:3], *value.stride()[:3], *source_strides, *launch.scalars),
        launch.constants,
    )
    return checks.aux


def _kv_sources(recorded: dict[str, Recorded], placeholder: torch.Tensor) -> tuple[tuple, tuple]:
    """The recorded k and v projection outputs and k's rotated-sum weights (``placeholder`` where there
    are none), and their (batch, token) strides: what the kernels take to check the newest k and v."""
    k_out, v_out = (_unit_stride(recorded[loc].out) if loc in recorded else None for loc in "kv")
    weights, *weight_strides = _rotary_weights(recorded.get("k"))
    tensors = tuple(placeholder if t is None else t for t in (k_out, v_out, weights))
    return tensors, (*_row_strides(k_out), *_row_strides(v_out), *weight_strides)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _row_strides(x: torch.Tensor | None) -> tuple[int, int]:
    """The (batch, token) strides of a recorded (B, T, H·D) output, (0, 0) for none."""
    return (0, 0) if x is None else x.stride()[:2]


def _rotary_weights(recorded: Recorded | None) -> tuple[torch.Tensor | None, int, int]:
    """The rotated-sum weights (B or 1, T, D) of a recorded q or k and their (batch, token) strides (the
    batch's 0 where one row serves every sample), or (None, 0, 0) where its sum is plain (or nothing was
    recorded)."""
    weights = None if recorded is None else recorded.weights
    if weights is None:
        return None, 0, 0
    return weights, 0 if weights.shape[0] == 1 else weights.stride(0), weights.stride(1)


@lru_cache(maxsize=256)
def _plan(
    query: torch.Size,
    key: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    scaling: float,
    causal: bool,
    enabled: tuple[bool, bool, bool],
    recorded: tuple[tuple[int, bool] | None, ...],
    tiles: tuple[int, int, int, int, int | None] | None,
    folded: bool,
) -> _Plan:
    """Everything of a call that follows from its shapes and options (``recorded``: per q, k, v, None or
    (columns compared, whether the sum is weighted)), worked out once per distinct call."""
    batch, heads, tokens, dim = query
    kv_heads, keys = key[1], key[2]
    q_rec, k_rec, v_rec = recorded
    names = tuple(name for name, on in zip(CHECKS, (*enabled, q_rec is not None), strict=True) if on)
    names += tuple(f"qkv_{loc}" for loc, r in zip("kv", (k_rec, v_rec), strict=True) if r is not None)
    summary = any(enabled)  # V's aux and hull, which the checks read
    checked = (summary or q_rec is not None) and dim <= CHECKED_TILES_MAX_DIM
    block_m, block_n, warps, stages, max_registers = tiles or built_in_tiles(dim, checked, folded)
    grid = (-(-tokens // block_m), batch * heads)
    aux = ((batch, kv_heads, keys, 16), dtype) if summary and not folded else None
    layout = Layout(batch, heads, kv_heads, tokens, dim, names, aux, grid[0] * grid[1] if folded else 0)
    eps = torch.finfo(dtype).eps
    slack = qkv_slack(dim, dtype)  # q/k/v, for the norm and the sum
    sizes = (("D", dim), ("D_PAD", dot_size(dim)))
    kv_checks = (("NK", k_rec[0] if k_rec else 0), ("NV", v_rec[0] if v_rec else 0))
    pass_launch = None
    if not folded and (summary or k_rec is not None or v_rec is not None):
        block_s, pass_warps = PASS_TILES
        pass_constants = (
            ("KV_HEADS", kv_heads),
            *sizes,
            ("BLOCK_S", block_s),
            ("SUMMARY", summary),
            *kv_checks,
            ("WEIGHTED", bool(k_rec and k_rec[1])),
            ("num_warps", pass_warps),
        )
        roles = 1 + (k_rec is not None)  # V's summary and the v check; the k check
        pass_grid = (batch * kv_heads, -(-keys // block_s), roles)
        pass_launch = _Launch(pass_grid, (layout.kv_rows_at, layout.peak_at, keys, tokens, *slack), pass_constants)
    constants = (
        ("HEADS", heads),
        ("GROUP", heads // kv_heads),
        *sizes,
        ("BLOCK_M", block_m),
        ("BLOCK_N", block_n),
        ("CAUSAL", causal),
        ("ENABLED", sum(bit for bit, on in zip((1, 2, 4), enabled, strict=True) if on)),
        ("NQ", q_rec[0] if q_rec else 0),
        ("WEIGHTED", bool(q_rec and q_rec[1])),
        ("PRECISION", "ieee" if dtype == torch.float32 else "tf32"),
        ("FOLDED", folded),
        *(kv_checks if folded else (("NK", 0), ("NV", 0))),
        ("WEIGHTED_K", folded and bool(k_rec and k_rec[1])),
        ("num_warps", warps),
        ("num_stages", stages),
        *((("maxnreg", max_registers),) if max_registers else ()),
    )
    scalars = (layout.rows_at, layout.peak_at, layout.kv_rows_at, layout.worst_at, tokens, keys, scaling, eps, *slack)
    return _Plan(layout, pass_launch, _Launch(grid, scalars, constants))


def built_in_tiles(dim: int, checked: bool, folded: bool) -> tuple[int, int, int, int, int | None]:
    """The attention kernel's tiles for a head dim, with or without checks, folded or not."""
    if folded:
        return FOLDED_TILES if dim <= CHECKED_TILES_MAX_DIM else FOLDED_WIDE_TILES
    return CHECKED_TILES if checked else TILES


def folds(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether a call folds the row pass into the attention kernel: where the attention is small
    (B·H·T·S·D up to FOLD_WORK) and 16-bit, so that the host's launch of the pass would cost more than
    the GPU time the fold adds, and never while a CUDA graph is captured, whose replays launch nothing."""
    batch, heads, tokens, dim = query.shape
    if query.dtype == torch.float32 or batch * heads * tokens * key.shape[2] * dim > FOLD_WORK:
        return False  # (float32 tiles would spill registers with the fold's)
    return not (query.is_cuda and torch.cuda.is_current_stream_capturing())


def checked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    causal: bool,
    enabled: tuple[bool, bool, bool],
    recorded: dict[str, Recorded],
    tiles: tuple[int, int, int, int, int | None] | None = None,
    reuse: Checks | None = None,
    folded: bool | None = None,
) -> tuple[torch.Tensor, Checks]:
    """Attention output (B, T, H, D) of q (B, H, T, D) and k, v (B, H_kv, S, D), and the ``Checks``
    of the call.

    ``enabled``: abft_output, softmax, output_bound; ``recorded``: by "q", "k", "v", the projections'
    outputs that q and the newest T tokens' k and v came from, where they were recorded (qkv.Recorded,
    covering exactly those T tokens, as do the rotary weights); ``tiles`` (BLOCK_M, BLOCK_N, warps, stages, register
    cap) overrides the built-in choice, for tuning; ``reuse``: the Checks of an earlier call whose
    results are no longer needed, whose buffers this call overwrites where its layout fits; ``folded``
    overrides ``folds``: one launch, the attention kernel computing V's summary and hull from the V
    blocks it loads (over the keys each program sees) and checking the newest k and v rows itself."""
    query, key, value = _unit_stride(query), _unit_stride(key), _unit_stride(value)
    signature = tuple(
        (recorded[loc].columns, recorded[loc].weights is not None) if loc in recorded else None for loc in "qkv"
    )
    folded = folds(query, key) if folded is None else folded
    plan = _plan(query.shape, key.shape, query.dtype, query.device, scaling, causal, enabled, signature, tiles, folded)
    checks = reuse if reuse is not None and reuse.layout is plan.layout else Checks.allocate(plan.layout, query.device)
    if plan.layout.names and not folded:
        checks.start.fill_(float("-inf"))
    batch, heads, tokens, dim = query.shape
    out = query.new_empty(batch, tokens, heads, dim)
    aux = checks.aux  # the state (never read) when no check needs V's summary
    if plan.row_pass is not None:
        aux = row_pass(key, value, checks, plan.row_pass, recorded)
    state = checks.state
    q_rec = _unit_stride(recorded["q"].out) if "q" in recorded else None
    q_weights, *q_weight_strides = _rotary_weights(recorded.get("q"))
    launch = plan.attention
    kv_sources, kv_strides = _kv_sources(recorded if folded else {}, state)
    _kernels().attention(
        launch.grid,
        (query, key, value, out, aux, state, state if q_rec is None else q_rec,
         state if q_weights is None else q_weights, *kv_sources),
        (*query.stride()[:3], *_row_strides(q_rec), *q_weight_strides, *key.stride()[:3], *value.stride()[:3],
         *kv_strides, *launch.scalars),
        launch.constants,
    )  # fmt: skip
    return out, checks
