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
from typing import TYPE_CHECKING

import torch

from adaplex.kernels import INTERPRETED, dot_size

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


@cache
def _kernels():
    """The Triton module (its kernels compile on first use), or None without Triton."""
    try:
        from adaplex.kernels import checked_attention_triton
    except ImportError:
        return None
    return checked_attention_triton


def row_pass(
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: torch.Tensor | None,
    recorded: dict[str, Recorded],
    kv_checks: torch.Tensor,
    peak: torch.Tensor,
    slack: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One parallel, memory-bound pass over k, v (B, H_kv, S, D) and the recorded projection outputs
    of their newest T tokens, before the attention kernel. Where ``bounds`` (B, H_kv, 2, D) float32,
    filled with -inf, is given, raises it to [-min; max] of V over the keys and returns it with aux
    (B, H_kv, S, 16) = [1, V·1 (two parts), 0…] per key in V's dtype (placeholders otherwise). Writes
    the newest k's and v's excess over their recorded stats into ``kv_checks`` (2, B, H_kv, T) and
    raises ``peak``."""
    batch, kv_heads, keys, dim = value.shape
    summary = bounds is not None
    aux = value.new_empty(batch, kv_heads, keys, 16) if summary else peak  # (or never read)
    bounds = peak if bounds is None else bounds
    outputs = {loc: _unit_stride(recorded[loc].out) for loc in "kv" if loc in recorded}
    weights = _rotary_weights(recorded.get("k"), batch, kv_checks.shape[-1], dim)
    block_s, warps = PASS_TILES
    roles = 1 + ("k" in recorded)  # V's summary and the v check; the k check
    _kernels().row_pass_kernel[(batch * kv_heads, -(-keys // block_s), roles)](
        key,
        value,
        aux,
        bounds,
        kv_checks,
        peak,
        *(outputs.get(loc, peak) for loc in "kv"),
        peak if weights is None else weights,
        *key.stride()[:3],
        *value.stride()[:3],
        *(stride for loc in "kv" for stride in (outputs[loc].stride()[:2] if loc in outputs else (0, 0))),
        *(weights.stride()[:2] if weights is not None else (0, 0)),
        keys,
        kv_checks.shape[-1],
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
    return aux, bounds


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rotary_weights(recorded: Recorded | None, batch: int, tokens: int, dim: int) -> torch.Tensor | None:
    """The rotated-sum weights (B, T, D) of a recorded q or k (maybe a broadcast over the batch), or None
    where its sum is plain (or nothing was recorded)."""
    weights = None if recorded is None else recorded.weights
    return None if weights is None else weights.expand(batch, tokens, dim)


def checked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    causal: bool,
    enabled: tuple[bool, bool, bool],
    recorded: dict[str, Recorded | None],
    tiles: tuple[int, int, int, int, int | None] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Attention output (B, T, H, D) of q (B, H, T, D) and k, v (B, H_kv, S, D), the excess of each
    check that ran ((B, H, T) for the CHECKS, (B, H_kv, T) for qkv_k and qkv_v) and their peak (1,).

    ``enabled``: abft_output, softmax, output_bound; ``recorded``: the projections' outputs that q and
    the newest T tokens' k and v came from (qkv.Recorded, covering exactly those T tokens), or None
    where there is none; ``tiles`` (BLOCK_M, BLOCK_N, warps, stages, register cap) overrides the
    built-in choice, for tuning."""
    batch, heads, tokens, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    query, key, value = (_unit_stride(t) for t in (query, key, value))
    out = query.new_empty(batch, tokens, heads, dim)
    checks = torch.empty(batch, heads, tokens, len(CHECKS), device=query.device)
    kv_checks = torch.empty(2, batch, kv_heads, tokens, device=query.device)
    summary = any(enabled)  # V's aux and hull, which the checks read
    state = torch.full((1 + summary * batch * kv_heads * 2 * dim,), float("-inf"), device=query.device)  # one fill
    peak = state[:1]
    bounds = state[1:].view(batch, kv_heads, 2, dim) if summary else None
    eps = torch.finfo(query.dtype).eps
    slack = (8 * dim * eps, 8 * dim * eps * dim**0.5)
    given = {loc: r for loc, r in recorded.items() if r is not None}
    aux = hull = peak  # placeholders (never read) when neither a check nor a k or v recording needs the pass
    if summary or "k" in given or "v" in given:
        aux, hull = row_pass(key, value, bounds, given, kv_checks, peak, slack)
    q_rec = _unit_stride(given["q"].out) if "q" in given else peak  # (or never read)
    q_weights = _rotary_weights(given.get("q"), batch, tokens, dim)
    checked = (summary or "q" in given) and dim <= CHECKED_TILES_MAX_DIM
    block_m, block_n, warps, stages, max_registers = tiles or (CHECKED_TILES if checked else TILES)
    _kernels().checked_attention_kernel[(-(-tokens // block_m), batch * heads)](
        query,
        key,
        value,
        out,
        aux,
        hull,
        q_rec,
        peak if q_weights is None else q_weights,
        checks,
        peak,
        *query.stride()[:3],
        *(q_rec.stride()[:2] if "q" in given else (0, 0)),
        *(q_weights.stride()[:2] if q_weights is not None else (0, 0)),
        *key.stride()[:3],
        *value.stride()[:3],
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
    excess = {
        name: checks[..., i] for i, (name, on) in enumerate(zip(CHECKS, (*enabled, "q" in given), strict=True)) if on
    }
    excess.update({f"qkv_{loc}": kv_checks[i] for i, loc in enumerate("kv") if loc in given})
    return out, excess, peak
