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
by an atomic max, so that a clean forward is confirmed with one reduction per layer. Causal masks
(query i sees keys j <= i + S - T) and no mask are supported, for heads of up to MAX_HEAD_DIM; other
masks and larger heads use the padded SDPA path.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, NamedTuple

import torch

from adaplex.faults.qkv import slack as qkv_slack
from adaplex.kernels import INTERPRETED, dot_size
from adaplex.kernels.launch import Launcher

if TYPE_CHECKING:
    from adaplex.faults.qkv import Recorded

MAX_HEAD_DIM = 128  # larger heads exceed the tiles' registers and shared memory: the padded SDPA path
# BLOCK_M, BLOCK_N, warps, pipeline stages, register cap (None: the compiler's choice), without and with checks
# (from the sweeps in faults_kernel_check.py and faults_profile.py, head dim 64). With checks, 3 stages fit 3
# programs per H100 SM (63 KB, 168 registers); 2 stages and a cap of 128 fit 4. Wider heads keep TILES: their
# tiles fit fewer programs whatever the cap, which would only spill.
TILES = (64, 64, 4, 3, None)
CHECKED_TILES = (64, 64, 4, 2, 128)
CHECKED_TILES_MAX_DIM = 64
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


class Checks(NamedTuple):
    """What one call checked, in one float32 buffer: [hull (B, H_kv, 2, D): [-min; max] of V | peak
    (1,) | 15 unused | rows (B, H, T, 4): the CHECKS' excess per query row | kv rows (2, B, H_kv, T):
    qkv_k's and qkv_v's per newest token]. The hull and the peak, where atomic maxima start, are
    filled with -inf; the kernels write every row that is read. The views are made only when asked
    for: each costs host time, which a host-bound forward pays in full."""

    state: torch.Tensor
    batch: int
    heads: int
    kv_heads: int
    tokens: int
    dim: int
    names: tuple[str, ...]  # the checks that ran: CHECKS' names, then qkv_k and qkv_v

    @classmethod
    def allocate(
        cls, batch: int, heads: int, kv_heads: int, tokens: int, dim: int, names: tuple[str, ...], device: torch.device
    ) -> Checks:
        layout = cls(None, batch, heads, kv_heads, tokens, dim, names)  # type: ignore[arg-type]
        state = torch.empty(layout.kv_rows_at + 2 * batch * kv_heads * tokens, device=device)
        state[: layout.peak_at + 1].fill_(float("-inf"))
        return cls(state, batch, heads, kv_heads, tokens, dim, names)

    @property
    def peak_at(self) -> int:
        return self.batch * self.kv_heads * 2 * self.dim

    @property
    def rows_at(self) -> int:
        return self.peak_at + 16  # after the peak and 15 unused floats, which keep the rows 64-byte aligned

    @property
    def kv_rows_at(self) -> int:
        return self.rows_at + self.batch * self.heads * self.tokens * 4

    def peak(self) -> torch.Tensor:
        """(1,): the largest excess of every check of the call (> 0, or NaN: one failed)."""
        return self.state[self.peak_at : self.peak_at + 1]

    def hull(self) -> torch.Tensor:
        return self.state[: self.peak_at].view(self.batch, self.kv_heads, 2, self.dim)

    def excess(self) -> dict[str, torch.Tensor]:
        """Each check's excess over its tolerance: (B, H, T) for the CHECKS, (B, H_kv, T) for qkv_k, qkv_v."""
        rows = self.state[self.rows_at : self.kv_rows_at].view(self.batch, self.heads, self.tokens, len(CHECKS))
        kv_rows = self.state[self.kv_rows_at :].view(2, self.batch, self.kv_heads, self.tokens)
        found = {name: rows[..., i] for i, name in enumerate(CHECKS) if name in self.names}
        found.update({name: kv_rows[i] for i, name in enumerate(("qkv_k", "qkv_v")) if name in self.names})
        return found


