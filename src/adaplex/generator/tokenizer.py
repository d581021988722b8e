"""The checkpoint tokenizer: an adapter's tensors as a fixed (T, D) grid of tokens, and back.

Each tensor (in the layout's order) is flattened row-major and cut into tokens of width D, its last
token zero-padded, so that no token mixes two tensors: T = Σ_k ceil(numel_k / D). The grid is float32,
which holds every float16, bfloat16 and float32 value exactly, so the round trip is bitwise exact.
A ``Layout`` records what the grid holds (keys, shapes, dtypes, tokens per tensor) and, optionally, the
per-position mean and std over a zoo that ``normalize``/``denormalize`` apply (padding stays 0).
Adapters of one layout share keys, shapes and dtypes; ``group_by_layout`` sorts a zoo by layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from adaplex.errors import ConfigError

DEFAULT_WIDTH = 384  # the embedded encoder's width


@dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]
    dtype: str
    tokens: int

    @property
    def layer(self) -> int | None:
        """The layer the tensor belongs to: the first number in its key's path (None: no number)."""
        return next((int(p) for p in self.key.split(".") if p.isdigit()), None)


@dataclass(frozen=True)
class Layout:
    width: int
    entries: tuple[Entry, ...]
    mean: torch.Tensor | None = field(default=None, compare=False)  # (T, D), with ``std``: per-position statistics
    std: torch.Tensor | None = field(default=None, compare=False)

    @property
    def tokens(self) -> int:
        return sum(e.tokens for e in self.entries)

    def signature(self) -> tuple:
        """What two adapters must share to be tokenized alike."""
        return self.width, tuple((e.key, e.shape, e.dtype) for e in self.entries)

    def layers(self) -> tuple[int, int]:
        """(L, t): the grid as L layers of t tokens each, where every layer (the first number in a key's
        path) holds the same number of tokens; else (1, T)."""
        per_layer: dict[int, int] = {}
        for e in self.entries:
            if e.layer is None:
                return 1, self.tokens
            per_layer[e.layer] = per_layer.get(e.layer, 0) + e.tokens
        counts = set(per_layer.values())
        return (len(per_layer), counts.pop()) if len(counts) == 1 else (1, self.tokens)

    def padding(self) -> torch.Tensor:
        """(T, D) boolean: True where a position holds no value of any tensor."""
        pad = torch.zeros(self.tokens, self.width, dtype=torch.bool)
        row = 0
        for e in self.entries:
            used = math.prod(e.shape)
            pad.view(-1)[row * self.width + used : (row + e.tokens) * self.width] = True
            row += e.tokens
        return pad


def natural_key(key: str) -> tuple:
    """Sort key that orders 'layers.2' before 'layers.10', so that each layer's tensors are contiguous."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split("."))


def layout_of(tensors: dict[str, torch.Tensor], width: int = DEFAULT_WIDTH) -> Layout:
    """The layout of one adapter's tensors, keys in natural order (layer by layer)."""
    if width < 1:
        raise ConfigError(f"token width {width} must be at least 1")
    entries = tuple(
        Entry(k, tuple(t.shape), str(t.dtype).removeprefix("torch."), max(1, math.ceil(t.numel() / width)))
        for k, t in sorted(tensors.items(), key=lambda item: natural_key(item[0]))
    )
    for e in entries:
        if e.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"tensor {e.key!r} is {e.dtype}; the tokenizer holds float32, float16 and bfloat16")
    return Layout(width, entries)


def tokenize(tensors: dict[str, torch.Tensor], layout: Layout) -> torch.Tensor:
    """(T, D) float32 grid of ``tensors``, which must have the layout's keys, shapes and dtypes."""
    own = layout_of(tensors, layout.width)
    if own.signature() != layout.signature():
        raise ConfigError(f"these tensors do not fit the layout: {_difference(own, layout)}")
    rows = []
    for e in layout.entries:
        flat = tensors[e.key].detach().reshape(-1).to(torch.float32)
        padded = torch.zeros(e.tokens * layout.width, dtype=torch.float32)
        padded[: flat.numel()] = flat
        rows.append(padded.view(e.tokens, layout.width))
    return torch.cat(rows)


