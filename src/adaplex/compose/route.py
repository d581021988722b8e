"""Routing: one shared adapter plus expert banks, every sample of a batch routed to its own key.

``route`` only produces weights: each bank's weight becomes ``Routed`` (each sample's expert index,
-1 for a sample whose key lives in another bank or for none), and with ``unrouted="base"`` every other
adapter's weight becomes ``PerSample``: 0 for a sample that no bank routes, 1 for the others. Entering
the route of a paged bank first brings the batch's experts to the device and holds them there until
the route ends (``adaplex.core.paging``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import torch

from adaplex.core.adapted import Adapted
from adaplex.core.weights import PerSample, Routed, WeightKind
from adaplex.errors import AdapterNameError

UNROUTED = (None, "__base__")


def route(handle: Adapted, keys: Sequence[str | None], unrouted: str = "shared") -> AbstractContextManager[None]:
    """Route sample b of the batch to expert ``keys[b]`` (in whichever bank holds that key); None or
    "__base__" routes to no expert, and then to the other adapters alone (``unrouted="shared"``) or to
    nothing ("base")."""
    if unrouted not in ("shared", "base"):
        raise AdapterNameError(f"unrouted must be 'shared' or 'base', not {unrouted!r}")
    found = handle.banks()
    if not found:
        raise AdapterNameError("this model has no expert bank to route; add an 'experts' adapter or load a bundle")
    device = next(handle.model.parameters()).device
    known = {key for config in found.values() for key in config.keys}
    unknown = [k for k in keys if k not in UNROUTED and k not in known]
    if unknown:
        raise AdapterNameError(f"unknown routing key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    kinds: dict[str, WeightKind] = {}
    paged: dict[str, list[int]] = {}
    for name, config in found.items():  # a key lives in one bank; the others give that sample no expert
        index = [config.keys.index(k) if k in config.keys else -1 for k in keys]
        kinds[name] = Routed(torch.tensor(index, dtype=torch.long, device=device))
        if name in handle.pagers:
            paged[name] = index
    if unrouted == "base":
        routed = torch.tensor([k not in UNROUTED for k in keys], dtype=torch.float32, device=device)  # (B,)
        kinds.update({name: PerSample(routed) for name in handle.configs if name not in found})
    if paged:
        return _holding(handle, paged, handle.stack.overriding(kinds))
    return handle.stack.overriding(kinds)


@contextmanager
def _holding(handle: Adapted, paged: dict[str, list[int]], inner: AbstractContextManager[None]) -> Iterator[None]:
    """``inner`` with each paged bank's experts of the batch on the device and held while it runs."""
    acquired: list[str] = []
    try:
        for name, index in paged.items():
            handle.pagers[name].acquire(index)
            acquired.append(name)
        with inner:
            yield
    finally:
        for name in acquired:
            handle.pagers[name].release(paged[name])
