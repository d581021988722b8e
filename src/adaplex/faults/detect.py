"""Detectors of faults inside one attention call, with tolerances from the dtype and the sizes.

All take (B, H, T, D) queries, (B, H, S, D) keys/values (heads already repeated for GQA), the
(B, H, T, S) scores and softmax weights, the (B, H, T, D) output and a boolean visibility mask
broadcastable to the scores (True = attend). Each returns findings: on-device excess tensors (> 0 where
a check fails) that become detections after the forward, so the checks never sync the device.

- softmax:       weights finite, in [0, 1] and each visible row sums to 1
- output_bound:  every output element lies within the min/max of V over the visible keys (convex hull)
- score_bound:   |s_tj| <= scale · ||q_t|| ||k_j||  (Cauchy-Schwarz); scores are the raw s·Q Kᵀ before masking
- abft:          Huang & Abraham checksums of S = s·Q Kᵀ and O = P V; a failing row checksum and a
                 failing column checksum locate the faulty element
- kv_tied:       for models or tests where K and V are tied, K == V
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

CHUNK_BYTES = 1 << 28  # the largest temporary of output_bound, which would otherwise be (B, H, T, S, D)


@dataclass(frozen=True)
class Detection:
    layer: int
    head: int
    detector: str
    location: tuple[int, ...]  # (batch, query row[, key column or feature])
    magnitude: float


@dataclass(frozen=True)
class Finding:
    """One check's excess over its tolerance, (B, H, ...), positive where it fails; abft findings also
    carry the column checksums' excess, to locate the faulty element."""

    layer: int
    detector: str
    excess: torch.Tensor
    columns: torch.Tensor | None = None

    def peak(self) -> torch.Tensor:
        """(0 to 2,): the largest excess of the rows and of the columns (none for an empty tensor)."""
        parts = [t.amax().reshape(1) for t in (self.excess, self.columns) if t is not None and t.numel()]
        return torch.cat(parts) if parts else self.excess.new_empty(0)

    def resolve(self) -> list[Detection]:
        if self.columns is None:
            return _report(self.layer, self.detector, self.excess)
        return _locate(self.layer, self.detector, self.excess, self.columns)


class Resolvable(Protocol):
    """What a hook keeps per check until the forward is over: a Finding, or several computed together."""

    def peak(self) -> torch.Tensor: ...

    def resolve(self) -> list[Detection]: ...


def failed(findings: Iterable[Resolvable]) -> torch.Tensor | None:
    """Whether any finding's excess is positive (or NaN), as a device bool (None without any excess):
    one reduction per finding, no sync."""
    peaks = [f.peak() for f in findings]
    joined = torch.cat(peaks).float() if peaks else torch.empty(0)
    return joined.nan_to_num(nan=torch.inf).amax() > 0 if joined.numel() else None


def any_failed(findings: Iterable[Resolvable]) -> bool:
    """``failed``, read back: one device sync."""
    found = failed(findings)
    return found is not None and bool(found)


@dataclass(frozen=True)
class Tensors:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scores: torch.Tensor  # raw s·Q Kᵀ, before the mask
    weights: torch.Tensor
    output: torch.Tensor
    visible: torch.Tensor
    scaling: float


def _eps(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).eps


def _report(layer: int, detector: str, excess: torch.Tensor, limit: int = 8) -> list[Detection]:
    """Detections at the positions where ``excess`` (B, H, ...) > 0, largest first."""
    excess = torch.nan_to_num(excess.float(), nan=float("inf"))
    hits = (excess > 0).nonzero()
    if not len(hits):
        return []
    values = excess[tuple(hits.T)]
    order = values.argsort(descending=True)[:limit]
    return [
        Detection(layer, int(hits[i, 1]), detector, (int(hits[i, 0]), *map(int, hits[i, 2:])), float(values[i]))
        for i in order
    ]


def softmax(layer: int, t: Tensors) -> list[Finding]:
    w = t.weights.float()
    rows = t.visible.expand_as(w).any(-1)  # rows with at least one visible key
    tol = 4 * w.shape[-1] * _eps(t.weights)
    out_of_range = torch.maximum(-w, w - 1).amax(-1) - tol  # (B, H, T)
    row_error = (w.sum(-1) - 1).abs() - tol
    excess = torch.where(rows, torch.maximum(out_of_range, row_error), torch.zeros_like(row_error))
    return [Finding(layer, "softmax", excess)]