def detokenize(grid: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The tensors a (T, D) grid holds, in their own shapes and dtypes."""
    if grid.dim() != 2 or tuple(grid.shape) != (layout.tokens, layout.width):
        raise ConfigError(
            f"a token grid of shape {tuple(grid.shape)} does not fit the layout, which needs "
            f"({layout.tokens}, {layout.width})"
        )
    out, row = {}, 0
    for e in layout.entries:
        flat = grid[row : row + e.tokens].reshape(-1)[: math.prod(e.shape)]
        out[e.key] = flat.to(getattr(torch, e.dtype)).reshape(e.shape).clone()
        row += e.tokens
    return out


def with_statistics(layout: Layout, grids: torch.Tensor) -> Layout:
    """The layout with the per-position mean and std of a stack of grids (N, T, D); std is 1 where a
    position does not vary (or is padding), so normalizing never divides by zero."""
    mean = grids.mean(0)
    std = grids.std(0, unbiased=False) if grids.shape[0] > 1 else torch.ones_like(mean)
    pad = layout.padding()
    mean = mean.masked_fill(pad, 0.0)
    std = torch.where((std > 0) & ~pad, std, torch.ones_like(std))
    return Layout(layout.width, layout.entries, mean, std)


def normalize(grid: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(grid - mean) / std per position (the identity without statistics)."""
    if layout.mean is None or layout.std is None:
        return grid
    return (grid - layout.mean) / layout.std


def denormalize(grid: torch.Tensor, layout: Layout) -> torch.Tensor:
    if layout.mean is None or layout.std is None:
        return grid
    return grid * layout.std + layout.mean


def group_by_layout(adapters: dict[str, dict[str, torch.Tensor]], width: int = DEFAULT_WIDTH) -> list[list[str]]:
    """Adapter names grouped by layout, largest group first."""
    groups: dict[tuple, list[str]] = {}
    for name, tensors in adapters.items():
        groups.setdefault(layout_of(tensors, width).signature(), []).append(name)
    return sorted(groups.values(), key=len, reverse=True)


def common_layout(adapters: dict[str, dict[str, torch.Tensor]], width: int = DEFAULT_WIDTH) -> Layout:
    """The one layout every adapter has, or an error naming the adapters that differ from the most common."""
    groups = group_by_layout(adapters, width)
    if not groups:
        raise ConfigError("no adapters to tokenize")
    if len(groups) > 1:
        odd = [n for g in groups[1:] for n in g]
        first = layout_of(adapters[groups[0][0]], width)
        why = _difference(layout_of(adapters[odd[0]], width), first)
        raise ConfigError(
            f"{len(odd)} adapter(s) differ from the layout of the other {len(groups[0])} "
            f"({', '.join(odd[:5])}{', ...' if len(odd) > 5 else ''}): {why}; tokenize each layout on its own"
        )
    return layout_of(adapters[groups[0][0]], width)


def _difference(a: Layout, b: Layout) -> str:
    """The first way layout ``a`` differs from ``b``, in words."""
    keys_a, keys_b = {e.key: e for e in a.entries}, {e.key: e for e in b.entries}
    missing, extra = sorted(keys_b.keys() - keys_a.keys()), sorted(keys_a.keys() - keys_b.keys())
    if missing:
        return f"tensor {missing[0]!r} is missing"
    if extra:
        return f"tensor {extra[0]!r} is not in the layout"
    for key, e in keys_a.items():
        other = keys_b[key]
        if (e.shape, e.dtype) != (other.shape, other.dtype):
            return f"tensor {key!r} is {e.dtype} {list(e.shape)}, the layout has {other.dtype} {list(other.shape)}"
    return f"token width {a.width} against {b.width}"


def layout_fields(layout: Layout) -> dict:
    """The layout as JSON fields (its statistics, tensors, are stored beside it)."""
    return {"width": layout.width, "entries": [[e.key, list(e.shape), e.dtype, e.tokens] for e in layout.entries]}


def layout_from_fields(fields: dict, mean: torch.Tensor | None = None, std: torch.Tensor | None = None) -> Layout:
    entries = tuple(Entry(key, tuple(shape), dtype, tokens) for key, shape, dtype, tokens in fields["entries"])
    return Layout(int(fields["width"]), entries, mean, std)
