"""The checkpoint tokenizer: adapters as (T, D) token grids and back, bitwise."""

from __future__ import annotations

import pytest
import torch

from adaplex import Adapted
from adaplex.errors import ConfigError
from adaplex.generator.tokenizer import (
    common_layout,
    denormalize,
    detokenize,
    group_by_layout,
    layout_of,
    normalize,
    tokenize,
    with_statistics,
)
from adaplex.methods import BottleneckConfig, LoRAConfig, MoSLoRAConfig

from helpers import randomize
from tiny import FAMILIES


def adapter_tensors(family: str, config, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    handle = Adapted.of(FAMILIES[family]().to(dtype))
    handle.add("a", config)
    randomize(handle, "a", std=0.3, seed=seed)
    return handle.state_dict("a")


LAYOUTS = {
    "lora r4 q,v": ("llama", LoRAConfig(r=4, targets=("q", "v")), torch.float32),
    "lora bf16": ("llama", LoRAConfig(r=4, targets=("q", "v")), torch.bfloat16),
    "moslora": ("llama", MoSLoRAConfig(r=2, targets=("all-linear",)), torch.float32),
    "bottleneck": ("bert", BottleneckConfig(reduction_factor=4), torch.float16),
    "gpt2 fused parts": ("gpt2", LoRAConfig(r=3, targets=("q", "v")), torch.float32),
}


@pytest.mark.parametrize("width", [384, 7, 32])
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_round_trip_is_bitwise_exact(case, width):
    family, config, dtype = LAYOUTS[case]
    tensors = adapter_tensors(family, config, dtype)
    layout = layout_of(tensors, width)
    grid = tokenize(tensors, layout)
    assert grid.shape == (layout.tokens, width) and grid.dtype == torch.float32
    assert layout.tokens == sum(-(-t.numel() // width) for t in tensors.values())
    assert not grid[layout.padding()].any()  # padding is zero
    assert int((~layout.padding()).sum()) == sum(t.numel() for t in tensors.values())
    back = detokenize(grid, layout)
    assert back.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_normalization_statistics_per_position():
    zoo = [adapter_tensors("llama", LoRAConfig(r=2, targets=("q",)), seed=s) for s in range(4)]
    layout = layout_of(zoo[0], 16)
    grids = torch.stack([tokenize(t, layout) for t in zoo])
    stats = with_statistics(layout, grids)
    pad = layout.padding()
    assert torch.allclose(stats.mean[~pad], grids.mean(0)[~pad])
    assert (stats.std[pad] == 1).all() and (stats.mean[pad] == 0).all()
    normed = normalize(grids[1], stats)
    assert torch.allclose(normed.mean(), normed.new_tensor(0.0), atol=1.0)
    assert torch.allclose(denormalize(normed, stats), grids[1], atol=1e-6)
    assert torch.equal(normalize(grids[1], layout), grids[1])  # no statistics: the identity


def test_mixed_zoos_are_grouped_or_refused_with_the_odd_ones_named():
    same = {f"r4-{i}": adapter_tensors("llama", LoRAConfig(r=4, targets=("q", "v")), seed=i) for i in range(3)}
    odd = {"r8": adapter_tensors("llama", LoRAConfig(r=8, targets=("q", "v")))}
    zoo = same | odd
    assert group_by_layout(zoo) == [list(same), ["r8"]]
    with pytest.raises(ConfigError, match=r"1 adapter\(s\) differ .* \(r8\): tensor '.*A' is float32 \[8, 32\]"):
        common_layout(zoo)
    assert common_layout(same).tokens == layout_of(same["r4-0"]).tokens


def test_a_grid_or_tensors_that_do_not_fit_the_layout_are_refused():
    tensors = adapter_tensors("llama", LoRAConfig(r=4, targets=("q",)))
    layout = layout_of(tensors, 32)
    grid = tokenize(tensors, layout)
    with pytest.raises(ConfigError, match="does not fit the layout, which needs"):
        detokenize(grid[:-1], layout)
    other = adapter_tensors("llama", LoRAConfig(r=4, targets=("v",)))
    with pytest.raises(ConfigError, match="is missing"):
        tokenize(other, layout)
    with pytest.raises(ConfigError, match="holds float32, float16 and bfloat16"):
        layout_of({"x": torch.zeros(3, dtype=torch.int64)})
