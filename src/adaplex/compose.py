"""Stacking: which adapters are active and with what weight.

A ``Stack`` is shared by every adapted layer of one model. Layers read ``stack.active``
(name -> weight, in the order the adapters were added) and compute
y = base(x) + Σ_{i in active} w_i · Δ_i(x). Routing only changes the weights: an expert bank's
weight becomes a ``Route`` (each sample's expert index), and with ``unrouted_base`` the other
adapters' weights become per-sample tensors (B, 1, 1) that are 0 for unrouted samples.
State changes made by the context managers are undone on exit, even when the body raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from adaplex.errors import AdapterNameError
from adaplex.methods.experts import Route


class Stack:
    """Per-adapter weights and enabled flags; merged adapters are excluded from ``active``."""

    def __init__(self) -> None:
        self.weights: dict[str, float] = {}
        self.enabled: set[str] = set()
        self.merged: dict[str, float] = {}
        self.routes: dict[str, torch.Tensor] = {}  # bank name -> (B,) expert index, -1 = none
        self.unrouted_base = False  # unrouted samples skip every adapter, not only the experts
        self.active: dict[str, float | torch.Tensor | Route] = {}

    def add(self, name: str, weight: float = 1.0, enabled: bool = True) -> None:
        self.weights[name] = weight
        if enabled:
            self.enabled.add(name)
        self._refresh()

    def remove(self, name: str) -> None:
        self.check(name)
        self._check_unmerged([name])
        del self.weights[name]
        self.enabled.discard(name)
        self._refresh()

    def check(self, *names: str) -> None:
        """Raise for any name that is not an adapter of this model."""
        unknown = [n for n in names if n not in self.weights]
        if unknown:
            known = ", ".join(self.weights) or "none"
            raise AdapterNameError(f"unknown adapter {unknown[0]!r}; this model has: {known}")

    def set_weight(self, name: str, weight: float) -> None:
        self.check(name)
        self._check_unmerged([name])
        self.weights[name] = weight
        self._refresh()

    def set_enabled(self, names: Iterable[str]) -> None:
        names = set(names)
        self.check(*names)
        self._check_unmerged(names ^ self.enabled)
        self.enabled = names
        self._refresh()

    def mark_merged(self, names: Iterable[str]) -> None:
        self.merged.update({n: self.weights[n] for n in names})
        self._refresh()

    def clear_merged(self) -> None:
        self.merged.clear()
        self._refresh()

    @contextmanager
    def only(self, *names: str) -> Iterator[None]:
        """Exactly ``names`` are active inside the block (none: the base model alone)."""
        with self._restoring():
            self.set_enabled(names)
            yield

    @contextmanager
    def enable(self, *names: str) -> Iterator[None]:
        with self._restoring():
            self.set_enabled(self.enabled | set(names))
            yield

    @contextmanager
    def disable(self, *names: str) -> Iterator[None]:
        """Disable ``names`` inside the block; with no names, disable every adapter."""
        self.check(*names)
        with self._restoring():
            self.set_enabled(self.enabled - set(names or self.weights))
            yield

    @contextmanager
    def weighted(self, **weights: float) -> Iterator[None]:
        with self._restoring():
            for name, weight in weights.items():
                self.set_weight(name, weight)
            yield

    @contextmanager
    def route(self, routes: dict[str, torch.Tensor], unrouted_base: bool = False) -> Iterator[None]:
        """Per-sample expert indices for each bank inside the block (restored on exit)."""
        self.check(*routes)
        saved = dict(self.routes), self.unrouted_base
        try:
            self.routes, self.unrouted_base = dict(routes), unrouted_base
            self._refresh()
            yield
        finally:
            self.routes, self.unrouted_base = saved
            self._refresh()

    @contextmanager
    def _restoring(self) -> Iterator[None]:
        saved = dict(self.weights), set(self.enabled)
        try:
            yield
        finally:
            self.weights, self.enabled = saved
            self._refresh()

    def _check_unmerged(self, names: Iterable[str]) -> None:
        merged = [n for n in names if n in self.merged]
        if merged:
            raise AdapterNameError(f"adapter {merged[0]!r} is merged into the base weights; unmerge() it first")

    def _refresh(self) -> None:
        active: dict[str, float | torch.Tensor | Route] = {
            n: w for n, w in self.weights.items() if n in self.enabled and n not in self.merged
        }
        routed = next(iter(self.routes.values()), None)
        for name in active:
            if name in self.routes:
                active[name] = Route(self.routes[name], self.weights[name])
            elif self.unrouted_base and routed is not None:
                active[name] = (routed >= 0).float().view(-1, 1, 1) * self.weights[name]
        self.active = active
