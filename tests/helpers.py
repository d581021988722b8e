"""Shared test helpers."""

from __future__ import annotations

import torch
from torch import nn

from adaplex import Adapted


def randomize(handle: Adapted, name: str, std: float = 0.05, seed: int = 0) -> None:
    """Give every parameter of adapter ``name`` random values, so its delta is non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters(name):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, tensor in before.items():
        assert torch.equal(tensor, after[key]), key