def _visible_extremes(v: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row, the min and max (B, H, T, D) of v (B, H, S, D) over the keys it sees (±inf where
    it sees none), a block of rows at a time: the (B, H, rows, S, D) temporary stays under CHUNK_BYTES."""
    batch, heads, keys, dim = v.shape
    v = v.float().unsqueeze(2)  # (B, H, 1, S, D)
    visible = visible.unsqueeze(-1)  # (B, H, T, S, 1)
    rows = max(1, CHUNK_BYTES // (4 * batch * heads * keys * dim))
    lows, highs = [], []
    for start in range(0, visible.shape[2], rows):
        seen = visible[:, :, start : start + rows]
        lows.append(torch.where(seen, v, torch.inf).amin(3))
        highs.append(torch.where(seen, v, -torch.inf).amax(3))
    return torch.cat(lows, 2), torch.cat(highs, 2)


def output_bound(layer: int, t: Tensors) -> list[Finding]:
    low, high = _visible_extremes(t.v, t.visible.expand(t.scores.shape))  # (B, H, T, D)
    o = t.output.float()
    tol = 4 * t.v.shape[2] * _eps(t.output) * t.v.float().abs().amax(dim=(2, 3), keepdim=True)
    excess = torch.maximum(low - o, o - high) - tol  # (B, H, T, D)
    excess = torch.where(torch.isfinite(low), excess, torch.zeros_like(excess))  # rows with no visible key
    return [Finding(layer, "output_bound", excess.amax(-1))]


def score_bound(layer: int, t: Tensors) -> list[Finding]:
    qn = t.q.float().norm(dim=-1, keepdim=True)  # (B, H, T, 1)
    kn = t.k.float().norm(dim=-1).unsqueeze(-2)  # (B, H, 1, S)
    bound = abs(t.scaling) * qn * kn
    tol = 4 * t.q.shape[-1] * _eps(t.scores) * bound + 1e-30
    excess = (t.scores.float().abs() - bound - tol).amax(-1)  # (B, H, T)
    return [Finding(layer, "score_bound", excess)]


def _checksums(
    name: str, layer: int, product: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float
) -> list[Finding]:
    """product = scale · left @ right; row and column checksums against the operands."""
    p, a, b = product.float(), left.float(), right.float()
    n = a.shape[-1]
    eps = _eps(product)
    row_ref = scale * (a @ b.sum(-1, keepdim=True)).squeeze(-1)  # (B, H, T)
    col_ref = scale * (a.sum(-2, keepdim=True) @ b).squeeze(-2)  # (B, H, S)
    row_mag = abs(scale) * (a.abs() @ b.abs().sum(-1, keepdim=True)).squeeze(-1)
    col_mag = abs(scale) * (a.abs().sum(-2, keepdim=True) @ b.abs()).squeeze(-2)
    size = n + p.shape[-1] + p.shape[-2]
    row_excess = (p.sum(-1) - row_ref).abs() - 4 * size * eps * row_mag - 1e-30  # (B, H, T)
    col_excess = (p.sum(-2) - col_ref).abs() - 4 * size * eps * col_mag - 1e-30  # (B, H, S)
    return [Finding(layer, name, row_excess, col_excess)]


def _locate(layer: int, name: str, row_excess: torch.Tensor, col_excess: torch.Tensor) -> list[Detection]:
    """A failing row checksum with exactly one failing column checksum locates the element."""
    found = []
    for row in _report(layer, name, row_excess):
        batch, _ = row.location
        bad_cols = (col_excess[batch, row.head] > 0).nonzero().flatten().tolist()
        where = (*row.location, bad_cols[0]) if len(bad_cols) == 1 else row.location
        found.append(Detection(layer, row.head, name, where, row.magnitude))
    if not found:  # a column fault whose row sum cancelled: still report it
        found = _report(layer, name, col_excess)
    return found


def abft(layer: int, t: Tensors) -> list[Finding]:
    """Checksums of the raw scores S = s·Q Kᵀ (taken before masking, so every product is kept) and of O = P V."""
    return _checksums("abft_scores", layer, t.scores, t.q, t.k.transpose(-1, -2), t.scaling) + _checksums(
        "abft_output", layer, t.output, t.weights, t.v, 1.0
    )


def kv_tied(layer: int, t: Tensors) -> list[Finding]:
    return [Finding(layer, "kv_tied", (t.k.float() - t.v.float()).abs().amax(-1))]


DETECTORS = {
    "softmax": softmax,
    "output_bound": output_bound,
    "score_bound": score_bound,
    "abft": abft,
    "kv_tied": kv_tied,
}
