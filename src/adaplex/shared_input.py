"""Sibling layers that a model calls on one input, run as one: q/k/v of attention, gate/up of an MLP.

Under a route, without autograd, where the fused kernel runs, the first member called (the leader)
computes every member's base output and adds every member's expert delta in ONE kernel launch
(``grouped_lora_add``); each other member then takes its result instead of computing it. A decode
step of a routed Llama so launches 4 expert kernels per layer instead of 7. Results are those of
the members computed alone (to rounding: a member's banks are added before its other adapters).
A member called on another input than the leader's leaves the group and computes alone from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from adaplex.kernels import gathered_lora
from adaplex.methods.experts import ExpertBank, Route

if TYPE_CHECKING:
    from adaplex.layers import AdaptedLinear

Result = tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]  # (base output, output with banks, banks applied)


@dataclass
class _Pending:
    x: torch.Tensor
    version: int  # x._version when computed: an in-place change since makes the result stale
    result: Result


def _banks(member: AdaptedLinear, names: list[str]) -> list[ExpertBank] | None:
    found = [member.adapters[n] for n in names if n in member.adapters]
    return found if len(found) == len(names) and all(isinstance(b, ExpertBank) for b in found) else None


class SharedInputGroup:
    """Members in the order the model calls them (the first leads)."""

    def __init__(self, members: list[AdaptedLinear]) -> None:
        self.members = members
        self._pending: dict[int, _Pending] = {}

    def take(self, member: AdaptedLinear, x: torch.Tensor, active: dict[str, object]) -> Result | None:
        """``member``'s result computed as part of the group, or None: compute it alone."""
        pending = self._pending.pop(id(member), None)
        if pending is not None:
            if pending.x is x and pending.version == x._version:
                return pending.result
            self.members.remove(member)  # called on another input: not a sibling after all
            return None
        if member is self.members[0] and not torch.is_grad_enabled() and gathered_lora.available(x):
            return self._lead(x, active)
        return None

    def _lead(self, x: torch.Tensor, active: dict[str, object]) -> Result | None:
        names = [n for n, w in active.items() if isinstance(w, Route) and n in self.members[0].adapters]
        joined = [(m, banks) for m in self.members if (banks := _banks(m, names)) is not None]
        if not names or len(joined) < 2 or joined[0][0] is not self.members[0]:
            return None
        bases = [m.base(x) for m, _ in joined]
        outs = bases
        for i, name in enumerate(names):
            route = active[name]
            outs = gathered_lora.grouped_lora_add(
                x, [(out, *banks[i].gathered(route, x.dtype)) for (_, banks), out in zip(joined, outs, strict=True)]
            )
        applied = tuple(names)
        for (m, _), base, out in zip(joined[1:], bases[1:], outs[1:], strict=True):
            self._pending[id(m)] = _Pending(x, x._version, (base, out, applied))
        return bases[0], outs[0], applied
