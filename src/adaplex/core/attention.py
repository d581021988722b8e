"""One attention function, registered with transformers' AttentionInterface as "adaplex".

Every attention layer of an adapted model calls ``adaplex_attention``. With nothing attached to
the layer it is transformers' own SDPA path, bit for bit. Prefix tuning attaches learned keys
and values to the layer (through an ``AttentionAdapters`` child module); they are prepended to
the layer's keys and values after the KV cache update, so the cache never holds them and
``generate()`` with a cache equals generation without one.

Each prefix's weight kind is resolved at the layer (site: the attention layer's path) with the
layer's input hidden states at hand (recorded as a layer with prefixes is called), the hook point of
a gate on the prefix share of attention. An observer (``AttentionObserver``: fault injection and checks
implement it) may take over computing the attention; this module knows nothing of what it does.
"""

from __future__ import annotations

import types
from typing import Any, Protocol

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from adaplex.core.stack import Stack
from adaplex.methods import Prefix, SiteWeight
from adaplex.methods.base import per_sample

ATTENTION_NAME = "adaplex"
CHILD_NAME = "adaplex_attention"


class AttentionObserver(Protocol):
    """Computes one attention layer's output instead of SDPA, e.g. to inject and detect faults."""

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float | None,
        is_causal: bool,
    ) -> torch.Tensor:
        """Attention output (B, T, H, D) over (B, H, T, D) queries and (B, H_kv, S, D) keys/values."""
        ...


