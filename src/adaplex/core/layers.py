"""The wrapper that applies adapters beside a base linear layer, and groups of wrappers fed one input.

AdaptedLinear(x) = base(x) + Σ_{i active} w_i · Δ_i(x, base(x)),  w_i = kind_i.at(site, adapter, x, base(x))

The base layer (``nn.Linear`` or GPT-2's ``Conv1D``) is held, not copied or subclassed;
``merge``/``unmerge`` are the only operations that touch its weight, and ``unmerge``
restores the exact original tensor. Each wrapper knows its site name (its module path).

Sibling layers that a model calls on one input (q/k/v of attention, gate/up of an MLP) form a
``SharedInputGroup``; every other wrapper is a group of one. Without autograd, where the fused kernel
runs, the first member called (the leader) computes every member's base output and adds every
member's per-sample LoRA deltas (expert banks, given adapters) in ONE kernel launch
(``GroupedLoRAAdd``); each other member then takes its result instead of computing it. A decode step
of a routed Llama so launches 4 expert kernels per layer instead of 7. Where the active kinds are
reusable (a route's), what the leader works out (who joins, the factors, the bound launches) is kept
in the stack's memo until the active set changes (or, for a launch that computes the base outputs
too, until a base's weight is replaced or a forward hook added), so a decode step after the first
does only the launches. Results are those of the members computed alone (to rounding: a member's
per-sample deltas are added before its other adapters). A member called on another input than the
leader's leaves the group and computes alone from then on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from transformers.pytorch_utils import Conv1D

from adaplex.core.stack import Stack
from adaplex.core.weights import WeightKind
from adaplex.kernels import gathered_lora
from adaplex.methods import Factors, PerSampleLoRA, SiteAdapter
from adaplex.util.tensors import version

LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a Conv1D (whose weight is (in, out))."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def apply_adapter(
    adapter: nn.Module,
    kind: WeightKind,
    site: str,
    out: torch.Tensor,
    x: torch.Tensor,
    base_out: torch.Tensor,
    inplace: bool = False,
) -> torch.Tensor:
    """out + w · Δ(x) for one adapter at ``site``, its weight kind resolved there (``inplace``: into out)."""
    if isinstance(adapter, FusedParts):
        return adapter.add_parts(out, x, base_out, kind, site)
    return adapter.add_to(out, x, base_out, kind.at(site, adapter, x, base_out), inplace)


class FusedParts(nn.Module):
    """Adapters on named slices of a fused projection (GPT-2's c_attn = [q | k | v]).

    Δ(x) = concat_p Δ_p(x) over the parts, with zeros for parts that have no adapter, so
    targeting q and v of c_attn equals adapting separate q and v projections. Part p's site is
    '<module>.<p>'.
    """

    def __init__(self, part_sizes: dict[str, int], parts: dict[str, SiteAdapter]) -> None:
        super().__init__()
        self.part_sizes = part_sizes
        self.parts = nn.ModuleDict(parts)
        self.mergeable = all(p.mergeable for p in parts.values())

    def add_parts(
        self, out: torch.Tensor, x: torch.Tensor, base_out: torch.Tensor, kind: WeightKind, site: str
    ) -> torch.Tensor:
        sizes = list(self.part_sizes.values())
        deltas = [
            self.parts[p](x, part_out, kind.at(f"{site}.{p}", self.parts[p], x, part_out))
            if p in self.parts
            else torch.zeros_like(part_out)
            for p, part_out in zip(self.part_sizes, base_out.split(sizes, dim=-1), strict=True)
        ]
        return out + torch.cat(deltas, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        first = next(iter(self.parts.values())).delta_weight()
        blocks = [
            self.parts[p].delta_weight() if p in self.parts else first.new_zeros(size, first.shape[1])
            for p, size in self.part_sizes.items()
        ]
        return torch.cat(blocks, dim=0)  # (out, in)


class AdaptedLinear(nn.Module):
    """A base linear layer at site ``site`` plus named adapters, weighted by the model's shared Stack."""

    def __init__(self, base: nn.Module, stack: Stack, site: str) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.stack = stack
        self.site = site
        self.group: SharedInputGroup | None = None  # siblings fed the same input (set by inject.link_shared_inputs)
        self._original_weight: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return linear_shape(self.base)[0]

    @property
    def out_features(self) -> int:
        return linear_shape(self.base)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.stack.active
        grouped = self.group.take(self, x, active) if self.group is not None else None
        if grouped is None:
            base_out = out = self.base(x)
            applied: tuple[str, ...] = ()
        else:
            base_out, out, applied = grouped
        todo = [(a, active[n]) for n, a in self.adapters.items() if n in active and n not in applied]
        last = len(todo) - 1
        for i, (adapter, kind) in enumerate(todo):
            # into out in place once it is no longer the base output; into the base output only where
            # nothing reads it later: no later adapter, and no autograd that saved it (a bottleneck's input)
            inplace = out is not base_out or (i == last and not torch.is_grad_enabled())
            out = apply_adapter(adapter, kind, self.site, out, x, base_out, inplace)
        return out

    @property
    def unmerged_weight(self) -> torch.Tensor:
        """The base layer's own weight, as it was before any merge."""
        return self.base.weight if self._original_weight is None else self._original_weight

    @torch.no_grad()
    def merge(self, weights: dict[str, float]) -> None:
        """W <- W + Σ w_i ΔW_i for the named adapters this layer holds; keeps W for unmerge."""
        held = {n: w for n, w in weights.items() if n in self.adapters}
        if not held:
            return
        if self._original_weight is None:
            self._original_weight = self.base.weight.detach().clone()
        for name, weight in held.items():
            delta = self.adapters[name].delta_weight().to(self.base.weight.dtype) * weight  # (out, in)
            self.base.weight += delta.T if isinstance(self.base, Conv1D) else delta

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight saved by the first merge."""
        if self._original_weight is not None:
            self.base.weight.copy_(self._original_weight)
            self._original_weight = None


Result = tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]  # (base output, output with deltas, names applied)
# the members that join the leader's launch, the per-sample adapters they apply, and either one bound add for
# each adapter or, for one adapter on a one-token step, launches that compute the base outputs too
_Launches = list[gathered_lora.GroupedLoRAAdd] | gathered_lora.GroupedLinearLoRA
_Plan = tuple[list["AdaptedLinear"], tuple[str, ...], _Launches]


@dataclass
class _Pending:
    x: torch.Tensor
    version: int  # x._version when computed: an in-place change since makes the result stale
    result: Result


class SharedInputGroup:
    """Members in the order the model calls them (the first leads)."""

    def __init__(self, members: list[AdaptedLinear]) -> None:
        self.members = members
        self._pending: dict[int, _Pending] = {}

    def take(self, member: AdaptedLinear, x: torch.Tensor, active: dict[str, WeightKind]) -> Result | None:
        """``member``'s result computed as part of the group, or None: compute it alone."""
        if not self._pending and torch.is_grad_enabled():
            return None  # groups lead only without autograd (and so add no guards on members to a compiled step)
        pending = self._pending.pop(id(member), None)
        if pending is not None:
            if pending.x is x and pending.version == version(x):
                return pending.result
            self.members.remove(member)  # called on another input: not a sibling after all
            member.stack.memo.clear()  # plans that counted it
            return None
        if member is self.members[0] and not torch.is_grad_enabled() and gathered_lora.available(x):
            return self._lead(x, active)
        return None

    def _lead(self, x: torch.Tensor, active: dict[str, WeightKind]) -> Result | None:
        plan = self._plan(x, active)
        if plan is None:
            return None
        joined, names, launches = plan
        if isinstance(launches, gathered_lora.GroupedLinearLoRA):
            bases, outs = launches(x)
        else:
            inputs = x.contiguous()  # before the base linears: the update launches may depend on them alone
            bases = outs = [m.base(inputs) for m in joined]
            for add in launches:
                outs = add(inputs, outs)
        for m, base, out in zip(joined[1:], bases[1:], outs[1:], strict=True):
            self._pending[id(m)] = _Pending(x, version(x), (base, out, names))
        return bases[0], outs[0], names

    def _plan(self, x: torch.Tensor, active: dict[str, WeightKind]) -> _Plan | None:
        """The members that join the leader's launch, the per-sample adapters they apply and each one's
        factors per member, or None: each member computes alone. Kept in the stack's memo while the
        active set holds where every kind involved is reusable (a route's are)."""
        stack = self.members[0].stack
        fused = gathered_lora.linear_sizes(x, len(self.members))
        key = (self, x.shape, x.dtype, x.device, fused, gathered_lora.dependent_launches(x))
        if key in stack.memo and _still_bound(stack.memo[key]):
            return stack.memo[key]
        names = tuple(n for n in active if _per_sample(self.members[0], n))
        plan = self._find_plan(x, active, names) if names else None
        if all(active[n].reusable for n in names):
            stack.remember(key, plan)
        return plan

    def _find_plan(self, x: torch.Tensor, active: dict[str, WeightKind], names: tuple[str, ...]) -> _Plan | None:
        joined = [m for m in self.members if all(_per_sample(m, n) for n in names)]  # the leader among them
        factors = [[active[n].at(m.site, m.adapters[n], x, None) for m in joined] for n in names]
        if not all(isinstance(f, Factors) for row in factors for f in row):
            return None
        if any(not _launchable_together(row) for row in factors):
            return None
        tables = [[(f.down, f.up, f.gain, f.ranks) for f in row] for row in factors]
        weights = _linear_weights(joined, x) if len(names) == 1 else None
        if weights is not None:
            return joined, names, gathered_lora.GroupedLinearLoRA(x, weights, tables[0], factors[0][0].rows)
        adds = [
            gathered_lora.GroupedLoRAAdd(x, table, row[0].rows, dependent=True)
            for table, row in zip(tables, factors, strict=True)
        ]
        return joined, names, adds


def _linear_weights(members: list[AdaptedLinear], x: torch.Tensor) -> list[torch.Tensor] | None:
    """The members' base weights where ``GroupedLinearLoRA`` may compute their base outputs with their
    updates: where ``gathered_lora.linear_sizes`` gives sizes for x, every base a plain bias-free
    ``nn.Linear`` without forward hooks (its own or global) holding a contiguous weight of x's dtype;
    else None."""
    if gathered_lora.linear_sizes(x, len(members)) is None:
        return None
    bases = [m.base for m in members]
    plain = all(
        type(b) is nn.Linear
        and b.bias is None
        and b.weight.dtype == x.dtype
        and b.weight.is_contiguous()
        and not _hooked(b)
        for b in bases
    )
    return [b.weight for b in bases] if plain else None


def _still_bound(plan: _Plan | None) -> bool:
    """Whether a kept plan still holds: one that computes its members' base outputs in its own launch
    holds while each base keeps the weight it was bound to and no hook has been added to one since
    (the launch would bypass the hook, or read a replaced weight)."""
    if plan is None or not isinstance(plan[2], gathered_lora.GroupedLinearLoRA):
        return True
    joined, _, launch = plan
    if _global_forward_hooks or _global_forward_pre_hooks:
        return False
    for member, weight in zip(joined, launch.weights, strict=False):  # every step, every group: no __getattr__
        base = member._modules["base"]
        if base._parameters["weight"] is not weight or base._forward_hooks or base._forward_pre_hooks:
            return False
    return True


def _hooked(base: nn.Module) -> bool:
    """Whether a forward hook expects to see ``base`` called: one of its own, or a global one."""
    return bool(base._forward_hooks or base._forward_pre_hooks or _global_forward_hooks or _global_forward_pre_hooks)


def _launchable_together(row: list[Factors]) -> bool:
    """Whether the members' factors of one adapter can share a launch: one rank, the same rows of their
    tables, and gains and ranks given alike (a route's banks give them so)."""
    first = row[0]
    return all(
        f.rank == first.rank
        and f.rows is first.rows
        and (f.gain is None, f.ranks is None) == (first.gain is None, first.ranks is None)
        for f in row
    )


def _per_sample(member: AdaptedLinear, name: str) -> bool:
    return name in member.adapters and isinstance(member.adapters[name], PerSampleLoRA)