def row_pass(
    key: torch.Tensor,
    value: torch.Tensor,
    checks: Checks,
    summary: bool,
    recorded: dict[str, Recorded],
    slack: tuple[float, float],
) -> torch.Tensor:
    """One parallel, memory-bound pass over k, v (B, H_kv, S, D) and the recorded projection outputs
    of their newest T tokens, before the attention kernel. With ``summary``, raises the hull in
    ``checks`` to [-min; max] of V over the keys and returns aux (B, H_kv, S, 16) = [1, V·1 (two
    parts), 0…] per key in V's dtype (a placeholder otherwise). Writes the newest k's and v's excess
    over their recorded stats into the kv rows of ``checks`` and raises its peak."""
    batch, kv_heads, keys, dim = value.shape
    state = checks.state
    aux = value.new_empty(batch, kv_heads, keys, 16) if summary else state  # (or never read)
    outputs = {loc: _unit_stride(recorded[loc].out) for loc in "kv" if loc in recorded}
    weights, *weight_strides = _rotary_weights(recorded.get("k"))
    block_s, warps = PASS_TILES
    roles = 1 + ("k" in recorded)  # V's summary and the v check; the k check
    _kernels().row_pass(
        (batch * kv_heads, -(-keys // block_s), roles),
        key,
        value,
        aux,
        state,
        *(outputs.get(loc, state) for loc in "kv"),
        state if weights is None else weights,
        *key.stride()[:3],
        *value.stride()[:3],
        *(stride for loc in "kv" for stride in (outputs[loc].stride()[:2] if loc in outputs else (0, 0))),
        *weight_strides,
        checks.kv_rows_at,
        checks.peak_at,
        keys,
        checks.tokens,
        *slack,
        KV_HEADS=kv_heads,
        D=dim,
        D_PAD=dot_size(dim),
        BLOCK_S=block_s,
        SUMMARY=summary,
        NK=recorded["k"].columns if "k" in recorded else 0,
        NV=recorded["v"].columns if "v" in recorded else 0,
        WEIGHTED=weights is not None,
        num_warps=warps,
    )
    return aux


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rotary_weights(recorded: Recorded | None) -> tuple[torch.Tensor | None, int, int]:
    """The rotated-sum weights (B or 1, T, D) of a recorded q or k and their (batch, token) strides (the
    batch's 0 where one row serves every sample), or (None, 0, 0) where its sum is plain (or nothing was
    recorded)."""
    weights = None if recorded is None else recorded.weights
    if weights is None:
        return None, 0, 0
    return weights, 0 if weights.shape[0] == 1 else weights.stride(0), weights.stride(1)


def checked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    causal: bool,
    enabled: tuple[bool, bool, bool],
    recorded: dict[str, Recorded | None],
    tiles: tuple[int, int, int, int, int | None] | None = None,
) -> tuple[torch.Tensor, Checks]:
    """Attention output (B, T, H, D) of q (B, H, T, D) and k, v (B, H_kv, S, D), and the ``Checks``
    of the call.

    ``enabled``: abft_output, softmax, output_bound; ``recorded``: the projections' outputs that q and
    the newest T tokens' k and v came from (qkv.Recorded, covering exactly those T tokens, as do the
    rotary weights), or None where there is none; ``tiles`` (BLOCK_M, BLOCK_N, warps, stages, register
    cap) overrides the built-in choice, for tuning."""
    batch, heads, tokens, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    query, key, value = _unit_stride(query), _unit_stride(key), _unit_stride(value)
    given = {loc: r for loc, r in recorded.items() if r is not None}
    names = tuple(name for name, on in zip(CHECKS, (*enabled, "q" in given), strict=True) if on)
    names += tuple(f"qkv_{loc}" for loc in "kv" if loc in given)
    checks = Checks.allocate(batch, heads, kv_heads, tokens, dim, names, query.device)
    state = checks.state
    out = query.new_empty(batch, tokens, heads, dim)
    summary = any(enabled)  # V's aux and hull, which the checks read
    eps = torch.finfo(query.dtype).eps
    slack = qkv_slack(dim, query.dtype)  # q/k/v, for the norm and the sum
    aux = state  # a placeholder (never read) when no check needs the summary
    if summary or "k" in given or "v" in given:
        aux = row_pass(key, value, checks, summary, given, slack)
    q_rec = _unit_stride(given["q"].out) if "q" in given else state  # (or never read)
    q_weights, *q_weight_strides = _rotary_weights(given.get("q"))
    checked = (summary or "q" in given) and dim <= CHECKED_TILES_MAX_DIM
    block_m, block_n, warps, stages, max_registers = tiles or (CHECKED_TILES if checked else TILES)
    _kernels().attention(
        (-(-tokens // block_m), batch * heads),
        query,
        key,
        value,
        out,
        aux,
        state,
        q_rec,
        state if q_weights is None else q_weights,
        *query.stride()[:3],
        *(q_rec.stride()[:2] if "q" in given else (0, 0)),
        *q_weight_strides,
        *key.stride()[:3],
        *value.stride()[:3],
        checks.rows_at,
        checks.peak_at,
        tokens,
        keys,
        scaling,
        eps,
        *slack,
        HEADS=heads,
        GROUP=heads // kv_heads,
        D=dim,
        D_PAD=dot_size(dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        CAUSAL=causal,
        ENABLED=sum(bit for bit, on in zip((1, 2, 4), enabled, strict=True) if on),
        NQ=given["q"].columns if "q" in given else 0,
        WEIGHTED=q_weights is not None,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=warps,
        num_stages=stages,
        **({"maxnreg": max_registers} if max_registers else {}),
    )
    return out, checks