class AttentionAdapters(nn.Module):
    """Adapters that act inside one attention layer, by adapter name: prefix key/values, and the gates
    of the layer's submodules (``adaplex.methods.gate``: they compute weights, attention never calls them)."""

    def __init__(self, stack: Stack, site: str) -> None:
        super().__init__()
        self.prefixes = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        self.stack = stack
        self.site = site
        self.observer: AttentionObserver | None = None  # set while a fault session is active
        self.attention_input: torch.Tensor | None = None  # the layer's input hidden states, this call

    def active_prefixes(self) -> list[tuple[Prefix, SiteWeight]]:
        """Each active prefix with its weight resolved at this layer."""
        active, hidden = self.stack.active, self.attention_input
        self.attention_input = None
        return [(p, active[n].at(self.site, p, hidden, None)) for n, p in self.prefixes.items() if n in active]

    def extend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        prefixes: list[tuple[Prefix, SiteWeight]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prepend the prefixes to key and value (B, H_kv, S, D) and open them in the mask.

        ``mask`` is transformers' boolean SDPA mask (B or 1, 1, T, S), True = attend, or None
        for a plain causal (or full) pattern, which is then built here explicitly; a full pattern
        becomes one row (B, 1, 1, P + S) shared by every query, or stays None on the CPU (where reading
        the weights costs nothing) when every prefix is present.
        """
        batch, _, q_len, _ = query.shape
        kv_len = key.shape[2]
        pk, pv = zip(*(p(w) for p, w in prefixes), strict=True)  # each (H_kv, L, D) or (B, H_kv, L, D)
        pk, pv = _joined(pk, batch, key.dtype), _joined(pv, batch, value.dtype)  # (B, H_kv, P, D)
        keys, values = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        if mask is None and not is_causal:  # every query sees every key: one row of visibility for them all
            if key.device.type == "cpu" and _all_present(prefixes):
                return keys, values, None
            row = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool, device=key.device)
            present = torch.cat([_present(w, batch, p.shape[1], row) for p, w in prefixes], dim=-1)  # (B, 1, 1, P)
            return keys, values, torch.cat([present, row], dim=-1)  # (B, 1, 1, P + S)
        mask = visible_mask(mask, q_len, kv_len, is_causal, key.device).expand(batch, 1, q_len, kv_len)
        present = torch.cat([_present(w, batch, p.shape[1], mask) for p, w in prefixes], dim=-1)  # (B, 1, 1, P)
        visible = present.expand(batch, 1, q_len, pk.shape[2])
        return keys, values, torch.cat([visible, mask], dim=-1)


def _all_present(prefixes: list[tuple[Prefix, SiteWeight]]) -> bool:
    """No prefix has a weight of 0 for any sample (read on the host: for CPU tensors only)."""
    return all(bool((per_sample(w, dims=2) != 0).all()) if isinstance(w, torch.Tensor) else w != 0 for _, w in prefixes)


def _present(weight: SiteWeight, batch: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, L) boolean: a prefix's positions are masked where its weight is 0, so that a weight of 0
    (an unrouted sample's, say) is the prefix absent, not zero keys that still draw attention."""
    if isinstance(weight, torch.Tensor):
        return (per_sample(weight, dims=4) != 0).expand(batch, 1, 1, length)
    return like.new_full((1, 1, 1, length), weight != 0).expand(batch, 1, 1, length)


def _joined(parts: tuple[torch.Tensor, ...], batch: int, dtype: torch.dtype) -> torch.Tensor:
    """Prefix keys (or values), each (H_kv, L, D) or per sample (B, H_kv, L, D), as one (B, H_kv, P, D)."""
    if all(p.dim() == 3 for p in parts):
        return torch.cat(parts, dim=1).to(dtype).unsqueeze(0).expand(batch, -1, -1, -1)
    return torch.cat([p.expand(batch, -1, -1, -1) for p in parts], dim=2).to(dtype)


def real_token_mask(q_len: int, kv_len: int, is_causal: bool, device: torch.device) -> torch.Tensor:
    """(1, 1, T, S) boolean mask; causal means query i sees keys j <= i + (S - T)."""
    if not is_causal:
        return torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (kv_len - q_len)
    return (torch.arange(kv_len, device=device).unsqueeze(0) <= rows).view(1, 1, q_len, kv_len)


def visible_mask(
    mask: torch.Tensor | None, q_len: int, kv_len: int, is_causal: bool, device: torch.device
) -> torch.Tensor:
    """Boolean visibility (True = attend) from transformers' mask: boolean as is, an additive float
    mask where it is 0, and None as the plain causal (or full) pattern."""
    if mask is None:
        return real_token_mask(q_len, kv_len, is_causal, device)
    return mask if mask.dtype == torch.bool else mask == 0


def adaplex_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over (B, H, T, D) queries and (B, H_kv, S, D) keys/values, with adapters applied."""
    adapters: AttentionAdapters | None = module._modules.get(CHILD_NAME)  # type: ignore[assignment]
    if adapters is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    prefixes = adapters.active_prefixes()
    is_causal = kwargs.pop("is_causal", None)
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if prefixes:
        key, value, attention_mask = adapters.extend(query, key, value, attention_mask, is_causal, prefixes)
        is_causal = False
    if adapters.observer is not None:
        return adapters.observer.attend(module, query, key, value, attention_mask, scaling, is_causal), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def register() -> None:
    """Make "adaplex" a valid ``attn_implementation`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, adaplex_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def attention_child(module: nn.Module, stack: Stack, site: str) -> AttentionAdapters:
    """The AttentionAdapters child of the attention layer ``module`` at path ``site``, created on first use."""
    child = module._modules.get(CHILD_NAME)
    if child is None:
        child = AttentionAdapters(stack, site)
        module.add_module(CHILD_NAME, child)
    return child  # type: ignore[return-value]


def record_input(module: nn.Module, recording: bool) -> None:
    """Make the attention layer ``module`` keep its input hidden states for its AttentionAdapters as it
    is called (where it has prefixes, whose weights may be computed from them), or stop it."""
    own = module.__dict__.get("forward")
    is_recording = own is not None and getattr(own, "__func__", None) is _forward_recording_input
    if recording and not is_recording:
        module.forward = types.MethodType(_forward_recording_input, module)
    elif not recording and is_recording:
        del module.forward


def remove_child(module: nn.Module) -> None:
    """Undo ``attention_child``: drop the child and the recording of the layer's input."""
    record_input(module, False)
    delattr(module, CHILD_NAME)


def _forward_recording_input(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The attention layer's own forward, its input hidden states kept for its AttentionAdapters.
    Bound to the instance rather than a forward pre-hook, which would put every call of the layer on
    nn.Module's slow path; bound, so a deep copy of the model records into its own child."""
    self._modules[CHILD_NAME].attention_input = args[0] if args else kwargs.get("hidden_states")
    return type(self).forward(self, *args, **kwargs)
