"""Flash attention with the fault checks computed inside the kernel, beside the output (Triton).

One program handles BLOCK_M queries of one (sample, head) with an online softmax over key blocks, as
flash attention does, and accumulates in float32 registers; a one-launch pre-pass over V
(``value_summary``) gives V·1 and the hull [min; max] of V over the keys. Checked in the kernel:
- O·1 against P(V·1) (the value rows' sums weighted by the same rounded P, one small MMA per key
  block together with P·1): abft_output;
- P·1 / l, the rounded weights' row sum over the normaliser: softmax;
- O within the hull of V: output_bound;
- the norm and sum of its q rows (and, for the first head of each K/V group, of the k and v rows
  of the newest tokens) against the references recorded at the projections: qkv_q, qkv_k, qkv_v.
Tolerances are those of ``faults/fused.py`` and ``faults/qkv.py``. Each check's excess (> 0: failed)
is written per row, and the largest excess of the call to ``peak`` by an atomic max, so that a clean
forward is confirmed with one reduction per layer. Causal masks (query i sees keys j <= i + S - T)
and no mask are supported, for heads of up to MAX_HEAD_DIM; other masks and larger heads use the
padded SDPA path.
"""

from __future__ import annotations

from functools import cache

import torch

from adaplex.kernels import INTERPRETED, dot_size

MAX_HEAD_DIM = 128  # larger heads exceed the tiles' registers and shared memory: the padded SDPA path
TILES = (128, 64, 4, 3)  # BLOCK_M, BLOCK_N, warps, pipeline stages (from the sweep in faults_kernel_check.py)
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


def head_stats(x: torch.Tensor, head_dim: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """qkv.stats of x (B, T, H·D) split into heads, in one launch: (B, H, T, 2) float32 [norm, sum],
    the sum weighted by ``weights`` (B, T, D) where given. x's last dimension must be contiguous."""
    batch, tokens, width = x.shape
    heads = width // head_dim
    out = torch.empty(batch, heads, tokens, 2, device=x.device)
    block_t = 32
    weighted = weights is not None
    w = weights.float().expand(batch, tokens, head_dim) if weighted else out  # (B, T, D), maybe broadcast
    _kernels().head_stats_kernel[(-(-tokens // block_t), batch)](
        x,
        w,
        out,
        x.stride(0),
        x.stride(1),
        w.stride(0),
        w.stride(1),
        tokens,
        HEADS=heads,
        D=head_dim,
        D_PAD=dot_size(head_dim),
        BLOCK_T=block_t,
        WEIGHTED=weighted,
    )
    return out


def value_summary(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V·1 (B, H_kv, S) and the hull [min; max] over the keys (B, H_kv, 2, D) of v (B, H_kv, S, D), float32."""
    batch, kv_heads, keys, dim = value.shape
    sums = torch.empty(batch, kv_heads, keys, device=value.device)
    hull = torch.empty(batch, kv_heads, 2, dim, device=value.device)
    _kernels().value_summary_kernel[(batch * kv_heads,)](
        value, sums, hull, *value.stride()[:3], keys, KV_HEADS=kv_heads, D=dim, D_PAD=dot_size(dim), BLOCK_S=64
    )
    return sums, hull


def checked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float,
    causal: bool,
    enabled: tuple[bool, bool, bool],
    references: dict[str, torch.Tensor | None],
    tiles: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Attention output (B, T, H, D) of q (B, H, T, D) and k, v (B, H_kv, S, D), the excess of each
    check that ran ((B, H, T) for the CHECKS, (B, H_kv, T) for qkv_k and qkv_v) and their peak (1,).

    ``enabled``: abft_output, softmax, output_bound; ``references``: the recorded [norm(, sum)] stats
    of q (B, H, T, c) and of the newest k and v (B, H_kv, T, c), or None where there is none; ``tiles``
    (BLOCK_M, BLOCK_N, warps, stages) overrides the built-in choice, for tuning."""
    batch, heads, tokens, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    refs = {loc: None if r is None else r.float().contiguous() for loc, r in references.items()}
    out = query.new_empty(batch, tokens, heads, dim)
    checks = torch.empty(batch, heads, tokens, len(CHECKS), device=query.device)
    kv_checks = torch.empty(2, batch, kv_heads, tokens, device=query.device)
    peak = torch.full((1,), float("-inf"), device=query.device)
    eps = torch.finfo(query.dtype).eps
    block_m, block_n, warps, stages = tiles or TILES
    value_sums, hull = value_summary(value) if any(enabled) else (peak, peak)  # (peak: never read)
    placeholder = peak  # the pointer of a reference that is absent (never read)
    _kernels().checked_attention_kernel[(-(-tokens // block_m), batch * heads)](
        query,
        key,
        value,
        out,
        value_sums,
        hull,
        checks,
        kv_checks[0],
        kv_checks[1],
        peak,
        *(refs.get(loc) if refs.get(loc) is not None else placeholder for loc in "qkv"),
        *query.stride()[:3],
        *key.stride()[:3],
        *value.stride()[:3],
        tokens,
        keys,
        scaling,
        eps,
        8 * dim * eps,
        8 * dim * eps * dim**0.5,
        HEADS=heads,
        GROUP=heads // kv_heads,
        D=dim,
        D_PAD=dot_size(dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        CAUSAL=causal,
        ENABLED=sum(bit for bit, on in zip((1, 2, 4), enabled, strict=True) if on),
        NQ=0 if refs.get("q") is None else refs["q"].shape[-1],
        NK=0 if refs.get("k") is None else refs["k"].shape[-1],
        NV=0 if refs.get("v") is None else refs["v"].shape[-1],
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=warps,
        num_stages=stages,
    )
    excess = {
        name: checks[..., i]
        for i, (name, on) in enumerate(zip(CHECKS, (*enabled, refs.get("q") is not None), strict=True))
        if on
    }
    excess.update({f"qkv_{loc}": kv_checks[i] for i, loc in enumerate("kv") if refs.get(loc) is not None})
    return out, excess, peak
