"""Stacking: which adapters are active and with what weight kind.

A ``Stack`` is shared by every adapted layer of one model. Layers read ``stack.active``
(name -> weight kind, in the order the adapters were added) and compute
y = base(x) + Σ_{i in active} w_i · Δ_i(x), each w_i resolved at the site (``adaplex.core.weights``).
An adapter's kind is its standing kind (``set_kind``: a gate's ``Gated``; else ``Constant(1)``) unless a
block overrides it (``overriding``: routes, given per-sample adapters); either is scaled by the
adapter's constant weight. ``memo`` keeps what a site derives from the active set (a group's launch
plan) for as long as that set holds.
State changes made by the context managers are undone on exit, even when the body raises.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from adaplex.core.weights import Constant, WeightKind
from adaplex.errors import AdapterNameError

_ONE = Constant(1.0)
MEMO_ENTRIES = 4096  # a generation without a key-value cache gives every step inputs of a new shape


class Stack:
    """Per-adapter weights and enabled flags; merged adapters are excluded from ``active``."""

    def __init__(self) -> None:
        self.weights: dict[str, float] = {}
        self.enabled: set[str] = set()
        self.merged: dict[str, float] = {}
        self.kinds: dict[str, WeightKind] = {}  # standing kinds other than Constant(1), e.g. gates
        self.overrides: dict[str, WeightKind] = {}  # set inside ``overriding`` blocks
        self.active: dict[str, WeightKind] = {}
        self.memo: dict[Hashable, Any] = {}  # what sites derive from ``active``, dropped when it changes

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
        self.kinds.pop(name, None)
        self.overrides.pop(name, None)
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

    def set_kind(self, name: str, kind: WeightKind | None) -> None:
        """The adapter's standing weight kind (None: back to a constant)."""
        self.check(name)
        self._check_unmerged([name])
        if kind is None:
            self.kinds.pop(name, None)
        else:
            self.kinds[name] = kind
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
    def overriding(self, kinds: Mapping[str, WeightKind]) -> Iterator[None]:
        """Inside the block the named adapters take these weight kinds (times their constant weight);
        the kinds set before are restored on exit."""
        self.check(*kinds)
        saved = dict(self.overrides)
        try:
            self.overrides = {**saved, **kinds}
            self._refresh()
            yield
        finally:
            self.overrides = saved
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

    def remember(self, key: Hashable, value: Any) -> None:
        """memo[key] = value, starting the memo afresh once it holds ``MEMO_ENTRIES``."""
        if len(self.memo) >= MEMO_ENTRIES:
            self.memo = {}
        self.memo[key] = value

    def _refresh(self) -> None:
        self.memo = {}
        self.active = {
            n: self.overrides.get(n, self.kinds.get(n, _ONE)).scaled(w)
            for n, w in self.weights.items()
            if n in self.enabled and n not in self.merged
        }
