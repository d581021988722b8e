"""One attention function, registered with transformers' AttentionInterface as "adaplex".

Every attention layer of an adapted model calls ``adaplex_attention``. With nothing attached to
the layer it is transformers' own SDPA path, bit for bit. Prefix tuning attaches learned keys
and values to the layer (through an ``AttentionAdapters`` child module); they are prepended to
the layer's keys and values after the KV cache update, so the cache never holds them and
``generate()`` with a cache equals generation without one.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from adaplex.compose import Stack
from adaplex.faults.eager import checked_attention
from adaplex.faults.fused import fused_checked_attention
from adaplex.faults.hook import FaultHook
from adaplex.methods.prefix import Prefix

ATTENTION_NAME = "adaplex"
CHILD_NAME = "adaplex_attention"


class AttentionAdapters(nn.Module):
    """Adapters that act inside one attention layer (prefix key/values), by adapter name."""

    def __init__(self, stack: Stack) -> None:
        super().__init__()
        self.prefixes = nn.ModuleDict()
        self.stack = stack
        self.fault_hook: FaultHook | None = None  # set while a fault session is active

    def active_prefixes(self) -> list[tuple[Prefix, float]]:
        active = self.stack.active
        return [(p, active[n]) for n, p in self.prefixes.items() if n in active]

    def extend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        prefixes: list[tuple[Prefix, float]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prepend the prefixes to key and value (B, H_kv, S, D) and open them in the mask.

        ``mask`` is transformers' boolean SDPA mask (B or 1, 1, T, S), True = attend, or None
        for a plain causal (or full) pattern, which is then built here explicitly.
        """
        batch, _, q_len, _ = query.shape
        kv_len = key.shape[2]
        pk, pv = zip(*(p(w) for p, w in prefixes), strict=True)  # each (H_kv, L, D)
        pk = torch.cat(pk, dim=1).to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H_kv, P, D)
        pv = torch.cat(pv, dim=1).to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
        mask = visible_mask(mask, q_len, kv_len, is_causal, key.device).expand(batch, 1, q_len, kv_len)
        visible = mask.new_ones(batch, 1, q_len, pk.shape[2])
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2), torch.cat([visible, mask], dim=-1)


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
    hook = adapters.fault_hook
    if hook is not None and hook.detectors.fused and hook.plan is None:
        return fused_checked_attention(module, query, key, value, attention_mask, scaling, is_causal, hook), None
    if hook is not None:
        causal = is_causal and query.shape[2] > 1
        return checked_attention(query, key, value, attention_mask, scaling, causal, hook), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def register() -> None:
    """Make "adaplex" a valid ``attn_implementation`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, adaplex_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def attention_child(module: nn.Module, stack: Stack) -> AttentionAdapters:
    """The AttentionAdapters child of an attention layer, created on first use."""
    child = module._modules.get(CHILD_NAME)
    if child is None:
        child = AttentionAdapters(stack)
        module.add_module(CHILD_NAME, child)
    return child  # type: ignore[return-value]
