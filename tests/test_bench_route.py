"""`adaplex bench route`: peers optional, any config's shape with random weights, mixed ranks, the
bank's size (resident, and at the actual ranks) and build time."""

from __future__ import annotations

import math

import pytest

from adaplex.bench import route as bench_route
from adaplex.bench import shapes as bench_shapes
from adaplex.errors import ConfigError

import tiny


@pytest.fixture(scope="module")
def shape(tmp_path_factory):
    return tiny.save_base("llama", tmp_path_factory.mktemp("shape") / "base")


def test_shaped_model_has_random_weights_of_the_config_cut_to_layers(shape):
    model = bench_shapes.shaped_model(shape / "config.json", layers=1, dtype=tiny.torch.float32)
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    weights = model.model.layers[0].self_attn.q_proj.weight
    assert math.isclose(float(weights.detach().std()), 0.02, rel_tol=0.2)
    assert float(model.model.norm.weight.min()) == 1.0


def test_mixed_ranks_without_peers_report_the_bank_at_its_actual_ranks(shape):
    result = bench_route.run(
        adapters=(2, 4), batch=4, seq=8, ranks=(2, 4), rounds=1, peers="none", shape=shape, layers=2, profile=True
    )
    assert result["peers"] == "none" and result["rank"] == [2, 4] and result["layers"] == 2
    for row in result["results"]:  # profiled: the routed step runs more operators than the base one
        profiles = row["profiles"]
        assert set(profiles) == {"base", "adaplex-routed"}
        assert profiles["adaplex-routed"]["busy_ms"] > 0 and profiles["base"]["busy_ms"] > 0
        assert any("bmm" in op["name"] for op in profiles["adaplex-routed"]["top"])
    model = bench_shapes.shaped_model(shape, layers=2, dtype=tiny.torch.float32)
    sides = sum(m.in_features + m.out_features for n, m in model.named_modules() if n.endswith("_proj"))
    for row, ranks in zip(result["results"], ([2, 4], [2, 4, 2, 4]), strict=True):
        assert "peft_x_base" not in row and row["routed_x_base"] > 0 and row["bank_build_s"] > 0
        # the bank holds every expert at the largest rank; what the actual ranks would need is reported beside
        assert row["bank_bytes"] == sides * len(ranks) * max(ranks) * 4
        assert row["bank_bytes_at_actual_ranks"] == sides * sum(ranks) * 4


def test_peft_side_by_side_with_mixed_ranks(shape):
    result = bench_route.run(str(shape), adapters=(3,), batch=3, seq=8, ranks=(2, 3), rounds=1)
    (row,) = result["results"]
    assert row["peft_x_base"] > 0 and row["peft_x_routed"] > 0


def test_bad_peers_and_shapes_are_named(tmp_path):
    with pytest.raises(ConfigError, match="--peers 'vllm'"):
        bench_route.run(peers="vllm")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable model config"):
        bench_route.run(shape=tmp_path / "config.json", peers="none")


def test_a_paged_bank_holds_its_slots_on_the_device_and_times_their_first_use(shape):
    result = bench_route.run(
        adapters=(2, 6), batch=4, seq=8, ranks=(2,), rounds=1, peers="none", shape=shape, layers=2, slots=4
    )
    model = bench_shapes.shaped_model(shape, layers=2, dtype=tiny.torch.float32)
    sides = sum(m.in_features + m.out_features for n, m in model.named_modules() if n.endswith("_proj"))
    for row, count in zip(result["results"], (2, 6), strict=True):
        assert row["slots"] == min(4, count) and row["first_use_s"] > 0 and row["first_use_per_key_ms"] > 0
        assert row["bank_bytes"] == sides * row["slots"] * 2 * 4  # only the slots are on the device
        assert row["bank_host_bytes"] == sides * count * 2 * 4  # every expert in host memory
        assert row["routed_x_base"] > 0
    with pytest.raises(ConfigError, match="--slots 2: a batch uses up to 4 keys"):
        bench_route.run(adapters=(6,), batch=4, seq=8, peers="none", shape=shape, layers=2, slots=2)
